// A test-only C ABI over the SAPA-D CPU core (kernels/cpu/sapa_deform_cpu.h), for
// tests/test_deform_kernels.py (ctypes on NumPy arrays). Not part of the package: the
// bindings (bindings/) expose the core to the frameworks with their own thread pool.
//
// Every function takes the sizes (batch, height, width, up, points, groups, dim,
// channels) of sapa_deform_cpu.h's DeformShape and `threads`: 1 runs on the calling
// thread, n > 1 on n std::threads that claim small blocks of the work in turn (so the
// split, and any race, differs from run to run). Returns 0, or 1 for bad sizes.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "../sapa_deform_cpu.h"

namespace {

using keras_sapa::cpu::ParallelFor;
using keras_sapa::cpu::Range;
using keras_sapa::cpu::deform::DeformShape;

ParallelFor Threads(int threads) {
  return [threads](int64_t units, int64_t, const Range& fn) {
    if (units <= 0) return;
    if (threads <= 1) {
      fn(0, units);
      return;
    }
    const int64_t block = std::max<int64_t>(1, units / (int64_t(threads) * 8));
    std::atomic<int64_t> next{0};
    auto work = [&] {
      for (;;) {
        const int64_t begin = next.fetch_add(block);
        if (begin >= units) return;
        fn(begin, std::min(units, begin + block));
      }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(work);
    work();
    for (std::thread& t : pool) t.join();
  };
}

bool Make(int64_t batch, int64_t height, int64_t width, int64_t up, int64_t points,
          int64_t groups, int64_t dim, int64_t channels, DeformShape* d) {
  d->batch = batch;
  d->height = height;
  d->width = width;
  d->up = up;
  d->points = points;
  d->groups = groups;
  d->dim = dim;
  d->channels = channels;
  return d->Valid();
}

}  // namespace

#define SIZES                                                                              \
  int64_t batch, int64_t height, int64_t width, int64_t up, int64_t points, int64_t groups, \
      int64_t dim, int64_t channels, int threads
#define MAKE                                                                              \
  DeformShape d;                                                                          \
  if (!Make(batch, height, width, up, points, groups, dim, channels, &d)) return 1;       \
  const ParallelFor pool = Threads(threads)

#define DEFINE(suffix, T)                                                                  \
  extern "C" int deform_forward_##suffix(const T* q, const T* k, const T* v, const T* off, \
                                         T* out, T* weights, SIZES) {                      \
    MAKE;                                                                                  \
    keras_sapa::cpu::deform::DeformForward<T>(pool, d, q, k, v, off, out, weights);        \
    return 0;                                                                              \
  }                                                                                        \
  extern "C" int deform_backward_##suffix(const T* grad, const T* q, const T* k,           \
                                          const T* v, const T* off, const T* weights,      \
                                          T* dq, T* dk, T* dv, T* doff, SIZES) {           \
    MAKE;                                                                                  \
    std::vector<T> dlogits(std::max<int64_t>(1, d.high_points() * d.gp()));               \
    keras_sapa::cpu::deform::DeformBackward<T>(pool, d, grad, q, k, v, off, weights,       \
                                               dlogits.data(), dq, dk, dv, doff);          \
    return 0;                                                                              \
  }                                                                                        \
  extern "C" int deform_similarity_##suffix(const T* q, const T* k, const T* off,          \
                                            T* logits, SIZES) {                            \
    MAKE;                                                                                  \
    keras_sapa::cpu::deform::DeformSimilarity<T>(pool, d, q, k, off, logits);              \
    return 0;                                                                              \
  }                                                                                        \
  extern "C" int deform_similarity_backward_##suffix(const T* dlogits, const T* q,         \
                                                     const T* k, const T* off, T* dq,      \
                                                     T* dk, T* doff, SIZES) {              \
    MAKE;                                                                                  \
    keras_sapa::cpu::deform::DeformSimilarityBackward<T>(pool, d, dlogits, q, k, off, dq,  \
                                                         dk, doff);                        \
    return 0;                                                                              \
  }                                                                                        \
  extern "C" int deform_aggregate_##suffix(const T* w, const T* v, const T* off, T* out,   \
                                           SIZES) {                                        \
    MAKE;                                                                                  \
    keras_sapa::cpu::deform::DeformAggregate<T>(pool, d, w, v, off, out);                  \
    return 0;                                                                              \
  }                                                                                        \
  extern "C" int deform_aggregate_backward_##suffix(const T* grad, const T* w, const T* v, \
                                                    const T* off, T* dw, T* dv, T* doff,   \
                                                    SIZES) {                               \
    MAKE;                                                                                  \
    keras_sapa::cpu::deform::DeformAggregateBackward<T>(pool, d, grad, w, v, off, dw, dv,  \
                                                        doff);                             \
    return 0;                                                                              \
  }

DEFINE(f32, float)
DEFINE(f64, double)
