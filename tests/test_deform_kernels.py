"""The SAPA-D kernels against the NumPy loop reference (tests/reference_deform.py).

- CPU core (custom_ops/sapa/kernels/cpu/sapa_deform_cpu.h), through its C entry points in
  the built keras_sapa/_lib/_sapa_core.so (bindings/sapa_deform_core_c.h, on the
  library's thread pool), called with ctypes: forward and the gradients of query, key,
  value and offsets, of the fused op and of its two halves, at real sizes (C=256, E=32,
  P=9, G=4) and odd ones; float64 numeric gradients away from integer positions; the
  kernels' rule at integer positions and for dropped points; determinism across thread
  counts. Skipped, saying why, where the library is not built.
- CUDA kernels (kernels/cuda/sapa_deform_kernels.cuh), run on the CPU under the emulation
  launcher/testing/deform_emulated.cc (one std::thread per CUDA thread) against the
  same reference, in every dtype. (That NVRTC compiles them for every target, every
  entry point in every image, is tests/test_cuda_build.py's check of the build's images,
  which include them.)

`python tests/test_deform_kernels.py` prints CPU timings at W1 (B=2, 32x32 -> 64x64,
C=256) beside SAPA-B's compiled forward.
"""

import ctypes
import os

import numpy as np
import pytest

import reference_deform as ref
from test_launcher import _cached_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAPA = os.path.join(ROOT, "custom_ops", "sapa")
CUDA_DIR = os.path.join(SAPA, "kernels", "cuda")
EMULATION = os.path.join(SAPA, "launcher", "testing", "deform_emulated.cc")
EMULATED_INCLUDE = os.path.join(SAPA, "launcher", "testing", "emulated_include")

I64 = ctypes.c_int64


def _core_library():
    """The built _sapa_core.so through the package's loader (its checks included)."""
    from keras_sapa.ops import _native

    lib, _ = _native.load_core()
    if lib is None:
        pytest.skip(f"_sapa_core.so is unavailable: {_native.unavailable_reason()}")
    return lib


@pytest.fixture(scope="session")
def capi():
    return Core(_core_library())


@pytest.fixture(scope="session")
def emulated():
    sources = [
        EMULATION,
        os.path.join(CUDA_DIR, "sapa_deform_kernels.cuh"),
        os.path.join(CUDA_DIR, "sapa_kernels.cuh"),
        *(os.path.join(EMULATED_INCLUDE, n) for n in os.listdir(EMULATED_INCLUDE)),
    ]
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-I" + EMULATED_INCLUDE, "-lpthread", "-ldl"]
    cxx = os.environ.get("CXX", "g++")
    return Emulated(
        ctypes.CDLL(_cached_build("deform_emulated", cxx, [EMULATION], sources, flags))
    )


# ---------------------------------------------------------------------------------------
# ctypes wrappers


def _ptr(a):
    return ctypes.c_void_p(a.ctypes.data) if a is not None else ctypes.c_void_p(0)


def _shape(query_or_weights, key_or_value, offsets, points, groups):
    batch, height, width = key_or_value.shape[:3]
    up = offsets.shape[1] // height
    return batch, height, width, up, points, groups


def _sizes(low, off, points, groups, dim=0, channels=0):
    """The entry points' sizes (batch, height, width, up, points, groups, dim, channels)
    from a low-resolution map and the offsets."""
    return (*_shape(None, low, off, points, groups), dim, channels)


class Core:
    """SAPA-D's C entry points in _sapa_core.so (sapa_deform_core_c.h) on NumPy arrays
    (float32 or float64). ``threads``: run on a pool of that many threads (the library's
    pool is resized, then restored to its default)."""

    def __init__(self, lib):
        self.lib = lib

    def _call(self, name, arrays, sizes, threads=None):
        suffix = {np.float32: "f32", np.float64: "f64"}[np.dtype(arrays[1].dtype).type]
        fn = getattr(self.lib, f"keras_sapa_deform_{name}_{suffix}")
        fn.argtypes = [ctypes.c_void_p] * len(arrays) + [I64] * len(sizes)
        fn.restype = ctypes.c_int
        if threads is not None:
            self.lib.keras_sapa_set_num_threads(threads)
        try:
            rc = fn(*(_ptr(a) for a in arrays), *(int(s) for s in sizes))
        finally:
            if threads is not None:
                self.lib.keras_sapa_set_num_threads(0)
        if rc != 0:
            raise ValueError(f"keras_sapa_deform_{name}: bad sizes {sizes}")

    def _grads(self, name, inputs, like, sizes, threads=None):
        """The outputs shaped like ``like``, NaN-filled first (unwritten ones show)."""
        outs = [np.full_like(a, np.nan) for a in like]
        self._call(name, [*inputs, *outs], sizes, threads)
        return outs

    def forward(self, q, k, v, off, points, groups, threads=None, weights=True):
        out = np.empty(q.shape[:3] + (v.shape[-1],), q.dtype)
        wt = np.empty(q.shape[:3] + (groups * points,), q.dtype) if weights else None
        sizes = _sizes(k, off, points, groups, q.shape[-1], v.shape[-1])
        self._call("forward", [q, k, v, off, out, wt], sizes, threads)
        return out, wt

    def backward(self, grad, q, k, v, off, wt, points, groups, threads=None):
        sizes = _sizes(k, off, points, groups, q.shape[-1], v.shape[-1])
        return self._grads("backward", [grad, q, k, v, off, wt], [q, k, v, off], sizes, threads)

    def similarity(self, q, k, off, points, groups):
        (logits,) = self._grads(
            "similarity",
            [q, k, off],
            [np.empty(q.shape[:3] + (groups * points,), q.dtype)],
            _sizes(k, off, points, groups, q.shape[-1]),
        )
        return logits

    def similarity_backward(self, dlogits, q, k, off, points, groups):
        sizes = _sizes(k, off, points, groups, q.shape[-1])
        return self._grads("similarity_backward", [dlogits, q, k, off], [q, k, off], sizes)

    def aggregate(self, wt, v, off, points, groups):
        (out,) = self._grads(
            "aggregate",
            [wt, v, off],
            [np.empty(wt.shape[:3] + (v.shape[-1],), v.dtype)],
            _sizes(v, off, points, groups, 0, v.shape[-1]),
        )
        return out

    def aggregate_backward(self, grad, wt, v, off, points, groups):
        sizes = _sizes(v, off, points, groups, 0, v.shape[-1])
        return self._grads("aggregate_backward", [grad, wt, v, off], [wt, v, off], sizes)


class DeformArgs(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_int64)
        for n in (
            "batch",
            "height",
            "width",
            "up",
            "points",
            "groups",
            "dim",
            "channels",
            "tile",
            "count",
        )
    ]


# dtype name -> (kernel suffix, NumPy storage, accumulation NumPy type)
CUDA_TYPES = {
    "float32": ("f32", np.float32, np.float32),
    "float64": ("f64", np.float64, np.float64),
    "float16": ("f16", np.float16, np.float32),
    "bfloat16": ("bf16", np.uint16, np.float32),
}


def _to_storage(x, dtype):
    """float64 array -> the kernel's storage (bfloat16: the top 16 bits, rounded)."""
    if dtype != "bfloat16":
        return np.ascontiguousarray(x, CUDA_TYPES[dtype][1])
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _from_storage(x, dtype):
    if dtype != "bfloat16":
        return np.asarray(x, np.float64)
    return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


class Emulated:
    """The CUDA kernels on the CPU (deform_emulated.cc), driven as a launcher would:
    small blocks and tiles, several blocks, so that partial tiles and the grid-stride
    loop are exercised."""

    def __init__(self, lib, block=48, tile=3, grid=2):
        self.lib, self.block, self.tile, self.grid = lib, block, tile, grid

    def launch(self, kernel, dims, count, *arrays):
        args = DeformArgs(*dims, self.tile, count)
        acc = 8 if kernel.endswith("f64") else 4
        smem = self.tile * dims[4] * dims[5] * (7 * acc + 8)
        ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        rc = self.lib.deform_emu_launch(
            kernel.encode(),
            self.grid,
            self.block,
            ctypes.c_size_t(smem),
            ctypes.byref(args),
            ptrs,
            len(arrays),
        )
        assert rc == 0, kernel

    def _scatter(self, t, dims, coef, src, off, like, wacc):
        _, _, acc = CUDA_TYPES[t]
        dst = np.full(like.shape, np.nan, acc)
        self.launch(
            f"sapa_deform_zero_{'f64' if acc is np.float64 else 'f32'}", dims, dst.size, dst
        )
        sfx = CUDA_TYPES[t][0] + ("_wacc" if wacc and acc is not CUDA_TYPES[t][1] else "")
        self.launch(f"sapa_deform_scatter_{sfx}", dims, src.shape[-1], coef, src, off, dst)
        if acc is CUDA_TYPES[t][1]:
            return dst
        out = np.empty(like.shape, CUDA_TYPES[t][1])
        self.launch(f"sapa_deform_cast_{CUDA_TYPES[t][0]}", dims, dst.size, dst, out)
        return out

    def fused(self, t, q, k, v, off, grad, points, groups):
        """(out, dq, dk, dv, doff) in float64, from float64 inputs cast to `t`."""
        sfx, _, acc = CUDA_TYPES[t]
        q, k, v, off, grad = (_to_storage(a, t) for a in (q, k, v, off, grad))
        b, h, w, s, p, g = _shape(q, k, off, points, groups)
        dims = (b, h, w, s, p, g, q.shape[-1], v.shape[-1])
        out = np.full(q.shape[:3] + (v.shape[-1],), 7, q.dtype)
        attn = np.full(q.shape[:3] + (g * p,), np.nan, acc)
        self.launch(f"sapa_deform_forward_{sfx}", dims, 0, q, k, v, off, out, attn)
        dl = np.full_like(attn, np.nan)
        dq, doff = np.full_like(q, 7), np.full_like(off, 7)
        self.launch(f"sapa_deform_backward_{sfx}", dims, 0, grad, q, k, v, off, attn, dl, dq, doff)
        dk = self._scatter(t, dims, dl, q, off, k, True)
        dv = self._scatter(t, dims, attn, grad, off, v, True)
        return [_from_storage(a, t) for a in (out, dq, dk, dv, doff)]

    def halves(self, t, q, k, v, off, wt, dlogits, grad, points, groups):
        """(logits, dq, dk, doff_sim, out, dw, dv, doff_agg) in float64."""
        sfx = CUDA_TYPES[t][0]
        q, k, v, off, wt, dlogits, grad = (
            _to_storage(a, t) for a in (q, k, v, off, wt, dlogits, grad)
        )
        b, h, w, s, p, g = _shape(q, k, off, points, groups)
        dims = (b, h, w, s, p, g, q.shape[-1], v.shape[-1])
        logits = np.full(q.shape[:3] + (g * p,), 7, q.dtype)
        self.launch(f"sapa_deform_similarity_{sfx}", dims, 0, q, k, off, logits)
        dq, doff_s = np.full_like(q, 7), np.full_like(off, 7)
        self.launch(
            f"sapa_deform_similarity_backward_{sfx}", dims, 0, dlogits, q, k, off, dq, doff_s
        )
        dk = self._scatter(t, dims, dlogits, q, off, k, False)
        out = np.full(q.shape[:3] + (v.shape[-1],), 7, q.dtype)
        self.launch(f"sapa_deform_aggregate_{sfx}", dims, 0, wt, v, off, out)
        dw, doff_a = np.full_like(wt, 7), np.full_like(off, 7)
        self.launch(f"sapa_deform_aggregate_backward_{sfx}", dims, 0, grad, wt, v, off, dw, doff_a)
        dv = self._scatter(t, dims, wt, grad, off, v, False)
        return [_from_storage(a, t) for a in (logits, dq, dk, doff_s, out, dw, dv, doff_a)]


# ---------------------------------------------------------------------------------------
# Inputs


def make_inputs(
    seed, batch, height, width, up, points, groups, embed, channels, spread=1.5, margin=0.05
):
    """query, key, value, offsets, grad (float64); offsets keep `margin` off integers."""
    rng = np.random.default_rng(seed)
    dim = groups * embed
    q = rng.standard_normal((batch, up * height, up * width, dim))
    k = rng.standard_normal((batch, height, width, dim))
    v = rng.standard_normal((batch, height, width, channels))
    off = ref.offsets_away_from_integers(
        rng, (batch, up * height, up * width, 2 * groups * points), spread=spread, margin=margin
    )
    grad = rng.standard_normal((batch, up * height, up * width, channels))
    return q, k, v, off, grad


# (batch, height, width, up, points, groups, embed, channels, spread)
ODD = [
    (1, 3, 4, 2, 4, 1, 5, 3, 2.5),  # P=4, G=1, odd channel counts, points outside
    (2, 2, 3, 3, 3, 2, 3, 6, 1.5),  # s=3, non-square
    (1, 4, 2, 1, 5, 3, 2, 9, 4.0),  # s=1, far offsets: many dropped points
    (1, 1, 1, 2, 2, 2, 4, 4, 0.8),  # a 1x1 map
]
REAL = (1, 5, 4, 2, 9, 4, 32, 256, 1.5)  # C=256, E=32, P=9, G=4, few pixels
IDS = ["P4-G1", "s3-nonsquare", "s1-far", "1x1"]


def _close(actual, expected, tol):
    actual = np.asarray(actual, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


# ---------------------------------------------------------------------------------------
# CPU core


@pytest.mark.parametrize("case", ODD + [REAL], ids=IDS + ["real"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cpu_fused_matches_reference(capi, case, dtype):
    *sizes, spread = case
    b, h, w, s, p, g, e, c = sizes
    q, k, v, off, grad = make_inputs(1, *sizes, spread=spread)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    typed = [np.ascontiguousarray(a, dtype) for a in (q, k, v, off, grad)]
    out, wt = capi.forward(*typed[:4], p, g)
    got = capi.backward(typed[4], *typed[:4], wt, p, g)
    # The reference is fed exactly the values the kernel saw.
    seen = [np.asarray(a, np.float64) for a in typed]
    _close(out, ref.sapa_deform(*seen[:4], p, s, g), tol)
    _close(wt, ref.group_softmax(ref.deform_similarity(*seen[:2], seen[3], p, s, g), g), tol)
    expected = ref.sapa_deform_vjp(*seen, p, s, g)
    for name, a, b_ in zip(("query", "key", "value", "offsets"), got, expected, strict=True):
        assert np.isfinite(a).all(), name
        _close(a, b_, 5 * tol)


@pytest.mark.parametrize("case", ODD + [REAL], ids=IDS + ["real"])
def test_cpu_halves_match_reference(capi, case):
    *sizes, spread = case
    b, h, w, s, p, g, e, c = sizes
    q, k, v, off, grad = make_inputs(2, *sizes, spread=spread)
    rng = np.random.default_rng(3)
    wt = rng.uniform(-1, 1, q.shape[:3] + (g * p,))
    dlogits = rng.standard_normal(wt.shape)
    _close(capi.similarity(q, k, off, p, g), ref.deform_similarity(q, k, off, p, s, g), 1e-12)
    got = capi.similarity_backward(dlogits, q, k, off, p, g)
    for a, b_ in zip(got, ref.deform_similarity_vjp(q, k, off, dlogits, p, s, g), strict=True):
        _close(a, b_, 1e-12)
    _close(capi.aggregate(wt, v, off, p, g), ref.deform_aggregate(wt, v, off, p, s, g), 1e-12)
    got = capi.aggregate_backward(grad, wt, v, off, p, g)
    for a, b_ in zip(got, ref.deform_aggregate_vjp(wt, v, off, grad, p, s, g), strict=True):
        _close(a, b_, 1e-12)


def test_cpu_gradients_match_numeric_gradients(capi):
    """Every input's gradient against float64 central differences of the kernel's own
    forward (positions kept 0.05 away from integers, so no difference straddles a cell
    edge or the drop boundary)."""
    sizes = (1, 3, 3, 2, 3, 2, 3, 4)
    q, k, v, off, grad = make_inputs(4, *sizes, spread=2.2, margin=0.05)
    p, g = sizes[4], sizes[5]
    _, wt = capi.forward(q, k, v, off, p, g)
    got = capi.backward(grad, q, k, v, off, wt, p, g)

    def fn(q_, k_, v_, off_):
        return capi.forward(q_, k_, v_, off_, p, g, weights=False)[0]

    for index, name in enumerate(("query", "key", "value", "offsets")):
        numeric = ref.numeric_gradient(fn, [q, k, v, off], index, grad, eps=1e-6)
        np.testing.assert_allclose(got[index], numeric, rtol=1e-6, atol=1e-7, err_msg=name)


def _one_point(capi, off_value, height=3, width=4):
    """A single output point (s=1 at (1, 1)) with one point of one group at the given
    (w, h) offset; returns the fused op's gradients and the inputs."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, height, width, 3))
    k = rng.standard_normal((1, height, width, 3))
    v = rng.standard_normal((1, height, width, 2))
    off = np.zeros((1, height, width, 4))  # P=2: point 1 stays on its anchor
    off[0, 1, 1, 0:2] = off_value
    grad = np.zeros((1, height, width, 2))
    grad[0, 1, 1] = rng.standard_normal(2)
    out, wt = capi.forward(q, k, v, off, 2, 1)
    return (q, k, v, off, grad), out, wt, capi.backward(grad, q, k, v, off, wt, 2, 1)


@pytest.mark.parametrize("position", [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (2.0, -1.0)])
def test_cpu_integer_positions_use_the_cell_of_floor(capi, position):
    """At an integer sample position the offsets' gradient is the derivative in the cell
    towards increasing coordinate: the one-sided difference from the right, as the
    official kernels compute it (grid_sample differs there)."""
    (q, k, v, off, grad), _, wt, got = _one_point(capi, position)
    expected = ref.sapa_deform_vjp(q, k, v, off, grad, 2, 1, 1)
    np.testing.assert_allclose(got[3], expected[3], rtol=1e-12, atol=1e-12)

    def loss(o):
        out, _ = capi.forward(q, k, v, o, 2, 1, weights=False)
        return float(np.sum(out * grad))

    for channel in (0, 1):
        plus = off.copy()
        plus[0, 1, 1, channel] += 1e-7
        right = (loss(plus) - loss(off)) / 1e-7
        assert abs(got[3][0, 1, 1, channel] - right) < 1e-5, (channel, right)


@pytest.mark.parametrize(
    "position",
    [(-2.0, 0.0), (0.0, -2.0), (3.0, 0.0), (0.0, 2.0), (-2.5, 0.3), (np.nan, 0.0), (0.2, np.inf)],
)
def test_cpu_dropped_points_have_zero_value_and_gradients(capi, position):
    """A point at ph <= -1, ph >= H, pw <= -1 or pw >= W (here from the anchor (1, 1) of a
    3 x 4 map), or NaN, samples 0 (logit 0 in the softmax) and gets no gradient."""
    (q, k, v, off, grad), out, wt, got = _one_point(capi, position)
    assert np.isfinite(out).all() and np.isfinite(wt).all()
    # logit 0 for the dropped point: its weight is softmax([0, logit of point 1])
    l1 = float(np.dot(q[0, 1, 1], k[0, 1, 1]))
    np.testing.assert_allclose(wt[0, 1, 1], np.exp([0.0, l1]) / np.exp([0.0, l1]).sum())
    np.testing.assert_allclose(out[0, 1, 1], wt[0, 1, 1, 1] * v[0, 1, 1])
    assert got[3][0, 1, 1, 0] == 0 and got[3][0, 1, 1, 1] == 0
    for a in got:
        assert np.isfinite(a).all()
    safe = np.nan_to_num(off, nan=50.0, posinf=50.0)
    expected = ref.sapa_deform_vjp(q, k, v, safe, grad, 2, 1, 1)
    for a, b_ in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)


def test_cpu_boundary_of_the_drop_rule(capi):
    """Exactly -1 is dropped; just inside -1 the point keeps its one in-map tap."""
    for value, kept in ((-2.0, False), (-2.0 + 1e-9, True)):  # anchor column 1: pw = value + 1
        (q, k, v, off, grad), out, wt, got = _one_point(capi, (value, 0.0))
        sim = ref.deform_similarity(q, k, off, 2, 1, 1)[0, 1, 1, 0]
        assert (sim != 0) == kept
        assert (got[3][0, 1, 1, 0] != 0) == kept


def test_cpu_is_deterministic_across_thread_counts(capi):
    sizes = REAL[:-1]
    q, k, v, off, grad = (np.asarray(a, np.float32) for a in make_inputs(6, *sizes))
    p, g = sizes[4], sizes[5]
    runs = []
    for threads in (1, 3, 7):
        out, wt = capi.forward(q, k, v, off, p, g, threads=threads)
        runs.append([out, wt, *capi.backward(grad, q, k, v, off, wt, p, g, threads=threads)])
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(a, b_)


def test_cpu_rejects_bad_sizes(capi):
    q, k, v, off, _ = make_inputs(7, 1, 2, 2, 2, 2, 2, 3, 4)
    with pytest.raises(ValueError, match="bad sizes"):
        capi.forward(q, k, v[..., :3], off, 2, 2)  # C=3 not divisible by G=2
    with pytest.raises(ValueError, match="bad sizes"):
        capi.forward(q[..., :5], k[..., :5], v, off, 2, 2)  # D=5 not divisible by G=2


@pytest.fixture(scope="module")
def tf_op():
    """The TensorFlow op on the CPU core (``KerasSapa>SapaDeform`` and its gradient)."""
    tf = pytest.importorskip("tensorflow")
    from keras_sapa.ops import _deform as deform_ops

    kernels = deform_ops._deform_kernels()
    if kernels is None or not kernels.available():
        pytest.skip("the compiled SAPA-D TensorFlow op is not built")
    return tf, kernels


# Half storage on the CPU core (the TensorFlow op hands float16 / bfloat16 tensors to the
# kernels, which convert rows as they read them): absolute tolerance relative to the
# largest expected magnitude, twice the largest error seen over these cases (float16
# 4.5e-4, bfloat16 3.5e-3: the final rounding, 2^-11 and 2^-8 of the magnitude).
TF_HALF_TOL = {"float16": 1e-3, "bfloat16": 8e-3}


@pytest.mark.parametrize("case", [ODD[0], ODD[1], REAL], ids=["P4-G1", "s3-nonsquare", "real"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tf_half_storage_matches_reference(tf_op, case, dtype):
    """float16 / bfloat16 SAPA-D on TensorFlow's CPU op: output and the gradients of all
    four inputs against the float64 reference of the values the kernel saw (the rounded
    inputs); the outputs and gradients keep the input dtype, the softmax float32."""
    tf, kernels = tf_op
    *sizes, spread = case
    b, h, w, s, p, g, e, c = sizes
    q, k, v, off, grad = make_inputs(13, *sizes, spread=spread)
    typed = [tf.cast(tf.constant(a, tf.float32), dtype) for a in (q, k, v, off, grad)]
    seen = [tf.cast(a, tf.float64).numpy() for a in typed]
    with tf.GradientTape() as tape:
        tape.watch(typed[:4])
        out, wt = kernels.sapa_deform_with_weights(*typed[:4], p, s, g)
    got = tape.gradient(out, typed[:4], typed[4])
    assert out.dtype == dtype and wt.dtype == tf.float32
    tol = TF_HALF_TOL[dtype]
    _close(out.numpy().astype(np.float64), ref.sapa_deform(*seen[:4], p, s, g), tol)
    expected = ref.sapa_deform_vjp(*seen, p, s, g)
    for name, a, b_ in zip(("query", "key", "value", "offsets"), got, expected, strict=True):
        assert a.dtype == dtype, name
        a = a.numpy().astype(np.float64)
        assert np.isfinite(a).all(), name
        _close(a, b_, tol)


# ---------------------------------------------------------------------------------------
# CUDA


def _cuda_tolerance(dtype, gradient=False):
    """Absolute tolerance relative to the largest expected magnitude: float64 and float32
    accumulate in their own type, half types in float32 with inputs and results rounded."""
    if dtype in ("float16", "bfloat16"):
        return {"float16": 5e-3, "bfloat16": 3e-2}[dtype]
    return {"float64": 1e-12, "float32": 2e-5}[dtype] * (5 if gradient else 1)


@pytest.mark.parametrize(
    "case",
    [ODD[0], ODD[1], ODD[3], (1, 2, 3, 2, 9, 4, 32, 64, 1.5)],
    ids=["P4-G1", "s3-nonsquare", "1x1", "real-E"],
)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_cuda_fused_in_emulation_matches_reference(emulated, case, dtype):
    *sizes, spread = case
    b, h, w, s, p, g, e, c = sizes
    q, k, v, off, grad = make_inputs(8, *sizes, spread=spread)
    seen = [_from_storage(_to_storage(a, dtype), dtype) for a in (q, k, v, off, grad)]
    got = emulated.fused(dtype, q, k, v, off, grad, p, g)
    expected = [ref.sapa_deform(*seen[:4], p, s, g), *ref.sapa_deform_vjp(*seen, p, s, g)]
    for name, a, b_ in zip(
        ("out", "query", "key", "value", "offsets"), got, expected, strict=True
    ):
        assert np.isfinite(a).all(), name
        _close(a, b_, _cuda_tolerance(dtype, gradient=name != "out"))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_cuda_halves_in_emulation_match_reference(emulated, dtype):
    sizes = (2, 2, 3, 2, 3, 2, 3, 4)
    b, h, w, s, p, g, e, c = sizes
    q, k, v, off, grad = make_inputs(9, *sizes, spread=2.5)
    rng = np.random.default_rng(10)
    wt = rng.uniform(-1, 1, q.shape[:3] + (g * p,))
    dlogits = rng.standard_normal(wt.shape)
    seen = [_from_storage(_to_storage(a, dtype), dtype) for a in (q, k, v, off, wt, dlogits, grad)]
    qs, ks, vs, offs, wts, dls, grads = seen
    got = emulated.halves(dtype, q, k, v, off, wt, dlogits, grad, p, g)
    expected = [
        ref.deform_similarity(qs, ks, offs, p, s, g),
        *ref.deform_similarity_vjp(qs, ks, offs, dls, p, s, g),
        ref.deform_aggregate(wts, vs, offs, p, s, g),
        *ref.deform_aggregate_vjp(wts, vs, offs, grads, p, s, g),
    ]
    for a, b_ in zip(got, expected, strict=True):
        _close(a, b_, _cuda_tolerance(dtype, gradient=True))


def test_cuda_rules_at_integer_and_dropped_points_in_emulation(emulated, capi):
    """The CUDA kernels follow the same rules as the CPU core where the reference's
    numeric checks cannot look: integer positions, the -1 boundary, NaN."""
    rng = np.random.default_rng(11)
    sizes = (1, 3, 4, 2, 4, 2, 3, 4)
    q, k, v, _, grad = make_inputs(12, *sizes)
    choices = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.5, -1.5, np.nan])
    off = rng.choice(choices, size=(1, 6, 8, 16))
    got = emulated.fused("float64", q, k, v, off, grad, 4, 2)
    out, wt = capi.forward(q, k, v, off, 4, 2)
    cpu = [out, *capi.backward(grad, q, k, v, off, wt, 4, 2)]
    for a, b_ in zip(got, cpu, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Timing (not a test)


def benchmark(rounds=10):
    """CPU timings at W1 (B=2, 32x32 -> 64x64, C=256, P=9, G=4, E=32, float32), minimum
    over interleaved rounds, beside SAPA-B's compiled forward (K=5, d=64), all from the
    built keras_sapa/_lib/_sapa_core.so (KERAS_SAPA_NUM_THREADS threads)."""
    import time

    from keras_sapa.ops import _native
    from keras_sapa.ops import _optable

    lib = _core_library()
    core = Core(lib)
    threads = lib.keras_sapa_num_threads()
    rng = np.random.default_rng(0)
    f = np.float32
    q = rng.standard_normal((2, 64, 64, 128)).astype(f)
    k = rng.standard_normal((2, 32, 32, 128)).astype(f)
    v = rng.standard_normal((2, 32, 32, 256)).astype(f)
    off = rng.uniform(-1.5, 1.5, (2, 64, 64, 72)).astype(f)
    grad = rng.standard_normal((2, 64, 64, 256)).astype(f)
    _, wt = core.forward(q, k, v, off, 9, 4)
    qb = rng.standard_normal((2, 64, 64, 64)).astype(f)
    kb = rng.standard_normal((2, 32, 32, 64)).astype(f)
    out, wb = np.empty((2, 64, 64, 256), f), np.empty((2, 64, 64, 25), f)
    sapa = _optable.op("Sapa")
    attrs = {"kernel_size": 5, "up_factor": 2}
    sapa_sizes = _native.core_sizes(sapa, [qb.shape, kb.shape, v.shape], attrs)
    runs = {
        "sapa_d_forward": lambda: core.forward(q, k, v, off, 9, 4),
        "sapa_d_backward": lambda: core.backward(grad, q, k, v, off, wt, 9, 4),
        "sapa_b_forward": lambda: _native.call_cpu(
            lib, sapa, [a.ctypes.data for a in (qb, kb, v, out, wb)], sapa_sizes, "f32"
        ),
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    fwd, bwd = best["sapa_d_forward"], best["sapa_d_backward"]
    print(f"W1, {threads} threads: " + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in best.items()))
    print(f"SAPA-D (forward + backward) / forward: {(fwd + bwd) / fwd:.2f}")
    print(f"SAPA-D forward / SAPA-B forward: {fwd / best['sapa_b_forward']:.2f}")
    return best


if __name__ == "__main__":
    benchmark()
