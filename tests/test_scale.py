"""Scale: tensors past 2**31 elements through the compiled op.

Marked ``benchmark`` (about 12 GB of memory and a minute or two, float32), so CI leaves it out;
run with ``python -m pytest -m benchmark tests/test_scale.py``. The output and the
value/query tensors hold more than 2**31 elements, so any int32 offset arithmetic in a
kernel would wrap and write or read the wrong place; the check looks at the last
points, whose flat offsets are past 2**31.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_sapa import ops

pytestmark = [
    pytest.mark.benchmark,
    pytest.mark.skipif(not ops.compiled_available(), reason="compiled op library not built"),
]

H = W = 256
S = 2
K = 3
C = 8200  # (2*256)**2 * 8200 = 2.15e9 > 2**31 elements per high-resolution tensor


def _random(shape, seed):
    """A float32 tensor of ``shape`` whose every point and channel differ: a random
    spatial map times a random channel profile, made with one multiplication so no
    temporary of the full size is needed. A wrapped int32 offset reads another point
    or channel, hence another value."""
    rng = np.random.default_rng(seed)
    spatial = tf.constant(rng.uniform(0.5, 1.5, shape[:-1] + (1,)).astype(np.float32))
    channels = tf.constant(rng.uniform(-0.1, 0.1, (shape[-1],)).astype(np.float32))
    return spatial * channels


class _Rows:
    """Reads single points of a huge tensor without copying it to NumPy whole."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __getitem__(self, index):
        return self.tensor[index].numpy()


def _window_points(i, j):
    r = K // 2
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            p, q = i // S + a, j // S + b
            yield (a + r) * K + (b + r), p, q, 0 <= p < H and 0 <= q < W


def _check_points():
    last = S * H - 1
    return [(last, last), (last, 0), (last - 1, last - 3), (S * H // 2, S * W // 2)]


def test_aggregate_past_int32():
    assert (S * H) * (S * W) * C > 2**31
    value = _random((1, H, W, C), seed=0)
    weights = _random((1, S * H, S * W, K * K), seed=1)
    out = ops.aggregate(weights, value, K, S, "compiled")
    assert out.shape == (1, S * H, S * W, C)
    v, w = _Rows(value), _Rows(weights)
    for i, j in _check_points():
        expected = np.zeros(C)
        for n, p, q, inside in _window_points(i, j):
            if inside:
                expected += float(w[0, i, j, n]) * v[0, p, q].astype(np.float64)
        got = out[0, i, j].numpy().astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_similarity_past_int32():
    key = _random((1, H, W, C), seed=2)
    query = _random((1, S * H, S * W, C), seed=3)
    sim = ops.similarity(query, key, K, S, "compiled")
    k, q = _Rows(key), _Rows(query)
    for i, j in _check_points():
        for n, p, t, inside in _window_points(i, j):
            expected = 0.0
            if inside:
                expected = float(
                    np.dot(q[0, i, j].astype(np.float64), k[0, p, t].astype(np.float64))
                )
            np.testing.assert_allclose(float(sim[0, i, j, n]), expected, rtol=1e-4, atol=1e-5)
