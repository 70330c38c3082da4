"""SAPA-D's compiled CPU kernels on PyTorch: ``torch.library`` custom ops over ctypes.

Two ops (the op table's ``SapaDeform`` / ``SapaDeformGrad`` entries), on the C entry
points of ``keras_sapa/_lib/_sapa_core.so`` (``custom_ops/sapa/bindings/
sapa_deform_core_c.h``), the library :mod:`._torch_kernels` loads and checks:

- ``torch.ops.keras_sapa.sapa_deform_forward(query, key, value, offsets, num_points,
  up_factor, groups) -> (out, weights)``, the per-group softmax kept for the backward;
- ``torch.ops.keras_sapa.sapa_deform_backward(grad, query, key, value, offsets, weights,
  num_points, up_factor, groups) -> (dquery, dkey, dvalue, doffsets)``,

with ``register_autograd`` (first-order gradients of all four inputs) and fake
implementations, so they run eagerly and inside ``torch.compile(fullgraph=True)`` as
single opaque nodes. CPU tensors of float32 or float64; :func:`sapa_deform` computes
float16 / bfloat16 in float32.
"""

import ctypes

import torch

from keras_sapa.ops import _optable
from keras_sapa.ops import _torch_kernels

_NATIVE = {torch.float32: "f32", torch.float64: "f64"}
_FORWARD = _optable.op("SapaDeform").bindings
_BACKWARD = _optable.op("SapaDeformGrad").bindings
_state = {}


def _entry(bindings, dtype):
    """The C function of an op for a dtype, its signature declared on first use of each
    library handle (the loader may hand out a new one after a reset, whose functions
    start undeclared: int64 sizes would then go through as C ints); None when the
    library predates SAPA-D."""
    lib = _torch_kernels._library_handle()
    name = f"{bindings.c_abi}_{_NATIVE[dtype]}"
    fn = getattr(lib, name, None)
    if fn is not None and fn.argtypes is None:
        pointers = 6 if bindings is _FORWARD else 10
        fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * 8
        fn.restype = ctypes.c_int
    return fn


def available():
    """True when the core library is loaded and has the SAPA-D entry points (looked up
    once: later calls, inside ``torch.compile`` too, read a flag)."""
    if not _torch_kernels.available():
        return False
    if "entries" not in _state:
        _state["entries"] = _entry(_FORWARD, torch.float32) is not None
    return _state["entries"]


def unavailable_reason():
    reason = _torch_kernels.unavailable_reason()
    if reason is None and not available():
        reason = "the core library predates SAPA-D (rebuild: `python custom_ops/build.py`)"
    return reason


def usable(*tensors):
    """Whether :func:`sapa_deform` serves these tensors: kernels loaded, all on the CPU."""
    return available() and all(t.device.type == "cpu" for t in tensors)


def _sizes(key, value, num_points, up_factor, groups):
    batch, height, width, dim = key.shape
    return (batch, height, width, up_factor, num_points, groups, dim, value.shape[-1])


def _check_native(*tensors):
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in _NATIVE or t.dtype != tensors[0].dtype:
            raise ValueError(
                "keras_sapa.sapa_deform_forward/backward take CPU tensors of one dtype, "
                "float32 or float64. Received: "
                f"{[(str(x.dtype), x.device.type) for x in tensors]}"
            )


def _call(bindings, tensors, sizes):
    rc = _entry(bindings, tensors[0].dtype)(*(t.data_ptr() for t in tensors), *sizes)
    if rc != 0:
        raise RuntimeError(f"{bindings.c_abi} failed (code {rc})")


@torch.library.custom_op(_FORWARD.torch, mutates_args=(), device_types="cpu")
def sapa_deform_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    num_points: int,
    up_factor: int,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused SAPA-D forward on CPU: ``(out, weights)`` (see the module docs)."""
    _check_native(query, key, value, offsets)
    query, key, value, offsets = (t.contiguous() for t in (query, key, value, offsets))
    high = tuple(query.shape[:-1])
    out = query.new_empty(high + (value.shape[-1],))
    weights = query.new_empty(high + (groups * num_points,))
    _call(
        _FORWARD,
        (query, key, value, offsets, out, weights),
        _sizes(key, value, num_points, up_factor, groups),
    )
    return out, weights


@sapa_deform_forward.register_fake
def _(query, key, value, offsets, num_points, up_factor, groups):
    high = tuple(query.shape[:-1])
    return (
        query.new_empty(high + (value.shape[-1],)),
        query.new_empty(high + (groups * num_points,)),
    )


@torch.library.custom_op(_BACKWARD.torch, mutates_args=(), device_types="cpu")
def sapa_deform_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    num_points: int,
    up_factor: int,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused SAPA-D backward on CPU: ``(dquery, dkey, dvalue, doffsets)``."""
    tensors = [t.contiguous() for t in (grad, query, key, value, offsets, weights)]
    _check_native(*tensors)
    grads = [torch.empty_like(t) for t in tensors[1:5]]
    _call(_BACKWARD, (*tensors, *grads), _sizes(key, value, num_points, up_factor, groups))
    return tuple(grads)


@sapa_deform_backward.register_fake
def _(grad, query, key, value, offsets, weights, num_points, up_factor, groups):
    return tuple(torch.empty_like(t) for t in (query, key, value, offsets))


def _setup_context(ctx, inputs, output):
    query, key, value, offsets, num_points, up_factor, groups = inputs
    ctx.save_for_backward(query, key, value, offsets, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.sizes = (num_points, up_factor, groups)


def _backward(ctx, grad_out, grad_weights):
    if grad_out is None:
        return (None,) * 7
    grads = sapa_deform_backward(grad_out, *ctx.saved_tensors, *ctx.sizes)
    return (*grads, None, None, None)


sapa_deform_forward.register_autograd(_backward, setup_context=_setup_context)


def sapa_deform(query, key, value, offsets, num_points, up_factor, groups):
    """The fused SAPA-D forward on the compiled kernels, for CPU tensors that
    :func:`keras_sapa.ops.sapa_deform` has checked; differentiable in all four inputs
    (first order), eagerly or inside ``torch.compile``. The result has ``value``'s dtype
    (half types computed in float32)."""
    _torch_kernels._library_handle()
    dtype = value.dtype
    dtypes = {t.dtype for t in (query, key, value, offsets)}
    compute = torch.float64 if torch.float64 in dtypes else torch.float32
    out, _ = sapa_deform_forward(
        *(t.to(compute) for t in (query, key, value, offsets)),
        int(num_points),
        int(up_factor),
        int(groups),
    )
    return out.to(dtype)
