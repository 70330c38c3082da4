"""The functional ops against the NumPy loop reference, their gradients, and bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sapa
import reference as ref
from keras_sapa import ops
from keras_sapa.ops import _tf_builtin

PURE = ["patches", "xla"]
ALL = PURE + [
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(
            not ops.compiled_available(), reason="compiled custom op library not built"
        ),
    )
]


def _inputs(rng, batch, height, width, s, d, c, dtype=np.float32):
    query = rng.standard_normal((batch, s * height, s * width, d)).astype(dtype)
    key = rng.standard_normal((batch, height, width, d)).astype(dtype)
    value = rng.standard_normal((batch, height, width, c)).astype(dtype)
    return query, key, value


@pytest.mark.parametrize("implementation", ALL)
@pytest.mark.parametrize(
    "kernel_size,up_factor,height,width",
    [
        (1, 1, 3, 4),
        (3, 2, 3, 5),
        (5, 2, 4, 3),
        (5, 3, 3, 3),
        (7, 2, 3, 5),
        (3, 4, 2, 3),
        (5, 1, 5, 7),
    ],
)
def test_ops_match_reference(implementation, kernel_size, up_factor, height, width):
    rng = np.random.default_rng(kernel_size * 10 + up_factor)
    query, key, value = _inputs(rng, 2, height, width, up_factor, 4, 3)
    expected_sim = ref.similarity(query, key, kernel_size, up_factor)
    got_sim = ops.similarity(query, key, kernel_size, up_factor, implementation)
    np.testing.assert_allclose(got_sim.numpy(), expected_sim, rtol=1e-5, atol=1e-5)

    weights = rng.standard_normal(expected_sim.shape).astype(np.float32)
    got_agg = ops.aggregate(weights, value, kernel_size, up_factor, implementation)
    np.testing.assert_allclose(
        got_agg.numpy(),
        ref.aggregate(weights, value, kernel_size, up_factor),
        rtol=1e-5,
        atol=1e-5,
    )

    got = ops.sapa(query, key, value, kernel_size, up_factor, implementation)
    np.testing.assert_allclose(
        got.numpy(),
        ref.sapa(query, key, value, kernel_size, up_factor),
        rtol=1e-5,
        atol=1e-5,
    )


def test_padding_enters_softmax_as_zero():
    """At a corner, padded points take softmax mass: real weights sum below 1."""
    query = np.ones((1, 2, 2, 1), np.float32)
    key = np.ones((1, 1, 1, 1), np.float32)
    value = np.ones((1, 1, 1, 1), np.float32)
    out = ops.sapa(query, key, value, kernel_size=3, up_factor=2).numpy()
    # One real point with logit 1 and eight padded points with logit 0.
    expected = np.e / (np.e + 8.0)
    np.testing.assert_allclose(out, np.full_like(out, expected), rtol=1e-6)


@pytest.mark.parametrize("implementation", ALL)
def test_gradients_match_numeric(implementation):
    """float64 central differences of the fused op, every element: a numeric spot check
    of the gradients that tests/multibackend/test_mb_ops.py compares, op by op, with
    the loop reference's analytic VJPs (the window ops' own gradients are checked
    there)."""
    rng = np.random.default_rng(7)
    query, key, value = _inputs(rng, 1, 3, 2, 2, 2, 2, dtype=np.float64)
    theoretical, numerical = tf.test.compute_gradient(
        lambda q, k, v: ops.sapa(q, k, v, 3, 2, implementation), [query, key, value], delta=1e-6
    )
    for t, n in zip(theoretical, numerical, strict=True):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


def test_xla_forward_and_gradient_compile():
    rng = np.random.default_rng(3)
    query, key, value = _inputs(rng, 2, 4, 3, 2, 4, 5)

    @tf.function(jit_compile=True)
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = ops.sapa(q, k, v, 5, 2)  # "auto" must pick a path XLA can compile
            loss = tf.reduce_sum(out * out)
        return out, tape.gradient(loss, [q, k, v])

    out, grads = step(tf.constant(query), tf.constant(key), tf.constant(value))
    np.testing.assert_allclose(
        out.numpy(), ref.sapa(query, key, value, 5, 2), rtol=1e-5, atol=1e-5
    )
    eager_out, eager_grads = step.python_function(
        tf.constant(query), tf.constant(key), tf.constant(value)
    )
    for g, e in zip(grads, eager_grads, strict=False):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-5)


def _custom_op_types(fn, *specs):
    """The KerasSapa op types in the graph that tracing ``fn`` at ``specs`` makes."""
    graph = tf.function(fn).get_concrete_function(*specs).graph
    return sorted({op.type for op in graph.get_operations() if op.type.startswith("KerasSapa")})


SPECS = (tf.TensorSpec((1, 8, 6, 4)), tf.TensorSpec((1, 4, 3, 4)), tf.TensorSpec((1, 4, 3, 5)))


def test_in_xla_context_tracks_tensorflow():
    """Pins the one non-public TensorFlow API of the package: if TensorFlow renames or
    changes ``tf.__internal__.get_enclosing_xla_context``, this fails."""
    assert callable(tf.__internal__.get_enclosing_xla_context)
    seen = {}

    def probe(name):
        def fn(x):
            seen[name] = _tf_builtin.in_xla_context()
            return x

        return fn

    assert _tf_builtin.in_xla_context() is False  # eager
    tf.function(probe("graph"))(tf.zeros(()))
    tf.function(probe("jit"), jit_compile=True)(tf.zeros(()))
    nested = tf.function(probe("nested"))
    tf.function(lambda x: nested(x), jit_compile=True)(tf.zeros(()))
    assert seen == {"graph": False, "jit": True, "nested": True}


def test_auto_rule():
    """Eager calls and training graphs use the compiled op (when built); graphs that do
    not train, and XLA-compiled ones, use builtin ops; use_implementation wins."""
    eager = "compiled" if ops.compiled_available() else "patches"
    assert ops.resolve_implementation("auto") == eager
    assert ops.resolve_implementation("auto", training=True) == eager
    seen = {}

    def probe(name, training):
        def fn(x):
            seen[name] = ops.resolve_implementation("auto", training=training)
            return x

        return fn

    for training in (None, False, np.bool_(False), tf.constant(True)):
        tf.function(probe(f"inference {training!r}", training))(tf.zeros(()))
    tf.function(probe("training", True))(tf.zeros(()))
    tf.function(probe("jit training", True), jit_compile=True)(tf.zeros(()))
    assert {v for k, v in seen.items() if k.startswith("inference")} == {"xla"}
    assert seen["training"] == ("compiled" if ops.compiled_available() else "xla")
    assert seen["jit training"] == "xla"
    with ops.use_implementation("patches"):
        assert ops.resolve_implementation("auto") == "patches"
        assert ops.resolve_implementation("xla") == "xla"
        tf.function(probe("scoped", None))(tf.zeros(()))
    assert seen["scoped"] == "patches"


def test_auto_graphs_hold_custom_ops_only_when_training():
    def infer(q, k, v):
        return ops.sapa(q, k, v, 3, 2)

    def train(q, k, v):
        return ops.sapa(q, k, v, 3, 2, training=True)

    assert _custom_op_types(infer, *SPECS) == []
    trained = _custom_op_types(train, *SPECS)
    if ops.compiled_available():
        assert trained, "a training graph should use the compiled op"
        with ops.use_implementation("compiled"):  # asked for: kept in inference too
            assert _custom_op_types(infer, *SPECS)
    else:
        assert trained == []


def test_environment_variable_read_at_trace_time(monkeypatch):
    def train(q, k, v):
        return ops.sapa(q, k, v, 3, 2, training=True)

    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    assert _custom_op_types(train, *SPECS) == []
    assert ops.resolve_implementation("auto") == "patches"


class _Holder(keras.layers.Layer):
    """A custom layer holding a SAPA layer as an attribute (as a decoder would)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.up = keras_sapa.SAPA(kernel_size=3, embedding_dim=4, implementation="xla")

    def call(self, x, guide):
        return self.up(x, guide)


def _two_level_model():
    x_in, g_in = keras.Input((4, 3, 6)), keras.Input((8, 6, 5))
    direct = keras_sapa.SAPA(kernel_size=3, embedding_dim=4)(x_in, g_in)
    nested = _Holder()(x_in, g_in)
    return keras.Model([x_in, g_in], keras.layers.Add()([direct, nested]))


def test_set_implementation_finds_nested_layers():
    """Also pins the one non-public Keras API used (``Layer._flatten_layers``)."""
    model = _two_level_model()
    layers = [x for x in model._flatten_layers() if isinstance(x, keras_sapa.SAPA)]
    assert len(layers) == 2
    assert ops.set_implementation(model, "patches") == 2
    assert [x.implementation for x in layers] == ["patches", "patches"]
    with pytest.raises(ValueError, match="implementation='cuda'"):
        ops.set_implementation(model, "cuda")
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no SAPA layer"):
        ops.set_implementation(plain, "xla")


def test_set_implementation_retraces_keras_functions(monkeypatch):
    """Keras traces predict/train functions once; the choice made then sticks (even a
    later use_implementation scope does not change it) until set_implementation."""
    chosen = []
    resolve = ops.resolve_implementation

    def recording(implementation="auto", training=None, like=None):
        result = resolve(implementation, training, like)
        if not tf.executing_eagerly():
            chosen.append(result)
        return result

    monkeypatch.setattr(ops, "resolve_implementation", recording)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 3, 6)).astype("float32")
    g = rng.standard_normal((2, 8, 6, 5)).astype("float32")
    model = _two_level_model()
    ops.set_implementation(model, "auto")
    first = model.predict([x, g], verbose=0)
    assert chosen and set(chosen) == {"xla"}  # inference graph: builtin ops
    chosen.clear()
    with ops.use_implementation("patches"):
        model.predict([x, g], verbose=0)
    assert chosen == []  # not traced again
    ops.set_implementation(model, "patches")
    assert model.predict_function is None and model.train_function is None
    second = model.predict([x, g], verbose=0)
    assert chosen and set(chosen) == {"patches"}
    np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-5)
    chosen.clear()
    model.compile(optimizer="sgd", loss="mse")
    model.fit([x, g], first, epochs=1, verbose=0)
    assert chosen and set(chosen) == {"patches"}


def test_set_implementation_compiled_without_library(monkeypatch):
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    with pytest.raises(RuntimeError, match="KERAS_SAPA_DISABLE_COMPILED"):
        ops.set_implementation(_two_level_model(), "compiled")


def test_float16_large_logits_no_nan():
    rng = np.random.default_rng(0)
    query, key, value = _inputs(rng, 1, 3, 3, 2, 8, 4)
    # Logits around 1e6 overflow float16 if the similarity were computed in it.
    out = ops.sapa(
        tf.constant(query * 400, tf.float16),
        tf.constant(key * 400, tf.float16),
        tf.constant(value, tf.float16),
        3,
        2,
    )
    assert out.dtype == tf.float16
    assert np.isfinite(out.numpy()).all()
    expected = ref.sapa(
        query.astype(np.float16).astype(np.float64) * 400,
        key.astype(np.float16).astype(np.float64) * 400,
        value.astype(np.float16),
        3,
        2,
    )
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel_size": 4}, "kernel_size=4"),
        ({"kernel_size": 0}, "kernel_size=0"),
        ({"kernel_size": -3}, "kernel_size=-3"),
        ({"kernel_size": 2.5}, "kernel_size=2.5"),
        ({"up_factor": 0}, "up_factor=0"),
        ({"up_factor": "2"}, "up_factor='2'"),
        ({"implementation": "cuda"}, "implementation='cuda'"),
    ],
)
def test_bad_arguments(kwargs, match):
    query = tf.zeros((1, 4, 4, 2))
    key = tf.zeros((1, 2, 2, 2))
    with pytest.raises(ValueError, match=match):
        ops.similarity(query, key, **kwargs)


@pytest.mark.parametrize(
    "query_shape,key_shape,match",
    [
        ((1, 5, 4, 2), (1, 2, 2, 2), "height of `query`"),
        ((1, 4, 3, 2), (1, 2, 2, 2), "width of `query`"),
        ((2, 4, 4, 2), (1, 2, 2, 2), "same batch size"),
        ((1, 4, 4, 3), (1, 2, 2, 2), "same number of channels"),
        ((4, 4, 2), (1, 2, 2, 2), "rank-4"),
        ((1, 4, 4, 2), (1, 2, 2, 2, 1), "rank-4"),
    ],
)
def test_bad_shapes(query_shape, key_shape, match):
    with pytest.raises(ValueError, match=match):
        ops.similarity(tf.zeros(query_shape), tf.zeros(key_shape), 3, 2)


def test_bad_weights_channels():
    with pytest.raises(ValueError, match="kernel_size\\*\\*2=9"):
        ops.aggregate(tf.zeros((1, 4, 4, 25)), tf.zeros((1, 2, 2, 3)), 3, 2)


def test_unknown_shapes_checked_at_run_time():
    @tf.function(
        input_signature=[
            tf.TensorSpec((None, None, None, 2)),
            tf.TensorSpec((None, None, None, 2)),
        ]
    )
    def fn(q, k):
        return ops.similarity(q, k, 3, 2)

    assert fn(tf.zeros((1, 4, 6, 2)), tf.zeros((1, 2, 3, 2))).shape == (1, 4, 6, 9)
    with pytest.raises(tf.errors.InvalidArgumentError, match="up_factor=2"):
        fn(tf.zeros((1, 5, 6, 2)), tf.zeros((1, 2, 3, 2)))


def test_compiled_unavailable_raises_clearly(monkeypatch):
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    assert not ops.compiled_available()
    with pytest.raises(RuntimeError, match="compiled"):
        ops.similarity(tf.zeros((1, 4, 4, 2)), tf.zeros((1, 2, 2, 2)), 3, 2, "compiled")


@pytest.mark.skipif(not ops.compiled_available(), reason="compiled custom op library unavailable")
def test_keras_fit_uses_compiled_op_and_predict_builtin_ops(monkeypatch):
    """Through the layer's ``training`` argument: Keras's train function (training=True)
    traces the compiled op, its predict and evaluate functions the builtin path."""
    chosen = []
    resolve = ops.resolve_implementation

    def recording(implementation="auto", training=None, like=None):
        result = resolve(implementation, training, like)
        if not tf.executing_eagerly():
            chosen.append((implementation, training, result))
        return result

    monkeypatch.setattr(ops, "resolve_implementation", recording)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 4, 3, 6)).astype("float32")
    g = rng.standard_normal((2, 8, 6, 5)).astype("float32")
    y = rng.standard_normal((2, 8, 6, 6)).astype("float32")
    model = _two_level_model()
    ops.set_implementation(model, "auto")
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    model.fit([x, g], y, epochs=1, verbose=0)
    assert {r for i, _, r in chosen if i == "auto"} == {"compiled"}
    chosen.clear()
    model.predict([x, g], verbose=0)
    model.evaluate([x, g], y, verbose=0)
    assert {r for i, _, r in chosen if i == "auto"} == {"xla"}
