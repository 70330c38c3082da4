"""SAPA-D's compiled CPU kernels on JAX: XLA FFI custom calls with a hand-written VJP.

The handlers live in ``keras_sapa/_lib/_sapa_jax.so`` beside SAPA's (the FFI targets of
the op table's ``SapaDeform`` / ``SapaDeformGrad`` entries):

- ``keras_sapa_deform_forward``: ``(query, key, value, offsets) -> (out, weights)``, the
  per-group softmax ``weights`` kept for the backward;
- ``keras_sapa_deform_backward``: ``(grad, query, key, value, offsets, weights) ->
  (dquery, dkey, dvalue, doffsets)``.

They work under ``jax.jit``, ``jax.grad`` (:func:`jax.custom_vjp`) and ``jax.vmap`` (every
leading dimension is a batch dimension for the handlers: ``vmap_method="broadcast_all"``).
The library is loaded and checked by :mod:`._jax_kernels` (disable switch, build record,
jaxlib version, CPU features); this module only registers the two extra targets. CPU
only; float32 and float64 natively, float16 / bfloat16 computed in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from keras_sapa.ops import _jax_kernels
from keras_sapa.ops import _native
from keras_sapa.ops import _optable

_FORWARD = _optable.op("SapaDeform")
_BACKWARD = _optable.op(_FORWARD.gradient)
FORWARD_TARGET, BACKWARD_TARGET = (o.bindings.xla_ffi[0] for o in (_FORWARD, _BACKWARD))


def _load():
    """(True, None) once the SAPA-D targets are registered, else (None, reason)."""
    if not _jax_kernels.available():
        return None, _jax_kernels.unavailable_reason()
    return _jax_kernels.register_ffi_targets(
        [o.bindings.xla_ffi for o in (_FORWARD, _BACKWARD)], "SAPA-D "
    )


# SAPA's loader warns about a missing or stale library; an older library without the
# SAPA-D handlers just leaves SAPA-D on its builtin formulation.
_library = _native.Library("JAX (SAPA-D)", _load, warn=False)


def available():
    """True when the SAPA-D FFI targets are registered (loads them on first call)."""
    return _library.get() is not None


def unavailable_reason():
    return _library.reason()


def usable(*tensors):
    """Whether :func:`sapa_deform` serves these tensors (JAX runs it on the CPU)."""
    del tensors
    return available()


def _attrs(num_points, up_factor, groups):
    return {
        "num_points": np.int64(num_points),
        "up_factor": np.int64(up_factor),
        "groups": np.int64(groups),
    }


def _forward(query, key, value, offsets, num_points, up_factor, groups):
    high = query.shape[:-1]
    call = jax.ffi.ffi_call(
        FORWARD_TARGET,
        (
            jax.ShapeDtypeStruct(high + (value.shape[-1],), query.dtype),
            jax.ShapeDtypeStruct(high + (groups * num_points,), query.dtype),
        ),
        vmap_method="broadcast_all",
    )
    return tuple(call(query, key, value, offsets, **_attrs(num_points, up_factor, groups)))


def _backward(grad, query, key, value, offsets, weights, num_points, up_factor, groups):
    call = jax.ffi.ffi_call(
        BACKWARD_TARGET,
        tuple(jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (query, key, value, offsets)),
        vmap_method="broadcast_all",
    )
    return tuple(
        call(grad, query, key, value, offsets, weights, **_attrs(num_points, up_factor, groups))
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(query, key, value, offsets, num_points, up_factor, groups):
    return _forward(query, key, value, offsets, num_points, up_factor, groups)[0]


def _fused_fwd(query, key, value, offsets, num_points, up_factor, groups):
    out, weights = _forward(query, key, value, offsets, num_points, up_factor, groups)
    return out, (query, key, value, offsets, weights)


def _fused_bwd(num_points, up_factor, groups, residuals, grad):
    query = residuals[0]
    return _backward(grad.astype(query.dtype), *residuals, num_points, up_factor, groups)


_fused.defvjp(_fused_fwd, _fused_bwd)


def sapa_deform(query, key, value, offsets, num_points, up_factor, groups):
    """The fused SAPA-D forward on the compiled kernels, for inputs that
    :func:`keras_sapa.ops.sapa_deform` has checked; differentiable in all four inputs
    (first order), also inside ``jax.jit`` and ``jax.vmap``. The result has ``value``'s
    dtype (half types computed in float32)."""
    if not available():
        raise RuntimeError(
            f"keras_sapa: the compiled SAPA-D kernels for JAX are unavailable: "
            f"{unavailable_reason()}"
        )
    dtypes = [jnp.asarray(t).dtype for t in (query, key, value, offsets)]
    compute = jnp.float64 if jnp.float64 in dtypes else jnp.float32
    out = _fused(
        *(jnp.asarray(t, compute) for t in (query, key, value, offsets)),
        int(num_points),
        int(up_factor),
        int(groups),
    )
    return out.astype(dtypes[2])
