"""SAPA's compiled CPU kernels on JAX: XLA FFI custom calls with a hand-written VJP.

:func:`sapa` computes ``aggregate(softmax(similarity(query, key)), value)`` (SAPA_SPEC.md)
with the fused kernels of ``custom_ops/sapa/kernels/cpu/``, called by XLA through the FFI
handlers of ``keras_sapa/_lib/_sapa_jax.so`` (built by ``custom_ops/build.py``):

- ``keras_sapa_forward``: ``(query, key, value) -> (out, weights)``, the window softmax
  ``weights`` kept for the backward;
- ``keras_sapa_backward``: ``(grad, query, key, value, weights) -> (dquery, dkey, dvalue)``.

It works under ``jax.jit``, ``jax.grad`` (:func:`jax.custom_vjp`), ``jax.vmap`` (the
handlers treat every leading dimension as batch, so the calls are declared
``vmap_method="broadcast_all"``, and a ``custom_vmap`` rule folds vmapped axes into the
batch) and sharding (``keras.distribution.DataParallel``): each call is a
``custom_partitioning`` op that keeps the batch axis sharded, so every device runs the
kernels on its own shard instead of XLA gathering the whole batch. CPU only: on other
platforms :func:`available` is False.

The library goes through the checks of :mod:`._native` (disable switch, build record,
jaxlib version, CPU features) on the first call of :func:`available`, never at import.
The kernels are XLA custom calls, so ``"compiled"`` runs inside ``jax.jit`` as well.
float32 and float64 run natively; float16 / bfloat16 inputs are computed in float32 and
the result rounded once to ``value``'s dtype.
"""

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning

from keras_sapa.ops import _native
from keras_sapa.ops import _optable

# (FFI target, handler symbol in _sapa_jax.so) of the fused forward and backward.
_FFI = (_optable.op("Sapa").bindings.xla_ffi, _optable.op("SapaGrad").bindings.xla_ffi)
FORWARD_TARGET, BACKWARD_TARGET = (target for target, _ in _FFI)

# ------------------------------------------------------------------ facts for the dispatch
EAGER_BUILTIN = "xla"  # the builtin formulation without the kernels


def traced(tensor=None):
    """Whether ``tensor`` is a tracer (``jax.jit``, ``jax.export``, Keras's symbolic
    build); without a tensor to look at, assumed so."""
    return tensor is None or isinstance(tensor, jax.core.Tracer)


def in_xla_trace():
    """False: the kernels are XLA custom calls, at home inside ``jax.jit``."""
    return False


def exporting():
    """None: ``jax.export`` offers no public way to tell an export from a jit trace."""
    return None


def layer_supports_jit(implementation="auto"):
    """True: a SAPA layer runs inside ``jax.jit`` with every implementation."""
    return True


def _load():
    """(True, None) once the FFI targets are registered, else (False, reason)."""
    core, info = _native.load_core()
    if core is None:
        return None, _native.unavailable_reason()
    info, reason = _native.bindings_build_info("jaxlib", jaxlib.__version__)
    if info is None:
        return None, reason
    if not info.get("jax_library"):
        return None, f"the JAX library was not built ({info.get('jax_status')})"
    return register_ffi_targets(_FFI, "")


def register_ffi_targets(ffi, what):
    """Registers the ``(target, handler symbol)`` pairs ``ffi`` of ``_sapa_jax.so`` as
    XLA FFI targets for the CPU: ``(True, None)``, or ``(None, reason)``. ``what``
    names the ops in the reason (``""`` for SAPA's, ``"SAPA-D "``)."""
    path = os.path.join(_native.bindings_dir(), _native.JAX_LIBRARY)
    try:
        lib = ctypes.CDLL(path)
        handlers = [getattr(lib, symbol) for _, symbol in ffi]
    except (OSError, AttributeError) as exc:
        return (
            None,
            f"{path} failed to load or has no {what}handlers ({exc}); rebuild with "
            "`python custom_ops/build.py`",
        )
    try:
        for (target, _), handler in zip(ffi, handlers, strict=True):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    except Exception as exc:  # a JAX without these APIs, or a rejected registration
        return None, f"registering the {what}XLA FFI targets failed ({exc!r})"
    return True, None


_library = _native.Library("JAX", _load)


def _platform_problem():
    backend = jax.default_backend()
    return (
        None
        if backend == "cpu"
        else (f"the JAX bindings run on CPU only (default backend: {backend})")
    )


def available():
    """True when the compiled kernels are registered with JAX (loads them on first call).

    False, after one ``RuntimeWarning``, when the library is missing, stale, built for
    another CPU or jaxlib, or fails to load; False without a warning when
    ``KERAS_SAPA_DISABLE_COMPILED`` is set or JAX's default backend is not the CPU.
    """
    return _platform_problem() is None and _library.get() is not None


def usable(query, key, value):
    """Whether :func:`sapa` can serve these tensors: the kernels are registered (JAX runs
    them on its default backend, the CPU). The tensors may be tracers."""
    del query, key, value
    return available()


def unavailable_reason():
    """Why :func:`available` is False (None when it is True)."""
    return _platform_problem() or _library.reason()


def _reset():
    """Forgets the load attempt (tests only)."""
    _library.reset()
    _native.core.reset()


def _attrs(kernel_size, up_factor):
    return {"kernel_size": np.int64(kernel_size), "up_factor": np.int64(up_factor)}


def _forward_call(query, key, value, kernel_size, up_factor):
    high = query.shape[:-1]
    call = jax.ffi.ffi_call(
        FORWARD_TARGET,
        (
            jax.ShapeDtypeStruct(high + (value.shape[-1],), query.dtype),
            jax.ShapeDtypeStruct(high + (kernel_size * kernel_size,), query.dtype),
        ),
        vmap_method="broadcast_all",
    )
    return tuple(call(query, key, value, **_attrs(kernel_size, up_factor)))


def _backward_call(grad, query, key, value, weights, kernel_size, up_factor):
    call = jax.ffi.ffi_call(
        BACKWARD_TARGET,
        (
            jax.ShapeDtypeStruct(query.shape, query.dtype),
            jax.ShapeDtypeStruct(key.shape, key.dtype),
            jax.ShapeDtypeStruct(value.shape, value.dtype),
        ),
        vmap_method="broadcast_all",
    )
    return tuple(call(grad, query, key, value, weights, **_attrs(kernel_size, up_factor)))


# Sharding. XLA cannot look into a custom call, so by itself it gathers sharded operands
# onto every device and runs the whole batch there. Each call is therefore wrapped in
# ``custom_partitioning``: every operand and result keeps the sharding of the query's
# batch axis, all other axes replicated, and each device runs the kernel on its shard.
# ``custom_partitioning`` has no batching rule, so ``custom_vmap`` folds a vmapped axis
# into the batch axis (broadcasting unbatched operands) before the call.
_RULES = {
    "forward": "b h w d, b x y d, b x y c -> b h w c, b h w n",
    "backward": "b h w c, b h w d, b x y d, b x y c, b h w n -> b h w d, b x y d, b x y c",
}


def _batch_sharding(mesh, arg_shapes):
    spec = arg_shapes[1].sharding.spec if len(arg_shapes) > 3 else arg_shapes[0].sharding.spec
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec[0] if spec else None))


def _partitioned(body, rule, arrays):
    """``body(*arrays, kernel_size, up_factor)`` as a batch-partitioned op."""
    op = custom_partitioning(body, static_argnums=(arrays, arrays + 1))

    def partition(kernel_size, up_factor, mesh, arg_shapes, result_shape):
        sharding = _batch_sharding(mesh, arg_shapes)
        return (
            mesh,
            lambda *arrays: body(*arrays, kernel_size, up_factor),
            tuple(sharding for _ in result_shape),
            tuple(sharding for _ in arg_shapes),
        )

    def infer(kernel_size, up_factor, mesh, arg_shapes, result_shape):
        sharding = _batch_sharding(mesh, arg_shapes)
        return tuple(sharding for _ in result_shape)

    # Every factor but the batch must stay whole, listed in order of first appearance.
    factors = []
    for name in rule.replace(",", " ").replace("->", " ").split():
        if name != "b" and name not in factors:
            factors.append(name)
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=tuple(factors),
    )
    return op


_forward_op = _partitioned(_forward_call, _RULES["forward"], 3)
_backward_op = _partitioned(_backward_call, _RULES["backward"], 5)


@functools.cache
def _batched(which, kernel_size, up_factor):
    """The partitioned op for fixed sizes, with a vmap rule."""
    op = _forward_op if which == "forward" else _backward_op

    @jax.custom_batching.custom_vmap
    def call(*arrays):
        return op(*arrays, kernel_size, up_factor)

    @call.def_vmap
    def _rule(axis_size, in_batched, *arrays):
        arrays = [
            a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, batched in zip(arrays, in_batched, strict=True)
        ]
        outs = call(*(a.reshape((-1,) + a.shape[2:]) for a in arrays))
        return (
            tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs),
            tuple(True for _ in outs),
        )

    return call


def _forward(query, key, value, kernel_size, up_factor):
    return _batched("forward", kernel_size, up_factor)(query, key, value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(query, key, value, kernel_size, up_factor):
    return _forward(query, key, value, kernel_size, up_factor)[0]


def _fused_fwd(query, key, value, kernel_size, up_factor):
    out, weights = _forward(query, key, value, kernel_size, up_factor)
    return out, (query, key, value, weights)


def _fused_bwd(kernel_size, up_factor, residuals, grad):
    query, key, value, weights = residuals
    grad = grad.astype(query.dtype)
    return _batched("backward", kernel_size, up_factor)(grad, query, key, value, weights)


_fused.defvjp(_fused_fwd, _fused_bwd)


def sapa(query, key, value, kernel_size, up_factor):
    """``aggregate(softmax(similarity(query, key)), value)`` on the compiled kernels, for
    inputs that :func:`keras_sapa.ops.sapa` has checked (shapes, one floating dtype).

    Float16 and bfloat16 are computed in float32, the result rounded once to ``value``'s
    dtype. Differentiable in all three inputs (first order); works under ``jax.jit``,
    ``jax.vmap`` and batch sharding. Raises ``RuntimeError`` when the kernels are
    unavailable (see :func:`available`).
    """
    if not available():
        raise RuntimeError(
            "keras_sapa: the compiled SAPA kernels for JAX are unavailable: "
            f"{unavailable_reason()}"
        )
    dtype = jnp.asarray(value).dtype
    compute = jnp.float64 if dtype == jnp.float64 else jnp.float32
    out = _fused(*(jnp.asarray(t, compute) for t in (query, key, value)), kernel_size, up_factor)
    return out.astype(dtype)
