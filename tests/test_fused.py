"""The fused compiled op (KerasSapa>Sapa / SapaGrad) and its framework-free CPU core.

References are independent of the code under test: ``tests/reference.py`` (float64 loops
over the spec) for the forward and the saved softmax, and its chain-rule VJP
``reference.sapa_vjp`` for the gradients (checked against central differences of
``reference.sapa`` in ``tests/test_real_sizes.py``). The core is also compiled and run
without TensorFlow (g++ only), with a serial pool and a threaded one.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

import reference as ref
from keras_sapa import ops
from keras_sapa.ops import _tf_kernels as _compiled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_DIR = os.path.join(ROOT, "custom_ops", "sapa", "kernels", "cpu")

needs_fused = pytest.mark.skipif(
    not (ops.compiled_available() and _compiled.fused_available()),
    reason="compiled library with the fused op unavailable (build custom_ops/build.py)",
)


def _inputs(rng, batch, height, width, dim, channels, up_factor, scale=1.0):
    s = up_factor
    return (
        rng.standard_normal((batch, s * height, s * width, dim)) * scale,
        rng.standard_normal((batch, height, width, dim)) * scale,
        rng.standard_normal((batch, height, width, channels)),
        rng.standard_normal((batch, s * height, s * width, channels)),
    )


def _fused_grads(query, key, value, grad, kernel_size, up_factor):
    args = [tf.constant(t) for t in (query, key, value)]
    with tf.GradientTape() as tape:
        tape.watch(args)
        out = _compiled.sapa(*args, kernel_size, up_factor)
    return out, tape.gradient(out, args, output_gradients=tf.constant(grad))


CASES = [
    # kernel_size, up_factor, batch, height, width, dim d, channels C
    (5, 2, 1, 6, 7, 64, 256),  # the real channel sizes (vector paths, no tails)
    (5, 2, 1, 5, 6, 65, 257),  # odd sizes: vector tails
    (1, 1, 2, 3, 4, 3, 5),  # K=1, s=1: the softmax of one point and no padding
    (3, 3, 1, 3, 5, 4, 7),
    (7, 2, 1, 4, 3, 5, 3),  # window larger than the map
    (5, 4, 1, 2, 3, 3, 9),
    (3, 2, 2, 1, 1, 2, 3),  # a 1x1 map
    (7, 1, 1, 1, 5, 4, 6),  # one row
    (3, 4, 1, 5, 1, 3, 4),  # one column
    (3, 3, 1, 2, 2, 0, 4),  # d=0: uniform weights over the window
]


@needs_fused
@pytest.mark.parametrize("kernel_size,up_factor,batch,height,width,dim,channels", CASES)
def test_fused_matches_reference_float64(
    kernel_size, up_factor, batch, height, width, dim, channels
):
    rng = np.random.default_rng(kernel_size * 1000 + up_factor * 100 + channels)
    k, s = kernel_size, up_factor
    query, key, value, grad = _inputs(rng, batch, height, width, dim, channels, s, scale=0.3)
    out, weights = _compiled.sapa_with_weights(query, key, value, k, s)
    assert out.dtype == tf.float64 and weights.dtype == tf.float64
    np.testing.assert_allclose(out, ref.sapa(query, key, value, k, s), rtol=1e-10, atol=1e-10)
    # The saved softmax, padded window points included.
    np.testing.assert_allclose(
        weights, ref.softmax(ref.similarity(query, key, k, s)), rtol=1e-10, atol=1e-12
    )
    _, grads = _fused_grads(query, key, value, grad, k, s)
    for got, want in zip(grads, ref.sapa_vjp(query, key, value, grad, k, s), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@needs_fused
# Tolerances of the storage type: outputs are rounded once (2^-11, 2^-8 relative); inputs
# are rounded before the reference sees them, and everything between runs in float.
@pytest.mark.parametrize(
    "dtype,tol", [(tf.float32, 2e-5), (tf.float16, 2e-3), (tf.bfloat16, 1.6e-2)]
)
@pytest.mark.parametrize(
    "kernel_size,up_factor,height,width,dim,channels",
    [(5, 2, 6, 7, 64, 256), (3, 3, 3, 5, 65, 257)],
)
def test_fused_dtypes(dtype, tol, kernel_size, up_factor, height, width, dim, channels):
    """float32 / half / bfloat16 against the float64 reference of the rounded inputs;
    the softmax is kept in float32 for all three."""
    rng = np.random.default_rng(4)
    k, s = kernel_size, up_factor
    inputs = _inputs(rng, 1, height, width, dim, channels, s, scale=1.0 / np.sqrt(dim))
    # The reference sees exactly the values the op sees.
    query, key, value, grad = (tf.cast(tf.cast(t, dtype), tf.float64).numpy() for t in inputs)
    args = [tf.cast(t, dtype) for t in (query, key, value)]
    with tf.GradientTape() as tape:
        tape.watch(args)
        out, weights = _compiled.sapa_with_weights(*args, k, s)
    grads = tape.gradient(out, args, output_gradients=tf.cast(grad, dtype))
    assert out.dtype == dtype and weights.dtype == tf.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    np.testing.assert_allclose(
        tf.cast(out, tf.float64), ref.sapa(query, key, value, k, s), rtol=tol, atol=tol
    )
    np.testing.assert_allclose(
        weights, ref.softmax(ref.similarity(query, key, k, s)), rtol=tol, atol=tol
    )
    for got, want in zip(grads, ref.sapa_vjp(query, key, value, grad, k, s), strict=True):
        scale = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(
            tf.cast(got, tf.float64) / scale, want / scale, rtol=tol, atol=tol
        )


@needs_fused
def test_large_logits_are_stable():
    """Logits of +-1e4: the softmax is shifted by its maximum, padding included."""
    rng = np.random.default_rng(8)
    query, key, value, _ = _inputs(rng, 1, 3, 3, 4, 5, 2, scale=60.0)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        args = [t.astype(dtype) for t in (query, key, value)]
        out = _compiled.sapa(*args, 3, 2)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, ref.sapa(*args, 3, 2), rtol=tol, atol=tol)


@needs_fused
def test_ops_sapa_compiled_uses_the_fused_op():
    rng = np.random.default_rng(1)
    query, key, value, _ = (tf.constant(t, tf.float32) for t in _inputs(rng, 2, 4, 5, 8, 16, 2))
    fn = tf.function(lambda q, k, v: ops.sapa(q, k, v, 3, 2, implementation="compiled"))
    graph = fn.get_concrete_function(query, key, value).graph
    types = {op.type for op in graph.get_operations()}
    assert "KerasSapa>Sapa" in types and "KerasSapa>Similarity" not in types
    np.testing.assert_allclose(
        fn(query, key, value),
        ref.sapa(query.numpy(), key.numpy(), value.numpy(), 3, 2),
        rtol=1e-5,
        atol=1e-5,
    )


@needs_fused
def test_fused_backward_is_deterministic():
    rng = np.random.default_rng(3)
    inputs = [t.astype(np.float32) for t in _inputs(rng, 2, 9, 11, 64, 256, 2)]
    first = _fused_grads(*inputs, 5, 2)[1]
    second = _fused_grads(*inputs, 5, 2)[1]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@needs_fused
def test_second_order_directional_float64():
    """The registered gradient of SapaGrad: d/de <first_order(x + e a), u> against
    central differences of the fused first-order gradient (itself checked above)."""
    rng = np.random.default_rng(6)
    k, s = 3, 2
    query, key, value, grad = _inputs(rng, 1, 2, 3, 3, 4, s, scale=0.5)
    ups = [rng.standard_normal(t.shape) for t in (query, key, value)]
    directions = [rng.standard_normal(t.shape) for t in (query, key, value, grad)]

    def inner(q, key_, v, g):
        return float(
            sum(
                np.sum(d.numpy() * u)
                for d, u in zip(_fused_grads(q, key_, v, g, k, s)[1], ups, strict=True)
            )
        )

    args = [tf.constant(t) for t in (query, key, value, grad)]
    with tf.GradientTape() as tape:
        tape.watch(args)
        with tf.GradientTape() as inner_tape:
            inner_tape.watch(args[:3])
            out = _compiled.sapa(*args[:3], k, s)
        first = inner_tape.gradient(out, args[:3], output_gradients=args[3])
        total = tf.add_n([tf.reduce_sum(f * u) for f, u in zip(first, ups, strict=True)])
    second = tape.gradient(total, args)
    eps = 1e-6
    base = [query, key, value, grad]
    for index in range(4):
        plus, minus = list(base), list(base)
        plus[index] = plus[index] + eps * directions[index]
        minus[index] = minus[index] - eps * directions[index]
        numeric = (inner(*plus) - inner(*minus)) / (2 * eps)
        analytic = float(np.sum(second[index].numpy() * directions[index]))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@needs_fused
def test_bad_shapes_raise():
    q = tf.zeros((1, 6, 8, 4))
    k = tf.zeros((1, 3, 4, 4))
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="value"):
        _compiled.sapa(q, k, tf.zeros((1, 3, 5, 2)), 3, 2)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="channels"):
        _compiled.sapa(q, tf.zeros((1, 3, 4, 5)), tf.zeros((1, 3, 4, 2)), 3, 2)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="odd"):
        _compiled.sapa(q, k, tf.zeros((1, 3, 4, 2)), 4, 2)


@needs_fused
def test_empty_batch():
    out, weights = _compiled.sapa_with_weights(
        tf.zeros((0, 4, 4, 3)), tf.zeros((0, 2, 2, 3)), tf.zeros((0, 2, 2, 5)), 3, 2
    )
    assert out.shape == (0, 4, 4, 5) and weights.shape == (0, 4, 4, 9)


# ------------------------------------------------------------ the core, without TensorFlow

_CORE_DRIVER = r"""
// Runs the framework-free core on inputs read from files (float64 values, stored in the
// type named by argv[9]: f64, or f16 / bf16 storage computed in float, converted per tile
// by the kernels), with a serial pool and with a threaded pool that hands out small
// ranges in reverse order; writes both results as float64.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>
#include "sapa_cpu.h"
using namespace keras_sapa::cpu;

template <typename In>
static std::vector<In> Read(const std::string& path, size_t n) {
  std::vector<double> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(double), n, f) != n) std::exit(2);
  std::fclose(f);
  std::vector<In> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = FromCompute<In>(typename ComputeOf<In>::type(v[i]));
  return r;
}

template <typename X>
static void Write(FILE* out, const std::vector<X>& x) {
  for (const X& e : x) {
    const double y = ToCompute(e);
    std::fwrite(&y, sizeof(double), 1, out);
  }
}

template <typename In>
static void Run(const Shape& d, long dim, long channels, const std::string& base) {
  using T = typename ComputeOf<In>::type;
  auto q = Read<In>(base + "/q", d.high_points() * dim);
  auto k = Read<In>(base + "/k", d.low_points() * dim);
  auto v = Read<In>(base + "/v", d.low_points() * channels);
  auto g = Read<In>(base + "/g", d.high_points() * channels);
  ParallelFor threaded = [](int64_t units, int64_t, const Range& fn) {
    std::vector<std::thread> threads;
    for (int64_t begin = units - (units > 3 ? 3 : units), end = units; end > 0;
         end = begin, begin = begin > 3 ? begin - 3 : 0) {
      threads.emplace_back([=, &fn] { fn(begin, end); });
    }
    for (auto& t : threads) t.join();
  };
  FILE* out = std::fopen((base + "/result").c_str(), "wb");
  for (const ParallelFor& pool : {Serial(), threaded}) {
    std::vector<In> o(d.high_points() * channels), dq(q.size()), dk(k.size()), dv(v.size());
    std::vector<T> w(d.high_points() * d.window()), dl(w.size());
    SapaForward<T>(pool, d, dim, channels, q.data(), k.data(), v.data(), o.data(), w.data());
    SapaBackward<T>(pool, d, dim, channels, g.data(), q.data(), k.data(), v.data(), w.data(),
                    dl.data(), dq.data(), dk.data(), dv.data());
    Write(out, o);
    Write(out, w);
    Write(out, dq);
    Write(out, dk);
    Write(out, dv);
  }
  std::fclose(out);
}

int main(int argc, char** argv) {
  Shape d;
  d.batch = std::atol(argv[1]); d.height = std::atol(argv[2]); d.width = std::atol(argv[3]);
  d.up = std::atol(argv[4]); d.kernel = std::atol(argv[5]);
  const long dim = std::atol(argv[6]), channels = std::atol(argv[7]);
  const std::string base(argv[8]), type(argv[9]);
  if (type == "f64") Run<double>(d, dim, channels, base);
  if (type == "f16") Run<Half>(d, dim, channels, base);
  if (type == "bf16") Run<BFloat16>(d, dim, channels, base);
  return 0;
}
"""

_CONVERT_DRIVER = r"""
// The half-precision conversions of simd.h: every binary16 and bfloat16 bit pattern to
// float (ConvertRow), and the float32 values of argv[1] rounded to both (RoundRow).
#include <cstdio>
#include <vector>
#include "simd.h"
using namespace keras_sapa::cpu;

int main(int argc, char** argv) {
  std::vector<Half> h(65536);
  std::vector<BFloat16> b(65536);
  for (int i = 0; i < 65536; ++i) h[i].bits = b[i].bits = uint16_t(i);
  std::vector<float> fh(65536), fb(65536);
  ConvertRow<float, Half>(h.data(), 65536, fh.data());
  ConvertRow<float, BFloat16>(b.data(), 65536, fb.data());
  FILE* in = std::fopen(argv[1], "rb");
  std::vector<float> x;
  for (float f; std::fread(&f, sizeof f, 1, in) == 1;) x.push_back(f);
  std::fclose(in);
  std::vector<Half> rh(x.size());
  std::vector<BFloat16> rb(x.size());
  RoundRow<Half, float>(x.data(), int64_t(x.size()), rh.data());
  RoundRow<BFloat16, float>(x.data(), int64_t(x.size()), rb.data());
  FILE* out = std::fopen(argv[2], "wb");
  std::fwrite(fh.data(), sizeof(float), fh.size(), out);
  std::fwrite(fb.data(), sizeof(float), fb.size(), out);
  std::fwrite(rh.data(), 2, rh.size(), out);
  std::fwrite(rb.data(), 2, rb.size(), out);
  std::fclose(out);
  return 0;
}
"""

needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no g++")


def _compile(tmp_path, name, source, flags=()):
    """g++ -O0 (half the compile time of -O1; the optimised kernels are what every
    TensorFlow, JAX and PyTorch test of the built libraries runs)."""
    (tmp_path / f"{name}.cc").write_text(source)
    exe = tmp_path / name
    subprocess.run(
        [
            os.environ.get("CXX", "g++"),
            "-std=c++17",
            "-O0",
            "-pthread",
            *flags,
            "-I" + CORE_DIR,
            str(tmp_path / f"{name}.cc"),
            "-o",
            str(exe),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return exe


_EMPTY_DRIVER = r"""
// The fused pair on maps with nothing in them (no batch, no rows, no columns): returns
// without touching memory. Built at -O0, where an integer division by zero traps.
#include <cstdio>
#include "sapa_cpu.h"
using namespace keras_sapa::cpu;
int main() {
  const long sizes[][3] = {{0, 4, 5}, {2, 0, 5}, {2, 4, 0}, {0, 0, 0}};
  for (const auto& z : sizes) {
    Shape d;
    d.batch = z[0], d.height = z[1], d.width = z[2], d.up = 2, d.kernel = 5;
    SapaForward<double, double>(Serial(), d, 3, 4, nullptr, nullptr, nullptr, nullptr, nullptr);
    SapaBackward<double, double>(Serial(), d, 3, 4, nullptr, nullptr, nullptr, nullptr, nullptr,
                                 nullptr, nullptr, nullptr, nullptr);
    std::printf("ok %ld %ld %ld\n", z[0], z[1], z[2]);
  }
}
"""


@needs_cxx
def test_core_runs_empty_maps(tmp_path):
    """Empty maps reach the core from the C bindings (JAX, PyTorch): the forward's whole-
    height runs of rows once divided by a height of 0 there."""
    exe = _compile(tmp_path, "empty", _EMPTY_DRIVER)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.split("\n")[:4] == ["ok 0 4 5", "ok 2 0 5", "ok 2 4 0", "ok 0 0 0"]


@needs_cxx
def test_core_builds_and_runs_without_tensorflow(tmp_path):
    """The CPU core compiles with nothing but the C++ standard library (no TensorFlow or
    Eigen include path, no SIMD flags) and matches the reference with a serial and a
    threaded pool: in float64, and on float16 / bfloat16 storage (the tiles converted to
    float inside the kernels, the results rounded once) against the float64 reference of
    the rounded inputs, with tolerances of those types."""
    exe = _compile(tmp_path, "driver", _CORE_DRIVER)
    rng = np.random.default_rng(9)
    batch, height, width, s, k, dim, channels = 2, 4, 5, 2, 5, 9, 11
    inputs = _inputs(rng, batch, height, width, dim, channels, s, 0.5)
    # float16 values are exact in bfloat16's exponent range but not its mantissa: round
    # each input to the storage type first, so the reference sees what the kernels see.
    bf16 = tf.bfloat16.as_numpy_dtype
    # Tolerances: the outputs' rounding to the storage type (2^-11, 2^-8 relative).
    for dtype, tol in ((np.float64, 1e-10), (np.float16, 2e-3), (bf16, 1.6e-2)):
        rounded = [t.astype(dtype).astype(np.float64) for t in inputs]
        for name, t in zip("qkvg", rounded, strict=True):
            t.tofile(tmp_path / name)
        type_name = {np.float64: "f64", np.float16: "f16"}.get(dtype, "bf16")
        args = (batch, height, width, s, k, dim, channels)
        subprocess.run(
            [str(exe), *map(str, args), str(tmp_path), type_name], check=True, timeout=120
        )
        query, key, value, grad = rounded
        result = np.fromfile(tmp_path / "result", np.float64)
        want = [
            ref.sapa(query, key, value, k, s),
            ref.softmax(ref.similarity(query, key, k, s)),
            *ref.sapa_vjp(query, key, value, grad, k, s),
        ]
        sizes = [w.size for w in want]
        assert result.size == 2 * sum(sizes)
        serial, threaded = result[: sum(sizes)], result[sum(sizes) :]
        np.testing.assert_array_equal(serial, threaded)  # the split into ranges changes nothing
        for got, expected in zip(np.split(serial, np.cumsum(sizes)[:-1]), want, strict=True):
            scale = max(1.0, float(np.max(np.abs(expected))))
            np.testing.assert_allclose(
                got.reshape(expected.shape) / scale,
                expected / scale,
                rtol=tol,
                atol=tol,
                err_msg=type_name,
            )


@needs_cxx
@pytest.mark.parametrize("simd", [False, True], ids=["portable", "build-flags"])
def test_half_conversions_match_numpy_and_tensorflow(tmp_path, simd):
    """simd.h's binary16 / bfloat16 conversions, in the portable code and with the build's
    SIMD flags (F16C where this CPU has it): every bit pattern to float against NumPy's
    float16 and TensorFlow's bfloat16, and float32 values (ties, subnormals, overflow,
    infinities, NaN, random) rounded to nearest even as NumPy and TensorFlow round them."""
    import importlib.util

    flags = ()
    if simd:
        spec = importlib.util.spec_from_file_location(
            "_sapa_build", os.path.join(ROOT, "custom_ops", "build.py")
        )
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        flags = build._cpu_simd_flags(os.environ.get("CXX", "g++"))
        if not flags:
            pytest.skip("no SIMD flags for this compiler and CPU")
    exe = _compile(tmp_path, "convert", _CONVERT_DRIVER, flags)
    rng = np.random.default_rng(5)
    half_bits = np.arange(65536, dtype=np.uint16)
    # Every float16 and bfloat16 value, the midpoints between neighbours (ties), values
    # just beside them, and random floats of every magnitude.
    f16 = half_bits.view(np.float16).astype(np.float32)
    bf = (half_bits.astype(np.uint32) << 16).view(np.float32)
    finite16, finitebf = f16[np.isfinite(f16)], bf[np.isfinite(bf)]
    mids = [
        (np.sort(finite16)[1:] + np.sort(finite16)[:-1]) / 2,
        (np.sort(finitebf)[1:].astype(np.float64) + np.sort(finitebf)[:-1]) / 2,
    ]
    x = np.concatenate(
        [
            f16,
            bf,
            *[m.astype(np.float32) for m in mids],
            *[np.nextafter(m.astype(np.float32), np.float32(np.inf)) for m in mids],
            (rng.standard_normal(4096) * np.exp(rng.uniform(-80, 80, 4096))).astype(np.float32),
            np.array([65504, 65519.99, 65520, 1e9, -1e9, np.inf, -np.inf, np.nan], np.float32),
        ]
    )
    x.tofile(tmp_path / "x")
    subprocess.run([str(exe), str(tmp_path / "x"), str(tmp_path / "out")], check=True, timeout=60)
    out = np.fromfile(tmp_path / "out", np.uint8)
    got_f16 = out[: 4 * 65536].view(np.float32)
    got_bf = out[4 * 65536 : 8 * 65536].view(np.float32)
    got_rh = out[8 * 65536 : 8 * 65536 + 2 * x.size].view(np.uint16)
    got_rb = out[8 * 65536 + 2 * x.size :].view(np.uint16)
    want_bf = tf.cast(tf.bitcast(tf.constant(half_bits), tf.bfloat16), tf.float32).numpy()
    np.testing.assert_array_equal(got_f16, f16)  # NaN == NaN here
    np.testing.assert_array_equal(got_bf, want_bf)
    with np.errstate(over="ignore"):
        want_rh = x.astype(np.float16)
    want_rb = tf.cast(tf.constant(x), tf.bfloat16).numpy()
    nan = np.isnan(x)
    np.testing.assert_array_equal(got_rh[~nan], want_rh[~nan].view(np.uint16))
    np.testing.assert_array_equal(got_rb[~nan], np.asarray(want_rb[~nan]).view(np.uint16))
    assert np.all(np.isnan(got_rh[nan].view(np.float16)))
    assert np.all(np.isnan((got_rb[nan].astype(np.uint32) << 16).view(np.float32)))
