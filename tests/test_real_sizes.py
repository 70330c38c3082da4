"""Every TensorFlow implementation at real channel counts, against the float64 loop
reference: forward and full gradients (``reference.*_vjp``), float32 and float64.

The property tests draw 1-3 channels; the CPU kernels switch to blocked, vectorised
loops at real widths (the aggregation forward and the backward scatter block channels
for C >= 32, with a tail when C is not a multiple of the block). Channel counts 40, 64,
256 and 257 and embedding widths 16, 64 and 65 cover full blocks, tails and odd sizes.
The similarity depends only on d and the aggregation only on C, so each is swept over
its own width; ``sapa`` (which the compiled op may run as one fused pass) takes
(C, d) pairs that cover every value. ``xla-jit`` is the ``xla`` implementation inside
``tf.function(jit_compile=True)``, whose forward is the fused accumulation rather than
the stacked windows used elsewhere; it runs the real sizes (d=64, C=256) only.

The reference VJPs themselves are checked here against central differences of the
reference forward, at small sizes that include the edge cases (K=1, a window larger than
the map, a 1x1 map): every gradient test of the suite (here, ``tests/test_fused.py``,
``tests/multibackend``, the property tests) compares against them.

Inputs come from fixed seeds. Run: ``python -m pytest -q tests/test_real_sizes.py``.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

import reference as ref
from keras_sapa import ops

KERNEL, UP = 5, 2
BATCH, HEIGHT, WIDTH = 2, 3, 4
CHANNELS = (40, 64, 256, 257)
EMBEDDINGS = (16, 64, 65)
SAPA_PAIRS = ((40, 16), (64, 64), (256, 64), (257, 65), (256, 16), (40, 65))
DTYPES = ("float32", "float64")

IMPLEMENTATIONS = [
    "patches",
    "xla",
    "xla-jit",
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(
            not ops.compiled_available(), reason="compiled custom op library unavailable"
        ),
    ),
]


def _random(seed, shape, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def _high(channels):
    return (BATCH, UP * HEIGHT, UP * WIDTH, channels)


def _low(channels):
    return (BATCH, HEIGHT, WIDTH, channels)


def _rounded(arrays, dtype):
    """The inputs as the op sees them (rounded to ``dtype``), in float64."""
    return [np.asarray(a, dtype).astype(np.float64) for a in arrays]


def _run(implementation, fn, args, cotangent, dtype):
    """fn(*args, implementation) and the gradients of sum(out * cotangent), as float64."""
    impl = "xla" if implementation == "xla-jit" else implementation

    def forward_and_grads(*tensors):
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            out = fn(*tensors, impl)
            loss = tf.reduce_sum(out * tf.cast(cotangent, out.dtype))
        return out, tape.gradient(loss, tensors)

    if implementation == "xla-jit":
        forward_and_grads = tf.function(forward_and_grads, jit_compile=True)
    tensors = [tf.constant(a, dtype) for a in args]
    out, grads = forward_and_grads(*tensors)
    assert out.dtype == tf.as_dtype(dtype)
    return out.numpy().astype(np.float64), [g.numpy().astype(np.float64) for g in grads]


def _assert_close(got, expected, dtype, what):
    # float32 sums of up to K*K*257 terms: relative to the largest magnitude.
    tol = 1e-10 if dtype == "float64" else 2e-5
    scale = 1.0 + np.abs(expected).max()
    err = np.abs(got - expected).max()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


# ------------------------------------------------------------------------ references
@functools.cache
def _similarity_case(d, dtype):
    query = _random(100 + d, _high(d), 0.5)
    key = _random(200 + d, _low(d), 0.5)
    cotangent = _random(300 + d, _high(KERNEL * KERNEL))
    query, key = _rounded([query, key], dtype)
    expected = ref.similarity(query, key, KERNEL, UP)
    grads = ref.similarity_vjp(query, key, cotangent, KERNEL, UP)
    return (query, key), cotangent, expected, grads


@functools.cache
def _aggregate_case(c, dtype):
    weights = _random(400 + c, _high(KERNEL * KERNEL), 0.3)
    value = _random(500 + c, _low(c))
    cotangent = _random(600 + c, _high(c))
    weights, value = _rounded([weights, value], dtype)
    expected = ref.aggregate(weights, value, KERNEL, UP)
    grads = ref.aggregate_vjp(weights, value, cotangent, KERNEL, UP)
    return (weights, value), cotangent, expected, grads


@functools.cache
def _sapa_case(c, d, dtype):
    # Logits of order one: the softmax is neither uniform nor one-hot.
    query = _random(700 + d, _high(d), 1.5 / np.sqrt(d))
    key = _random(800 + d, _low(d), 1.0)
    value = _random(900 + c, _low(c))
    cotangent = _random(1000 + c, _high(c))
    query, key, value = _rounded([query, key, value], dtype)
    expected = ref.sapa(query, key, value, KERNEL, UP)
    grads = ref.sapa_vjp(query, key, value, cotangent, KERNEL, UP)
    return (query, key, value), cotangent, expected, grads


# ----------------------------------------------------------------------------- tests
# op -> (its reference case for a width, the op as each implementation runs it, the names
# of its gradients).
OPS = {
    "similarity": (
        _similarity_case,
        lambda q, k, impl: ops.similarity(q, k, KERNEL, UP, impl),
        ("d query", "d key"),
    ),
    "aggregate": (
        _aggregate_case,
        lambda w, v, impl: ops.aggregate(w, v, KERNEL, UP, impl),
        ("d weights", "d value"),
    ),
    "sapa": (
        lambda pair, dtype: _sapa_case(*pair, dtype),
        lambda q, k, v, impl: ops.sapa(q, k, v, KERNEL, UP, impl),
        ("d query", "d key", "d value"),
    ),
}


def _cases(op, widths, real_width):
    """(op, implementation, width, dtype) for every implementation, width and dtype, except
    that XLA under jit (which compiles each case for a second or more) runs the real width
    in float32 only: its fused forward is generated code, not a kernel with
    width-dependent blocks."""
    cases = []
    for implementation in IMPLEMENTATIONS:
        name = getattr(implementation, "values", (implementation,))[0]
        for width in widths:
            for dtype in DTYPES:
                if name == "xla-jit" and (width != real_width or dtype != "float32"):
                    continue
                marks = getattr(implementation, "marks", ())
                label = "C{}-d{}".format(*width) if isinstance(width, tuple) else width
                cases.append(
                    pytest.param(
                        op, name, width, dtype, marks=marks, id=f"{op}-{name}-{label}-{dtype}"
                    )
                )
    return cases


@pytest.mark.parametrize(
    "op,implementation,width,dtype",
    _cases("similarity", EMBEDDINGS, 64)
    + _cases("aggregate", CHANNELS, 256)
    + _cases("sapa", SAPA_PAIRS, (256, 64)),
)
def test_real_widths(op, implementation, width, dtype):
    """Forward and every gradient of one op at one width against the float64 reference."""
    make_case, fn, grad_names = OPS[op]
    args, cotangent, expected, expected_grads = make_case(width, dtype)
    out, grads = _run(implementation, fn, args, cotangent, dtype)
    _assert_close(out, expected, dtype, op)
    for name, got, want in zip(grad_names, grads, expected_grads, strict=True):
        _assert_close(got, want, dtype, name)


# (kernel_size, up_factor, batch, height, width, d, channels): the window inside the map,
# K=1 with s=1 (no padding), a window larger than the map, a 1x1 map, one channel.
VJP_CASES = [
    (3, 2, 1, 2, 3, 3, 5),
    (1, 1, 2, 2, 2, 2, 3),
    (5, 3, 1, 2, 3, 2, 2),
    (3, 2, 2, 1, 1, 1, 1),
]


@pytest.mark.parametrize("k,s,batch,height,width,d,c", VJP_CASES)
def test_reference_vjps_match_directional_derivatives(k, s, batch, height, width, d, c):
    """The reference VJPs (which the implementations' gradients are checked against,
    here and in ``tests/multibackend``) against central differences of the reference
    forward: <vjp(cotangent), direction> == d/de sum(f(x + e * direction) * cotangent),
    along two random directions per input."""
    eps = 1e-6
    high, low = (batch, s * height, s * width), (batch, height, width)
    shapes = {"q": high + (d,), "k": low + (d,), "v": low + (c,), "w": high + (k * k,)}
    seed = 1000 * k + 100 * s + 10 * height + width
    arrays = {name: _random(seed + i, shape) for i, (name, shape) in enumerate(shapes.items())}

    def check(fn, vjp, names, out_channels):
        cotangent = _random(seed + 99, high + (out_channels,))
        args = [arrays[n] for n in names]
        grads = vjp(*args, cotangent, k, s)
        for index, name in enumerate(names):
            assert grads[index].shape == args[index].shape
            for trial in range(2):
                direction = _random(seed + 10 * index + trial + 50, args[index].shape)
                plus = [a + eps * direction if i == index else a for i, a in enumerate(args)]
                minus = [a - eps * direction if i == index else a for i, a in enumerate(args)]
                numeric = (
                    np.sum(fn(*plus, k, s) * cotangent) - np.sum(fn(*minus, k, s) * cotangent)
                ) / (2 * eps)
                analytic = np.sum(grads[index] * direction)
                np.testing.assert_allclose(
                    analytic, numeric, rtol=1e-7, atol=1e-7, err_msg=f"{fn.__name__} d{name}"
                )

    check(ref.similarity, ref.similarity_vjp, ("q", "k"), k * k)
    check(ref.aggregate, ref.aggregate_vjp, ("w", "v"), c)
    check(ref.sapa, ref.sapa_vjp, ("q", "k", "v"), c)
