"""SAPA-D's compiled kernels on PyTorch: ``torch.library`` custom ops over ctypes.

Two ops (the op table's ``SapaDeform`` / ``SapaDeformGrad`` entries), on the C entry
points of ``keras_sapa/_lib/_sapa_core.so`` (``custom_ops/sapa/bindings/
sapa_deform_core_c.h``), the library :mod:`._torch_kernels` loads and checks:

- ``torch.ops.keras_sapa.sapa_deform_forward(query, key, value, offsets, num_points,
  up_factor, groups) -> (out, weights)``, the per-group softmax kept for the backward;
- ``torch.ops.keras_sapa.sapa_deform_backward(grad, query, key, value, offsets, weights,
  num_points, up_factor, groups) -> (dquery, dkey, dvalue, doffsets)``,

and the halves, ``torch.ops.keras_sapa.sapa_deform_similarity(query, key, offsets, ...)
-> (logits,)`` and ``sapa_deform_aggregate(weights, value, offsets, ...) -> (out,)`` with
their ``_backward`` ops (the gradients of all three inputs),

defined as every op of the table is (:func:`._torch_kernels.define`: fake
implementations, autograd of all four inputs), so they run eagerly and inside
``torch.compile(fullgraph=True)`` as single opaque nodes. Tensors of float32 or float64
on the CPU, or on a CUDA device where PyTorch has CUDA (the launcher's SAPA-D entry
points); :func:`sapa_deform` also takes float16 / bfloat16 in their own storage
(converted row by row inside the kernels, computed in float32).
"""

import torch

from keras_sapa.ops import _native
from keras_sapa.ops import _optable
from keras_sapa.ops import _torch_kernels

_OPS = (_optable.op("SapaDeform"), _optable.op("SapaDeformGrad"))
_HALVES = tuple(map(_optable.op, _optable.DEFORM_HALVES))
for _op in (_OPS[0], _HALVES[0], _HALVES[2]):
    _torch_kernels.define(_op)
_state = {}


@torch.compiler.assume_constant_result  # Dynamo runs it (it may load), then a constant
def available():
    """True when the core library is loaded and has the SAPA-D entry points (looked up
    once: later calls read a flag)."""
    if not _torch_kernels.available():
        return False
    if "entries" not in _state:
        lib = _torch_kernels._library_handle()
        _state["entries"] = all(_native.entry_point(lib, o, "f32") for o in _OPS)
    return _state["entries"]


def unavailable_reason():
    reason = _torch_kernels.unavailable_reason()
    if reason is None and not available():
        reason = "the core library predates SAPA-D (rebuild: `python custom_ops/build.py`)"
    return reason


def usable(*tensors):
    """Whether :func:`sapa_deform` serves these tensors: kernels loaded, and the tensors
    on a device they serve (:func:`._torch_kernels.serves`)."""
    return available() and _torch_kernels.serves(_OPS, tensors)


def halves_usable(*tensors):
    """Whether :func:`deform_similarity` and :func:`deform_aggregate` serve these tensors:
    the core has the halves' entry points (a core built before them has not) and the
    tensors (if any are given) are on a device they serve."""
    if not available():
        return False
    if "halves" not in _state:
        lib = _torch_kernels._library_handle()
        _state["halves"] = all(_native.entry_point(lib, o, "f32") for o in _HALVES)
    return _state["halves"] and (not tensors or _torch_kernels.serves(_HALVES, tensors))


def _half(op, tensors, num_points, up_factor, groups):
    return _torch_kernels.torch_op(op)(*tensors, int(num_points), int(up_factor), int(groups))


def deform_similarity(query, key, offsets, num_points, up_factor, groups):
    """SAPA-D's similarity on the compiled kernels -> logits ``(B, sH, sW, G*P)``, for
    float32 or float64 tensors of one dtype that :func:`keras_sapa.ops.deform_similarity`
    has checked; differentiable in all three (first order), eagerly or inside
    ``torch.compile``."""
    return _half(_HALVES[0], (query, key, offsets), num_points, up_factor, groups)


def deform_aggregate(weights, value, offsets, num_points, up_factor, groups):
    """SAPA-D's aggregation on the compiled kernels -> ``(B, sH, sW, C)``, for float32 or
    float64 tensors of one dtype that :func:`keras_sapa.ops.deform_aggregate` has checked;
    differentiable in all three (first order)."""
    return _half(_HALVES[2], (weights, value, offsets), num_points, up_factor, groups)


def sapa_deform(query, key, value, offsets, num_points, up_factor, groups):
    """The fused SAPA-D forward on the compiled kernels, for tensors that
    :func:`keras_sapa.ops.sapa_deform` has checked; differentiable in all four inputs
    (first order), eagerly or inside ``torch.compile``. The result has ``value``'s dtype
    (half types stored as they are, computed in float32)."""
    attrs = {"num_points": num_points, "up_factor": up_factor, "groups": groups}
    return _torch_kernels.run(_OPS[0], (query, key, value, offsets), attrs)
