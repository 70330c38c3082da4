"""SAPA-D's compiled kernels on TensorFlow: the ``KerasSapa>SapaDeform`` custom op and
its gradient ``KerasSapa>SapaDeformGrad``, from the same library as SAPA's
(:mod:`._tf_kernels` loads it; the op table :mod:`._optable` describes both ops).

The op runs the fused CPU kernels of ``custom_ops/sapa/kernels/cpu/sapa_deform_cpu.h``:
forward ``(query, key, value, offsets) -> (output, weights)``, the per-group softmax
``weights`` kept for the backward, which gives the gradients of all four inputs without
materialising any sampled copy of key or value. float16 and bfloat16 compute in float32
inside the kernel (the softmax stays float32), float64 in float64. It has no GPU kernel
yet: TensorFlow places it on the CPU.
"""

import tensorflow as tf

from keras_sapa.ops import _optable
from keras_sapa.ops import _tf_kernels

_FORWARD = _optable.op("SapaDeform")
_BACKWARD = _optable.op(_FORWARD.gradient)
_FORWARD_FN = _tf_kernels._python_name(_FORWARD.name)  # keras_sapa_sapa_deform
_BACKWARD_FN = _tf_kernels._python_name(_BACKWARD.name)


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
    """Whether :func:`sapa_deform` serves these tensors (any device: the op runs on CPU)."""
    del tensors
    return available()


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


@tf.RegisterGradient(_FORWARD.tf_name)
def _sapa_deform_gradient(op, grad, unused_weights_grad):
    # The table's gradient op: grad of the output, then `gradient_inputs` (the forward's
    # inputs and its saved softmax); one gradient per differentiable input.
    if grad is None:
        return [None] * len(_FORWARD.inputs)
    tensors = dict(
        zip(
            [t.name for t in _FORWARD.inputs + _FORWARD.outputs],
            list(op.inputs) + list(op.outputs),
            strict=True,
        )
    )
    return getattr(_tf_kernels._ops(), _BACKWARD_FN)(
        grad,
        *(tensors[name] for name in _FORWARD.gradient_inputs),
        **{a.name: op.get_attr(a.name) for a in _FORWARD.attrs},
    )
