"""SAPA's two primitive ops written with ``keras.ops`` only: they run on every Keras
backend, and every backend's autodiff differentiates them.

This is the ``"patches"`` formulation outside TensorFlow: the K x K windows of the
low-resolution tensor are stacked (built from K*K shifted slices of a zero-padded
copy, so K*K times its memory) and one einsum contracts them with the
high-resolution tensor, viewed as ``(B, H, s, W, s, .)`` so that the s x s output
points of one anchor share its window. Semantics: ``shared/SAPA_SPEC.md``.

    query  (B, sH, sW, d)   key   (B, H, W, d)   ->  similarity (B, sH, sW, K*K)
    weights (B, sH, sW, K*K) value (B, H, W, C)  ->  aggregate  (B, sH, sW, C)

Spatial sizes must be known (they are on JAX and PyTorch; on TensorFlow the package
uses :mod:`keras_sapa.ops._tf_builtin`, which also handles unknown sizes).
"""

from keras import ops


def high6(shape, up_factor):
    """(B, sH, sW, C) -> (B, H, s, W, s, C): the shape under which the s x s output points
    of one anchor share its window (the JAX and PyTorch formulations use it too)."""
    batch, height, width, channels = shape
    s = up_factor
    return (batch, height // s, s, width // s, s, channels)


def high4(shape6):
    """The inverse of :func:`high6`."""
    batch, height, s1, width, s2, channels = shape6
    return (batch, height * s1, width * s2, channels)


def split_high(t, up_factor):
    """(B, sH, sW, C) -> (B, H, s, W, s, C)."""
    return ops.reshape(t, high6(ops.shape(t), up_factor))


def merge_high(t6):
    """(B, H, s, W, s, C) -> (B, sH, sW, C)."""
    return ops.reshape(t6, high4(ops.shape(t6)))


def stacked_windows(t, kernel_size):
    """(B, H, W, C) -> (B, H, W, K*K, C): window n = (a + r) * K + (b + r) of every
    point, zero outside the map."""
    k = kernel_size
    r = k // 2
    _, height, width, _ = ops.shape(t)
    padded = ops.pad(t, [[0, 0], [r, r], [r, r], [0, 0]])
    windows = [
        padded[:, row : row + height, col : col + width, :] for row in range(k) for col in range(k)
    ]
    return ops.stack(windows, axis=3)


def similarity_patches(query, key, kernel_size, up_factor):
    q6 = split_high(query, up_factor)
    windows = stacked_windows(key, kernel_size)
    return merge_high(ops.einsum("bhiwjd,bhwnd->bhiwjn", q6, windows))


def aggregate_patches(weights, value, kernel_size, up_factor):
    w6 = split_high(weights, up_factor)
    windows = stacked_windows(value, kernel_size)
    return merge_high(ops.einsum("bhiwjn,bhwnc->bhiwjc", w6, windows))
