"""SAPA-D's compiled kernels on JAX: XLA FFI custom calls with a hand-written VJP.

The handlers live in ``keras_sapa/_lib/_sapa_jax.so`` beside SAPA's (the FFI targets of
the op table's ``SapaDeform`` / ``SapaDeformGrad`` entries):

- ``keras_sapa_deform_forward``: ``(query, key, value, offsets) -> (out, weights)``, the
  per-group softmax ``weights`` kept for the backward;
- ``keras_sapa_deform_backward``: ``(grad, query, key, value, offsets, weights) ->
  (dquery, dkey, dvalue, doffsets)``.

They are bound as every op of the table is (:func:`._jax_kernels.run`): under
``jax.jit``, ``jax.grad``, ``jax.vmap`` and batch sharding. The library is loaded and
checked by :mod:`._jax_kernels` (disable switch, build record, jaxlib version, CPU
features); this module only registers the two extra targets (CPU, and CUDA where JAX
has it). float32 and float64 natively, float16 / bfloat16 computed in float32.
"""

from keras_sapa.ops import _jax_kernels
from keras_sapa.ops import _native
from keras_sapa.ops import _optable

_OPS = (_optable.op("SapaDeform"), _optable.op("SapaDeformGrad"))


def _load():
    """The registration (see :func:`._jax_kernels.register_ffi_targets`) of the SAPA-D
    targets, else (None, reason)."""
    if _jax_kernels._library.get() is None:
        return None, _jax_kernels.unavailable_reason()
    return _jax_kernels.register_ffi_targets(_OPS, "SAPA-D ")


# SAPA's loader warns about a missing or stale library; an older library without the
# SAPA-D handlers just leaves SAPA-D on its builtin formulation.
_library = _native.Library("JAX (SAPA-D)", _load, warn=False)


def available():
    """True when the SAPA-D FFI targets are registered for JAX's default backend (loads
    them on first call)."""
    return _library.get() is not None and _jax_kernels.platform_problem(_library) is None


def unavailable_reason():
    return _library.reason() or _jax_kernels.platform_problem(_library)


def usable(*tensors):
    """Whether :func:`sapa_deform` serves these tensors (JAX's default backend)."""
    del tensors
    return available()


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
    attrs = {"num_points": num_points, "up_factor": up_factor, "groups": groups}
    return _jax_kernels.run("SapaDeform", (query, key, value, offsets), attrs)
