"""SAPA-D's compiled kernels on TensorFlow: the ``KerasSapa>SapaDeform`` custom op and
its gradient ``KerasSapa>SapaDeformGrad``, and the halves ``KerasSapa>DeformSimilarity``
and ``KerasSapa>DeformAggregate`` with their gradient ops, from the same library as
SAPA's (:mod:`._tf_kernels` loads it and registers every op's gradient; the op table
:mod:`._optable` describes them).

The op runs the fused kernels: on the CPU those of
``custom_ops/sapa/kernels/cpu/sapa_deform_cpu.h``, on a GPU the CUDA kernels of
``custom_ops/sapa/kernels/cuda/sapa_deform_kernels.cuh`` through the launcher (the GPU
library's ``DEVICE_GPU`` kernels, checked at first use with SAPA's: :mod:`._tf_kernels`).
Forward ``(query, key, value, offsets) -> (output, weights)``, the per-group softmax
``weights`` kept for the backward, which gives the gradients of all four inputs without
materialising any sampled copy of key or value. float16 and bfloat16 compute in float32
inside the kernel (the softmax stays float32), float64 in float64. The halves
(:func:`deform_similarity`, :func:`deform_aggregate`) take float32 or float64 (the public
ops compute half types in float32); their gradient ops give the gradients of all three
inputs, offsets included.
"""

import tensorflow as tf

from keras_sapa.ops import _optable
from keras_sapa.ops import _tf_kernels

_FORWARD = _optable.op("SapaDeform")
_FORWARD_FN = _tf_kernels._python_name(_FORWARD.name)  # keras_sapa_sapa_deform
_HALVES = ("DeformSimilarity", "DeformAggregate")


def available():
    """True when the loaded custom op library has the SAPA-D ops (libraries built before
    them still serve SAPA's)."""
    module = _tf_kernels.load_library()
    return module is not None and hasattr(module, _FORWARD_FN)


def unavailable_reason():
    """Why :func:`available` is False (None when it is True)."""
    reason = _tf_kernels.unavailable_reason()
    if reason is None and not available():
        reason = (
            f"the library at {_tf_kernels.library_path()} predates the SAPA-D ops "
            "(rebuild it with `python custom_ops/build.py`)"
        )
    return reason


def usable(*tensors):
    """Whether :func:`sapa_deform` serves these tensors (on the CPU, or on a GPU when the
    GPU library passed its first-use check; else the library is not used at all)."""
    del tensors
    return available()


def halves_usable(*tensors):
    """Whether :func:`deform_similarity` and :func:`deform_aggregate` serve these tensors:
    the loaded library has the halves' ops (on the CPU, and on a GPU as :func:`usable`
    says)."""
    module = _tf_kernels.load_library() if usable(*tensors) else None
    return module is not None and all(
        hasattr(module, _tf_kernels._python_name(n)) for n in _HALVES
    )


def _half(name, tensors, num_points, up_factor, groups):
    return getattr(_tf_kernels._ops(), _tf_kernels._python_name(name))(
        *tensors, **_attrs(num_points, up_factor, groups)
    )


def deform_similarity(query, key, offsets, num_points, up_factor, groups):
    """``KerasSapa>DeformSimilarity`` -> logits ``(B, sH, sW, G*P)``, for float32 or
    float64 tensors of one dtype that :func:`keras_sapa.ops.deform_similarity` has
    checked; differentiable in all three."""
    return _half("DeformSimilarity", (query, key, offsets), num_points, up_factor, groups)


def deform_aggregate(weights, value, offsets, num_points, up_factor, groups):
    """``KerasSapa>DeformAggregate`` -> ``(B, sH, sW, C)``, for float32 or float64 tensors
    of one dtype that :func:`keras_sapa.ops.deform_aggregate` has checked; differentiable
    in all three."""
    return _half("DeformAggregate", (weights, value, offsets), num_points, up_factor, groups)


def _attrs(num_points, up_factor, groups):
    return {"num_points": int(num_points), "up_factor": int(up_factor), "groups": int(groups)}


def _weights_dtype(dtype):
    return tf.float64 if dtype == tf.float64 else tf.float32


def sapa_deform_with_weights(query, key, value, offsets, num_points, up_factor, groups):
    """``KerasSapa>SapaDeform`` -> ``(output, weights)`` for tensors of one float dtype;
    ``weights`` (B, sH, sW, G*P) is the per-group softmax (float32 for half, bfloat16 and
    float32 inputs, float64 for float64), not differentiable."""
    return getattr(_tf_kernels._ops(), _FORWARD_FN)(
        query,
        key,
        value,
        offsets,
        Tweights=_weights_dtype(tf.as_dtype(query.dtype)),
        **_attrs(num_points, up_factor, groups),
    )


def sapa_deform(query, key, value, offsets, num_points, up_factor, groups):
    """The fused SAPA-D forward on the compiled kernels, for inputs of one float dtype
    that :func:`keras_sapa.ops.sapa_deform` has checked; differentiable in all four."""
    return sapa_deform_with_weights(query, key, value, offsets, num_points, up_factor, groups)[0]


# The gradients (KerasSapa>SapaDeformGrad, DeformSimilarityGrad and DeformAggregateGrad, as
# the op table states them) are registered with the other ops' in _tf_kernels.
