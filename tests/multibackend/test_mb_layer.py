"""The SAPA layer on the running backend, against the float64 NumPy loop reference of
the spec (``tests/reference.py``): every variant x norm x data_format, kernel sizes and
up factors with a value projection, the real sizes (C=256, d=64) through every
implementation, gradients with respect to the inputs and every weight, a functional
model that builds, trains a step, saves and reloads, ``jit_compile``, mixed precision,
the config round trip, initialisers, the compiled-implementation fallback of loaded
configs, and bad input.

The main run executes this file on TensorFlow; ``tests/test_backends.py`` runs it again
on JAX and PyTorch (TensorFlow-only parts say so and skip there)."""

import json
import warnings

import keras
import numpy as np
import pytest

import reference as ref
from backend_utils import PARAM_NAMES
from backend_utils import directional_derivative
from backend_utils import randomise
from backend_utils import to_numpy
from backend_utils import vjp
from keras_sapa import SAPA
from keras_sapa import ops as sapa_ops

VARIANTS = ("identity", "bilinear", "gated", "concat")
NORMS = ("layer", "group", None)
BACKEND = keras.config.backend()


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
    layer = SAPA(
        kernel_size=3,
        embedding_dim=6,
        variant=variant,
        norm=norm,
        norm_groups=4,
        data_format=data_format,
    )
    if data_format == "channels_first":
        x_in, guide_in = x.transpose(0, 3, 1, 2), guide.transpose(0, 3, 1, 2)
    else:
        x_in, guide_in = x, guide
    layer(x_in, guide_in)
    params = randomise(layer, rng)
    out = to_numpy(layer(x_in, guide_in))
    if data_format == "channels_first":
        assert layer.compute_output_shape(x_in.shape, guide_in.shape) == (2, 8, 6, 10)
        out = out.transpose(0, 2, 3, 1)
    expected = ref.sapa_layer(x, guide, params, variant, 3, 2, norm=norm, groups=4)
    assert out.shape == (2, 6, 10, 8)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kernel_size,up_factor,height,width", [(1, 1, 3, 3), (3, 3, 2, 3), (5, 2, 3, 5), (7, 4, 2, 2)]
)
def test_layer_sizes_and_value_projection(kernel_size, up_factor, height, width):
    """Kernel sizes and up factors (K=7 over a 2x2 map: the window is larger than the
    map), with ``output_dim`` (a value projection)."""
    rng = np.random.default_rng(kernel_size + 10 * up_factor)
    x, guide = _pair(rng, height=height, width=width, s=up_factor, cx=6, cy=4)
    layer = SAPA(
        up_factor=up_factor,
        kernel_size=kernel_size,
        embedding_dim=5,
        variant="gated",
        output_dim=3,
    )
    layer(x, guide)
    params = randomise(layer, rng)
    out = to_numpy(layer(x, guide))
    assert out.shape == (2, up_factor * height, up_factor * width, 3)
    expected = ref.sapa_layer(
        x, guide, params, "gated", kernel_size, up_factor, value_projection=True
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_value_projection_flag_and_bias_free():
    rng = np.random.default_rng(5)
    x, guide = _pair(rng, cx=4, cy=6)
    layer = SAPA(kernel_size=3, embedding_dim=4, use_bias=False, value_projection=True)
    layer(x, guide)
    assert layer.v is not None and layer.q.bias is None
    params = randomise(layer, rng)
    expected = ref.sapa_layer(x, guide, params, "bilinear", 3, 2, value_projection=True)
    np.testing.assert_allclose(to_numpy(layer(x, guide)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["patches", "xla", "compiled", "auto"])
def test_layer_real_sizes(implementation):
    """C=256 channels, d=64, K=5, with a value projection, through every implementation
    ("compiled": the backend's compiled kernels, skipped saying why where not built)."""
    if implementation == "compiled" and not sapa_ops.compiled_available():
        pytest.skip(f"the compiled kernels of the {BACKEND} backend are not built or are disabled")
    rng = np.random.default_rng(41)
    x, guide = _pair(rng, batch=1, height=4, width=5, cx=256, cy=64)
    layer = SAPA(
        kernel_size=5,
        embedding_dim=64,
        variant="gated",
        output_dim=128,
        implementation=implementation,
    )
    layer(x, guide)
    params = randomise(layer, rng, scale=0.1)
    expected = ref.sapa_layer(x, guide, params, "gated", 5, 2, value_projection=True)
    # float32 sums over 256 channels (norms, projections): rounding of order 1e-5.
    np.testing.assert_allclose(to_numpy(layer(x, guide)), expected, rtol=1e-4, atol=5e-5)


# Keras's normalisation layers lose float64 precision on PyTorch (they round through
# float32) and, with Keras 3.15, on JAX: a float64 layer's forward is off the float64
# reference by ~4e-7 with LayerNorm and exact with norm=None (the SAPA ops themselves are
# exact there). A looser bound on those backends, still far below the O(1) error of a
# wrong gradient.
GRADIENT_RTOL = 1e-6 if BACKEND == "tensorflow" else 2e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_gradients_match_reference(variant):
    """The backend's gradients of a float64 layer (through ``stateless_call``) with
    respect to ``x``, ``guide`` and every weight, each against a central difference of
    the float64 loop reference along a random direction."""
    rng = np.random.default_rng(21 + VARIANTS.index(variant))
    x, guide = _pair(rng, batch=1, height=2, width=3, cx=4, cy=4, dtype=np.float64)
    projected = variant == "gated"  # one case with the value projection's weights
    layer = SAPA(
        kernel_size=3,
        embedding_dim=3,
        variant=variant,
        value_projection=projected,
        dtype="float64",
    )
    layer(x, guide)
    params = randomise(layer, rng)
    names = {
        id(w): f"{n}.{suffix}"
        for n in PARAM_NAMES
        if getattr(layer, n, None) is not None
        for w, suffix in zip(getattr(layer, n).weights, ("weight", "bias"), strict=False)
    }
    keys = [names[id(w)] for w in layer.trainable_weights]
    assert len(keys) == len(params) > 0
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(x_t, guide_t, *weights):
        return layer.stateless_call(list(weights), non_trainable, x_t, guide_t)[0]

    def reference(x_a, guide_a, *weights):
        return ref.sapa_layer(
            x_a,
            guide_a,
            dict(zip(keys, weights, strict=True)),
            variant,
            3,
            2,
            value_projection=projected,
        )

    args = [x, guide] + [params[k] for k in keys]
    cotangent = rng.standard_normal((1, 4, 6, 4))
    grads = vjp(forward, args, cotangent)
    for index, (name, grad) in enumerate(zip(["x", "guide", *keys], grads, strict=True)):
        assert grad.dtype == np.float64, name
        directions = [np.zeros_like(a) for a in args]
        directions[index] = rng.standard_normal(args[index].shape)
        expected = directional_derivative(reference, args, directions, cotangent, jit=False)
        np.testing.assert_allclose(
            float(np.sum(grad * directions[index])),
            expected,
            rtol=GRADIENT_RTOL,
            atol=1e-9,
            err_msg=name,
        )


def _functional(cx=8, cy=6, head=True, **kwargs):
    x_in = keras.Input((None, None, cx), name="x")
    guide_in = keras.Input((None, None, cy), name="guide")
    out = SAPA(kernel_size=3, embedding_dim=4, variant="gated", name="sapa", **kwargs)(
        x_in, guide_in
    )
    if head:
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
    changed = [
        not np.allclose(b, a)
        for b, a, w in zip(before, after, model.trainable_weights, strict=True)
        if id(w) in sapa_weights
    ]
    assert changed and all(changed), "every SAPA weight gets a gradient"

    expected = model.predict([x, guide], verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)  # registered: no custom_objects
    assert isinstance(reloaded.get_layer("sapa"), SAPA)
    np.testing.assert_allclose(
        reloaded.predict([x, guide], verbose=0), expected, rtol=1e-6, atol=1e-6
    )
    # Unknown spatial size: other image sizes run through the same model.
    x2, guide2 = _pair(rng, height=4, width=4, cx=8, cy=6)
    assert reloaded.predict([x2, guide2], verbose=0).shape == (2, 8, 8, 3)


def test_jit_compile_forward_and_training_step():
    """``compile(jit_compile=True)`` (XLA on TensorFlow, ``jax.jit`` on JAX) against
    the same training step without it, and the forward against an eager call. PyTorch's
    jit_compile is ``torch.compile``: ``test_mb_ops::test_torch_compile_forward_and_backward``
    covers it."""
    if BACKEND == "torch":
        pytest.skip("jit_compile=True is torch.compile on PyTorch (covered in test_mb_ops)")
    rng = np.random.default_rng(4)
    x, guide = _pair(rng, cx=8, cy=6)
    target = rng.standard_normal((2, 6, 10, 8)).astype(np.float32)
    weights_after = []
    for jit in (True, False):
        keras.utils.set_random_seed(0)
        model = _functional(head=False, implementation="auto")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit)
        if jit:
            np.testing.assert_allclose(
                model.predict([x, guide], verbose=0),
                to_numpy(model([x, guide])),
                rtol=1e-5,
                atol=1e-6,
            )
        history = model.fit([x, guide], target, epochs=1, batch_size=2, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        weights_after.append([to_numpy(w) for w in model.trainable_weights])
    for jit_w, eager_w in zip(*weights_after, strict=True):
        np.testing.assert_allclose(jit_w, eager_w, rtol=1e-4, atol=1e-6)
    # The training step changed the weights: the gradient reached them.
    keras.utils.set_random_seed(0)
    initial = [to_numpy(w) for w in _functional(head=False).trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(initial, weights_after[0], strict=True))


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
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(out, "float32")), expected, atol=tol * 4, rtol=tol
    )


def test_config_round_trip():
    settings = {
        "up_factor": 3,
        "kernel_size": 7,
        "embedding_dim": 16,
        "variant": "concat",
        "norm": "group",
        "norm_groups": 2,
        "use_bias": False,
        "output_dim": 12,
        "value_projection": True,
        "data_format": "channels_first",
        "implementation": "xla",
    }
    layer = SAPA(
        **settings,
        kernel_initializer=keras.initializers.HeNormal(seed=1),
        bias_initializer="ones",
        name="my_sapa",
        dtype="float64",
    )
    config = layer.get_config()
    json.dumps(config)
    clone = SAPA.from_config(config)
    assert clone.get_config() == config
    assert {key: getattr(clone, key) for key in settings} == settings
    assert isinstance(clone.kernel_initializer, keras.initializers.HeNormal)
    assert clone.dtype_policy.name == "float64"
    default = SAPA.from_config(SAPA().get_config())
    assert isinstance(default.kernel_initializer, keras.initializers.TruncatedNormal)
    assert default.kernel_initializer.stddev == 0.02


@pytest.mark.parametrize("variant", ["bilinear", "gated", "concat"])
def test_projections_start_from_different_kernels(variant):
    # One Keras random initializer instance returns the same values at every call: shared
    # by the projections, it would start q and k (qy, qx, v, ...) identical.
    layer = SAPA(kernel_size=3, embedding_dim=8, variant=variant, output_dim=12)
    layer.build((None, 4, 4, 16), (None, 8, 8, 16))
    kernels = {
        name: to_numpy(getattr(layer, name).kernel)
        for name in ("q", "k", "qy", "qx", "v")
        if getattr(layer, name) is not None
    }
    assert len(kernels) >= 3
    names = sorted(kernels)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            rows = min(kernels[a].shape[0], kernels[b].shape[0])
            cols = min(kernels[a].shape[1], kernels[b].shape[1])
            assert not np.allclose(kernels[a][:rows, :cols], kernels[b][:rows, :cols]), (a, b)
        # Each still follows the official initialisation: truncated normal, stddev 0.02.
        assert np.abs(kernels[a]).max() <= 2 * 0.02 + 1e-7
        assert 0.01 < kernels[a].std() < 0.02


def test_seeded_initializer_is_reproducible_and_still_distinct():
    def build():
        layer = SAPA(
            kernel_size=3,
            embedding_dim=8,
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02, seed=7),
        )
        layer.build((None, 4, 4, 16), (None, 8, 8, 16))
        return to_numpy(layer.q.kernel), to_numpy(layer.k.kernel)

    (q1, k1), (q2, k2) = build(), build()
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(k1, k2)
    assert not np.allclose(q1, k1)


def test_compiled_from_config_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    rng = np.random.default_rng(12)
    x, guide = _pair(rng)
    # Explicit construction keeps the request: calling it without the op raises.
    explicit = SAPA(kernel_size=3, embedding_dim=4, implementation="compiled")
    assert explicit.implementation == "compiled"
    with pytest.raises(RuntimeError, match="implementation='compiled'.*not available"):
        explicit(x, guide)
    # "auto" falls back to a pure path without complaint.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert SAPA(kernel_size=3, embedding_dim=4)(x, guide).shape == (2, 6, 10, 8)
    assert not [w for w in caught if "compiled" in str(w.message)]
    # A config (as saved where the op was built) loads and runs on the pure path.
    config = SAPA(
        kernel_size=3, embedding_dim=4, implementation="compiled", name="saved"
    ).get_config()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = SAPA.from_config(config)
    messages = [str(w.message) for w in caught if "compiled" in str(w.message)]
    assert len(messages) == 1 and "'saved'" in messages[0], messages
    assert loaded.implementation == "auto"
    loaded(x, guide)
    params = randomise(loaded, rng)
    np.testing.assert_allclose(
        to_numpy(loaded(x, guide)),
        ref.sapa_layer(x, guide, params, "bilinear", 3, 2),
        rtol=1e-5,
        atol=1e-5,
    )


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
    x = np.zeros((1, 3, 3, 8), np.float32)
    layer = SAPA(kernel_size=3, embedding_dim=4)
    layer(x, np.zeros((1, 6, 6, 8), np.float32))
    with pytest.raises(ValueError, match="width of `guide`"):
        layer(x, np.zeros((1, 6, 5, 8), np.float32))
    with pytest.raises(ValueError, match="same batch size"):
        layer(x, np.zeros((2, 6, 6, 8), np.float32))
    model = _functional(head=False)
    with pytest.raises(ValueError, match="height of `guide`"):
        model([x, np.zeros((1, 7, 6, 6), np.float32)])
    with pytest.raises(ValueError, match="same batch size"):
        model([x, np.zeros((2, 6, 6, 6), np.float32)])
    if BACKEND == "tensorflow":
        # Sizes unknown while tracing a graph are checked when it runs.
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec((None, None, None, 8))] * 2)
        def graph_call(a, b):
            return layer(a, b)

        with pytest.raises(tf.errors.InvalidArgumentError, match="`guide`"):
            graph_call(x, np.zeros((1, 5, 6, 8), np.float32))


def test_set_implementation_and_training_argument():
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
        np.testing.assert_allclose(
            model.predict([x, guide], verbose=0), expected, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            to_numpy(model([x, guide], training=True)), expected, rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="no SAPA layer"):
        sapa_ops.set_implementation(keras.Sequential([keras.layers.Dense(2)]), "auto")
    if not sapa_ops.compiled_available():
        with pytest.raises(RuntimeError, match="implementation='compiled'"):
            sapa_ops.set_implementation(model, "compiled")


def test_supports_jit_declines_xla_only_where_the_gpu_op_runs(monkeypatch):
    # No GPU here (or no usable GPU op): XLA stays allowed, on every backend.
    assert SAPA().supports_jit is True
    if BACKEND != "tensorflow":
        return  # only TensorFlow has a compiled GPU op that XLA cannot hold
    import tensorflow as tf

    from keras_sapa.ops import _tf_kernels as _compiled

    # Where the compiled GPU op is usable, jit_compile="auto" must not pick XLA.
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else []
    )
    monkeypatch.setattr(_compiled, "gpu_op_usable", lambda: True)
    assert SAPA().supports_jit is False
    assert SAPA(implementation="xla").supports_jit is True
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    assert SAPA().supports_jit is True
