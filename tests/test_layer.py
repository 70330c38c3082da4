"""The SAPA layer against the NumPy reference of the spec, plus the Keras contract:
gradients, config, saving, export, XLA, mixed precision, channels_first, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as ref
from multibackend.backend_utils import randomise
from savedmodel_utils import custom_op_types
from keras_sapa import SAPA


def _pair(rng, batch=2, height=3, width=5, s=2, cx=8, cy=8, dtype=np.float32):
    x = rng.standard_normal((batch, height, width, cx)).astype(dtype)
    guide = rng.standard_normal((batch, s * height, s * width, cy)).astype(dtype)
    return x, guide


@pytest.mark.parametrize("variant", ["identity", "bilinear", "gated", "concat"])
@pytest.mark.parametrize("norm", ["layer", "group", None])
def test_layer_matches_reference(variant, norm):
    # A fixed seed per case (str hashes are salted per process, so hash() is not one).
    seed = 100 * ["identity", "bilinear", "gated", "concat"].index(variant)
    rng = np.random.default_rng(seed + ["layer", "group", None].index(norm))
    x, guide = _pair(rng, cx=8, cy=8)
    layer = SAPA(kernel_size=3, embedding_dim=6, variant=variant, norm=norm, norm_groups=4)
    layer(x, guide)
    params = randomise(layer, rng)
    out = layer(x, guide).numpy()
    expected = ref.sapa_layer(x, guide, params, variant, 3, 2, norm=norm, groups=4)
    assert out.shape == (2, 6, 10, 8)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kernel_size,up_factor,height,width", [(1, 1, 3, 3), (3, 3, 2, 3), (5, 2, 3, 5), (7, 4, 2, 2)]
)
def test_layer_sizes_and_value_projection(kernel_size, up_factor, height, width):
    rng = np.random.default_rng(kernel_size + 10 * up_factor)
    x, guide = _pair(rng, height=height, width=width, s=up_factor, cx=6, cy=4)
    layer = SAPA(up_factor=up_factor, kernel_size=kernel_size, embedding_dim=5,
                 variant="gated", output_dim=3)
    layer(x, guide)
    params = randomise(layer, rng)
    out = layer(x, guide).numpy()
    assert out.shape == (2, up_factor * height, up_factor * width, 3)
    expected = ref.sapa_layer(x, guide, params, "gated", kernel_size, up_factor,
                              value_projection=True)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_value_projection_flag_and_bias_free():
    rng = np.random.default_rng(5)
    x, guide = _pair(rng, cx=4, cy=6)
    layer = SAPA(kernel_size=3, embedding_dim=4, use_bias=False, value_projection=True)
    layer(x, guide)
    assert layer.v is not None and layer.q.bias is None
    params = randomise(layer, rng)
    expected = ref.sapa_layer(x, guide, params, "bilinear", 3, 2, value_projection=True)
    np.testing.assert_allclose(layer(x, guide).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_channels_first_matches_channels_last():
    rng = np.random.default_rng(11)
    x, guide = _pair(rng, cx=4, cy=6)
    layer = SAPA(kernel_size=3, embedding_dim=4, variant="gated", data_format="channels_first")
    x_cf, guide_cf = x.transpose(0, 3, 1, 2), guide.transpose(0, 3, 1, 2)
    layer(x_cf, guide_cf)
    params = randomise(layer, rng)
    out = layer(x_cf, guide_cf).numpy()
    assert out.shape == (2, 4, 6, 10)
    assert layer.compute_output_shape(x_cf.shape, guide_cf.shape) == (2, 4, 6, 10)
    expected = ref.sapa_layer(x, guide, params, "gated", 3, 2)
    np.testing.assert_allclose(out.transpose(0, 2, 3, 1), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["identity", "bilinear", "gated", "concat"])
def test_layer_gradients_match_numeric(variant):
    rng = np.random.default_rng(21)
    x, guide = _pair(rng, batch=1, height=2, width=3, cx=4, cy=4, dtype=np.float64)
    layer = SAPA(kernel_size=3, embedding_dim=3, variant=variant, dtype="float64")
    layer(x, guide)
    randomise(layer, rng)
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, b: layer(a, b), [x, guide], delta=1e-6
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-6)

    # And with respect to every weight, through Keras's stateless call.
    x_t, guide_t = tf.constant(x), tf.constant(guide)
    initial = [w.numpy() for w in layer.trainable_weights]

    def fn(*trainables):
        out, _ = layer.stateless_call(list(trainables), [], x_t, guide_t)
        return out

    theoretical, numerical = tf.test.compute_gradient(fn, initial, delta=1e-6)
    assert len(theoretical) == len(layer.trainable_weights) > 0
    for t, n, w in zip(theoretical, numerical, layer.trainable_weights):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-6, err_msg=w.path)


def _functional(variant="gated", cx=8, cy=6, **kwargs):
    x_in = keras.Input((None, None, cx), name="x")
    guide_in = keras.Input((None, None, cy), name="guide")
    out = SAPA(kernel_size=3, embedding_dim=4, variant=variant, name="sapa", **kwargs)(x_in, guide_in)
    return keras.Model([x_in, guide_in], out)


def test_functional_model_unknown_spatial_size():
    model = _functional()
    assert model.output.shape == (None, None, None, 8)
    rng = np.random.default_rng(0)
    for height, width in [(3, 5), (4, 4)]:
        x, guide = _pair(rng, height=height, width=width, cx=8, cy=6)
        assert model.predict([x, guide], verbose=0).shape == (2, 2 * height, 2 * width, 8)


def test_config_round_trip():
    layer = SAPA(up_factor=3, kernel_size=7, embedding_dim=16, variant="concat", norm="group",
                 norm_groups=2, use_bias=False, output_dim=12, value_projection=True,
                 data_format="channels_first", implementation="xla",
                 kernel_initializer=keras.initializers.HeNormal(seed=1),
                 bias_initializer="ones", name="my_sapa", dtype="float64")
    config = layer.get_config()
    json.dumps(config)
    clone = SAPA.from_config(config)
    assert clone.get_config() == config
    for key in ("up_factor", "kernel_size", "embedding_dim", "variant", "norm", "norm_groups",
                "use_bias", "output_dim", "value_projection", "data_format", "implementation"):
        assert getattr(clone, key) == getattr(layer, key), key
    assert isinstance(clone.kernel_initializer, keras.initializers.HeNormal)
    assert clone.dtype_policy.name == "float64"
    default = SAPA.from_config(SAPA().get_config())
    assert isinstance(default.kernel_initializer, keras.initializers.TruncatedNormal)
    assert default.kernel_initializer.stddev == 0.02


def test_keras_file_round_trip(tmp_path):
    model = _functional()
    rng = np.random.default_rng(1)
    randomise(model.get_layer("sapa"), rng)
    x, guide = _pair(rng, cx=8, cy=6)
    expected = model.predict([x, guide], verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)  # no custom_objects: registered
    assert isinstance(reloaded.get_layer("sapa"), SAPA)
    np.testing.assert_allclose(reloaded.predict([x, guide], verbose=0), expected, rtol=1e-6, atol=1e-6)


def test_saved_model_reloads_without_keras_sapa(tmp_path):
    model = _functional(variant="bilinear")
    rng = np.random.default_rng(2)
    randomise(model.get_layer("sapa"), rng)
    x, guide = _pair(rng, cx=8, cy=6)
    expected = ref.sapa_layer(
        x, guide,
        {f"{n}.{s}": w.numpy() for n in ("norm_x", "norm_y", "q", "k")
         for s, w in zip(("weight", "bias"), getattr(model.get_layer("sapa"), n).weights)},
        "bilinear", 3, 2,
    )
    export_dir = str(tmp_path / "exported")
    # A plain export: "auto" traces the builtin-op path for it, even where the
    # compiled op is built, so the SavedModel loads with TensorFlow alone.
    model.export(export_dir, verbose=False)
    assert custom_op_types(export_dir) == []
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "guide.npy", guide)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({export_dir!r})
        out = loaded.serve([np.load({str(tmp_path / 'x.npy')!r}),
                            np.load({str(tmp_path / 'guide.npy')!r})])
        np.save({str(tmp_path / 'out.npy')!r}, out.numpy())
        assert "keras_sapa" not in sys.modules, "keras_sapa was imported"
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-4, atol=1e-5)


def test_jit_compile_forward_and_training_step():
    rng = np.random.default_rng(4)
    x, guide = _pair(rng, cx=8, cy=6)
    target = rng.standard_normal((2, 6, 10, 8)).astype(np.float32)
    weights_after = []
    for jit in (True, False):
        keras.utils.set_random_seed(0)
        model = _functional(implementation="auto")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit)
        if jit:
            np.testing.assert_allclose(
                model.predict([x, guide], verbose=0),
                model([x, guide]).numpy(), rtol=1e-5, atol=1e-6,
            )
        history = model.fit([x, guide], target, epochs=1, batch_size=2, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        weights_after.append([w.numpy() for w in model.trainable_weights])
    for jit_w, eager_w in zip(*weights_after):
        np.testing.assert_allclose(jit_w, eager_w, rtol=1e-4, atol=1e-6)
    # The training step changed the weights: the gradient reached them.
    keras.utils.set_random_seed(0)
    initial = [w.numpy() for w in _functional().trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(initial, weights_after[0]))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    rng = np.random.default_rng(6)
    x, guide = _pair(rng, cx=8, cy=8)
    try:
        keras.config.set_dtype_policy(policy)
        layer = SAPA(kernel_size=3, embedding_dim=4, variant="gated")
        out = layer(x, guide)
        params = randomise(layer, rng)
        out = layer(x, guide)
        # Large inputs give large logits: the softmax must not overflow.
        big = layer(x * 300.0, guide * 300.0)
        trainable_dtypes = {w.dtype for w in layer.trainable_weights}
    finally:
        keras.config.set_dtype_policy("float32")
    compute = policy.split("_")[1]
    assert out.dtype.name == compute and trainable_dtypes == {"float32"}
    assert np.isfinite(big.numpy().astype(np.float32)).all()
    expected = ref.sapa_layer(x, guide, params, "gated", 3, 2)
    tol = 5e-2 if compute == "bfloat16" else 1e-2
    np.testing.assert_allclose(out.numpy().astype(np.float32), expected, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel_size": 4}, "kernel_size=4"),
        ({"kernel_size": 0}, "kernel_size=0"),
        ({"up_factor": 0}, "up_factor=0"),
        ({"up_factor": 1.5}, "up_factor=1.5"),
        ({"variant": "dynamic"}, "variant='dynamic'"),
        ({"norm": "batch"}, "norm='batch'"),
        ({"implementation": "triton"}, "implementation='triton'"),
        ({"embedding_dim": 0}, "embedding_dim=0"),
        ({"output_dim": -1}, "output_dim=-1"),
        ({"norm_groups": 0}, "norm_groups=0"),
        ({"data_format": "NHWC"}, "data_format='NHWC'"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAPA(**kwargs)


@pytest.mark.parametrize(
    "layer_kwargs,x_shape,guide_shape,match",
    [
        ({}, (None, 4, 4, 8), (None, 9, 8, 8), "height of `guide`"),
        ({}, (None, 4, 4, 8), (None, 8, 6, 8), "width of `guide`"),
        ({"up_factor": 3}, (None, 4, 4, 8), (None, 8, 8, 8), "up_factor=3"),
        ({}, (2, 4, 4, 8), (3, 8, 8, 8), "same batch size"),
        ({"variant": "identity"}, (None, 4, 4, 8), (None, 8, 8, 6), "same number of channels"),
        ({"norm": "group", "norm_groups": 3}, (None, 4, 4, 9), (None, 8, 8, 8), "norm_groups=3"),
        ({}, (None, 4, 8), (None, 8, 8, 8), "rank-4"),
        ({}, (None, 4, 4, 8), (None, 8, 8, 8, 1), "rank-4"),
        ({}, (None, 4, 4, None), (None, 8, 8, 8), "channel dimensions"),
    ],
)
def test_bad_shapes_at_build_time(layer_kwargs, x_shape, guide_shape, match):
    layer = SAPA(**layer_kwargs)
    with pytest.raises(ValueError, match=match):
        layer.build(x_shape, guide_shape)


def test_bad_shapes_at_call_time():
    model = _functional()
    x = np.zeros((1, 3, 3, 8), np.float32)
    with pytest.raises(ValueError, match="height of `guide`"):
        model([x, np.zeros((1, 7, 6, 6), np.float32)])
    with pytest.raises(ValueError, match="same batch size"):
        model([x, np.zeros((2, 6, 6, 6), np.float32)])

    layer = SAPA(kernel_size=3, embedding_dim=4)
    layer(x, np.zeros((1, 6, 6, 8), np.float32))

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 8))] * 2)
    def graph_call(a, b):
        return layer(a, b)

    with pytest.raises(tf.errors.InvalidArgumentError, match="`guide`"):
        graph_call(x, np.zeros((1, 5, 6, 8), np.float32))


def test_every_implementation_gives_the_reference(implementation):
    rng = np.random.default_rng(31)
    x, guide = _pair(rng, cx=6, cy=4)
    layer = SAPA(kernel_size=5, embedding_dim=4, variant="gated", implementation=implementation)
    layer(x, guide)
    params = randomise(layer, rng)
    expected = ref.sapa_layer(x, guide, params, "gated", 5, 2)
    np.testing.assert_allclose(layer(x, guide).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_compiled_implementation_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    layer = SAPA(kernel_size=3, embedding_dim=4, implementation="compiled")
    x = np.zeros((1, 2, 2, 4), np.float32)
    with pytest.raises(RuntimeError, match="implementation='compiled'.*not available"):
        layer(x, np.zeros((1, 4, 4, 4), np.float32))
    # "auto" falls back to a pure path without complaint.
    auto = SAPA(kernel_size=3, embedding_dim=4)
    assert auto(x, np.zeros((1, 4, 4, 4), np.float32)).shape == (1, 4, 4, 4)


@pytest.mark.parametrize("variant", ["bilinear", "gated", "concat"])
def test_projections_start_from_different_kernels(variant):
    # One Keras random initializer instance returns the same values at every call: shared
    # by the projections, it would start q and k (qy, qx, v, ...) identical.
    layer = SAPA(kernel_size=3, embedding_dim=8, variant=variant, output_dim=12)
    layer.build((None, 4, 4, 16), (None, 8, 8, 16))
    kernels = {name: getattr(layer, name).kernel.numpy()
               for name in ("q", "k", "qy", "qx", "v") if getattr(layer, name) is not None}
    assert len(kernels) >= 3
    names = sorted(kernels)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            rows = min(kernels[a].shape[0], kernels[b].shape[0])
            cols = min(kernels[a].shape[1], kernels[b].shape[1])
            assert not np.allclose(kernels[a][:rows, :cols], kernels[b][:rows, :cols]), (a, b)
        # Each still follows the official initialisation: truncated normal, stddev 0.02.
        assert np.abs(kernels[a]).max() <= 2 * 0.02 + 1e-7
        assert 0.01 < kernels[a].std() < 0.02


def test_seeded_initializer_is_reproducible_and_still_distinct():
    def build():
        layer = SAPA(kernel_size=3, embedding_dim=8,
                     kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02, seed=7))
        layer.build((None, 4, 4, 16), (None, 8, 8, 16))
        return layer.q.kernel.numpy(), layer.k.kernel.numpy()

    (q1, k1), (q2, k2) = build(), build()
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(k1, k2)
    assert not np.allclose(q1, k1)


def test_supports_jit_declines_xla_only_where_the_gpu_op_runs(monkeypatch):
    from keras_sapa.ops import _tf_kernels as _compiled

    # No GPU here (or no usable GPU op): XLA stays allowed.
    assert SAPA().supports_jit is True
    # Where the compiled GPU op is usable, jit_compile="auto" must not pick XLA.
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    monkeypatch.setattr(_compiled, "gpu_op_usable", lambda: True)
    assert SAPA().supports_jit is False
    assert SAPA(implementation="xla").supports_jit is True
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    assert SAPA().supports_jit is True
