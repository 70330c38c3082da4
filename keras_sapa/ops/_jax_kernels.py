"""SAPA's compiled CPU kernels on JAX: XLA FFI custom calls with a hand-written VJP.

:func:`sapa` computes ``aggregate(softmax(similarity(query, key)), value)`` (SAPA_SPEC.md)
with the fused kernels of ``custom_ops/sapa/kernels/cpu/``, called by XLA through the FFI
handlers of ``keras_sapa/_lib/_sapa_jax.so`` (built by ``custom_ops/build_bindings.py``):

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

The library is loaded on the first call of :func:`available` (or :func:`sapa`), never at
import. A missing, stale or broken library gives one ``RuntimeWarning``; ``available()``
is then False and :func:`unavailable_reason` says why, so callers use the pure path.
float32 and float64 run natively; float16 / bfloat16 inputs are computed in float32 and
the result rounded once to ``value``'s dtype.
"""

import ctypes
import functools
import os
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning

from keras_sapa.ops import _checks
from keras_sapa.ops import _native

FORWARD_TARGET = "keras_sapa_forward"
BACKWARD_TARGET = "keras_sapa_backward"

_lock = threading.RLock()
_state = {"tried": False, "ok": False, "reason": None}


def _load():
    """(True, None) once the FFI targets are registered, else (False, reason)."""
    if jax.default_backend() != "cpu":
        return False, f"the JAX bindings run on CPU only (default backend: {jax.default_backend()})"
    core, info = _native.load_core()
    if core is None:
        return False, _native.unavailable_reason()
    if not info.get("jax_library"):
        return False, f"the JAX library was not built ({info.get('jax_status')})"
    path = os.path.join(_native.library_dir(), _native.JAX_LIBRARY)
    try:
        lib = ctypes.CDLL(path)
        handlers = (lib.KerasSapaForward, lib.KerasSapaBackward)
    except (OSError, AttributeError) as exc:
        return False, f"{path} failed to load ({exc})"
    try:
        for name, handler in zip((FORWARD_TARGET, BACKWARD_TARGET), handlers):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    except Exception as exc:  # a JAX without these APIs, or a rejected registration
        return False, f"registering the XLA FFI targets failed ({exc!r})"
    return True, None


def available():
    """True when the compiled kernels are registered with JAX (loads them on first call).

    False, after one ``RuntimeWarning``, when the library is missing, stale, built for
    another CPU or fails to load; False without a warning when
    ``KERAS_SAPA_DISABLE_COMPILED=1`` or when JAX's default backend is not the CPU.
    """
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _state["ok"], _state["reason"] = _load()
            # Disabled on purpose, or another platform: not a broken install, no warning.
            if not _state["ok"] and not _native.disabled() and jax.default_backend() == "cpu":
                warnings.warn(
                    "keras_sapa: the compiled SAPA kernels for JAX are unavailable, the pure "
                    f"JAX path is used instead: {_state['reason']}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _state["ok"]


def usable(query, key, value):
    """Whether :func:`sapa` can serve these tensors: the kernels are registered (JAX runs
    them on its default backend, the CPU). The tensors may be tracers."""
    del query, key, value  # placement is JAX's default backend, checked by available()
    return available()


def unavailable_reason():
    """Why :func:`available` is False (None when it is True or was not called)."""
    return _state["reason"]


def _reset():
    """Forgets the load attempt (tests only)."""
    with _lock:
        _state.update(tried=False, ok=False, reason=None)
        _native._reset()


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
        return (mesh, lambda *arrays: body(*arrays, kernel_size, up_factor),
                tuple(sharding for _ in result_shape), tuple(sharding for _ in arg_shapes))

    def infer(kernel_size, up_factor, mesh, arg_shapes, result_shape):
        sharding = _batch_sharding(mesh, arg_shapes)
        return tuple(sharding for _ in result_shape)

    # Every factor but the batch must stay whole, listed in order of first appearance.
    factors = []
    for name in rule.replace(",", " ").replace("->", " ").split():
        if name != "b" and name not in factors:
            factors.append(name)
    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=rule, need_replication_factors=tuple(factors))
    return op


_forward_op = _partitioned(_forward_call, _RULES["forward"], 3)
_backward_op = _partitioned(_backward_call, _RULES["backward"], 5)


@functools.lru_cache(maxsize=None)
def _batched(which, kernel_size, up_factor):
    """The partitioned op for fixed sizes, with a vmap rule."""
    op = _forward_op if which == "forward" else _backward_op

    @jax.custom_batching.custom_vmap
    def call(*arrays):
        return op(*arrays, kernel_size, up_factor)

    @call.def_vmap
    def _rule(axis_size, in_batched, *arrays):
        arrays = [a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
                  for a, batched in zip(arrays, in_batched)]
        outs = call(*(a.reshape((-1,) + a.shape[2:]) for a in arrays))
        return (tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs),
                tuple(True for _ in outs))

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


def sapa(query, key, value, kernel_size=5, up_factor=2):
    """``aggregate(softmax(similarity(query, key)), value)`` on the compiled kernels.

    Args:
        query: ``(B, s*H, s*W, d)`` high-resolution query.
        key: ``(B, H, W, d)`` low-resolution key.
        value: ``(B, H, W, C)`` low-resolution value.
        kernel_size: odd window size K.
        up_factor: integer upsampling factor s.

    Returns:
        ``(B, s*H, s*W, C)`` in ``value``'s dtype. Differentiable in all three inputs
        (first order).

    Raises:
        ValueError: bad ``kernel_size`` / ``up_factor`` or mismatched shapes.
        RuntimeError: the compiled kernels are unavailable (see :func:`available`).
    """
    kernel_size = _checks.check_kernel_size(kernel_size)
    up_factor = _checks.check_up_factor(up_factor)
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    # Sizes that are not ints (symbolic, as in Keras's shape inference) are not checked.
    shapes = [tuple(d if isinstance(d, int) else None for d in t.shape) for t in (query, key, value)]
    _checks.check_pair("query", shapes[0], "key", shapes[1], up_factor, last_dim="equal")
    _checks.check_pair("query", shapes[0], "value", shapes[2], up_factor)
    if not available():
        raise RuntimeError(
            "keras_sapa: the compiled SAPA kernels for JAX are unavailable: "
            f"{unavailable_reason()}"
        )
    dtypes = {query.dtype, key.dtype, value.dtype}
    compute = jnp.float64 if jnp.dtype(jnp.float64) in dtypes else jnp.float32
    out = _fused(
        query.astype(compute), key.astype(compute), value.astype(compute), kernel_size,
        up_factor,
    )
    return out.astype(value.dtype)
