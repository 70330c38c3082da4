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

#: The two contractions of the ops, on the high-resolution tensor viewed as
#: ``(B, H, s, W, s, .)`` and the stacked windows ``(B, H, W, K*K, .)``.
SIMILARITY_EQUATION = "bhiwjd,bhwnd->bhiwjn"
AGGREGATE_EQUATION = "bhiwjn,bhwnc->bhiwjc"


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


def weighted_window_sum(w6, windows):
    """``sum_n w6[..., n] * window_n``, one window offset at a time, for ``w6`` of shape
    ``(B, H, s, W, s, K*K)`` and ``windows`` yielding ``(n, window_n)`` of shape
    ``(B, H, W, C)``: the aggregation as a loop that XLA fuses without materialising
    the windows. Indexing and arithmetic only, so it runs on the tensors of any
    framework (the TensorFlow and JAX formulations use it)."""
    out = None
    for n, window in windows:
        term = w6[..., n : n + 1] * window[:, :, None, :, None, :]
        out = term if out is None else out + term
    return out


def window_op_pair(window_op, similarity, aggregate):
    """``(similarity_xla, aggregate_xla)`` from a backend's ``window_op(forward,
    transpose, grad_is_window, doc)`` and its two window primitives: the gradient of
    either op with respect to its high-resolution input is the other op applied to the
    upstream gradient; with respect to its low-resolution input it scatters the K*K-channel
    tensor (the upstream gradient of the similarity, the weights of the aggregation)."""
    return (
        window_op(
            similarity, aggregate, True, "``(B, sH, sW, d) x (B, H, W, d) -> (B, sH, sW, K*K)``."
        ),
        window_op(
            aggregate, similarity, False, "``(B, sH, sW, K*K) x (B, H, W, C) -> (B, sH, sW, C)``."
        ),
    )


def similarity_patches(query, key, kernel_size, up_factor):
    q6 = split_high(query, up_factor)
    windows = stacked_windows(key, kernel_size)
    return merge_high(ops.einsum(SIMILARITY_EQUATION, q6, windows))


def aggregate_patches(weights, value, kernel_size, up_factor):
    w6 = split_high(weights, up_factor)
    windows = stacked_windows(value, kernel_size)
    return merge_high(ops.einsum(AGGREGATE_EQUATION, w6, windows))
