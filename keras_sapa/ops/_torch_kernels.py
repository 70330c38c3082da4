"""SAPA's compiled CPU kernels on PyTorch: ``torch.library`` custom ops over ctypes.

:func:`sapa` computes ``aggregate(softmax(similarity(query, key)), value)`` (SAPA_SPEC.md)
with the fused kernels of ``custom_ops/sapa/kernels/cpu/``, through the C entry points of
``keras_sapa/_lib/_sapa_core.so`` (built by ``custom_ops/build.py``). Two ops:

- ``torch.ops.keras_sapa.sapa_forward(query, key, value, kernel_size, up_factor)
  -> (out, weights)``, the window softmax ``weights`` kept for the backward;
- ``torch.ops.keras_sapa.sapa_backward(grad, query, key, value, weights, kernel_size,
  up_factor) -> (dquery, dkey, dvalue)``,

with ``register_autograd`` (first-order gradients in all three inputs) and fake
implementations, so they run eagerly and inside ``torch.compile(fullgraph=True)`` graphs
as single opaque nodes. CPU tensors of float32 or float64; :func:`sapa` computes float16 /
bfloat16 in float32 and rounds the result once to ``value``'s dtype.

The core library goes through the checks of :mod:`._native` (disable switch, build
record, CPU features; ctypes ties it to no PyTorch version) on the first call of
:func:`available`, never at import (importing this module only registers the op schemas).
"""

import torch

from keras_sapa.ops import _native
from keras_sapa.ops import _optable

_NATIVE = {torch.float32: "f32", torch.float64: "f64"}
_FORWARD, _BACKWARD = (_optable.op(name).bindings for name in ("Sapa", "SapaGrad"))

# ------------------------------------------------------------------ facts for the dispatch
EAGER_BUILTIN = "xla"  # the builtin formulation without the kernels


def traced(tensor=None):
    """Whether ``torch.compile`` (Dynamo) is tracing."""
    return torch.compiler.is_compiling()


def in_xla_trace():
    """False: ``torch.compile`` keeps the custom ops as opaque nodes."""
    return False


def exporting():
    """Whether ``torch.onnx`` or ``torch.export`` is tracing (public API)."""
    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def layer_supports_jit(implementation="auto"):
    """True: a SAPA layer runs inside ``torch.compile`` with every implementation."""
    return True


_library = _native.Library(
    "PyTorch", lambda: (_native.load_core()[0], _native.unavailable_reason())
)


def available():
    """True when the compiled kernels are loaded (loads them on first call).

    False, after one ``RuntimeWarning``, when the library is missing, stale, built for
    another CPU or fails to load; False without a warning when
    ``KERAS_SAPA_DISABLE_COMPILED`` is set. The kernels take CPU tensors only.
    """
    return _library.get() is not None


def usable(query, key, value):
    """Whether :func:`sapa` can serve these tensors: the kernels are loaded and all three
    tensors are on the CPU (CUDA tensors need the builtin formulation)."""
    return available() and all(t.device.type == "cpu" for t in (query, key, value))


def unavailable_reason():
    """Why :func:`available` is False (None when it is True)."""
    return _library.reason()


def _reset():
    """Forgets the load attempt (tests only)."""
    _library.reset()
    _native.core.reset()


def _library_handle():
    if not available():
        raise RuntimeError(
            "keras_sapa: the compiled SAPA kernels for PyTorch are "
            f"unavailable: {unavailable_reason()}"
        )
    return _library.get()


def _sizes(key, value, kernel_size, up_factor):
    batch, height, width, dim = key.shape
    return (batch, height, width, up_factor, kernel_size, dim, value.shape[-1])


def _check_native(*tensors):
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in _NATIVE or t.dtype != tensors[0].dtype:
            raise ValueError(
                "keras_sapa.sapa_forward/backward take CPU tensors of one dtype, float32 or "
                f"float64. Received: {[(str(x.dtype), x.device.type) for x in tensors]}"
            )


@torch.library.custom_op(_FORWARD.torch, mutates_args=(), device_types="cpu")
def sapa_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int, up_factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused SAPA forward on CPU: ``(out, weights)`` (see the module docs)."""
    _check_native(query, key, value)
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    high = tuple(query.shape[:-1])
    out = query.new_empty(high + (value.shape[-1],))
    weights = query.new_empty(high + (kernel_size * kernel_size,))
    fn = getattr(_library_handle(), f"{_FORWARD.c_abi}_{_NATIVE[query.dtype]}")
    rc = fn(
        query.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        out.data_ptr(),
        weights.data_ptr(),
        *_sizes(key, value, kernel_size, up_factor),
    )
    if rc != 0:
        raise RuntimeError(f"keras_sapa_forward failed (code {rc})")
    return out, weights


@sapa_forward.register_fake
def _(query, key, value, kernel_size, up_factor):
    high = tuple(query.shape[:-1])
    return (
        query.new_empty(high + (value.shape[-1],)),
        query.new_empty(high + (kernel_size * kernel_size,)),
    )


@torch.library.custom_op(_BACKWARD.torch, mutates_args=(), device_types="cpu")
def sapa_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: torch.Tensor,
    kernel_size: int,
    up_factor: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused SAPA backward on CPU: ``(dquery, dkey, dvalue)`` (see the module docs)."""
    _check_native(grad, query, key, value, weights)
    grad, query, key, value, weights = (t.contiguous() for t in (grad, query, key, value, weights))
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    fn = getattr(_library_handle(), f"{_BACKWARD.c_abi}_{_NATIVE[query.dtype]}")
    rc = fn(
        grad.data_ptr(),
        query.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        weights.data_ptr(),
        dq.data_ptr(),
        dk.data_ptr(),
        dv.data_ptr(),
        *_sizes(key, value, kernel_size, up_factor),
    )
    if rc != 0:
        raise RuntimeError(f"keras_sapa_backward failed (code {rc})")
    return dq, dk, dv


@sapa_backward.register_fake
def _(grad, query, key, value, weights, kernel_size, up_factor):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, kernel_size, up_factor = inputs
    ctx.save_for_backward(query, key, value, output[1])
    ctx.mark_non_differentiable(output[1])
    # No zero-filled gradient for `weights` (it is never differentiated): None instead.
    ctx.set_materialize_grads(False)
    ctx.kernel_size, ctx.up_factor = kernel_size, up_factor


def _backward(ctx, grad_out, grad_weights):
    query, key, value, weights = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    dq, dk, dv = sapa_backward(
        grad_out, query, key, value, weights, ctx.kernel_size, ctx.up_factor
    )
    return dq, dk, dv, None, None


sapa_forward.register_autograd(_backward, setup_context=_setup_context)


def sapa(query, key, value, kernel_size, up_factor):
    """``aggregate(softmax(similarity(query, key)), value)`` on the compiled kernels, for
    CPU tensors that :func:`keras_sapa.ops.sapa` has checked (shapes, one floating dtype).

    Float16 and bfloat16 are computed in float32, the result rounded once to ``value``'s
    dtype. Differentiable in all three inputs (first order), eagerly or inside
    ``torch.compile(fullgraph=True)``. Raises ``RuntimeError`` when the kernels are
    unavailable (see :func:`available`).
    """
    _library_handle()
    dtype = value.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    out, _ = sapa_forward(
        query.to(compute), key.to(compute), value.to(compute), kernel_size, up_factor
    )
    return out.to(dtype)
