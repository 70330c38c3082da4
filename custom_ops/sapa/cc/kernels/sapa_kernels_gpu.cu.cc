// CUDA kernels of the keras_sapa ops (see sapa_kernels.h for the three primitives).
//
// One thread per output element, grid-stride loops with int64 indices. Every output
// element is written by exactly one thread, which sums its terms in a fixed order: the
// backward passes (WindowScatter) gather over the output points whose window contains a
// low-resolution point instead of scattering with atomics, so all results are
// deterministic. float, half and bfloat16 accumulate in float; double in double.
// Consecutive threads handle consecutive channels, so the row reads are coalesced.

#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include <algorithm>
#include <climits>

#include "sapa_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/util/gpu_kernel_helper.h"

namespace keras_sapa {

using GPUDevice = Eigen::GpuDevice;

namespace gpu {

template <typename T>
struct Acc {
  using Type = float;
};
template <>
struct Acc<double> {
  using Type = double;
};

// Grid-stride loop with 64-bit indices.
#define KERAS_SAPA_GPU_LOOP(i, n)                                                    \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);          \
       i += int64_t(blockDim.x) * gridDim.x)

struct Geometry {
  int64_t batch, height, width, up, kernel, channels;
};

// out (B, sH, sW, K*K): one thread per (point, n).
template <typename T>
__global__ void WindowDotKernel(Geometry g, const T* __restrict__ hi, const T* __restrict__ lo,
                                T* __restrict__ out, int64_t total) {
  using A = typename Acc<T>::Type;
  const int64_t kk = g.kernel * g.kernel, r = g.kernel / 2;
  const int64_t hw = g.width * g.up, hh = g.height * g.up;
  KERAS_SAPA_GPU_LOOP(index, total) {
    const int64_t n = index % kk;
    const int64_t point = index / kk;
    const int64_t j = point % hw;
    const int64_t i = (point / hw) % hh;
    const int64_t b = point / (hw * hh);
    const int64_t p = i / g.up + n / g.kernel - r;
    const int64_t q = j / g.up + n % g.kernel - r;
    A sum = A(0);
    if (p >= 0 && p < g.height && q >= 0 && q < g.width) {
      const T* x = hi + point * g.channels;
      const T* y = lo + ((b * g.height + p) * g.width + q) * g.channels;
      for (int64_t c = 0; c < g.channels; ++c) {
        sum += static_cast<A>(x[c]) * static_cast<A>(y[c]);
      }
    }
    out[index] = static_cast<T>(sum);
  }
}

// out (B, sH, sW, D): one thread per (point, channel).
template <typename T>
__global__ void WindowGatherKernel(Geometry g, const T* __restrict__ w,
                                   const T* __restrict__ lo, T* __restrict__ out,
                                   int64_t total) {
  using A = typename Acc<T>::Type;
  const int64_t kk = g.kernel * g.kernel, r = g.kernel / 2;
  const int64_t hw = g.width * g.up, hh = g.height * g.up;
  KERAS_SAPA_GPU_LOOP(index, total) {
    const int64_t c = index % g.channels;
    const int64_t point = index / g.channels;
    const int64_t j = point % hw;
    const int64_t i = (point / hw) % hh;
    const int64_t b = point / (hw * hh);
    const T* wp = w + point * kk;
    A sum = A(0);
    for (int64_t a = 0; a < g.kernel; ++a) {
      const int64_t p = i / g.up + a - r;
      if (p < 0 || p >= g.height) continue;
      for (int64_t e = 0; e < g.kernel; ++e) {
        const int64_t q = j / g.up + e - r;
        if (q < 0 || q >= g.width) continue;
        sum += static_cast<A>(wp[a * g.kernel + e]) *
               static_cast<A>(lo[((b * g.height + p) * g.width + q) * g.channels + c]);
      }
    }
    out[index] = static_cast<T>(sum);
  }
}

// out (B, H, W, D): one thread per (low-resolution point, channel); gathers over the
// s x s children of every anchor (p - a, q - e) whose window holds (p, q).
template <typename T>
__global__ void WindowScatterKernel(Geometry g, const T* __restrict__ w,
                                    const T* __restrict__ hi, T* __restrict__ out,
                                    int64_t total) {
  using A = typename Acc<T>::Type;
  const int64_t kk = g.kernel * g.kernel, r = g.kernel / 2;
  const int64_t hw = g.width * g.up, hh = g.height * g.up;
  KERAS_SAPA_GPU_LOOP(index, total) {
    const int64_t c = index % g.channels;
    const int64_t low = index / g.channels;
    const int64_t q = low % g.width;
    const int64_t p = (low / g.width) % g.height;
    const int64_t b = low / (g.width * g.height);
    A sum = A(0);
    for (int64_t a = -r; a <= r; ++a) {
      const int64_t h = p - a;
      if (h < 0 || h >= g.height) continue;
      for (int64_t e = -r; e <= r; ++e) {
        const int64_t x = q - e;
        if (x < 0 || x >= g.width) continue;
        const int64_t n = (a + r) * g.kernel + (e + r);
        for (int64_t ci = 0; ci < g.up; ++ci) {
          const int64_t row = (b * hh + h * g.up + ci) * hw + x * g.up;
          for (int64_t cj = 0; cj < g.up; ++cj) {
            const int64_t point = row + cj;
            sum += static_cast<A>(w[point * kk + n]) *
                   static_cast<A>(hi[point * g.channels + c]);
          }
        }
      }
    }
    out[index] = static_cast<T>(sum);
  }
}

#undef KERAS_SAPA_GPU_LOOP

inline Geometry ToGeometry(const WindowDims& d) {
  return Geometry{d.batch, d.height, d.width, d.up, d.kernel, d.channels};
}

template <typename Kernel, typename... Args>
tensorflow::Status Launch(tensorflow::OpKernelContext* ctx, Kernel kernel, int64_t total,
                          Args... args) {
  if (total == 0) return absl::OkStatus();
  const GPUDevice& device = ctx->eigen_device<GPUDevice>();
  // The launch size is capped; the grid-stride loop covers any int64 total.
  const int capped = static_cast<int>(std::min<int64_t>(total, INT_MAX / 2));
  tensorflow::GpuLaunchConfig config = tensorflow::GetGpuLaunchConfig(capped, device);
  return tensorflow::GpuLaunchKernel(kernel, config.block_count, config.thread_per_block, 0,
                                     device.stream(), args..., total);
}

}  // namespace gpu

namespace functor {

template <typename T>
struct WindowDot<GpuTag, T> {
  tensorflow::Status operator()(tensorflow::OpKernelContext* ctx, const WindowDims& d,
                                const T* hi, const T* lo, T* out) const {
    return gpu::Launch(ctx, gpu::WindowDotKernel<T>, d.high_points() * d.window(),
                       gpu::ToGeometry(d), hi, lo, out);
  }
};

template <typename T>
struct WindowGather<GpuTag, T> {
  tensorflow::Status operator()(tensorflow::OpKernelContext* ctx, const WindowDims& d,
                                const T* w, const T* lo, T* out) const {
    return gpu::Launch(ctx, gpu::WindowGatherKernel<T>, d.high_points() * d.channels,
                       gpu::ToGeometry(d), w, lo, out);
  }
};

template <typename T>
struct WindowScatter<GpuTag, T> {
  tensorflow::Status operator()(tensorflow::OpKernelContext* ctx, const WindowDims& d,
                                const T* w, const T* hi, T* out) const {
    return gpu::Launch(ctx, gpu::WindowScatterKernel<T>, d.low_points() * d.channels,
                       gpu::ToGeometry(d), w, hi, out);
  }
};

#define KERAS_SAPA_INSTANTIATE_GPU(T)         \
  template struct WindowDot<GpuTag, T>;       \
  template struct WindowGather<GpuTag, T>;    \
  template struct WindowScatter<GpuTag, T>;
KERAS_SAPA_INSTANTIATE_GPU(float);
KERAS_SAPA_INSTANTIATE_GPU(double);
KERAS_SAPA_INSTANTIATE_GPU(Eigen::half);
KERAS_SAPA_INSTANTIATE_GPU(Eigen::bfloat16);
#undef KERAS_SAPA_INSTANTIATE_GPU

}  // namespace functor
}  // namespace keras_sapa

#endif  // GOOGLE_CUDA
