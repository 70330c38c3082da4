"""TensorFlow's builtin formulations of SAPA's two primitive ops (``"patches"`` and
``"xla"`` on TensorFlow).

Both compute exactly the semantics of ``shared/SAPA_SPEC.md``: a K x K window of
low-resolution points around the anchor ``(i // s, j // s)``, numbered row-major,
zero padding outside the map. Shapes are channels last:

    query  (B, sH, sW, d)   key   (B, H, W, d)   ->  similarity (B, sH, sW, K*K)
    weights (B, sH, sW, K*K) value (B, H, W, C)  ->  aggregate  (B, sH, sW, C)

``patches``: ``tf.image.extract_patches`` materialises the K*K windows of the key or
value (K*K times their memory) and one einsum contracts them. Its gradient does not
compile under XLA.

``xla``: pads the low-resolution tensor once and takes one shifted slice per window
offset. Inside an XLA-compiled function (:func:`in_xla_context`) it accumulates K*K broadcast
products, a loop XLA fuses without materialising the windows; elsewhere (TensorFlow's
graph executor, SavedModel serving, converters) it stacks the K*K slices and contracts
them with one einsum, about twice as fast there as the accumulation (measured by
``scripts/bench_dispatch.py``), at the memory cost of the patches path. Only slicing,
stacking, multiplication and contractions: it compiles and trains under
``jit_compile=True`` and exports to SavedModel, ONNX and LiteRT with builtin ops only.

The high-resolution tensors are viewed as ``(B, H, s, W, s, .)`` so that every group
of s x s output points shares one anchor; no upsampled copy of the key is made.
"""

import tensorflow as tf

from keras_sapa.ops._patches import AGGREGATE_EQUATION
from keras_sapa.ops._patches import SIMILARITY_EQUATION
from keras_sapa.ops._patches import weighted_window_sum


def in_xla_context():
    """True while tracing a function that XLA compiles (``tf.function(jit_compile=True)``,
    including functions nested in one), where the compiled custom op cannot run.

    TensorFlow has no public API for this; ``tf.__internal__.get_enclosing_xla_context``
    (exported for Keras's own use) is the one non-public call of the package, confined
    to this function and pinned by ``tests/test_ops.py::test_in_xla_context_tracks_tensorflow``.
    Should TensorFlow remove it, every graph counts as XLA-compiled: the builtin path,
    which is always correct.
    """
    if tf.executing_eagerly():
        return False
    internal = getattr(tf, "__internal__", None)
    get_context = getattr(internal, "get_enclosing_xla_context", None)
    if get_context is None:  # pragma: no cover - depends on the TensorFlow version
        return True
    return get_context() is not None


def _split_high(t, up_factor):
    """(B, sH, sW, C) -> (B, H, s, W, s, C), with dynamic sizes."""
    shape = tf.shape(t)
    s = up_factor
    return tf.reshape(t, tf.stack([shape[0], shape[1] // s, s, shape[2] // s, s, shape[3]]))


def _merge_high(t6):
    """(B, H, s, W, s, C) -> (B, sH, sW, C)."""
    shape = tf.shape(t6)
    return tf.reshape(
        t6,
        tf.stack([shape[0], shape[1] * shape[2], shape[3] * shape[4], shape[5]]),
    )


def _patches(t, kernel_size):
    """(B, H, W, C) -> (B, H, W, K*K, C), windows in row-major order, zero padded.

    The gradient of ``extract_patches`` fails on an empty tensor (an empty batch, zero
    channels), so such a tensor takes the shifted slices, which give the same (empty)
    windows; a size unknown at trace time is decided at run time."""
    k = kernel_size

    def extract():
        patches = tf.image.extract_patches(
            t, sizes=[1, k, k, 1], strides=[1, 1, 1, 1], rates=[1, 1, 1, 1], padding="SAME"
        )
        shape = tf.shape(t)
        # extract_patches orders each patch as (row, column, channel).
        return tf.reshape(patches, tf.stack([shape[0], shape[1], shape[2], k * k, shape[3]]))

    size = t.shape.num_elements()
    if size is None:
        return tf.cond(tf.size(t) > 0, extract, lambda: _stacked_windows(t, k))
    return extract() if size else _stacked_windows(t, k)


def _window_contraction(equation, windows):
    """``(high, low, kernel_size, up_factor) -> (B, sH, sW, .)``: ``equation`` between
    the high-resolution tensor and ``windows(low, kernel_size)``, the stacked K*K
    windows of the low-resolution one."""

    def contract(high, low, kernel_size, up_factor):
        return _merge_high(
            tf.einsum(equation, _split_high(high, up_factor), windows(low, kernel_size))
        )

    return contract


def _shifted_windows(t, kernel_size):
    """Yields (n, window_n) with window_n[b, p, q] = t[b, p + a, q + b'] (zero outside)
    for the offsets (a, b') in row-major order, n = (a + r) * K + (b' + r)."""
    r = kernel_size // 2
    shape = tf.shape(t)
    height, width = shape[1], shape[2]
    padded = tf.pad(t, [[0, 0], [r, r], [r, r], [0, 0]])
    for row in range(kernel_size):
        for col in range(kernel_size):
            yield row * kernel_size + col, padded[:, row : row + height, col : col + width, :]


def _stacked_windows(t, kernel_size):
    """(B, H, W, C) -> (B, H, W, K*K, C) from shifted slices (XLA-friendly)."""
    return tf.stack([w for _, w in _shifted_windows(t, kernel_size)], axis=3)


def _stacked_windows_adjoint(grad, kernel_size):
    """Adjoint of :func:`_stacked_windows`: (B, H, W, K*K, C) -> (B, H, W, C), each
    window's gradient shifted back to the point it was read from."""
    r = kernel_size // 2
    padded = None
    for row in range(kernel_size):
        for col in range(kernel_size):
            n = row * kernel_size + col
            term = tf.pad(
                grad[:, :, :, n, :],
                [[0, 0], [row, 2 * r - row], [col, 2 * r - col], [0, 0]],
            )
            padded = term if padded is None else padded + term
    shape = tf.shape(grad)
    return padded[:, r : r + shape[1], r : r + shape[2], :]


def _similarity_slices(query, key, kernel_size, up_factor):
    q6 = _split_high(query, up_factor)
    columns = []
    for _, window in _shifted_windows(key, kernel_size):
        columns.append(tf.reduce_sum(q6 * window[:, :, None, :, None, :], axis=-1))
    return _merge_high(tf.stack(columns, axis=-1))


def _aggregate_slices(weights, value, kernel_size, up_factor):
    return _merge_high(
        weighted_window_sum(_split_high(weights, up_factor), _shifted_windows(value, kernel_size))
    )


similarity_patches = _window_contraction(SIMILARITY_EQUATION, _patches)
aggregate_patches = _window_contraction(AGGREGATE_EQUATION, _patches)
_similarity_stacked = _window_contraction(SIMILARITY_EQUATION, _stacked_windows)
_aggregate_stacked = _window_contraction(AGGREGATE_EQUATION, _stacked_windows)


# Under XLA the forward passes accumulate one window offset at a time, which XLA fuses
# into a single loop. Differentiating that loop directly gives K*K broadcast reductions
# that XLA's CPU backend runs about ten times slower than the explicit gradients below,
# which contract stacked windows with one einsum each.


def _xla_window_op(fused_forward, stacked_forward, grad_high_equation, grad_windows_equation):
    """Wraps a forward(high, low, kernel_size, up_factor) (``fused_forward`` under XLA,
    ``stacked_forward`` elsewhere) in the explicit gradient:
    d_high = einsum(grad_high_equation, upstream6, windows(low)) and
    d_low = adjoint(einsum(grad_windows_equation, upstream6, high6))."""

    def op(high, low, kernel_size, up_factor):
        forward = fused_forward if in_xla_context() else stacked_forward

        @tf.custom_gradient
        def fn(high, low):
            def grad(upstream):
                g6 = _split_high(upstream, up_factor)
                d_high = tf.einsum(grad_high_equation, g6, _stacked_windows(low, kernel_size))
                d_windows = tf.einsum(grad_windows_equation, g6, _split_high(high, up_factor))
                return (
                    _merge_high(d_high),
                    _stacked_windows_adjoint(d_windows, kernel_size),
                )

            return forward(high, low, kernel_size, up_factor), grad

        return fn(high, low)

    return op


# query (d channels) against key windows: upstream has n = K*K channels.
similarity_xla = _xla_window_op(
    _similarity_slices, _similarity_stacked, "bhiwjn,bhwnd->bhiwjd", "bhiwjn,bhiwjd->bhwnd"
)
# weights (n channels) over value windows: upstream has C channels.
aggregate_xla = _xla_window_op(
    _aggregate_slices, _aggregate_stacked, "bhiwjc,bhwnc->bhiwjn", "bhiwjc,bhiwjn->bhwnc"
)
