"""SAPA-D's compiled kernels on the running backend (TensorFlow custom op, JAX XLA FFI,
PyTorch ``torch.library``): forward and the gradients of all four inputs against the
NumPy loop reference of the spec (``tests/reference_deform.py``), at real sizes (C=256,
E=32, P=9, G=4) and odd ones, float64 central differences of the op itself away from
integer positions, and the dispatch rule's choice between the kernels and the builtin
formulation. Skipped where the kernels are not built."""

import keras
import numpy as np
import pytest

import reference_deform as ref
from backend_utils import _compiled as jitted
from backend_utils import to_numpy
from backend_utils import value_and_vjp
from backend_utils import vjp
from keras_sapa.ops import _deform as deform_ops

BACKEND = keras.config.backend()


def _kernels():
    kernels = deform_ops._deform_kernels()
    return kernels if kernels is not None and kernels.available() else None


pytestmark = pytest.mark.skipif(
    _kernels() is None, reason="the compiled SAPA-D kernels are not built for this backend"
)


def _inputs(
    rng, batch, height, width, groups, e, points, s, channels, dtype=np.float64, away=False
):
    out = (batch, s * height, s * width)
    shape = out + (2 * groups * points,)
    if away:
        o = ref.offsets_away_from_integers(rng, shape, spread=2.5)
    else:
        o = rng.uniform(-2.5, 2.5, shape)
        o[0, 0, 0, :4] = [0.0, 1.0, float(width), -1.0]  # integer positions, a dropped point
        o[0, -1, -1, 2 * groups * points - 1] = np.nan  # a NaN offset: dropped
    f = lambda *dims: rng.standard_normal(dims)  # noqa: E731
    arrays = (
        0.5 * f(*out, groups * e),
        f(batch, height, width, groups * e),
        f(batch, height, width, channels),
        o,
    )
    return [a.astype(dtype) for a in arrays]


CASES = {
    # (B, H, W, G, E, P, s, C)
    "real-C256-E32-P9-G4": (1, 4, 4, 4, 32, 9, 2, 256),
    "odd-B2-3x5-G3-P5-s3": (2, 3, 5, 3, 3, 5, 3, 6),
}


def _fn(points, s, groups, implementation="compiled"):
    def fn(q, k, v, o):
        return deform_ops.sapa_deform(
            q,
            k,
            v,
            o,
            num_points=points,
            up_factor=s,
            groups=groups,
            implementation=implementation,
        )

    return fn


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_and_gradients_match_reference(case):
    _, height, width, groups, _, points, s, channels = case
    rng = np.random.default_rng(sum(case))
    q, k, v, o = _inputs(rng, *case)
    fn = _fn(points, s, groups)
    want = ref.sapa_deform(q, k, v, o, points, s, groups)
    np.testing.assert_allclose(to_numpy(fn(q, k, v, o)), want, rtol=1e-10, atol=1e-11)
    got32 = to_numpy(fn(*(a.astype(np.float32) for a in (q, k, v, o))))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-4)

    g = rng.standard_normal(want.shape)
    grads = vjp(fn, [q, k, v, o], g)
    expected = ref.sapa_deform_vjp(q, k, v, o, g, points, s, groups)
    for name, got, exp in zip(("query", "key", "value", "offsets"), grads, expected, strict=True):
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, exp, rtol=1e-9, atol=1e-10, err_msg=name)


def test_gradients_match_central_differences():
    """float64 central differences of the compiled op itself (positions away from
    integers), every element of all four inputs."""
    rng = np.random.default_rng(11)
    case = (1, 2, 2, 2, 2, 2, 2, 4)
    _, _, _, groups, _, points, s, _ = case
    q, k, v, o = _inputs(rng, *case, away=True)
    fn = _fn(points, s, groups)
    g = rng.standard_normal(q.shape[:3] + (4,))
    grads = vjp(fn, [q, k, v, o], g)
    eps = 1e-6
    for index, arg in enumerate((q, k, v, o)):
        numeric = np.zeros_like(arg)
        for position in np.ndindex(arg.shape):
            plus, minus = [a.copy() for a in (q, k, v, o)], [a.copy() for a in (q, k, v, o)]
            plus[index][position] += eps
            minus[index][position] -= eps
            numeric[position] = np.sum((to_numpy(fn(*plus)) - to_numpy(fn(*minus))) * g) / (
                2 * eps
            )
        np.testing.assert_allclose(grads[index], numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_compute_in_float32(dtype):
    rng = np.random.default_rng(3)
    case = (1, 3, 3, 2, 8, 4, 2, 8)
    _, _, _, groups, _, points, s, _ = case
    arrays = _inputs(rng, *case, dtype=np.float32)
    half = [keras.ops.cast(a, dtype) for a in arrays]
    out = _fn(points, s, groups)(*half)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    rounded = [to_numpy(keras.ops.cast(a, "float32")).astype(np.float64) for a in half]
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(out, "float32")),
        ref.sapa_deform(*rounded, points, s, groups),
        rtol=2e-2,
        atol=2e-2,
    )


def test_empty_batch_runs_forward_and_backward():
    rng = np.random.default_rng(4)
    q, k, v, o = _inputs(rng, 1, 2, 2, 2, 2, 3, 2, 4)
    q, k, v, o = (a[:0] for a in (q, k, v, o))
    fn = _fn(3, 2, 2)
    assert to_numpy(fn(q, k, v, o)).shape == (0, 4, 4, 4)
    grads = vjp(fn, [q, k, v, o], np.zeros((0, 4, 4, 4)))
    assert [g.shape for g in grads] == [a.shape for a in (q, k, v, o)]


def test_auto_resolves_like_sapa(monkeypatch):
    """The "auto" choice: the kernels for eager calls and training traces; explicit "compiled"
    raises where the kernels are disabled; "xla" and "patches" name the builtin."""
    resolve = deform_ops.resolve_deform_implementation
    rng = np.random.default_rng(5)
    q = keras.ops.convert_to_tensor(_inputs(rng, 1, 2, 2, 1, 2, 2, 2, 2)[0])
    assert resolve("auto", like=q) == "compiled"
    assert resolve("compiled", like=q) == "compiled"
    assert resolve("xla", like=q) == resolve("patches", like=q) == "builtin"
    if BACKEND == "tensorflow":
        import tensorflow as tf

        seen = {}

        @tf.function
        def traced(x):
            seen["inference"] = resolve("auto", training=None, like=x)
            seen["training"] = resolve("auto", training=True, like=x)
            return x

        traced(q)
        assert seen == {"inference": "builtin", "training": "compiled"}
    elif BACKEND == "jax":
        import jax

        seen = {}

        def traced(x):
            seen["inference"] = resolve("auto", training=None, like=x)
            seen["training"] = resolve("auto", training=True, like=x)
            return x

        jax.jit(traced)(q)
        assert seen == {"inference": "builtin", "training": "compiled"}
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    assert resolve("auto", like=q) == "builtin"
    with pytest.raises(RuntimeError, match="compiled"):
        resolve("compiled", like=q)


def test_auto_calls_the_kernels_eagerly(monkeypatch):
    kernels = _kernels()
    calls = []
    original = kernels.sapa_deform
    monkeypatch.setattr(
        kernels, "sapa_deform", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    rng = np.random.default_rng(6)
    q, k, v, o = _inputs(rng, 1, 2, 2, 1, 2, 2, 2, 2)
    out = _fn(2, 2, 1, implementation="auto")(q, k, v, o)
    assert calls == [1]
    np.testing.assert_allclose(
        to_numpy(out), ref.sapa_deform(q, k, v, o, 2, 2, 1), rtol=1e-10, atol=1e-11
    )
    _fn(2, 2, 1, implementation="xla")(q, k, v, o)
    assert calls == [1]


def test_framework_transforms_keep_the_kernels():
    """PyTorch: ``torch.compile(fullgraph=True)`` holds the custom ops (forward and
    backward); JAX: ``jax.vmap`` over an extra leading axis. TensorFlow: nothing to do."""
    rng = np.random.default_rng(7)
    case = (2, 2, 3, 2, 2, 3, 2, 4)
    _, _, _, groups, _, points, s, _ = case
    q, k, v, o = _inputs(rng, *case)
    kernels = _kernels()
    expected = [
        ref.sapa_deform(*(a[i : i + 1] for a in (q, k, v, o)), points, s, groups) for i in range(2)
    ]
    if BACKEND == "torch":
        import torch

        fn = torch.compile(
            lambda *a: kernels.sapa_deform(*a, points, s, groups),
            fullgraph=True,
            backend="aot_eager",
        )
        tensors = [torch.tensor(a, requires_grad=True) for a in (q, k, v, o)]
        out = fn(*tensors)
        np.testing.assert_allclose(
            out.detach().numpy(), np.concatenate(expected), rtol=1e-10, atol=1e-11
        )
        g = rng.standard_normal(tuple(out.shape))
        grads = torch.autograd.grad(out, tensors, torch.tensor(g))
        want = ref.sapa_deform_vjp(q, k, v, o, g, points, s, groups)
        for got, exp in zip(grads, want, strict=True):
            np.testing.assert_allclose(got.numpy(), exp, rtol=1e-9, atol=1e-10)
    elif BACKEND == "jax":
        import jax

        stacked = [a[:, None] for a in (q, k, v, o)]  # (2, 1, ...): vmap over axis 0
        out = jax.jit(jax.vmap(lambda *a: kernels.sapa_deform(*a, points, s, groups)))(*stacked)
        np.testing.assert_allclose(
            np.asarray(out)[:, 0], np.concatenate(expected), rtol=1e-10, atol=1e-11
        )


# ------------------------------------------------------------------ the halves


def _halves():
    """The bindings when they serve SAPA-D's halves on this backend (else None)."""
    kernels = _kernels()
    return kernels if kernels is not None and kernels.halves_usable() else None


halves = pytest.mark.skipif(
    _halves() is None, reason="the compiled SAPA-D halves are not built for this backend"
)


def _half_fns(points, s, groups, implementation="compiled"):
    args = dict(num_points=points, up_factor=s, groups=groups, implementation=implementation)
    return (
        lambda q, k, o: deform_ops.deform_similarity(q, k, o, **args),
        lambda w, v, o: deform_ops.deform_aggregate(w, v, o, **args),
    )


def _half_cases(rng, case, dtype=np.float64, away=False):
    """((query, key, offsets), (weights, value, offsets)) of a case."""
    q, k, v, o = _inputs(rng, *case, dtype=dtype, away=away)
    _, _, _, groups, _, points, _, _ = case
    w = rng.standard_normal(q.shape[:3] + (groups * points,)).astype(dtype)
    return (q, k, o), (w, v, o)


@halves
@pytest.mark.parametrize("implementation", ["compiled", "xla"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_halves_match_reference(case, implementation, monkeypatch):
    """Both halves, compiled and builtin, forward (float64 and float32) and the gradients
    of all three inputs against the reference's loops and chain-rule VJPs (integer
    positions, a dropped and a NaN point included)."""
    kernels = _halves()
    calls = []
    for name in ("deform_similarity", "deform_aggregate"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, f=original: calls.append(1) or f(*a))
    _, _, _, groups, _, points, s, _ = case
    rng = np.random.default_rng(sum(case) + 1)
    fns = _half_fns(points, s, groups, implementation)
    refs = (ref.deform_similarity, ref.deform_aggregate)
    vjps = (ref.deform_similarity_vjp, ref.deform_aggregate_vjp)
    for fn, reference, reference_vjp, args in zip(
        fns, refs, vjps, _half_cases(rng, case), strict=True
    ):
        want = reference(*args, points, s, groups)
        g = rng.standard_normal(want.shape)
        out, grads = value_and_vjp(fn, list(args), g)  # one jax.jit on JAX
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-11)
        expected = reference_vjp(*args, g, points, s, groups)
        for index, (got, exp) in enumerate(zip(grads, expected, strict=True)):
            assert np.isfinite(got).all(), index
            np.testing.assert_allclose(got, exp, rtol=1e-9, atol=1e-10, err_msg=str(index))
        got32 = to_numpy(jitted(fn)(*(a.astype(np.float32) for a in args)))
        assert got32.dtype == np.float32
        np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-4)
    # The kernels ran exactly when asked for.
    assert bool(calls) == (implementation == "compiled"), calls


@halves
def test_halves_gradients_match_central_differences():
    """float64 central differences of the compiled halves (positions away from integers),
    spot-checked: a few elements of every input."""
    rng = np.random.default_rng(12)
    case = (1, 2, 3, 2, 2, 3, 2, 4)
    _, _, _, groups, _, points, s, _ = case
    for fn, args in zip(
        _half_fns(points, s, groups), _half_cases(rng, case, away=True), strict=True
    ):
        g = rng.standard_normal(np.shape(to_numpy(fn(*args))))
        grads = vjp(fn, list(args), g)
        eps = 1e-6
        for index, arg in enumerate(args):
            flat = rng.choice(arg.size, size=min(arg.size, 6), replace=False)
            for position in zip(*np.unravel_index(flat, arg.shape), strict=True):
                plus, minus = [a.copy() for a in args], [a.copy() for a in args]
                plus[index][position] += eps
                minus[index][position] -= eps
                numeric = np.sum((to_numpy(fn(*plus)) - to_numpy(fn(*minus))) * g) / (2 * eps)
                np.testing.assert_allclose(grads[index][position], numeric, rtol=1e-6, atol=1e-7)


@halves
def test_halves_half_inputs_compute_in_float32():
    """float16 inputs: the similarity's logits come back in float32, the aggregation in
    the value's dtype, both from float32 computations of the rounded inputs."""
    rng = np.random.default_rng(13)
    case = (1, 3, 3, 2, 8, 4, 2, 8)
    _, _, _, groups, _, points, s, _ = case
    similarity, aggregate = _half_fns(points, s, groups)
    for fn, reference, args, out_dtype in zip(
        (similarity, aggregate),
        (ref.deform_similarity, ref.deform_aggregate),
        _half_cases(rng, case, dtype=np.float32),
        ("float32", "float16"),
        strict=True,
    ):
        half = [keras.ops.cast(a, "float16") for a in args]
        out = fn(*half)
        assert keras.backend.standardize_dtype(out.dtype) == out_dtype
        rounded = [to_numpy(keras.ops.cast(a, "float32")).astype(np.float64) for a in half]
        np.testing.assert_allclose(
            to_numpy(keras.ops.cast(out, "float32")),
            reference(*rounded, points, s, groups),
            rtol=2e-2,
            atol=2e-2,
        )
