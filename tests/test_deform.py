"""SAPA-D on the TensorFlow backend: the builtin ops against the NumPy loop reference
(``tests/reference_deform.py``) forward and backward, the kernels' gradient rule at
integer positions and dropped points, XLA, half precision, bad input; the SAPADeform
layer against the reference layer, its config, ``.keras`` reload and mixed precision.

Parity with the official module (via ``tests/official_deform_torch.py``) is in
``tests/test_convert_deform.py``; the JAX and PyTorch runs in
``tests/multibackend/test_mb_deform.py``; the portable exports (SavedModel in a fresh
process, ONNX, LiteRT) in ``tests/test_export.py``, beside SAPA's.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference_deform as ref
from keras_sapa.deform import SAPADeform
from keras_sapa.ops import _deform as deform_ops
from multibackend.backend_utils import deform_layer
from multibackend.backend_utils import randomise


def _inputs(
    rng,
    batch,
    height,
    width,
    groups,
    e,
    points,
    s,
    channels,
    dtype=np.float32,
    spread=2.5,
    away=True,
):
    f = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    out_shape = (batch, s * height, s * width)
    if away:
        offsets = ref.offsets_away_from_integers(
            rng, out_shape + (2 * groups * points,), spread=spread
        )
    else:
        offsets = rng.uniform(-spread, spread, out_shape + (2 * groups * points,))
    return (
        f(*out_shape, groups * e) * 0.5,
        f(batch, height, width, groups * e),
        f(batch, height, width, channels),
        offsets.astype(dtype),
    )


def _with_edge_points(offsets, height, width):
    """Puts some points exactly on integers, on the drop boundary (-1, H, W), just
    inside it, and one NaN, at output point (0, 0) (anchor (0, 0))."""
    o = offsets.copy()
    values = [
        (0.0, 0.0),
        (1.0, 2.0),
        (-1.0, 0.5),
        (0.5, -1.0),
        (float(width), 0.0),
        (0.0, float(height)),
        (-0.999, -0.5),
        (width - 1.0, height - 1.0),
        (np.nan, 0.25),
    ]
    for k, (w, h) in enumerate(values[: o.shape[-1] // 2]):
        o[0, 0, 0, 2 * k], o[0, 0, 0, 2 * k + 1] = w, h
    return o


def _np(t):
    return keras.ops.convert_to_numpy(t)


# ------------------------------------------------------------------ forward


CASES = [  # (batch, height, width, groups, e, points, s, channels)
    (2, 3, 4, 2, 3, 3, 2, 4),
    (1, 3, 5, 1, 2, 4, 3, 3),
    (1, 2, 3, 3, 1, 1, 1, 6),
    (1, 2, 2, 4, 2, 9, 4, 8),
]


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")  # P=1
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}w{}g{}e{}p{}s{}c{}".format(*c))
def test_ops_match_reference(case):
    batch, height, width, groups, e, points, s, channels = case
    rng = np.random.default_rng(sum(case))
    q, k, v, o = _inputs(rng, *case, away=False)
    o = _with_edge_points(o, height, width)
    w = rng.standard_normal(q.shape[:3] + (groups * points,)).astype(np.float32)
    args = dict(num_points=points, up_factor=s, groups=groups)
    np.testing.assert_allclose(
        _np(deform_ops.deform_similarity(q, k, o, **args)),
        ref.deform_similarity(q, k, o, points, s, groups),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        _np(deform_ops.deform_aggregate(w, v, o, **args)),
        ref.deform_aggregate(w, v, o, points, s, groups),
        rtol=1e-5,
        atol=1e-5,
    )
    out = _np(deform_ops.sapa_deform(q, k, v, o, **args))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(
        out, ref.sapa_deform(q, k, v, o, points, s, groups), rtol=1e-5, atol=1e-5
    )


def test_real_sizes_match_reference():
    """C=256, E=32, P=9, G=4, s=2: the official defaults at a real channel count."""
    rng = np.random.default_rng(3)
    q, k, v, o = _inputs(rng, 1, 4, 5, 4, 32, 9, 2, 256, spread=3.0, away=False)
    q *= 0.3
    out = deform_ops.sapa_deform(q, k, v, o, num_points=9, up_factor=2, groups=4)
    np.testing.assert_allclose(
        _np(out), ref.sapa_deform(q, k, v, o, 9, 2, 4), rtol=1e-5, atol=2e-5
    )


def test_dropped_points_keep_logit_zero():
    """A point outside (-1, H) x (-1, W) has logit 0 and contributes nothing, so the
    weights on real points sum to less than 1 (the official border rule)."""
    q = np.ones((1, 2, 2, 2), np.float32)
    k = np.ones((1, 1, 1, 2), np.float32) * 3.0
    v = np.ones((1, 1, 1, 1), np.float32)
    o = np.zeros((1, 2, 2, 4), np.float32)
    o[..., 2:] = 5.0  # second point far outside
    logits = _np(deform_ops.deform_similarity(q, k, o, num_points=2, up_factor=2, groups=1))
    np.testing.assert_allclose(logits[..., 0], 6.0)
    np.testing.assert_allclose(logits[..., 1], 0.0)
    out = _np(deform_ops.sapa_deform(q, k, v, o, num_points=2, up_factor=2, groups=1))
    np.testing.assert_allclose(out[..., 0], np.exp(6) / (np.exp(6) + 1), rtol=1e-6)


# ------------------------------------------------------------------ gradients


def _tape_grads(fn, arrays, cotangent):
    tensors = [tf.constant(a) for a in arrays]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        out = fn(*tensors)
    return [g.numpy() for g in tape.gradient(out, tensors, tf.constant(cotangent))]


def test_gradients_match_numeric_away_from_integers():
    """float64 autodiff of all four inputs of the fused op against central differences
    of the reference, and against the reference's chain-rule VJP."""
    rng = np.random.default_rng(11)
    groups, points, s = 2, 2, 2
    q, k, v, o = _inputs(rng, 1, 2, 2, groups, 2, points, s, 2, dtype=np.float64)
    g = rng.standard_normal(q.shape[:3] + (2,))
    args = dict(num_points=points, up_factor=s, groups=groups)
    grads = _tape_grads(lambda *a: deform_ops.sapa_deform(*a, **args), [q, k, v, o], g)

    def fn(*a):
        return ref.sapa_deform(*a, points, s, groups)

    for index, grad in enumerate(grads):
        numeric = ref.numeric_gradient(fn, [q, k, v, o], index, g)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)
    expected_grads = ref.sapa_deform_vjp(q, k, v, o, g, points, s, groups)
    for grad, expected in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-10)


def test_half_gradients_match_numeric():
    """The two halves' gradients (query, key, offsets; weights, value, offsets)."""
    rng = np.random.default_rng(12)
    groups, points, s = 2, 2, 3
    q, k, v, o = _inputs(rng, 1, 1, 2, groups, 1, points, s, 2, dtype=np.float64)
    w = rng.standard_normal(q.shape[:3] + (groups * points,))
    args = dict(num_points=points, up_factor=s, groups=groups)
    g_sim = rng.standard_normal(w.shape)
    got = _tape_grads(lambda *a: deform_ops.deform_similarity(*a, **args), [q, k, o], g_sim)
    for index, grad in enumerate(got):
        numeric = ref.numeric_gradient(
            lambda *a: ref.deform_similarity(*a, points, s, groups), [q, k, o], index, g_sim
        )
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)
    g_agg = rng.standard_normal(q.shape[:3] + (2,))
    got = _tape_grads(lambda *a: deform_ops.deform_aggregate(*a, **args), [w, v, o], g_agg)
    for index, grad in enumerate(got):
        numeric = ref.numeric_gradient(
            lambda *a: ref.deform_aggregate(*a, points, s, groups), [w, v, o], index, g_agg
        )
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


def test_gradient_rule_at_integer_positions_and_dropped_points():
    """At integer positions the offsets' gradient is the derivative in the cell of
    floor (a one-sided derivative towards increasing coordinate); a dropped point
    (on -1, H, W exactly, beyond, or NaN) has zero gradient everywhere."""
    rng = np.random.default_rng(13)
    groups, points, s, height, width = 1, 9, 2, 3, 4
    q, k, v, o = _inputs(rng, 1, height, width, groups, 3, points, s, 2, dtype=np.float64)
    o = _with_edge_points(o, height, width)
    o[0, 1:, :, :] = np.round(o[0, 1:, :, :])  # many more integer positions
    g = rng.standard_normal(q.shape[:3] + (2,))
    args = dict(num_points=points, up_factor=s, groups=groups)
    grads = _tape_grads(lambda *a: deform_ops.sapa_deform(*a, **args), [q, k, v, o], g)
    for grad in grads:
        assert np.isfinite(grad).all()
    expected_grads = ref.sapa_deform_vjp(q, k, v, o, g, points, s, groups)
    for grad, expected in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-10)
    d_o = grads[3]
    # Dropped points of (0, 0): k = 2 (w=-1), 3 (h=-1), 4 (w=W), 5 (h=H), 8 (NaN).
    for point in (2, 3, 4, 5, 8):
        np.testing.assert_array_equal(d_o[0, 0, 0, 2 * point : 2 * point + 2], 0.0)
    # One-sided (right) finite differences at the integer points of (0, 0): k = 0, 1, 7.
    fn = lambda *a: ref.sapa_deform(*a, points, s, groups)  # noqa: E731
    base = np.sum(fn(q, k, v, o) * g)
    eps = 1e-7
    for point in (0, 1, 7):
        for channel in (2 * point, 2 * point + 1):
            shifted = o.copy()
            shifted[0, 0, 0, channel] += eps
            right = (np.sum(fn(q, k, v, shifted) * g) - base) / eps
            np.testing.assert_allclose(d_o[0, 0, 0, channel], right, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ XLA, dtypes


def test_jit_compile_matches_eager():
    rng = np.random.default_rng(21)
    q, k, v, o = _inputs(rng, 2, 3, 4, 2, 4, 3, 2, 6, away=False)
    args = dict(num_points=3, up_factor=2, groups=2)

    def loss_and_grads(*a):
        with tf.GradientTape() as tape:
            tape.watch(list(a))
            out = deform_ops.sapa_deform(*a, **args)
            loss = tf.reduce_sum(out * out)
        return out, tape.gradient(loss, list(a))

    inputs = [tf.constant(t) for t in (q, k, v, o)]
    eager_out, eager_grads = loss_and_grads(*inputs)
    jit_out, jit_grads = tf.function(loss_and_grads, jit_compile=True)(*inputs)
    np.testing.assert_allclose(jit_out.numpy(), eager_out.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jit_out.numpy(), ref.sapa_deform(q, k, v, o, 3, 2, 2), rtol=1e-5, atol=1e-5
    )
    for a, b in zip(jit_grads, eager_grads, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


def test_unknown_spatial_sizes_in_a_graph():
    rng = np.random.default_rng(22)
    q, k, v, o = _inputs(rng, 1, 3, 4, 2, 2, 2, 2, 4, away=False)
    spec = lambda c: tf.TensorSpec((None, None, None, c), tf.float32)  # noqa: E731
    fn = tf.function(
        lambda *a: deform_ops.sapa_deform(*a, num_points=2, up_factor=2, groups=2),
        input_signature=[spec(4), spec(4), spec(4), spec(8)],
    )
    np.testing.assert_allclose(
        fn(q, k, v, o).numpy(), ref.sapa_deform(q, k, v, o, 2, 2, 2), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs(dtype):
    """Half inputs: sampling, similarity and softmax in float32, result in value's
    dtype, close to the reference of the rounded inputs."""
    rng = np.random.default_rng(23)
    q, k, v, o = _inputs(rng, 1, 3, 3, 2, 4, 3, 2, 4, away=False)
    cast = [keras.ops.cast(t, dtype) for t in (q, k, v, o)]
    out = deform_ops.sapa_deform(*cast, num_points=3, up_factor=2, groups=2)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    logits = deform_ops.deform_similarity(
        cast[0], cast[1], cast[3], num_points=3, up_factor=2, groups=2
    )
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    rounded = [_np(keras.ops.cast(t, "float32")) for t in cast]
    expected = ref.sapa_deform(*rounded, 3, 2, 2)
    tol = 2e-2 if dtype == "bfloat16" else 3e-3
    np.testing.assert_allclose(_np(keras.ops.cast(out, "float32")), expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------ bad input


def test_bad_arguments_raise():
    rng = np.random.default_rng(24)
    q, k, v, o = _inputs(rng, 1, 2, 2, 2, 2, 3, 2, 4)
    args = dict(num_points=3, up_factor=2, groups=2)
    with pytest.raises(ValueError, match="num_points=0"):
        deform_ops.sapa_deform(q, k, v, o, num_points=0, up_factor=2, groups=2)
    with pytest.raises(ValueError, match="groups=2.5"):
        deform_ops.sapa_deform(q, k, v, o, num_points=3, up_factor=2, groups=2.5)
    with pytest.raises(ValueError, match="up_factor=0"):
        deform_ops.sapa_deform(q, k, v, o, num_points=3, up_factor=0, groups=2)
    with pytest.raises(ValueError, match="implementation='fast'"):
        deform_ops.sapa_deform(q, k, v, o, implementation="fast", **args)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="not available"):
        mp.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")  # compiled where the kernels are not
        deform_ops.sapa_deform(q, k, v, o, implementation="compiled", **args)
    with pytest.raises(ValueError, match="offsets.shape"):
        deform_ops.sapa_deform(q, k, v, o[..., :-2], **args)
    with pytest.raises(ValueError, match="offsets.shape"):
        deform_ops.sapa_deform(q, k, v, o[:, :-1], **args)
    with pytest.raises(ValueError, match="exactly up_factor=2"):
        deform_ops.sapa_deform(q[:, :-1], k, v, o[:, :-1], **args)
    with pytest.raises(ValueError, match="value.shape"):
        deform_ops.sapa_deform(q, k, v[..., :3], o, **args)
    with pytest.raises(ValueError, match="key.shape"):
        deform_ops.sapa_deform(q[..., :3], k[..., :3], v, o, **args)
    with pytest.raises(ValueError, match="same number of channels"):
        deform_ops.sapa_deform(q[..., :2], k, v, o, **args)
    with pytest.raises(ValueError, match="offsets.dtype=int32"):
        deform_ops.sapa_deform(q, k, v, o.astype(np.int32), **args)
    with pytest.raises(ValueError, match="same dtype"):
        deform_ops.deform_similarity(q, k.astype(np.float64), o, **args)
    with pytest.raises(ValueError, match="weights.shape"):
        deform_ops.deform_aggregate(q[..., :5], v, o, **args)
    with pytest.raises(ValueError, match="rank-4"):
        deform_ops.sapa_deform(q[0], k, v, o, **args)
    assert deform_ops.resolve_deform_implementation("xla") == "builtin"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
        assert deform_ops.resolve_deform_implementation("auto") == "builtin"


# ------------------------------------------------------------------ the layer


LAYER_CASES = [  # ((points, groups, up_factor, high_offset, group norm, data_format), cx, cy)
    ((9, 4, 2, True, False, "channels_last"), 8, 6),
    ((4, 1, 3, False, False, "channels_first"), 3, 5),
    ((4, 2, 2, True, True, "channels_first"), 64, 32),
    ((2, 4, 4, False, True, "channels_last"), 32, 64),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "p{}g{}s{}-{}-{}-{}".format(*c[0]))
def test_layer_matches_reference(case):
    (points, groups, s, high_offset, norm, data_format), cx, cy = case
    rng = np.random.default_rng(s * 100 + points)
    x = rng.standard_normal((2, 3, 2, cx)).astype(np.float32)
    y = rng.standard_normal((2, 3 * s, 2 * s, cy)).astype(np.float32)
    layer = deform_layer(case[0])
    to_layer = (
        (lambda t: t.transpose(0, 3, 1, 2)) if data_format == "channels_first" else (lambda t: t)
    )
    layer(to_layer(x), to_layer(y))
    params = randomise(layer, rng, scale=0.3)
    out = _np(layer(to_layer(x), to_layer(y)))
    if data_format == "channels_first":
        out = out.transpose(0, 2, 3, 1)
    expected = ref.sapa_deform_layer(x, y, params, points, s, groups, high_offset, norm)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    offsets = _np(layer.sampling_offsets(to_layer(x)))
    x_n = ref.group_norm(x, 32, params["norm_x.weight"], params["norm_x.bias"]) if norm else x
    np.testing.assert_allclose(
        offsets, ref.layer_offsets(x_n, params, s, high_offset), rtol=1e-4, atol=1e-4
    )
    shape = layer.compute_output_shape(to_layer(x).shape, to_layer(y).shape)
    assert tuple(shape) == tuple(to_layer(expected).shape)


def test_layer_initial_offsets_sit_on_the_anchor():
    """Official init: kernels normal(0.02), biases 0: offsets ~0, so an untrained
    layer samples (nearly) its anchor."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((1, 4, 4, 16)).astype(np.float32)
    layer = SAPADeform()
    y = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)
    out = _np(layer(x, y))
    assert out.shape == (1, 8, 8, 16)
    assert np.abs(_np(layer.sampling_offsets(x))).max() < 0.5
    kernels = [layer.q.kernel, layer.k.kernel, layer.offset.kernel]
    assert 0.01 < np.std(_np(kernels[2])) < 0.03
    assert not np.allclose(_np(kernels[0])[:16], _np(kernels[1])[:16])


def test_layer_bad_arguments_and_shapes():
    with pytest.raises(ValueError, match="num_points=0"):
        SAPADeform(num_points=0)
    with pytest.raises(ValueError, match="groups=-1"):
        SAPADeform(groups=-1)
    with pytest.raises(ValueError, match="norm='layer'"):
        SAPADeform(norm="layer")
    with pytest.raises(ValueError, match="data_format='nhwc'"):
        SAPADeform(data_format="nhwc")
    with pytest.raises(ValueError, match="implementation='cuda'"):
        SAPADeform(implementation="cuda")
    with pytest.raises(ValueError, match="up_factor=1.5"):
        SAPADeform(up_factor=1.5)
    with pytest.raises(ValueError, match="divisible by groups=4. Received: x channels=6"):
        SAPADeform().build((1, 4, 4, 6), (1, 8, 8, 6))
    with pytest.raises(ValueError, match="exactly up_factor=2"):
        SAPADeform().build((1, 4, 4, 8), (1, 9, 8, 8))
    with pytest.raises(ValueError, match="guide channels=48"):
        SAPADeform(norm="group").build((1, 4, 4, 64), (1, 8, 8, 48))
    with pytest.raises(ValueError, match="rank-4"):
        SAPADeform().build((1, 4, 8), (1, 8, 8, 8))
    layer = SAPADeform(implementation="compiled")
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="not available"):
        mp.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
        layer(np.zeros((1, 2, 2, 4), np.float32), np.zeros((1, 4, 4, 4), np.float32))


def test_layer_config_and_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(41)
    x = rng.standard_normal((1, 3, 3, 32)).astype(np.float32)
    y = rng.standard_normal((1, 6, 6, 32)).astype(np.float32)
    settings = {
        "up_factor": 2,
        "num_points": 4,
        "groups": 2,
        "embedding_dim": 8,
        "use_bias": False,
        "high_offset": False,
        "norm": "group",
    }
    initializer = keras.initializers.RandomNormal(stddev=0.1, seed=3)
    layer = SAPADeform(**settings, name="sapa_d", kernel_initializer=initializer)
    config = layer.get_config()
    clone = SAPADeform.from_config(config)
    assert clone.get_config() == config
    assert {key: config[key] for key in settings} == settings

    xi = keras.Input((3, 3, 32))
    yi = keras.Input((6, 6, 32))
    model = keras.Model([xi, yi], SAPADeform(num_points=4, groups=2, norm="group")(xi, yi))
    randomise(model.layers[-1], rng, scale=0.3)
    expected = _np(model([x, y]))
    path = str(tmp_path / "deform.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.layers[-1], SAPADeform)
    np.testing.assert_allclose(_np(reloaded([x, y])), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_layer_mixed_precision_trains(policy):
    rng = np.random.default_rng(51)
    x = rng.standard_normal((2, 3, 3, 8)).astype(np.float32)
    y = rng.standard_normal((2, 6, 6, 8)).astype(np.float32)
    layer = SAPADeform(num_points=4, groups=2, embedding_dim=4, dtype=policy)
    out = layer(x, y)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in layer.weights)
    params = randomise(layer, rng, scale=0.2)
    expected = ref.sapa_deform_layer(x, y, params, num_points=4, groups=2)
    tol = 6e-2 if policy == "mixed_bfloat16" else 1e-2
    got = _np(keras.ops.cast(layer(x, y), "float32"))
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.cast(layer(x, y), tf.float32) ** 2)
    grads = tape.gradient(loss, layer.trainable_weights)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    assert np.abs(grads[-2].numpy()).max() > 0  # the offset kernel learns
