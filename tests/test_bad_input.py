"""Bad and degenerate input where only TensorFlow goes: traced graphs with unknown sizes,
XLA (``jit_compile=True``), and the compiled op meeting XLA (issue 21).

The backend-neutral sweep (every op and implementation, eager, forward and backward
against the loop reference; dtypes; the disable switch) is
``tests/multibackend/test_mb_bad_input.py``, which this run executes on TensorFlow too.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sapa
import reference
from keras_sapa import ops

needs_compiled = pytest.mark.skipif(
    not ops.compiled_available(), reason="compiled custom op library unavailable"
)
# (B, H, W, s, K, d, C), as in tests/multibackend/test_mb_bad_input.py
CASES = [
    (0, 3, 4, 2, 3, 4, 5),
    (2, 3, 4, 2, 3, 4, 0),
    (2, 1, 1, 2, 3, 3, 4),
    (1, 2, 1, 3, 5, 3, 2),
]


def _arrays(b, h, w, s, k, d, c):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((b, s * h, s * w, d)),
        rng.standard_normal((b, h, w, d)),
        rng.standard_normal((b, h, w, c)),
        rng.standard_normal((b, s * h, s * w, c)),
    )


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize(
    "case", CASES, ids=["empty_batch", "zero_channels", "one_by_one", "window_larger"]
)
def test_degenerate_shapes_in_graphs(case, jit):
    """Traced with unknown batch and spatial sizes (graph) or compiled by XLA, training
    (so "auto" takes the compiled op in the graph where it is built): forward and
    gradients match the loop reference."""
    *_, s, k, d, c = case
    query, key, value, grad = _arrays(*case)
    unknown = tf.TensorSpec([None, None, None, d], tf.float64)
    signature = (
        None if jit else [unknown, unknown, tf.TensorSpec([None, None, None, c], tf.float64)]
    )

    @tf.function(input_signature=signature, jit_compile=jit)
    def forward_and_grads(q, kk, v):
        with tf.GradientTape() as tape:
            tape.watch([q, kk, v])
            out = ops.sapa(q, kk, v, k, s, training=True)
        return out, tape.gradient(out, [q, kk, v], output_gradients=tf.constant(grad))

    out, grads = forward_and_grads(tf.constant(query), tf.constant(key), tf.constant(value))
    np.testing.assert_allclose(
        out.numpy(), reference.sapa(query, key, value, k, s), rtol=1e-9, atol=1e-9
    )
    for got, want in zip(grads, reference.sapa_vjp(query, key, value, grad, k, s), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_bad_dtypes_in_a_graph():
    spec = tf.TensorSpec([None, 4, 6, 3])
    with pytest.raises(ValueError, match=r"`key`.*key\.dtype=int32"):
        tf.function(lambda q, kk: ops.similarity(q, kk, 3, 2)).get_concrete_function(
            spec, tf.TensorSpec([None, 2, 3, 3], tf.int32)
        )
    with pytest.raises(ValueError, match=r"`value`.*value\.dtype=float16"):
        tf.function(lambda q, kk, v: ops.sapa(q, kk, v, 3, 2)).get_concrete_function(
            spec, tf.TensorSpec([None, 2, 3, 3]), tf.TensorSpec([None, 2, 3, 5], tf.float16)
        )


@needs_compiled
def test_compiled_inside_xla_names_the_conflict():
    """Not XLA's raw "No registered 'KerasSapa>Sapa' OpKernel for XLA_CPU_JIT devices"."""
    q, kk, v, _ = (tf.constant(a, tf.float32) for a in _arrays(1, 2, 3, 2, 3, 4, 5))
    fn = tf.function(lambda *a: ops.sapa(*a, 3, 2, implementation="compiled"), jit_compile=True)
    with pytest.raises(ValueError, match=r"jit_compile=True.*implementation='auto'"):
        fn(q, kk, v)
    with ops.use_implementation("compiled"), pytest.raises(ValueError, match="jit_compile=True"):
        tf.function(lambda *a: ops.sapa(*a, 3, 2), jit_compile=True)(q, kk, v)
    # "auto" takes the builtin formulation inside XLA, training or not.
    out = tf.function(lambda *a: ops.sapa(*a, 3, 2, training=True), jit_compile=True)(q, kk, v)
    np.testing.assert_allclose(out.numpy(), reference.sapa(q, kk, v, 3, 2), rtol=1e-5, atol=1e-5)


def _model(implementation):
    x_in, g_in = keras.Input((4, 3, 6)), keras.Input((8, 6, 5))
    layer = keras_sapa.SAPA(kernel_size=3, embedding_dim=4, implementation=implementation)
    return keras.Model([x_in, g_in], layer(x_in, g_in)), layer


@needs_compiled
def test_compiled_layer_declines_xla_and_set_implementation_follows():
    """A "compiled" layer reports supports_jit=False, so Keras compiles its model without
    XLA (with Keras's warning) and fit runs; set_implementation keeps supports_jit and
    the model's jit_compile consistent."""
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((2, 4, 3, 6)), rng.standard_normal((2, 8, 6, 5))
    y = rng.standard_normal((2, 8, 6, 6))
    model, layer = _model("compiled")
    assert layer.supports_jit is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile is False
    assert any("jit_compile" in str(w.message) for w in caught)
    model.fit([x, g], y, epochs=1, verbose=0)

    model, layer = _model("auto")
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert layer.supports_jit is True and model.jit_compile is True
    ops.set_implementation(model, "compiled")
    assert layer.supports_jit is False and model.jit_compile is False
    model.fit([x, g], y, epochs=1, verbose=0)
    ops.set_implementation(model, "xla")
    assert layer.supports_jit is True


def test_constructor_does_not_probe_for_a_gpu(monkeypatch):
    def probe(*args, **kwargs):
        raise AssertionError("the SAPA constructor listed devices")

    monkeypatch.setattr(tf.config, "list_physical_devices", probe)
    keras_sapa.SAPA(implementation="auto")
    keras_sapa.SAPA(implementation="compiled")
