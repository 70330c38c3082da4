// Functors of the keras_sapa custom ops, one template per device. The CPU functors are
// thin adapters of the framework-free kernel core, custom_ops/sapa/kernels/cpu/sapa_cpu.h,
// which also holds the fused SAPA forward and backward (KerasSapa>Sapa / SapaGrad).
//
// Three window primitives cover the forward and backward passes of both SAPA ops.
// With hi (B, sH, sW, D) high resolution, lo (B, H, W, D) low resolution and
// w (B, sH, sW, K*K) window weights:
//
//   WindowDot     (hi, lo) -> w   w[b,i,j,n]  = <hi[b,i,j], lo[b, i/s+a, j/s+c]>
//   WindowGather  (w,  lo) -> hi  hi[b,i,j]   = sum_n w[b,i,j,n] * lo[b, i/s+a, j/s+c]
//   WindowScatter (w,  hi) -> lo  lo[b,p,q]   = sum over (i,j,n) whose window point n is
//                                               (p,q) of w[b,i,j,n] * hi[b,i,j]
//
// They are mutually adjoint: <Dot(hi,lo), w> = <hi, Gather(w,lo)> = <lo, Scatter(w,hi)>.
// Hence
//   Similarity(q, k)           = Dot(q, k)
//   SimilarityGrad(g, q, k)    = (Gather(g, k), Scatter(g, q))
//   Aggregate(w, v)            = Gather(w, v)
//   AggregateGrad(g, w, v)     = (Dot(g, v), Scatter(w, g))
//
// WindowScatter is written as a gather over the output points whose window contains
// each low-resolution point, so no kernel needs atomics and every result is
// deterministic: for the low-resolution point (p, q) and the offset (a, c), those are
// the s x s children of the anchor (p - a, q - c), at window index n = (a+r)*K + (c+r).

#ifndef KERAS_SAPA_KERNELS_SAPA_KERNELS_H_
#define KERAS_SAPA_KERNELS_SAPA_KERNELS_H_

#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"

namespace keras_sapa {

// Sizes of one call. All products are formed in int64.
struct WindowDims {
  int64_t batch = 0;
  int64_t height = 0;    // low-resolution H
  int64_t width = 0;     // low-resolution W
  int64_t up = 1;        // s
  int64_t kernel = 1;    // K (odd)
  int64_t channels = 0;  // D of hi and lo

  int64_t radius() const { return kernel / 2; }
  int64_t window() const { return kernel * kernel; }
  int64_t high_height() const { return height * up; }
  int64_t high_width() const { return width * up; }
  int64_t low_points() const { return batch * height * width; }
  int64_t high_points() const { return batch * height * width * up * up; }
};

// Device tag of the CUDA functors (the host files never need Eigen's GPU headers).
struct GpuTag {};

namespace functor {

template <typename Device, typename T>
struct WindowDot {
  // hi (B,sH,sW,D), lo (B,H,W,D) -> out (B,sH,sW,K*K).
  tensorflow::Status operator()(tensorflow::OpKernelContext* ctx, const WindowDims& dims,
                                const T* hi, const T* lo, T* out) const;
};

template <typename Device, typename T>
struct WindowGather {
  // w (B,sH,sW,K*K), lo (B,H,W,D) -> out (B,sH,sW,D).
  tensorflow::Status operator()(tensorflow::OpKernelContext* ctx, const WindowDims& dims,
                                const T* w, const T* lo, T* out) const;
};

template <typename Device, typename T>
struct WindowScatter {
  // w (B,sH,sW,K*K), hi (B,sH,sW,D) -> out (B,H,W,D).
  tensorflow::Status operator()(tensorflow::OpKernelContext* ctx, const WindowDims& dims,
                                const T* w, const T* hi, T* out) const;
};

}  // namespace functor
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_SAPA_KERNELS_H_
