"""SAPA-D's compiled TensorFlow op (``KerasSapa>SapaDeform`` and its gradient op) in the
places only TensorFlow has: ``fit`` takes the kernels and exports made the standard way
hold builtin ops only, ``jit_compile=True`` takes the builtin formulation (an explicit
``"compiled"`` gets a clear ``ValueError``), the op's own shape checks name the input,
and a SavedModel exported with the op on purpose holds it. The numbers of the op against
the NumPy loop reference are checked in ``tests/multibackend/test_mb_deform_compiled.py``
(on all three backends)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference_deform as ref
from keras_sapa.deform import SAPADeform
from keras_sapa.ops import _deform as deform_ops
from keras_sapa.ops import use_implementation
from savedmodel_utils import custom_op_types

kernels = deform_ops._deform_kernels()
pytestmark = pytest.mark.skipif(
    kernels is None or not kernels.available(), reason="the compiled SAPA-D op is not built"
)


def _counting(monkeypatch):
    calls = []
    original = kernels.sapa_deform
    monkeypatch.setattr(
        kernels, "sapa_deform", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    return calls


def _model(rng):
    xi, yi = keras.Input((4, 4, 16), batch_size=2), keras.Input((8, 8, 16), batch_size=2)
    layer = SAPADeform(num_points=4, groups=2, embedding_dim=4)
    model = keras.Model([xi, yi], layer(xi, yi))
    for w in layer.trainable_weights:
        w.assign(0.3 * rng.standard_normal(w.shape).astype("float32"))
    return model


def test_fit_uses_the_kernels_and_export_holds_builtin_ops(monkeypatch, tmp_path):
    rng = np.random.default_rng(1)
    model = _model(rng)
    x = rng.standard_normal((2, 4, 4, 16)).astype("float32")
    y = rng.standard_normal((2, 8, 8, 16)).astype("float32")
    target = rng.standard_normal((2, 8, 8, 16)).astype("float32")
    calls = _counting(monkeypatch)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=False)
    history = model.fit([x, y], target, epochs=3, batch_size=2, verbose=0)
    assert calls, "fit did not take the compiled SAPA-D kernels"
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]

    calls.clear()
    expected = model.predict([x, y], verbose=0)  # an inference trace: builtin
    assert not calls
    path = str(tmp_path / "auto")
    model.export(path, format="tf_saved_model", verbose=False)
    assert custom_op_types(path) == []
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(loaded.serve([x, y]).numpy(), expected, rtol=1e-5, atol=1e-5)

    # Exported with the op on purpose: the SavedModel holds it and still runs.
    path = str(tmp_path / "compiled")
    with use_implementation("compiled"):
        model.export(path, format="tf_saved_model", verbose=False)
    assert custom_op_types(path) == ["KerasSapa>SapaDeform"]
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(loaded.serve([x, y]).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_jit_compile_takes_the_builtin_formulation():
    rng = np.random.default_rng(2)
    case = dict(num_points=3, up_factor=2, groups=2)
    q = rng.standard_normal((1, 4, 4, 4)).astype("float32")
    k = rng.standard_normal((1, 2, 2, 4)).astype("float32")
    v = rng.standard_normal((1, 2, 2, 6)).astype("float32")
    o = rng.uniform(-1.5, 1.5, (1, 4, 4, 12)).astype("float32")
    expected = ref.sapa_deform(q, k, v, o, 3, 2, 2)

    @tf.function(jit_compile=True)
    def auto(*a):
        return deform_ops.sapa_deform(*a, **case, training=True)

    np.testing.assert_allclose(auto(q, k, v, o).numpy(), expected, rtol=1e-5, atol=1e-5)

    @tf.function(jit_compile=True)
    def compiled(*a):
        return deform_ops.sapa_deform(*a, **case, implementation="compiled")

    with pytest.raises(ValueError, match="jit_compile=True"):
        compiled(q, k, v, o)


def test_op_checks_shapes_by_the_table():
    q = tf.zeros((1, 4, 4, 4))
    k = tf.zeros((1, 2, 2, 4))
    v = tf.zeros((1, 2, 2, 5))  # 5 channels, groups=2
    o = tf.zeros((1, 4, 4, 12))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="value"):
        kernels.sapa_deform_with_weights(q, k, v, o, 3, 2, 2)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="offsets"):
        kernels.sapa_deform_with_weights(q, k, tf.zeros((1, 2, 2, 4)), o[..., :10], 3, 2, 2)


def test_halves_ops_check_shapes_by_the_table():
    """KerasSapa>DeformSimilarity / DeformAggregate check their inputs by the op table,
    naming the input."""
    q, k, o = tf.zeros((1, 4, 4, 4)), tf.zeros((1, 2, 2, 4)), tf.zeros((1, 4, 4, 12))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="offsets"):
        kernels.deform_similarity(q, k, o[..., :10], 3, 2, 2)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="value"):
        kernels.deform_aggregate(tf.zeros((1, 4, 4, 6)), tf.zeros((1, 2, 2, 5)), o, 3, 2, 2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_halves_run_on_the_gpu(dtype):
    """DeformSimilarity / DeformAggregate and their gradient ops on the GPU (soft placement
    off) against tests/reference_deform.py at the official P=9, G=4, E=32, C=256."""
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("no GPU visible to TensorFlow")
    from keras_sapa.ops import _tf_kernels

    if not _tf_kernels.gpu_op_usable():
        pytest.skip(f"the GPU kernels are not usable: {_tf_kernels.gpu_status()}")
    rng = np.random.default_rng(14)
    p, s, g = 9, 2, 4
    high, low = (1, 8, 10), (1, 4, 5)
    off = ref.offsets_away_from_integers(rng, high + (2 * g * p,), spread=2.0, margin=0.1)
    cases = [
        (kernels.deform_similarity, ref.deform_similarity, ref.deform_similarity_vjp)
        + ([rng.standard_normal(high + (128,)) * 0.3, rng.standard_normal(low + (128,)), off],),
        (kernels.deform_aggregate, ref.deform_aggregate, ref.deform_aggregate_vjp)
        + ([rng.standard_normal(high + (g * p,)), rng.standard_normal(low + (256,)), off],),
    ]
    tol = {"float32": 1e-4, "float64": 1e-10}[dtype]
    soft = tf.config.get_soft_device_placement()
    tf.config.set_soft_device_placement(False)
    try:
        for op, forward, backward, raw in cases:
            want = forward(*raw, p, s, g)
            cotangent = rng.standard_normal(want.shape)
            with tf.device("/GPU:0"):
                inputs = [tf.constant(x, dtype) for x in raw]
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    out = op(*inputs, p, s, g)
                grads = tape.gradient(out, inputs, output_gradients=tf.constant(cotangent, dtype))
            assert "GPU" in out.device and all("GPU" in t.device for t in grads)
            expected = [want, *backward(*raw, cotangent, p, s, g)]
            for got, exp in zip([out, *grads], expected, strict=True):
                scale = max(1.0, float(np.abs(exp).max()))
                np.testing.assert_allclose(got.numpy(), exp, rtol=tol, atol=tol * scale)
    finally:
        tf.config.set_soft_device_placement(soft)
