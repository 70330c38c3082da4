"""The compiled SAPA custom ops (custom_ops/): results against the NumPy loop reference on
every implementation, float64 gradient checks of the ops and of the gradient ops, half
precision, determinism, the loader's fallbacks, SavedModel export and the GPU kernels."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import tensorflow as tf

import reference as ref
from keras_sapa import ops
from keras_sapa.ops import _tf_kernels as _compiled
from savedmodel_utils import saved_op_types

needs_compiled = pytest.mark.skipif(
    not ops.compiled_available(),
    reason="compiled custom op library unavailable (build it with custom_ops/build.py)",
)


def _rand(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def _problem(rng, kernel_size, up_factor, batch, height, width, d, channels, dtype=np.float64):
    """Query, key, value, weights, and cotangents of the similarity (logits) and of the
    aggregation (output)."""
    high, low = (batch, up_factor * height, up_factor * width), (batch, height, width)
    kk = kernel_size * kernel_size
    shapes = [high + (d,), low + (d,), low + (channels,), high + (kk,), high + (kk,)]
    return [_rand(rng, shape, dtype) for shape in shapes + [high + (channels,)]]


CASES = [
    # kernel_size, up_factor, batch, height, width
    (5, 2, 2, 5, 7),  # odd sizes, window wider than the map in one direction
    (1, 1, 2, 3, 4),  # K=1, s=1: a per-point dot / scale
    (3, 1, 1, 4, 5),
    (3, 3, 1, 3, 5),
    (7, 2, 1, 4, 3),  # window larger than the map
    (5, 4, 1, 2, 3),
]


@pytest.mark.parametrize("kernel_size,up_factor,batch,height,width", CASES)
def test_ops_match_reference(implementation, kernel_size, up_factor, batch, height, width):
    rng = np.random.default_rng(kernel_size * 100 + up_factor)
    s, kk = up_factor, kernel_size * kernel_size
    query = _rand(rng, (batch, s * height, s * width, 6))
    key = _rand(rng, (batch, height, width, 6))
    value = _rand(rng, (batch, height, width, 9))
    weights = _rand(rng, (batch, s * height, s * width, kk))

    sim = ops.similarity(query, key, kernel_size, up_factor, implementation)
    np.testing.assert_allclose(
        sim, ref.similarity(query, key, kernel_size, up_factor), rtol=1e-10, atol=1e-10
    )
    agg = ops.aggregate(weights, value, kernel_size, up_factor, implementation)
    np.testing.assert_allclose(
        agg, ref.aggregate(weights, value, kernel_size, up_factor), rtol=1e-10, atol=1e-10
    )
    out = ops.sapa(
        query.astype(np.float32),
        key.astype(np.float32),
        value.astype(np.float32),
        kernel_size,
        up_factor,
        implementation,
    )
    np.testing.assert_allclose(
        out,
        ref.sapa(
            query.astype(np.float32),
            key.astype(np.float32),
            value.astype(np.float32),
            kernel_size,
            up_factor,
        ),
        rtol=1e-4,
        atol=1e-4,
    )


def test_empty_batch(implementation):
    query = tf.zeros((0, 6, 8, 4))
    key = tf.zeros((0, 3, 4, 4))
    value = tf.zeros((0, 3, 4, 5))
    out = ops.sapa(query, key, value, 3, 2, implementation)
    assert out.shape == (0, 6, 8, 5)


@needs_compiled
def test_auto_prefers_compiled():
    assert ops.resolve_implementation("auto") == "compiled"


@needs_compiled
def test_zero_channels():
    query = tf.zeros((1, 4, 4, 0), tf.float64)
    key = tf.zeros((1, 2, 2, 0), tf.float64)
    sim = _compiled.similarity(query, key, 3, 2)
    assert sim.shape == (1, 4, 4, 9)
    np.testing.assert_array_equal(sim, np.zeros((1, 4, 4, 9)))


@needs_compiled
@pytest.mark.parametrize("kernel_size,up_factor", [(3, 2), (5, 3), (1, 1)])
def test_gradient_ops_match_reference(kernel_size, up_factor):
    s = up_factor
    problem = _problem(np.random.default_rng(7), kernel_size, s, 2, 3, 4, 5, 7)
    query, key, value, weights, grad_sim, grad_out = problem

    k = kernel_size
    got = [  # the gradient ops
        _compiled.similarity_grad(grad_sim, query, key, k, s),
        _compiled.aggregate_grad(grad_out, weights, value, k, s),
    ]
    want = [  # the loop reference's VJPs
        ref.similarity_vjp(query, key, grad_sim, k, s),
        ref.aggregate_vjp(weights, value, grad_out, k, s),
    ]
    for grads, expected in zip(got, want, strict=True):
        for g, e in zip(grads, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10)


def _check_gradients(fn, args):
    theoretical, numerical = tf.test.compute_gradient(fn, [tf.constant(a) for a in args])
    for t, n in zip(theoretical, numerical, strict=False):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


@needs_compiled
@pytest.mark.parametrize("kernel_size,up_factor", [(3, 2), (5, 1), (3, 3)])
def test_gradients_float64(kernel_size, up_factor):
    s = up_factor
    problem = _problem(np.random.default_rng(11), kernel_size, s, 1, 3, 2, 3, 4)
    query, key, value, weights = problem[:4]
    k, impl = kernel_size, "compiled"
    _check_gradients(lambda q, key_: ops.similarity(q, key_, k, s, impl), [query, key])
    _check_gradients(lambda w, v: ops.aggregate(w, v, k, s, impl), [weights, value])
    _check_gradients(lambda q, key_, v: ops.sapa(q, key_, v, k, s, impl), [query, key, value])


@needs_compiled
def test_gradients_of_gradient_ops_float64():
    """Second order: the registered gradients of SimilarityGrad and AggregateGrad."""
    k, s = 3, 2
    problem = _problem(np.random.default_rng(5), k, s, 1, 2, 3, 3, 4)
    query, key, value, weights, grad_sim, grad_out = problem
    for index in (0, 1):
        _check_gradients(
            lambda g, q, key_, i=index: _compiled.similarity_grad(g, q, key_, k, s)[i],
            [grad_sim, query, key],
        )
        _check_gradients(
            lambda g, w, v, i=index: _compiled.aggregate_grad(g, w, v, k, s)[i],
            [grad_out, weights, value],
        )


@needs_compiled
def test_backward_is_deterministic():
    rng = np.random.default_rng(3)
    query = tf.constant(_rand(rng, (2, 16, 16, 8), np.float32))
    key = tf.constant(_rand(rng, (2, 8, 8, 8), np.float32))
    value = tf.constant(_rand(rng, (2, 8, 8, 40), np.float32))

    def grads():
        with tf.GradientTape() as tape:
            tape.watch([query, key, value])
            out = ops.sapa(query, key, value, 5, 2, "compiled")
            loss = tf.reduce_sum(out * out)
        return [g.numpy() for g in tape.gradient(loss, [query, key, value])]

    first, second = grads(), grads()
    for a, b in zip(first, second, strict=False):
        np.testing.assert_array_equal(a, b)


@needs_compiled
@pytest.mark.parametrize("dtype,tol", [(tf.float16, 2e-2), (tf.bfloat16, 1e-1)])
def test_half_precision_matches_float32(dtype, tol):
    k, s = 5, 2
    problem = _problem(np.random.default_rng(2), k, s, 2, 5, 6, 16, 24, np.float32)
    query, key, value = problem[0] * 0.5, problem[1] * 0.5, problem[2]
    weights = tf.nn.softmax(problem[3])
    cast = lambda t: tf.cast(t, dtype)  # noqa: E731
    for fn, args in (
        (_compiled.similarity, (query, key)),
        (_compiled.aggregate, (weights, value)),
    ):
        want = fn(*args, k, s)
        got = fn(*[cast(a) for a in args], k, s)
        assert got.dtype == dtype
        np.testing.assert_allclose(tf.cast(got, tf.float32), want, rtol=tol, atol=tol)
    with tf.GradientTape() as tape:
        half_value = cast(value)
        tape.watch(half_value)
        out = ops.sapa(cast(query), cast(key), half_value, k, s, "compiled")
    grad = tape.gradient(out, half_value)
    assert out.dtype == dtype and grad.dtype == dtype
    want = ref.sapa(query, key, value, k, s)
    np.testing.assert_allclose(tf.cast(out, tf.float32), want, rtol=tol, atol=tol)


@needs_compiled
def test_bad_shapes_raise():
    query = tf.zeros((1, 6, 8, 4))
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="up_factor"):
        _compiled.similarity(query, tf.zeros((1, 3, 3, 4)), 3, 2)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="channels"):
        _compiled.similarity(query, tf.zeros((1, 3, 4, 5)), 3, 2)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="kernel_size"):
        _compiled.aggregate(tf.zeros((1, 6, 8, 8)), tf.zeros((1, 3, 4, 2)), 3, 2)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="odd"):
        _compiled.similarity(query, tf.zeros((1, 3, 4, 4)), 4, 2)


@needs_compiled
def test_shape_function_merges_dims():
    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, 4]), tf.TensorSpec([2, 3, 5, None])]
    )
    def fn(query, key):
        sim = _compiled.similarity(query, key, 3, 2)
        assert sim.shape.as_list() == [2, 6, 10, 9], sim.shape
        return sim

    fn.get_concrete_function()
    with pytest.raises(ValueError, match="[Dd]imension"):
        tf.function(lambda q, k: _compiled.similarity(q, k, 3, 2)).get_concrete_function(
            tf.TensorSpec([2, 6, 7, 4]), tf.TensorSpec([2, 3, 4, 4])
        )
    with pytest.raises(ValueError, match="rank"):
        tf.function(lambda q, k: _compiled.similarity(q, k, 3, 2)).get_concrete_function(
            tf.TensorSpec([6, 8, 4]), tf.TensorSpec([2, 3, 4, 4])
        )


# ------------------------------------------------------------------------------ loader


@pytest.fixture
def reload_library(monkeypatch):
    """Yields a function that points the loader at a library path and forgets the last
    load attempt; the real library is restored afterwards."""

    def point_at(path):
        monkeypatch.setenv(_compiled.ENV_LIBRARY, path)
        _compiled._reset()

    yield point_at
    monkeypatch.delenv(_compiled.ENV_LIBRARY, raising=False)
    _compiled._reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _compiled.available()


def _copy_build(tmp_path):
    lib = _compiled.library_path()
    target = tmp_path / _compiled.CPU_LIBRARY
    shutil.copy(lib, target)
    shutil.copy(
        os.path.join(os.path.dirname(lib), _compiled.BUILD_INFO), tmp_path / _compiled.BUILD_INFO
    )
    return target


def _available_with_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [_compiled.available(), _compiled.available(), ops.compiled_available()]
    return results, [w for w in caught if "keras_sapa" in str(w.message)]


@needs_compiled
def test_corrupted_library_falls_back_with_one_warning(tmp_path, reload_library):
    target = _copy_build(tmp_path)
    target.write_bytes(b"this is not an ELF shared object" * 64)
    reload_library(str(target))
    results, caught = _available_with_warnings()
    assert results == [False, False, False]
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "failed" in _compiled.unavailable_reason()
    assert ops.resolve_implementation("auto") == "patches"
    query, key = tf.zeros((1, 4, 4, 3)), tf.zeros((1, 2, 2, 3))
    assert ops.similarity(query, key, 3, 2).shape == (1, 4, 4, 9)  # pure path
    with pytest.raises(RuntimeError, match="not available"):
        ops.similarity(query, key, 3, 2, implementation="compiled")


@needs_compiled
def test_stale_build_falls_back_with_one_warning(tmp_path, reload_library):
    target = _copy_build(tmp_path)
    info_path = tmp_path / _compiled.BUILD_INFO
    info = json.loads(info_path.read_text())
    info["tensorflow_version"] = "1.0.0"
    info_path.write_text(json.dumps(info))
    reload_library(str(target))
    results, caught = _available_with_warnings()
    assert results == [False, False, False]
    assert len(caught) == 1
    assert "1.0.0" in _compiled.unavailable_reason()


def test_missing_library_falls_back(tmp_path, reload_library):
    reload_library(str(tmp_path / "nowhere" / _compiled.CPU_LIBRARY))
    results, caught = _available_with_warnings()
    assert results == [False, False, False]
    assert len(caught) == 1
    assert "no library" in _compiled.unavailable_reason()
    with pytest.raises(RuntimeError, match="custom_ops/build.py"):
        ops.aggregate(tf.zeros((1, 2, 2, 1)), tf.zeros((1, 2, 2, 3)), 1, 1, "compiled")


def test_disable_environment_variable(monkeypatch):
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    assert not ops.compiled_available()
    assert ops.resolve_implementation("auto") in ("patches", "xla")
    with pytest.raises(RuntimeError, match="KERAS_SAPA_DISABLE_COMPILED"):
        ops.resolve_implementation("compiled")


# ----------------------------------------------------------------------------- export


class _Upsampler(tf.Module):
    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 8, 8, 4]),
            tf.TensorSpec([None, 4, 4, 4]),
            tf.TensorSpec([None, 4, 4, 6]),
        ]
    )
    def __call__(self, query, key, value):
        return ops.sapa(query, key, value, 3, 2)


def _export_inputs():
    rng = np.random.default_rng(0)
    return (
        _rand(rng, (2, 8, 8, 4), np.float32),
        _rand(rng, (2, 4, 4, 4), np.float32),
        _rand(rng, (2, 4, 4, 6), np.float32),
    )


@needs_compiled
def test_savedmodel_with_compiled_op_reloads(tmp_path):
    """A SavedModel traced with the compiled op (asked for explicitly: exports default
    to builtin ops) holds KerasSapa>* nodes: it reloads once the library is loaded
    (here it is: this process loaded it). That a fresh process without the library
    fails to load such a SavedModel, and loads it after
    ``keras_sapa.ops.load_compiled_library()``, is what notebook 04 shows and
    tests/test_notebooks.py checks (its run printing both exit codes)."""
    path = str(tmp_path / "compiled")
    with ops.use_implementation("compiled"):
        tf.saved_model.save(_Upsampler(), path)
    expected = (
        {"KerasSapa>Sapa"}
        if _compiled.fused_available()
        else {"KerasSapa>Similarity", "KerasSapa>Aggregate"}
    )
    assert expected <= saved_op_types(path)
    inputs = _export_inputs()
    restored = tf.saved_model.load(path)
    np.testing.assert_allclose(restored(*inputs), ref.sapa(*inputs, 3, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scope", ["default", "xla"])
def test_savedmodel_export_has_builtin_ops_only(tmp_path, scope):
    """``tf.saved_model.save`` traces "auto" as the builtin-op path by itself, even
    where the compiled op is available."""
    path = str(tmp_path / "portable")
    with ops.use_implementation("xla" if scope == "xla" else "auto"):
        tf.saved_model.save(_Upsampler(), path)
    assert not [t for t in saved_op_types(path) if t.startswith("KerasSapa")]
    inputs = _export_inputs()
    np.testing.assert_allclose(
        tf.saved_model.load(path)(*inputs), ref.sapa(*inputs, 3, 2), rtol=1e-4, atol=1e-4
    )


# -------------------------------------------------------------------------------- GPU


def _gpu_skip_reason():
    if not tf.config.list_physical_devices("GPU"):
        return "no GPU is visible to TensorFlow, so the CUDA kernels cannot run here"
    if not ops.compiled_available():
        return "compiled custom op library unavailable"
    if _compiled.gpu_status() != "loaded":
        return f"GPU kernel library not loaded ({_compiled.gpu_status()})"
    return None


@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
@pytest.mark.parametrize(
    "dtype,tol", [(tf.float32, 1e-4), (tf.float16, 3e-2), (tf.bfloat16, 1.5e-1)]
)
def test_gpu_matches_cpu(dtype, tol):
    k, s = 5, 2
    problem = _problem(np.random.default_rng(1), k, s, 2, 7, 5, 16, 40, np.float32)
    query, key, value, grad_out = problem[0] * 0.5, problem[1] * 0.5, problem[2], problem[5]

    def run(device):
        with tf.device(device):
            args = [tf.cast(t, dtype) for t in (query, key, value)]
            with tf.GradientTape() as tape:
                tape.watch(args)
                out = ops.sapa(*args, k, s, "compiled")
                loss = tf.reduce_sum(tf.cast(out, tf.float32) * grad_out)
            grads = tape.gradient(loss, args)
        return [tf.cast(t, tf.float32).numpy() for t in [out, *grads]]

    cpu, gpu, gpu_again = run("/CPU:0"), run("/GPU:0"), run("/GPU:0")
    for c, g, g2 in zip(cpu, gpu, gpu_again, strict=False):
        np.testing.assert_allclose(g, c, rtol=tol, atol=tol)
        np.testing.assert_array_equal(g, g2)  # deterministic backward
