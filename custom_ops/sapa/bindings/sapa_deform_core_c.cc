// _sapa_core.so's SAPA-D entry points (sapa_deform_core_c.h), on the framework-free core
// kernels/cpu/sapa_deform_cpu.h and the library's thread pool (thread_pool.h). PyTorch
// calls them through ctypes, the XLA FFI handlers of sapa_deform_xla_ffi.cc directly.

#include <cstdint>
#include <memory>

#include "../kernels/cpu/sapa_deform_cpu.h"
#include "sapa_deform_core_c.h"
#include "thread_pool.h"

namespace keras_sapa {
namespace bindings {
namespace {

bool DeformShapeOf(int64_t batch, int64_t height, int64_t width, int64_t up, int64_t points,
                   int64_t groups, int64_t dim, int64_t channels, cpu::deform::DeformShape* d) {
  d->batch = batch;
  d->height = height;
  d->width = width;
  d->up = up;
  d->points = points;
  d->groups = groups;
  d->dim = dim;
  d->channels = channels;
  return groups >= 1 && d->Valid();
}

template <typename T>
int DeformForwardC(const T* q, const T* k, const T* v, const T* off, T* out, T* weights,
                   int64_t batch, int64_t height, int64_t width, int64_t up, int64_t points,
                   int64_t groups, int64_t dim, int64_t channels) {
  cpu::deform::DeformShape d;
  if (!DeformShapeOf(batch, height, width, up, points, groups, dim, channels, &d)) {
    return KERAS_SAPA_BAD_SHAPE;
  }
  cpu::deform::DeformForward<T>(GlobalParallelFor(), d, q, k, v, off, out, weights);
  return KERAS_SAPA_OK;
}

template <typename T>
int DeformBackwardC(const T* g, const T* q, const T* k, const T* v, const T* off, const T* w,
                    T* dq, T* dk, T* dv, T* doff, int64_t batch, int64_t height, int64_t width,
                    int64_t up, int64_t points, int64_t groups, int64_t dim, int64_t channels) {
  cpu::deform::DeformShape d;
  if (!DeformShapeOf(batch, height, width, up, points, groups, dim, channels, &d)) {
    return KERAS_SAPA_BAD_SHAPE;
  }
  // The logits' gradient (B, sH, sW, GP): the core's workspace.
  std::unique_ptr<T[]> dlogits(new T[d.high_points() * d.gp() + 1]);
  cpu::deform::DeformBackward<T>(GlobalParallelFor(), d, g, q, k, v, off, w, dlogits.get(), dq,
                                 dk, dv, doff);
  return KERAS_SAPA_OK;
}

}  // namespace
}  // namespace bindings
}  // namespace keras_sapa

extern "C" {

#define KERAS_SAPA_DEFORM_DEFINE(suffix, T)                                                   \
  __attribute__((visibility("default"))) int keras_sapa_deform_forward_##suffix(              \
      const T* q, const T* k, const T* v, const T* off, T* out, T* w, int64_t batch,         \
      int64_t height, int64_t width, int64_t up, int64_t points, int64_t groups, int64_t dim, \
      int64_t channels) {                                                                     \
    return keras_sapa::bindings::DeformForwardC<T>(q, k, v, off, out, w, batch, height, width, \
                                                   up, points, groups, dim, channels);        \
  }                                                                                           \
  __attribute__((visibility("default"))) int keras_sapa_deform_backward_##suffix(             \
      const T* g, const T* q, const T* k, const T* v, const T* off, const T* w, T* dq, T* dk, \
      T* dv, T* doff, int64_t batch, int64_t height, int64_t width, int64_t up,               \
      int64_t points, int64_t groups, int64_t dim, int64_t channels) {                        \
    return keras_sapa::bindings::DeformBackwardC<T>(g, q, k, v, off, w, dq, dk, dv, doff,     \
                                                    batch, height, width, up, points, groups, \
                                                    dim, channels);                           \
  }

KERAS_SAPA_DEFORM_DEFINE(f32, float)
KERAS_SAPA_DEFORM_DEFINE(f64, double)

#undef KERAS_SAPA_DEFORM_DEFINE

}  // extern "C"
