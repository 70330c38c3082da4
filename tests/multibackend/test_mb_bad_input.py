"""Bad and degenerate input on every implementation of the running backend (issue 21).

Backend-neutral: the main run executes it on TensorFlow, ``tests/test_backends.py`` on
JAX and PyTorch. Degenerate but valid shapes (an empty batch, zero channels, 1x1
low-resolution maps, a window larger than the image) run forward and backward and match
the float64 loop reference (``tests/reference.py``) and its analytic VJPs; integer
inputs and mixed float precisions raise ``ValueError`` naming the argument and its
dtype; ``KERAS_SAPA_DISABLE_COMPILED`` and the CPU-feature check decide the same way
here as on the other backends. TensorFlow's graph-only cases: ``tests/test_bad_input.py``.
"""

import json
import os

import keras
import numpy as np
import pytest

import reference
from backend_utils import to_numpy
from backend_utils import value_and_vjp
from keras_sapa import ops
from keras_sapa.ops import _native

IMPLEMENTATIONS = ["patches", "xla", "compiled"]
# Each case: a valid problem (B=2 maps of 3 x 4, s=2, K=3, d=4, C=5) with the sizes
# that make it degenerate changed.
BASE = {"B": 2, "H": 3, "W": 4, "s": 2, "K": 3, "d": 4, "C": 5}
DEGENERATE = {
    "empty_batch": {"B": 0},
    "zero_value_channels": {"C": 0},
    "zero_key_channels": {"B": 1, "W": 3, "d": 0},
    "one_by_one": {"H": 1, "W": 1, "d": 3, "C": 4},
    "one_by_one_s1": {"B": 1, "H": 1, "W": 1, "s": 1, "d": 2, "C": 2},
    "window_larger_than_image": {"B": 1, "H": 2, "W": 1, "s": 3, "K": 5, "d": 3, "C": 2},
}
TOL = 1e-9


def _needs(implementation):
    if implementation == "compiled" and not ops.compiled_available():
        pytest.skip("the compiled kernels are not available here")


def _arrays(case, seed=0):
    sizes = {**BASE, **DEGENERATE[case]}
    b, h, w, s, k, d, c = (sizes[n] for n in ("B", "H", "W", "s", "K", "d", "C"))
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((b, s * h, s * w, d))
    key = rng.standard_normal((b, h, w, d))
    value = rng.standard_normal((b, h, w, c))
    grad = rng.standard_normal((b, s * h, s * w, c))
    return query, key, value, grad, k, s


def _close(got, want):
    got = np.asarray(got, np.float64)
    assert got.shape == np.shape(want), (got.shape, np.shape(want))
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_shapes_forward_and_backward(case, implementation):
    _needs(implementation)
    query, key, value, grad, k, s = _arrays(case)

    def fused(q, kk, v):
        return ops.sapa(q, kk, v, k, s, implementation=implementation, training=True)

    def similarity(q, kk):
        return ops.similarity(q, kk, k, s, implementation=implementation, training=True)

    def aggregate(w, v):
        return ops.aggregate(w, v, k, s, implementation=implementation, training=True)

    weights = reference.softmax(reference.similarity(query, key, k, s))
    window_grad = np.random.default_rng(1).standard_normal(weights.shape)
    # Each op's forward and VJP from one call (jitted on JAX).
    for fn, args, cotangent, forward, backward in (
        (fused, [query, key, value], grad, reference.sapa, reference.sapa_vjp),
        (similarity, [query, key], window_grad, reference.similarity, reference.similarity_vjp),
        (aggregate, [weights, value], grad, reference.aggregate, reference.aggregate_vjp),
    ):
        out, grads = value_and_vjp(fn, args, cotangent)
        _close(out, forward(*args, k, s))
        for got, want in zip(grads, backward(*args, cotangent, k, s), strict=True):
            _close(got, want)


def _calls(implementation, query, key, value, weights):
    """Every public op, called with these tensors, as (name, thunk)."""
    return [
        ("sapa", lambda: ops.sapa(query, key, value, 3, 2, implementation)),
        ("similarity", lambda: ops.similarity(query, key, 3, 2, implementation)),
        ("aggregate", lambda: ops.aggregate(weights, value, 3, 2, implementation)),
    ]


def _good(dtype="float32"):
    rng = np.random.default_rng(2)
    shapes = {
        "query": (1, 4, 6, 3),
        "key": (1, 2, 3, 3),
        "value": (1, 2, 3, 5),
        "weights": (1, 4, 6, 9),
    }
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("argument", ["query", "key", "value", "weights"])
@pytest.mark.parametrize("bad_dtype", ["int32", "float16", "float64"])
def test_bad_dtypes_name_the_argument(argument, bad_dtype, implementation):
    """An integer tensor, or a float of another precision than the call's first tensor
    (``query``, or ``weights`` for ``aggregate``), is a ValueError naming the argument
    and its dtype, before any implementation is chosen (so even where ``"compiled"`` is
    unavailable)."""
    tensors = _good()
    tensors[argument] = keras.ops.convert_to_tensor(tensors[argument].astype(bad_dtype))
    received = keras.backend.standardize_dtype(tensors[argument].dtype)
    if received == "float32":  # JAX without x64 narrows float64: nothing is mixed then
        pytest.skip(f"{keras.config.backend()} holds {bad_dtype} as float32 here")
    used = {
        "sapa": ("query", "key", "value"),
        "similarity": ("query", "key"),
        "aggregate": ("weights", "value"),
    }
    for op_name, call in _calls(implementation, **tensors):
        if argument not in used[op_name]:
            continue
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert f"`{argument}`" in message and f"{argument}.dtype={received}" in message, (
            op_name,
            message,
        )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_keep_their_dtype(dtype, implementation):
    _needs(implementation)
    tensors = _good()
    half = {name: keras.ops.cast(t, dtype) for name, t in tensors.items()}
    out = ops.sapa(half["query"], half["key"], half["value"], 3, 2, implementation)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    want = reference.sapa(
        *(to_numpy(keras.ops.cast(half[n], "float32")) for n in ("query", "key", "value")), 3, 2
    )
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(out, "float32")), want, rtol=3e-2, atol=3e-2
    )


@pytest.mark.parametrize(
    "value,disables",
    [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_disable_switch_reads_the_same_on_every_backend(value, disables, monkeypatch):
    monkeypatch.delenv(_native.ENV_DISABLE, raising=False)
    built = ops.compiled_available()
    monkeypatch.setenv(_native.ENV_DISABLE, value)
    assert ops.compiled_available() is (built and not disables)
    if disables:
        assert ops.resolve_implementation("auto", training=True) != "compiled"
        with pytest.raises(RuntimeError, match=_native.ENV_DISABLE):
            ops.resolve_implementation("compiled")


def test_unreadable_cpu_features_refuse_the_kernels(tmp_path, monkeypatch):
    """Where the CPU's features cannot be read, a library built for some is refused,
    with one warning naming them: the same decision on every backend."""
    kernels = ops._kernels()  # the backend's bindings
    monkeypatch.delenv(_native.ENV_DISABLE, raising=False)
    if not kernels.available():
        pytest.skip("the compiled kernels are not available here")
    if keras.config.backend() == "tensorflow":
        record = os.path.join(os.path.dirname(kernels.library_path()), kernels.BUILD_INFO)
    else:
        record = os.path.join(_native.bindings_dir(), _native.BINDINGS_BUILD_INFO)
    with open(record) as f:
        if not json.load(f).get("cpu_features"):
            pytest.skip("a portable build (no CPU features recorded) loads anywhere")
    monkeypatch.setattr(_native, "CPUINFO", str(tmp_path / "no_cpuinfo"))
    kernels._reset()
    try:
        with pytest.warns(RuntimeWarning, match="lacks"):
            assert not ops.compiled_available()
        assert "lacks" in kernels.unavailable_reason()
        assert ops.resolve_implementation("auto", training=True) != "compiled"
    finally:
        monkeypatch.undo()
        kernels._reset()
    assert kernels.available()
