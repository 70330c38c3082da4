// Functors of the keras_sapa custom ops, one template per device: the device-generic
// OpKernels (sapa_op_kernels.h) call them. The CPU functors (sapa_kernels.cc) are thin
// adapters of the framework-free kernel core, custom_ops/sapa/kernels/cpu/sapa_cpu.h; the
// GPU ones (sapa_kernels_gpu.cc) hand the stream and pointers to the CUDA launcher.
//
// Three window primitives cover the forward and backward passes of the window ops.
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

#include "../../kernels/cpu/sapa_cpu.h"
#include "../../kernels/cpu/sapa_deform_cpu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace keras_sapa {

// Sizes of one call: the kernel core's shape (batch, low-resolution height and width, up,
// kernel; products in int64) and the channel count D of hi and lo.
struct WindowDims : cpu::Shape {
  int64_t channels = 0;
};

// Sizes of one SAPA-D call (the kernel core's shape: D = groups*E, C = groups*Cg).
using DeformDims = cpu::deform::DeformShape;

// Device tag of the CUDA functors (the host files never need Eigen's GPU headers).
struct GpuTag {};

// One call of an op (sapa_op_kernels.h).
struct Call;

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

// The fused ops, F the accumulation type of the saved weights (float for half and
// bfloat16): SAPA's (query, key, value) -> (output, weights) and its gradient, SAPA-D's
// (query, key, value, offsets) -> (output, weights) and its gradient. Each device
// specialises operator(), which reads the inputs from, and writes the outputs the op
// table allocated into, the call (sapa_op_kernels.h), whose bound sizes give the shape
// (SAPA-D's: Call::deform_dims).
enum class Fused { kSapaForward, kSapaBackward, kDeformForward, kDeformBackward };

template <Fused kOp, typename Device, typename T, typename F>
struct FusedOp {
  tensorflow::Status operator()(const Call& c) const;
};

}  // namespace functor
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_SAPA_KERNELS_H_
