"""keras_sapa.ops on the running backend: every implementation against the NumPy
loop reference (tiny sizes and the real C=256, d=64 sizes), gradients against the
reference's chain-rule VJPs (``reference.*_vjp``, themselves checked against central
differences in ``tests/test_real_sizes.py``) and, at the real sizes, against float64
central differences of the op itself; half-precision inputs, bad input."""

import os

import keras
import numpy as np
import pytest

import reference as ref
from backend_utils import directional_derivative
from backend_utils import to_numpy
from backend_utils import value_and_vjp
from backend_utils import vjp
from keras_sapa import ops as sapa_ops

# "compiled": TensorFlow's custom op, or on JAX/PyTorch the bindings of the same CPU
# kernels (their fused `sapa`; the window ops run "xla" there). Skipped, saying why, where
# they are not built.
IMPLEMENTATIONS = (
    "patches",
    "xla",
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(
            not sapa_ops.compiled_available(),
            reason="the compiled kernels of this backend are not built or are disabled",
        ),
    ),
)


def _inputs(rng, batch, height, width, d, channels, s, dtype=np.float32):
    f = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    return (
        f(batch, s * height, s * width, d),
        f(batch, height, width, d),
        f(batch, height, width, channels),
    )


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")  # K=1
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kernel_size,up_factor", [(1, 1), (3, 2), (5, 2), (3, 3)])
def test_ops_match_reference(implementation, kernel_size, up_factor):
    rng = np.random.default_rng(kernel_size * 10 + up_factor)
    query, key, value = _inputs(rng, 2, 3, 4, 5, 6, up_factor)
    weights = rng.standard_normal(query.shape[:3] + (kernel_size**2,)).astype(np.float32)
    kw = dict(kernel_size=kernel_size, up_factor=up_factor, implementation=implementation)
    np.testing.assert_allclose(
        to_numpy(sapa_ops.similarity(query, key, **kw)),
        ref.similarity(query, key, kernel_size, up_factor),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        to_numpy(sapa_ops.aggregate(weights, value, **kw)),
        ref.aggregate(weights, value, kernel_size, up_factor),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        to_numpy(sapa_ops.sapa(query, key, value, **kw)),
        ref.sapa(query, key, value, kernel_size, up_factor),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_real_sizes_match_reference(implementation):
    """C=256, d=64, K=5, s=2: the vectorised paths at the sizes they are used at."""
    rng = np.random.default_rng(7)
    query, key, value = _inputs(rng, 1, 6, 7, 64, 256, 2)
    query *= 0.2  # logits of order 1: a softmax that is not one-hot
    out = sapa_ops.sapa(query, key, value, 5, 2, implementation=implementation)
    np.testing.assert_allclose(
        to_numpy(out), ref.sapa(query, key, value, 5, 2), rtol=1e-5, atol=1e-5
    )


def _compiled_window_ops():
    """Whether the backend's compiled kernels include the window ops (TensorFlow); on
    JAX and PyTorch they bind the fused ``sapa`` only and the window ops run "xla"."""
    kernels = sapa_ops._kernels()
    return kernels is not None and hasattr(kernels, "similarity")


def _op(name, implementation, kernel_size, up_factor):
    def fn(*args):
        return getattr(sapa_ops, name)(
            *args, kernel_size=kernel_size, up_factor=up_factor, implementation=implementation
        )

    return fn


# name: (the loop reference's forward, its chain-rule VJP)
REFERENCES = {
    "similarity": (ref.similarity, ref.similarity_vjp),
    "aggregate": (ref.aggregate, ref.aggregate_vjp),
    "sapa": (ref.sapa, ref.sapa_vjp),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kernel_size,up_factor", [(3, 2), (5, 3)])
@pytest.mark.parametrize("name", ["similarity", "aggregate", "sapa"])
def test_gradients_match_reference_vjp(implementation, kernel_size, up_factor, name):
    """float64 gradients through the backend's autodiff against the loop reference's
    VJPs (and the forward of the same call against the reference). K=5 over a 2x3 map:
    every window is clipped by the border."""
    if implementation == "compiled" and name != "sapa" and not _compiled_window_ops():
        pytest.skip("'compiled' window ops are the 'xla' ones on this backend (same case)")
    rng = np.random.default_rng(3 + kernel_size)
    k, s = kernel_size, up_factor
    query, key, value = _inputs(rng, 2, 2, 3, 3, 4, s, dtype=np.float64)
    if name == "similarity":
        args = [query, key]
    elif name == "aggregate":
        args = [rng.standard_normal(query.shape[:3] + (k * k,)), value]
    else:
        args = [query, key, value]
    fn = _op(name, implementation, k, s)
    forward, backward = REFERENCES[name]
    want = forward(*args, k, s)
    cotangent = rng.standard_normal(want.shape)
    out, got = value_and_vjp(fn, args, cotangent)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
    expected = backward(*args, cotangent, k, s)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_at_real_sizes_directional(implementation):
    """<grad, v> against a float64 central difference along v, at C=256, d=64."""
    rng = np.random.default_rng(8)
    args = list(_inputs(rng, 1, 5, 6, 64, 256, 2, dtype=np.float64))
    args[0] *= 0.2
    fn = _op("sapa", implementation, 5, 2)
    cotangent = rng.standard_normal(args[0].shape[:3] + args[2].shape[3:])
    grads = vjp(fn, args, cotangent)
    for index in range(3):
        directions = [np.zeros_like(a) for a in args]
        directions[index] = rng.standard_normal(args[index].shape)
        expected = directional_derivative(fn, args, directions, cotangent)
        got = float(np.sum(grads[index] * directions[index]))
        np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_softmax_in_float32(dtype):
    rng = np.random.default_rng(9)
    query, key, value = _inputs(rng, 1, 3, 3, 4, 5, 2)
    # Logits up to ~1e5: they overflow float16 unless the softmax runs in float32.
    big_q, big_k = query * 150.0, key * 150.0
    cast = lambda t: keras.ops.cast(t, dtype)  # noqa: E731
    out = sapa_ops.sapa(cast(big_q), cast(big_k), cast(value), 3, 2)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    out = to_numpy(keras.ops.cast(out, "float32"))
    assert np.isfinite(out).all()
    q32 = to_numpy(keras.ops.cast(cast(big_q), "float32"))
    k32 = to_numpy(keras.ops.cast(cast(big_k), "float32"))
    v32 = to_numpy(keras.ops.cast(cast(value), "float32"))
    tol = 5e-2 if dtype == "bfloat16" else 1e-2
    np.testing.assert_allclose(out, ref.sapa(q32, k32, v32, 3, 2), rtol=tol, atol=tol)


def test_resolve_and_use_implementation():
    backend = keras.config.backend()
    if backend != "tensorflow":
        kernels = sapa_ops.compiled_available()
        assert sapa_ops.load_compiled_library() == kernels
        # JAX takes the compiled kernels for training calls only (exports stay
        # portable); PyTorch whenever it is not exporting.
        expected_auto = "compiled" if kernels and backend == "torch" else "xla"
        assert sapa_ops.resolve_implementation("auto") == expected_auto
        expected_train = "compiled" if kernels else "xla"
        assert sapa_ops.resolve_implementation("auto", training=True) == expected_train
        if not kernels:
            with pytest.raises(RuntimeError, match="implementation='compiled'"):
                sapa_ops.resolve_implementation("compiled")
    if backend != "tensorflow":
        os.environ["KERAS_SAPA_DISABLE_COMPILED"] = "1"
        try:
            assert not sapa_ops.compiled_available()
            assert sapa_ops.resolve_implementation("auto", training=True) == "xla"
            with pytest.raises(RuntimeError, match="implementation='compiled'"):
                sapa_ops.resolve_implementation("compiled")
        finally:
            del os.environ["KERAS_SAPA_DISABLE_COMPILED"]
    # training= is accepted everywhere (TensorFlow's "auto" uses it in graphs).
    assert sapa_ops.resolve_implementation("patches", training=True) == "patches"
    with sapa_ops.use_implementation("patches"):
        assert sapa_ops.resolve_implementation("auto") == "patches"
        assert sapa_ops.resolve_implementation("xla") == "xla"
    with pytest.raises(ValueError, match="implementation='triton'"):
        sapa_ops.resolve_implementation("triton")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v, w: sapa_ops.similarity(q, k, kernel_size=4), "kernel_size=4"),
        (lambda q, k, v, w: sapa_ops.similarity(q, k, up_factor=0), "up_factor=0"),
        (lambda q, k, v, w: sapa_ops.similarity(q, k, up_factor=2.0), "up_factor=2.0"),
        (lambda q, k, v, w: sapa_ops.similarity(q, k, up_factor=3), "up_factor=3"),
        (lambda q, k, v, w: sapa_ops.similarity(q, v), "same number of channels"),
        (lambda q, k, v, w: sapa_ops.similarity(q[:, :-1], k), "height of `query`"),
        (lambda q, k, v, w: sapa_ops.similarity(q, k[:1]), "same batch size"),
        (lambda q, k, v, w: sapa_ops.similarity(q[0], k), "rank-4"),
        (
            lambda q, k, v, w: sapa_ops.aggregate(w[..., :8], v, kernel_size=3),
            "kernel_size\\*\\*2=9",
        ),
        (
            lambda q, k, v, w: sapa_ops.sapa(q, k, v, implementation="cuda"),
            "implementation='cuda'",
        ),
        (lambda q, k, v, w: sapa_ops.sapa(q, k, v[:, :-1]), "height of `query`"),
    ],
)
def test_bad_input_is_a_value_error(call, match):
    rng = np.random.default_rng(10)
    query, key, value = _inputs(rng, 2, 3, 4, 5, 6, 2)
    weights = rng.standard_normal(query.shape[:3] + (9,)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        call(query, key, value, weights)


def test_torch_compile_forward_and_backward():
    """PyTorch only: the default implementation traced by ``torch.compile`` (one
    graph, no graph breaks: ``fullgraph=True``) gives the reference's forward and
    VJP."""
    if keras.config.backend() != "torch":
        pytest.skip("torch.compile exists on the torch backend only")
    import torch

    rng = np.random.default_rng(11)
    query, key, value = _inputs(rng, 1, 3, 4, 4, 3, 2, dtype=np.float64)

    def fn(q, k, v):
        return sapa_ops.sapa(q, k, v, kernel_size=3, up_factor=2)

    # "aot_eager": Dynamo's capture and AOTAutograd's tracing of the forward and the
    # hand-written backward, without Inductor's C++ code generation (minutes on a
    # loaded 2-core CI machine; the bench's torch rows can time it).
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*[torch.tensor(a) for a in (query, key, value)])
    np.testing.assert_allclose(
        to_numpy(out), ref.sapa(query, key, value, 3, 2), rtol=1e-10, atol=1e-12
    )
    cotangent = rng.standard_normal(tuple(out.shape))
    got = vjp(compiled, [query, key, value], cotangent)
    expected = ref.sapa_vjp(query, key, value, cotangent, 3, 2)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)
