"""Scale: tensors past 2**31 elements through the compiled op.

Marked ``benchmark`` (about 12 GB of memory and a minute or two), so CI leaves it out;
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
    rng = np.random.default_rng(0)
    value = tf.constant(rng.standard_normal((1, H, W, C), dtype=np.float32).astype(np.float16))
    weights = tf.constant(rng.random((1, S * H, S * W, K * K), dtype=np.float32).astype(np.float16))
    out = ops.aggregate(weights, value, K, S, "compiled")
    assert out.shape == (1, S * H, S * W, C)
    v, w = value.numpy(), weights.numpy()
    for i, j in _check_points():
        expected = np.zeros(C)
        for n, p, q, inside in _window_points(i, j):
            if inside:
                expected += float(w[0, i, j, n]) * v[0, p, q].astype(np.float64)
        got = out[0, i, j].numpy().astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)


def test_similarity_past_int32():
    rng = np.random.default_rng(1)
    key = tf.constant(rng.standard_normal((1, H, W, C), dtype=np.float32).astype(np.float16) / 30)
    query = tf.constant(
        rng.standard_normal((1, S * H, S * W, C), dtype=np.float32).astype(np.float16) / 30
    )
    sim = ops.similarity(query, key, K, S, "compiled")
    k, q = key.numpy(), query.numpy()
    for i, j in _check_points():
        for n, p, t, inside in _window_points(i, j):
            expected = float(np.dot(q[0, i, j].astype(np.float64), k[0, p, t].astype(np.float64))) if inside else 0.0
            np.testing.assert_allclose(float(sim[0, i, j, n]), expected, rtol=2e-2, atol=2e-2)
