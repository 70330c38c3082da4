// Standalone microbenchmark of the framework-free SAPA CPU kernels
// (custom_ops/sapa/kernels/cpu/sapa_cpu.h), driven by scripts/bench_cpu_kernels.py, which
// compiles it with the flags of custom_ops/build.py (-O3 -mavx2 -mfma -mf16c).
//
//   bench_cpu_kernels check                  compare against a float64 loop reference
//   bench_cpu_kernels peak THREADS           measured FMA throughput (GFLOP/s)
//   bench_cpu_kernels time SHAPE THREADS REPS [NAMES]  median times of the kernels (ms)
//
// SHAPE is B,H,W,s,K,d,C. With -DBASELINE_HEADER="path" the same kernels of an older
// revision (namespace baseline::) are timed in the same run, interleaved rep by rep.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "sapa_cpu.h"

#ifdef BASELINE_HEADER
namespace baseline {
#include BASELINE_HEADER
}  // namespace baseline
#endif

namespace {

using keras_sapa::cpu::ParallelFor;
using keras_sapa::cpu::Range;
using keras_sapa::cpu::Shape;

// A persistent pool like the bindings' (bindings/thread_pool.h): [0, units) is cut into
// min(units, 4 * threads) blocks that the workers and the caller claim in turn.
class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { Loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  void Run(int64_t units, const Range& fn) {
    if (units <= 0) return;
    const int64_t blocks = std::min<int64_t>(units, 4 * threads_);
    if (threads_ == 1 || blocks == 1) {
      fn(0, units);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      units_ = units;
      block_ = (units + blocks - 1) / blocks;
      blocks_ = (units + block_ - 1) / block_;
      next_ = 0;
      done_ = 0;
      ++generation_;
    }
    cv_.notify_all();
    Work();
    std::unique_lock<std::mutex> lock(mu_);
    finished_.wait(lock, [&] { return done_.load() == blocks_; });
    fn_ = nullptr;
  }
  ParallelFor AsParallelFor() {
    return [this](int64_t units, int64_t, const Range& fn) { Run(units, fn); };
  }

 private:
  void Work() {
    for (;;) {
      const int64_t b = next_.fetch_add(1);
      if (b >= blocks_) return;
      (*fn_)(b * block_, std::min(units_, (b + 1) * block_));
      if (done_.fetch_add(1) + 1 == blocks_) {
        std::lock_guard<std::mutex> lock(mu_);
        finished_.notify_all();
      }
    }
  }
  void Loop() {
    int64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      Work();
    }
  }
  int threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, finished_;
  const Range* fn_ = nullptr;
  int64_t units_ = 0, block_ = 1, blocks_ = 0, generation_ = 0;
  std::atomic<int64_t> next_{0}, done_{0};
  bool stop_ = false;
};

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::vector<float> Random(int64_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// ---------------------------------------------------------------------------------------
// float64 loop reference of SAPA_SPEC.md: forward and backward.

struct Ref {
  std::vector<double> out, w, dq, dk, dv;
};

Ref Reference(const Shape& d, int64_t dim, int64_t ch, const std::vector<float>& q,
              const std::vector<float>& k, const std::vector<float>& v,
              const std::vector<float>& g) {
  const int64_t s = d.up, K = d.kernel, r = K / 2, kk = K * K, H = d.height, W = d.width;
  const int64_t HH = H * s, WW = W * s;
  Ref ref;
  ref.out.assign(d.high_points() * ch, 0);
  ref.w.assign(d.high_points() * kk, 0);
  ref.dq.assign(d.high_points() * dim, 0);
  ref.dk.assign(d.low_points() * dim, 0);
  ref.dv.assign(d.low_points() * ch, 0);
  std::vector<double> logit(kk), wt(kk), dw(kk);
  std::vector<int64_t> low(kk);
  for (int64_t b = 0; b < d.batch; ++b)
    for (int64_t i = 0; i < HH; ++i)
      for (int64_t j = 0; j < WW; ++j) {
        const int64_t pt = (b * HH + i) * WW + j;
        for (int64_t n = 0; n < kk; ++n) {
          const int64_t p = i / s + n / K - r, qq = j / s + n % K - r;
          low[n] = (p < 0 || p >= H || qq < 0 || qq >= W) ? -1 : (b * H + p) * W + qq;
          double acc = 0;
          if (low[n] >= 0)
            for (int64_t c = 0; c < dim; ++c) acc += double(q[pt * dim + c]) * k[low[n] * dim + c];
          logit[n] = acc;
        }
        double mx = -1e300, tot = 0;
        for (double l : logit) mx = std::max(mx, l);
        for (int64_t n = 0; n < kk; ++n) tot += (wt[n] = std::exp(logit[n] - mx));
        for (int64_t n = 0; n < kk; ++n) ref.w[pt * kk + n] = (wt[n] /= tot);
        for (int64_t n = 0; n < kk; ++n) {
          if (low[n] < 0) {
            dw[n] = 0;
            continue;
          }
          double acc = 0;
          for (int64_t c = 0; c < ch; ++c) {
            ref.out[pt * ch + c] += wt[n] * v[low[n] * ch + c];
            acc += double(g[pt * ch + c]) * v[low[n] * ch + c];
            ref.dv[low[n] * ch + c] += wt[n] * g[pt * ch + c];
          }
          dw[n] = acc;
        }
        double inner = 0;
        for (int64_t n = 0; n < kk; ++n) inner += wt[n] * dw[n];
        for (int64_t n = 0; n < kk; ++n) {
          if (low[n] < 0) continue;
          const double dl = wt[n] * (dw[n] - inner);
          for (int64_t c = 0; c < dim; ++c) {
            ref.dq[pt * dim + c] += dl * k[low[n] * dim + c];
            ref.dk[low[n] * dim + c] += dl * q[pt * dim + c];
          }
        }
      }
  return ref;
}

double MaxRel(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, scale = 1e-12;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(double(got[i]) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return err / scale;
}

int Check() {
  struct Case {
    int64_t b, h, w, s, k, dim, ch;
  };
  const Case cases[] = {{2, 7, 9, 2, 5, 12, 20},  {1, 6, 5, 1, 3, 64, 37},
                        {1, 5, 8, 3, 7, 64, 256}, {1, 4, 4, 2, 1, 8, 8},
                        {2, 9, 11, 2, 3, 33, 19}, {1, 3, 2, 4, 9, 7, 3},
                        {1, 10, 12, 2, 5, 64, 256}, {0, 4, 4, 2, 3, 8, 8}};
  int failures = 0;
  for (int threads : {1, 2}) {
    Pool pool(threads);
    for (const Case& c : cases) {
      Shape d;
      d.batch = c.b, d.height = c.h, d.width = c.w, d.up = c.s, d.kernel = c.k;
      std::mt19937 rng(7);
      auto q = Random(d.high_points() * c.dim, rng, 0.5f);
      auto k = Random(d.low_points() * c.dim, rng, 0.5f);
      auto v = Random(d.low_points() * c.ch, rng, 1.f);
      auto g = Random(d.high_points() * c.ch, rng, 1.f);
      Ref ref = Reference(d, c.dim, c.ch, q, k, v, g);
      const int64_t kk = d.window();
      std::vector<float> out(d.high_points() * c.ch, NAN), w(d.high_points() * kk, NAN);
      std::vector<float> out2(out.size(), NAN);
      std::vector<float> dq(d.high_points() * c.dim, NAN), dk(d.low_points() * c.dim, NAN),
          dv(d.low_points() * c.ch, NAN), dl(d.high_points() * kk, NAN);
      auto pf = pool.AsParallelFor();
      keras_sapa::cpu::SapaForward<float>(pf, d, c.dim, c.ch, q.data(), k.data(), v.data(),
                                          out.data(), w.data());
      keras_sapa::cpu::SapaForward<float>(pf, d, c.dim, c.ch, q.data(), k.data(), v.data(),
                                          out2.data(), nullptr);
      keras_sapa::cpu::SapaBackward<float>(pf, d, c.dim, c.ch, g.data(), q.data(), k.data(),
                                           v.data(), w.data(), dl.data(), dq.data(), dk.data(),
                                           dv.data());
      const double e[] = {MaxRel(out, ref.out), MaxRel(out2, ref.out), MaxRel(w, ref.w),
                          MaxRel(dq, ref.dq),   MaxRel(dk, ref.dk),    MaxRel(dv, ref.dv)};
      const char* names[] = {"out", "out(no w)", "weights", "dq", "dk", "dv"};
      bool ok = true;
      for (int i = 0; i < 6; ++i) ok = ok && e[i] < 2e-5;
      std::printf("%s threads=%d B=%ld H=%ld W=%ld s=%ld K=%ld d=%ld C=%ld:", ok ? "ok  " : "FAIL",
                  threads, long(c.b), long(c.h), long(c.w), long(c.s), long(c.k), long(c.dim),
                  long(c.ch));
      for (int i = 0; i < 6; ++i) std::printf(" %s %.1e", names[i], e[i]);
      std::printf("\n");
      failures += !ok;
    }
  }
  return failures == 0 ? 0 : 1;
}

// ---------------------------------------------------------------------------------------
// Measured FMA peak: 12 independent 8-lane FMA chains per thread (enough to cover the
// FMA latency of two pipes), all threads at once.

float FmaLoop(int64_t iters, float seed) {
#if defined(__FMA__)
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(seed + i);
  const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
  }
  __m256 t = a[0];
  for (int i = 1; i < 12; ++i) t = _mm256_add_ps(t, a[i]);
  float out[8];
  _mm256_storeu_ps(out, t);
  return out[0];
#else
  float acc = seed;
  for (int64_t it = 0; it < iters; ++it) acc = acc * 0.999999f + 1e-7f;
  return acc;
#endif
}

int Peak(int threads) {
  const int64_t iters = 20000000;
  std::vector<double> rates;
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<std::thread> pool;
    std::atomic<float> sink{0};
    const double t0 = Now();
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] { sink = sink + FmaLoop(iters, 1.f + t); });
    for (auto& th : pool) th.join();
    const double dt = Now() - t0;
    rates.push_back(double(threads) * iters * 12 * 8 * 2 / dt / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  std::printf("peak threads=%d gflops=%.2f max=%.2f\n", threads, Median(rates), rates.back());
  return 0;
}

// ---------------------------------------------------------------------------------------
// Timing.

double CpuNow() {  // CPU time of the whole process (all threads), seconds
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// Wall-clock and process CPU milliseconds per call. On a machine shared with other jobs
// the CPU time (summed over threads) is the steadier measure of the work done.
template <typename Fn>
double TimeMs(Fn fn, int inner, double* cpu_ms = nullptr) {
  const double t0 = Now(), c0 = CpuNow();
  for (int i = 0; i < inner; ++i) fn();
  if (cpu_ms != nullptr) *cpu_ms = (CpuNow() - c0) * 1e3 / inner;
  return (Now() - t0) * 1e3 / inner;
}

std::atomic<float> sink{0};  // keeps the FMA loops alive

int Time(const Shape& d, int64_t dim, int64_t ch, int threads, int reps,
         const std::string& only) {
  Pool pool(threads);
  auto pf = pool.AsParallelFor();
  std::mt19937 rng(3);
  const int64_t kk = d.window();
  auto q = Random(d.high_points() * dim, rng, 0.3f);
  auto k = Random(d.low_points() * dim, rng, 0.3f);
  auto v = Random(d.low_points() * ch, rng, 1.f);
  auto g = Random(d.high_points() * ch, rng, 1.f);
  std::vector<float> out(d.high_points() * ch), w(d.high_points() * kk), dl(w.size());
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
  namespace cur = keras_sapa::cpu;
  using Half = keras_sapa::cpu::Half;
  auto half = [](const std::vector<float>& x) {
    std::vector<Half> h(x.size());
    keras_sapa::cpu::RoundRow<Half, float>(x.data(), int64_t(x.size()), h.data());
    return h;
  };
  const auto hq = half(q), hk = half(k), hv = half(v), hg = half(g);
  std::vector<Half> hout(out.size()), hdq(q.size()), hdk(k.size()), hdv(v.size());
  auto P = [](auto& x) { return x.data(); };  // the entries below read better without .data()

  struct Entry {
    std::string name;
    std::function<void()> fn;
    std::vector<double> ms, cpu;
  };
  std::vector<Entry> entries;
  auto add = [&](const char* name, std::function<void()> fn) {
    entries.push_back({name, std::move(fn), {}, {}});
  };
  add("fwd", [&] { cur::SapaForward<float>(pf, d, dim, ch, P(q), P(k), P(v), P(out), P(w)); });
  add("bwd", [&] {
    cur::SapaBackward<float>(pf, d, dim, ch, P(g), P(q), P(k), P(v), P(w), P(dl), P(dq), P(dk),
                             P(dv));
  });
  // Half-precision storage, converted per tile inside the kernels.
  add("fwd_f16", [&] {
    cur::SapaForward<float>(pf, d, dim, ch, P(hq), P(hk), P(hv), P(hout), P(w));
  });
  add("bwd_f16", [&] {
    cur::SapaBackward<float>(pf, d, dim, ch, P(hg), P(hq), P(hk), P(hv), P(w), P(dl), P(hdq),
                             P(hdk), P(hdv));
  });
  add("dot_qk", [&] { cur::Dot<float>(pf, d, dim, P(q), P(k), P(dl)); });
  add("gather_wv", [&] { cur::Gather<float>(pf, d, ch, P(w), P(v), P(out)); });
  add("dot_gv", [&] { cur::Dot<float>(pf, d, ch, P(g), P(v), P(dl)); });
  add("gather_lk", [&] { cur::Gather<float>(pf, d, dim, P(w), P(k), P(dq)); });
  add("scatter_lq", [&] { cur::Scatter<float>(pf, d, dim, P(w), P(q), P(dk)); });
  add("scatter_wg", [&] { cur::Scatter<float>(pf, d, ch, P(w), P(g), P(dv)); });
  add("fma_peak", [&] {  // 12.8 MFLOP of pure FMA per thread, all threads
    pool.Run(threads, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) sink.store(sink.load() + FmaLoop(50000, 1.f + u));
    });
  });
  add("write_out", [&] {  // memory floor: write the output once
    float* o = out.data();
    const int64_t n = int64_t(out.size());
    pool.Run(threads * 4, [&](int64_t b, int64_t e) {
      const int64_t per = (n + threads * 4 - 1) / (threads * 4);
      for (int64_t u = b; u < e; ++u) {
        const int64_t lo = u * per, hi = std::min(n, lo + per);
        if (lo < hi) std::memset(o + lo, 0, (hi - lo) * sizeof(float));
      }
    });
  });
#ifdef BASELINE_HEADER
  namespace old = baseline::keras_sapa::cpu;
  baseline::keras_sapa::cpu::Shape od;
  od.batch = d.batch, od.height = d.height, od.width = d.width, od.up = d.up,
  od.kernel = d.kernel;
  baseline::keras_sapa::cpu::ParallelFor opf = [&](int64_t units, int64_t,
                                                   const baseline::keras_sapa::cpu::Range& fn) {
    pool.Run(units, fn);
  };
  add("base_fwd", [&] {
    old::SapaForward<float>(opf, od, dim, ch, P(q), P(k), P(v), P(out), P(w));
  });
  add("base_bwd", [&] {
    old::SapaBackward<float>(opf, od, dim, ch, P(g), P(q), P(k), P(v), P(w), P(dl), P(dq),
                             P(dk), P(dv));
  });
#endif
  if (!only.empty()) {  // keep the entries named in the comma-separated list `only`
    std::vector<Entry> kept;
    for (auto& e : entries)
      if (("," + only + ",").find("," + e.name + ",") != std::string::npos) kept.push_back(e);
    entries.swap(kept);
  }
  // Warm up, then pick an inner count so that one sample takes ~20 ms.
  std::vector<int> inner(entries.size());
  for (size_t e = 0; e < entries.size(); ++e) {
    entries[e].fn();
    const double ms = TimeMs(entries[e].fn, 2);
    inner[e] = std::max(1, int(20.0 / std::max(ms, 1e-3)));
  }
  for (int rep = 0; rep < reps; ++rep) {
    for (size_t e = 0; e < entries.size(); ++e) {
      double cpu = 0;
      entries[e].ms.push_back(TimeMs(entries[e].fn, inner[e], &cpu));
      entries[e].cpu.push_back(cpu);
    }
  }
  std::printf("fma_peak_mflop %.3f\n", threads * 50000.0 * 12 * 8 * 2 / 1e6);
  for (auto& e : entries) {
    std::vector<double> sorted = e.ms;
    std::sort(sorted.begin(), sorted.end());
    std::printf(
        "time %s median_ms=%.4f min_ms=%.4f p90_ms=%.4f cpu_median_ms=%.4f cpu_min_ms=%.4f\n",
        e.name.c_str(), Median(e.ms), sorted.front(), sorted[sorted.size() * 9 / 10],
        Median(e.cpu), *std::min_element(e.cpu.begin(), e.cpu.end()));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "check") return Check();
  if (argc >= 3 && std::string(argv[1]) == "peak") return Peak(std::atoi(argv[2]));
  if (argc >= 5 && std::string(argv[1]) == "time") {
    long b, h, w, s, k, dim, ch;
    if (std::sscanf(argv[2], "%ld,%ld,%ld,%ld,%ld,%ld,%ld", &b, &h, &w, &s, &k, &dim, &ch) != 7)
      return 2;
    Shape d;
    d.batch = b, d.height = h, d.width = w, d.up = s, d.kernel = k;
    return Time(d, dim, ch, std::atoi(argv[3]), std::atoi(argv[4]), argc >= 6 ? argv[5] : "");
  }
  std::fprintf(stderr, "usage: %s check | peak THREADS | time B,H,W,s,K,d,C THREADS REPS [NAMES]\n",
               argv[0]);
  return 2;
}
