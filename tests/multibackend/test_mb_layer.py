"""The SAPA layer on the running backend: every variant x norm x data_format against
the NumPy loop reference, a functional model that builds, trains a step, saves and
reloads, mixed precision, the compiled-implementation fallback of loaded configs,
bad input, and imports that stay free of TensorFlow / KerasCV."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import reference as ref
from backend_utils import randomise, to_numpy
from keras_sapa import SAPA

VARIANTS = ("identity", "bilinear", "gated", "concat")
NORMS = ("layer", "group", None)


def _pair(rng, batch=2, height=3, width=5, s=2, cx=8, cy=8, dtype=np.float32):
    x = rng.standard_normal((batch, height, width, cx)).astype(dtype)
    guide = rng.standard_normal((batch, s * height, s * width, cy)).astype(dtype)
    return x, guide


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_matches_reference(variant, norm, data_format):
    seed = 10 * VARIANTS.index(variant) + NORMS.index(norm) + 100 * (data_format[-4:] == "last")
    rng = np.random.default_rng(seed)
    x, guide = _pair(rng)
    layer = SAPA(kernel_size=3, embedding_dim=6, variant=variant, norm=norm, norm_groups=4,
                 data_format=data_format)
    if data_format == "channels_first":
        x_in, guide_in = x.transpose(0, 3, 1, 2), guide.transpose(0, 3, 1, 2)
    else:
        x_in, guide_in = x, guide
    layer(x_in, guide_in)
    params = randomise(layer, rng)
    out = to_numpy(layer(x_in, guide_in))
    if data_format == "channels_first":
        out = out.transpose(0, 2, 3, 1)
    expected = ref.sapa_layer(x, guide, params, variant, 3, 2, norm=norm, groups=4)
    assert out.shape == (2, 6, 10, 8)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["patches", "xla", "auto"])
def test_layer_real_sizes(implementation):
    """C=256 channels, d=64, K=5, with a value projection."""
    rng = np.random.default_rng(41)
    x, guide = _pair(rng, batch=1, height=4, width=5, cx=256, cy=64)
    layer = SAPA(kernel_size=5, embedding_dim=64, variant="gated", output_dim=128,
                 implementation=implementation)
    layer(x, guide)
    params = randomise(layer, rng, scale=0.1)
    expected = ref.sapa_layer(x, guide, params, "gated", 5, 2, value_projection=True)
    # float32 sums over 256 channels (norms, projections): rounding of order 1e-5.
    np.testing.assert_allclose(to_numpy(layer(x, guide)), expected, rtol=1e-4, atol=5e-5)


def _functional(cx=8, cy=6, **kwargs):
    x_in = keras.Input((None, None, cx), name="x")
    guide_in = keras.Input((None, None, cy), name="guide")
    out = SAPA(kernel_size=3, embedding_dim=4, variant="gated", name="sapa", **kwargs)(
        x_in, guide_in)
    out = keras.layers.Conv2D(3, 1, name="head")(out)
    return keras.Model([x_in, guide_in], out)


def test_functional_model_trains_saves_and_reloads(tmp_path):
    keras.utils.set_random_seed(0)
    model = _functional()
    assert model.output.shape == (None, None, None, 3)
    rng = np.random.default_rng(1)
    randomise(model.get_layer("sapa"), rng)
    x, guide = _pair(rng, cx=8, cy=6)
    target = rng.standard_normal((2, 6, 10, 3)).astype(np.float32)
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = model.fit([x, guide], target, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [to_numpy(w) for w in model.trainable_weights]
    sapa_weights = {id(w) for w in model.get_layer("sapa").trainable_weights}
    changed = [not np.allclose(b, a) for b, a, w in
               zip(before, after, model.trainable_weights) if id(w) in sapa_weights]
    assert changed and all(changed), "every SAPA weight gets a gradient"

    expected = model.predict([x, guide], verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)  # registered: no custom_objects
    assert isinstance(reloaded.get_layer("sapa"), SAPA)
    np.testing.assert_allclose(reloaded.predict([x, guide], verbose=0), expected,
                               rtol=1e-6, atol=1e-6)
    # Unknown spatial size: other image sizes run through the same model.
    x2, guide2 = _pair(rng, height=4, width=4, cx=8, cy=6)
    assert reloaded.predict([x2, guide2], verbose=0).shape == (2, 8, 8, 3)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    rng = np.random.default_rng(6)
    x, guide = _pair(rng)
    try:
        keras.config.set_dtype_policy(policy)
        layer = SAPA(kernel_size=3, embedding_dim=4, variant="gated")
        layer(x, guide)
        params = randomise(layer, rng)
        out = layer(x, guide)
        # Large inputs give large logits: the softmax must not overflow.
        big = layer(x * 300.0, guide * 300.0)
        trainable_dtypes = {w.dtype for w in layer.trainable_weights}
    finally:
        keras.config.set_dtype_policy("float32")
    compute = policy.split("_")[1]
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert trainable_dtypes == {"float32"}
    assert np.isfinite(to_numpy(keras.ops.cast(big, "float32"))).all()
    expected = ref.sapa_layer(x, guide, params, "gated", 3, 2)
    tol = 5e-2 if compute == "bfloat16" else 1e-2
    np.testing.assert_allclose(to_numpy(keras.ops.cast(out, "float32")), expected,
                               atol=tol * 4, rtol=tol)


def test_compiled_from_config_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    rng = np.random.default_rng(12)
    x, guide = _pair(rng)
    # Explicit construction keeps the request: calling it without the op raises.
    explicit = SAPA(kernel_size=3, embedding_dim=4, implementation="compiled")
    assert explicit.implementation == "compiled"
    with pytest.raises(RuntimeError, match="implementation='compiled'"):
        explicit(x, guide)
    # A config (as saved where the op was built) loads and runs on the pure path.
    config = SAPA(kernel_size=3, embedding_dim=4, implementation="compiled",
                  name="saved").get_config()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = SAPA.from_config(config)
    messages = [str(w.message) for w in caught if "compiled" in str(w.message)]
    assert len(messages) == 1 and "'saved'" in messages[0], messages
    assert loaded.implementation == "auto"
    loaded(x, guide)
    params = randomise(loaded, rng)
    np.testing.assert_allclose(to_numpy(loaded(x, guide)),
                               ref.sapa_layer(x, guide, params, "bilinear", 3, 2),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel_size": 4}, "kernel_size=4"),
        ({"up_factor": 1.5}, "up_factor=1.5"),
        ({"variant": "dynamic"}, "variant='dynamic'"),
        ({"norm": "batch"}, "norm='batch'"),
        ({"implementation": "triton"}, "implementation='triton'"),
        ({"embedding_dim": 0}, "embedding_dim=0"),
        ({"data_format": "NHWC"}, "data_format='NHWC'"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAPA(**kwargs)


def test_bad_shapes():
    layer = SAPA(kernel_size=3, embedding_dim=4)
    with pytest.raises(ValueError, match="height of `guide`"):
        layer.build((None, 4, 4, 8), (None, 9, 8, 8))
    layer = SAPA(kernel_size=3, embedding_dim=4)
    x = np.zeros((1, 3, 3, 8), np.float32)
    layer(x, np.zeros((1, 6, 6, 8), np.float32))
    with pytest.raises(ValueError, match="width of `guide`"):
        layer(x, np.zeros((1, 6, 5, 8), np.float32))
    with pytest.raises(ValueError, match="same batch size"):
        layer(x, np.zeros((2, 6, 6, 8), np.float32))


def test_imports_stay_light():
    """keras_sapa (ops, layers, convert) imports no KerasCV, and no TensorFlow unless
    it is Keras's backend."""
    backend = keras.config.backend()
    script = (
        "import sys, keras_sapa, keras_sapa.ops, keras_sapa.layers, keras_sapa.convert\n"
        "print(sorted(m for m in ('tensorflow', 'keras_cv', 'keras_hub') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "KERAS_BACKEND": backend}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = eval(result.stdout.strip().splitlines()[-1])
    expected = ["tensorflow"] if backend == "tensorflow" else []
    assert loaded == expected, f"{backend}: import keras_sapa loaded {loaded}"


def test_set_implementation_and_training_argument():
    from keras_sapa import ops as sapa_ops

    model = _functional()
    rng = np.random.default_rng(13)
    params = randomise(model.get_layer("sapa"), rng)
    x, guide = _pair(rng, cx=8, cy=6)
    head = model.get_layer("head")
    kernel, bias = (to_numpy(w).astype(np.float64) for w in head.weights)
    expected = ref.sapa_layer(x, guide, params, "gated", 3, 2) @ kernel[0, 0] + bias
    for implementation in ("patches", "xla"):
        assert sapa_ops.set_implementation(model, implementation) == 1
        assert model.get_layer("sapa").implementation == implementation
        np.testing.assert_allclose(model.predict([x, guide], verbose=0), expected,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(to_numpy(model([x, guide], training=True)), expected,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no SAPA layer"):
        sapa_ops.set_implementation(keras.Sequential([keras.layers.Dense(2)]), "auto")
    if not sapa_ops.compiled_available():
        with pytest.raises(RuntimeError, match="implementation='compiled'"):
            sapa_ops.set_implementation(model, "compiled")
