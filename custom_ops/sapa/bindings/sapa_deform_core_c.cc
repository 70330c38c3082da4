// _sapa_core.so's SAPA-D entry points (sapa_deform_core_c.h), on the framework-free core
// kernels/cpu/sapa_deform_cpu.h and the library's thread pool (thread_pool.h). PyTorch
// and the tests call them through ctypes, the XLA FFI handlers directly.

#include "sapa_deform_core_c.h"

#include <cstdint>
#include <memory>

#include "../kernels/cpu/sapa_deform_cpu.h"
#include "storage.h"
#include "thread_pool.h"

namespace keras_sapa {
namespace bindings {
namespace {

namespace deform = cpu::deform;

// Checks the sizes, then runs `kernel(pool, shape)` on the library's pool.
template <typename Kernel>
int Run(int64_t batch, int64_t height, int64_t width, int64_t up, int64_t points,
        int64_t groups, int64_t dim, int64_t channels, Kernel kernel) {
  deform::DeformShape d;
  d.batch = batch;
  d.height = height;
  d.width = width;
  d.up = up;
  d.points = points;
  d.groups = groups;
  d.dim = dim;
  d.channels = channels;
  if (groups < 1 || !d.Valid()) return KERAS_SAPA_BAD_SHAPE;
  kernel(GlobalParallelFor(), d);
  return KERAS_SAPA_OK;
}

}  // namespace
}  // namespace bindings
}  // namespace keras_sapa

// keras_sapa_deform_<name>_<suffix>(params..., sizes...): the sizes checked, then the
// statements `...` on the library's pool (`pool`) with the shape `d`.
#define KERAS_SAPA_UNPAREN(...) __VA_ARGS__
#define KERAS_SAPA_DEFORM_ENTRY(name, suffix, params, ...)                                \
  __attribute__((visibility("default"))) int keras_sapa_deform_##name##_##suffix(         \
      KERAS_SAPA_UNPAREN params, KERAS_SAPA_DEFORM_SIZES) {                               \
    return keras_sapa::bindings::Run(                                                     \
        batch, height, width, up, points, groups, dim, channels,                          \
        [&](const keras_sapa::cpu::ParallelFor& pool,                                     \
            const keras_sapa::cpu::deform::DeformShape& d) { __VA_ARGS__; });             \
  }

namespace deform = keras_sapa::cpu::deform;

extern "C" {

#define KERAS_SAPA_DEFORM_DEFINE(suffix, T)                                                  \
  KERAS_SAPA_DEFORM_ENTRY(forward, suffix,                                                   \
                          (const T* q, const T* k, const T* v, const T* off, T* out, T* w),  \
                          deform::DeformForward<T>(pool, d, q, k, v, off, out, w))           \
  /* The backward's workspace: the logits' gradient (B, sH, sW, GP). */                     \
  KERAS_SAPA_DEFORM_ENTRY(backward, suffix,                                                  \
                          (const T* g, const T* q, const T* k, const T* v, const T* off,     \
                           const T* w, T* dq, T* dk, T* dv, T* doff),                        \
                          std::unique_ptr<T[]> dl(new T[d.high_points() * d.gp() + 1]);      \
                          deform::DeformBackward<T>(pool, d, g, q, k, v, off, w, dl.get(),   \
                                                    dq, dk, dv, doff))                       \
  KERAS_SAPA_DEFORM_ENTRY(similarity, suffix,                                                \
                          (const T* q, const T* k, const T* off, T* logits),                 \
                          deform::DeformSimilarity<T>(pool, d, q, k, off, logits))           \
  KERAS_SAPA_DEFORM_ENTRY(similarity_backward, suffix,                                       \
                          (const T* dl, const T* q, const T* k, const T* off, T* dq, T* dk,  \
                           T* doff),                                                         \
                          deform::DeformSimilarityBackward<T>(pool, d, dl, q, k, off, dq,    \
                                                              dk, doff))                     \
  KERAS_SAPA_DEFORM_ENTRY(aggregate, suffix, (const T* w, const T* v, const T* off, T* out), \
                          deform::DeformAggregate<T>(pool, d, w, v, off, out))               \
  KERAS_SAPA_DEFORM_ENTRY(aggregate_backward, suffix,                                        \
                          (const T* g, const T* w, const T* v, const T* off, T* dw, T* dv,   \
                           T* doff),                                                         \
                          deform::DeformAggregateBackward<T>(pool, d, g, w, v, off, dw, dv,  \
                                                             doff))

KERAS_SAPA_DEFORM_DEFINE(f32, float)
KERAS_SAPA_DEFORM_DEFINE(f64, double)

// The fused pair in 16-bit storage S (uint16_t bits in the C ABI), weights float32.
#define KERAS_SAPA_DEFORM_DEFINE_HALF(suffix, S)                                              \
  KERAS_SAPA_DEFORM_ENTRY(                                                                    \
      forward, suffix,                                                                        \
      (const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* off,          \
       uint16_t* out, float* w),                                                              \
      using keras_sapa::bindings::Storage;                                                    \
      deform::DeformForward<float, S>(pool, d, Storage<S>(q), Storage<S>(k), Storage<S>(v),   \
                                      Storage<S>(off), Storage<S>(out), w))                   \
  KERAS_SAPA_DEFORM_ENTRY(                                                                    \
      backward, suffix,                                                                       \
      (const uint16_t* g, const uint16_t* q, const uint16_t* k, const uint16_t* v,            \
       const uint16_t* off, const float* w, uint16_t* dq, uint16_t* dk, uint16_t* dv,         \
       uint16_t* doff),                                                                       \
      using keras_sapa::bindings::Storage;                                                    \
      std::unique_ptr<float[]> dl(new float[d.high_points() * d.gp() + 1]);                   \
      deform::DeformBackward<float, S>(pool, d, Storage<S>(g), Storage<S>(q), Storage<S>(k),  \
                                       Storage<S>(v), Storage<S>(off), w, dl.get(),           \
                                       Storage<S>(dq), Storage<S>(dk), Storage<S>(dv),        \
                                       Storage<S>(doff)))

KERAS_SAPA_DEFORM_DEFINE_HALF(f16, keras_sapa::cpu::Half)
KERAS_SAPA_DEFORM_DEFINE_HALF(bf16, keras_sapa::cpu::BFloat16)

#undef KERAS_SAPA_DEFORM_DEFINE_HALF
#undef KERAS_SAPA_DEFORM_DEFINE
#undef KERAS_SAPA_DEFORM_ENTRY
#undef KERAS_SAPA_UNPAREN

}  // extern "C"
