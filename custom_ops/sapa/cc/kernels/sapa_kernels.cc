// CPU kernels of the keras_sapa ops, and their registration for DEVICE_CPU: thin
// TensorFlow adapters of the framework-free kernel core (custom_ops/sapa/kernels/cpu/),
// which gets TensorFlow's intra-op thread pool as its ParallelFor.
//
// Ops: the four window ops (Similarity, Aggregate and their gradients, composed from the
// core's Dot / Gather / Scatter), the fused pair Sapa / SapaGrad (the core's SapaForward /
// SapaBackward) and SAPA-D's SapaDeform / SapaDeformGrad (sapa_deform_cpu.h).
//
// float and double compute in their own type. For half and bfloat16, the window ops work
// on whole-tensor float copies (ViaFloat) with the results rounded once; the fused ops
// hand the 16-bit tensors to the core, which converts them tile by tile. The fused ops'
// saved weights (the softmax) stay in float (double for double inputs).

#define EIGEN_USE_THREADS

#include <algorithm>
#include <functional>
#include <type_traits>

#include "../../kernels/cpu/sapa_cpu.h"
#include "sapa_kernels.h"
#include "sapa_op_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/threadpool.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace keras_sapa {

using CPUDevice = Eigen::ThreadPoolDevice;

namespace tf_cpu {

// The core's ParallelFor on the op's intra-op pool.
inline cpu::ParallelFor Pool(OpKernelContext* ctx) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [workers](int64_t units, int64_t cost_per_unit, const cpu::Range& fn) {
    workers->ParallelFor(units, std::max<int64_t>(cost_per_unit, 1), fn);
  };
}

// float and double compute directly; half and bfloat16 through float copies.
template <typename T>
struct Compute {
  static constexpr bool kNative = std::is_same<T, float>::value || std::is_same<T, double>::value;
};

// Converts `n` elements of `src` to float in a temporary tensor (on the pool).
template <typename T>
Status ToFloat(OpKernelContext* ctx, const T* src, int64_t n, Tensor* tmp) {
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({n}), tmp));
  if (n > 0) {
    const auto& device = ctx->eigen_device<CPUDevice>();
    Eigen::TensorMap<Eigen::Tensor<const T, 1, Eigen::RowMajor>> in(src, n);
    tmp->flat<float>().device(device) = in.template cast<float>();
  }
  return absl::OkStatus();
}

template <typename T>
void FromFloat(OpKernelContext* ctx, const Tensor& tmp, int64_t n, T* dst) {
  if (n == 0) return;
  const auto& device = ctx->eigen_device<CPUDevice>();
  Eigen::TensorMap<Eigen::Tensor<T, 1, Eigen::RowMajor>> out(dst, n);
  out.device(device) = tmp.flat<float>().template cast<T>();
}

// Calls fn(float_a, float_b, float_out) on float copies of a (na elements), b (nb) and
// a float output of nout elements, then rounds the output into out.
template <typename T, typename Fn>
Status ViaFloat(OpKernelContext* ctx, const T* a, int64_t na, const T* b, int64_t nb, T* out,
                int64_t nout, Fn fn) {
  Tensor fa, fb, fout;
  TF_RETURN_IF_ERROR(ToFloat(ctx, a, na, &fa));
  TF_RETURN_IF_ERROR(ToFloat(ctx, b, nb, &fb));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({nout}), &fout));
  fn(fa.flat<float>().data(), fb.flat<float>().data(), fout.flat<float>().data());
  FromFloat(ctx, fout, nout, out);
  return absl::OkStatus();
}

enum Primitive { kDot, kGather, kScatter };

// The window primitive P of the core on (a, b) -> out: directly for float and double, else
// on float copies with the result rounded once into out. Dot reads (hi, lo) and writes
// weights, Gather (weights, lo) -> hi, Scatter (weights, hi) -> lo.
template <Primitive P, typename T>
Status Window(OpKernelContext* ctx, const WindowDims& d, const T* a, const T* b, T* out) {
  const int64_t hi = d.high_points() * d.channels, lo = d.low_points() * d.channels;
  const int64_t w = d.high_points() * d.window();
  auto core = [&](const auto* x, const auto* y, auto* o) {
    if constexpr (P == kDot) {
      cpu::Dot(Pool(ctx), d, d.channels, x, y, o);
    } else if constexpr (P == kGather) {
      cpu::Gather(Pool(ctx), d, d.channels, x, y, o);
    } else {
      cpu::Scatter(Pool(ctx), d, d.channels, x, y, o);
    }
  };
  if constexpr (Compute<T>::kNative) {
    core(a, b, out);
    return absl::OkStatus();
  } else if constexpr (P == kDot) {
    return ViaFloat<T>(ctx, a, hi, b, lo, out, w, core);
  } else if constexpr (P == kGather) {
    return ViaFloat<T>(ctx, a, w, b, lo, out, hi, core);
  } else {
    return ViaFloat<T>(ctx, a, w, b, hi, out, lo, core);
  }
}

}  // namespace tf_cpu

namespace functor {

template <typename T>
struct WindowDot<CPUDevice, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* hi, const T* lo,
                    T* out) const {
    return tf_cpu::Window<tf_cpu::kDot>(ctx, d, hi, lo, out);
  }
};

template <typename T>
struct WindowGather<CPUDevice, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* lo,
                    T* out) const {
    return tf_cpu::Window<tf_cpu::kGather>(ctx, d, w, lo, out);
  }
};

template <typename T>
struct WindowScatter<CPUDevice, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* hi,
                    T* out) const {
    return tf_cpu::Window<tf_cpu::kScatter>(ctx, d, w, hi, out);
  }
};

}  // namespace functor

// ------------------------------------------------------------------------ fused ops

namespace tf_cpu {

// The kernel core's storage type for T (custom_ops/sapa/kernels/cpu/simd.h): Eigen's
// half and bfloat16 are 16-bit patterns with the core's Half / BFloat16 layout.
template <typename T>
struct StorageOf {
  typedef T type;
};
template <>
struct StorageOf<Eigen::half> {
  typedef cpu::Half type;
};
template <>
struct StorageOf<Eigen::bfloat16> {
  typedef cpu::BFloat16 type;
};
static_assert(sizeof(Eigen::half) == sizeof(cpu::Half), "Eigen::half is not 16 bits");
static_assert(sizeof(Eigen::bfloat16) == sizeof(cpu::BFloat16), "Eigen::bfloat16 is not 16 bits");

// A tensor's data as the core's storage type.
template <typename T>
const typename StorageOf<T>::type* Storage(const Tensor& t) {
  return reinterpret_cast<const typename StorageOf<T>::type*>(t.flat<T>().data());
}
template <typename T>
typename StorageOf<T>::type* Storage(Tensor* t) {
  return reinterpret_cast<typename StorageOf<T>::type*>(t->flat<T>().data());
}

// A temporary of n elements of F (the logits' gradient of the backwards).
template <typename F>
Status Temp(const Call& c, int64_t n, Tensor* t) {
  return c.ctx->allocate_temp(tensorflow::DataTypeToEnum<F>::value, TensorShape({n}), t);
}

}  // namespace tf_cpu

namespace functor {

// F (float or double) is the compute type and the type of the saved weights. The fused
// pair takes the tensors in their own storage type: half and bfloat16 rows are converted
// tile by tile inside the core (no whole-tensor float copies, tf_cpu::Storage).
template <typename T, typename F>
struct FusedOp<Fused::kSapaForward, CPUDevice, T, F> {
  Status operator()(const Call& c) const {
    const WindowDims d = c.dims(c.size("d"));
    using S = typename tf_cpu::StorageOf<T>::type;
    cpu::SapaForward<F, S>(tf_cpu::Pool(c.ctx), d, d.channels, c.size("C"),
                           tf_cpu::Storage<T>(c.in(0)), tf_cpu::Storage<T>(c.in(1)),
                           tf_cpu::Storage<T>(c.in(2)), tf_cpu::Storage<T>(c.out(0)),
                           c.out_data<F>(1));
    return absl::OkStatus();
  }
};

template <typename T, typename F>
struct FusedOp<Fused::kSapaBackward, CPUDevice, T, F> {
  Status operator()(const Call& c) const {
    const WindowDims d = c.dims(c.size("d"));
    using S = typename tf_cpu::StorageOf<T>::type;
    Tensor dl;
    TF_RETURN_IF_ERROR(tf_cpu::Temp<F>(c, c.in(4).NumElements(), &dl));
    cpu::SapaBackward<F, S>(tf_cpu::Pool(c.ctx), d, d.channels, c.size("C"),
                            tf_cpu::Storage<T>(c.in(0)), tf_cpu::Storage<T>(c.in(1)),
                            tf_cpu::Storage<T>(c.in(2)), tf_cpu::Storage<T>(c.in(3)),
                            c.in_data<F>(4), dl.flat<F>().data(), tf_cpu::Storage<T>(c.out(0)),
                            tf_cpu::Storage<T>(c.out(1)), tf_cpu::Storage<T>(c.out(2)));
    return absl::OkStatus();
  }
};

// SAPA-D (custom_ops/sapa/kernels/cpu/sapa_deform_cpu.h), also in storage type: half and
// bfloat16 rows are converted as the kernels read them.
template <typename T, typename F>
struct FusedOp<Fused::kDeformForward, CPUDevice, T, F> {
  Status operator()(const Call& c) const {
    DeformDims d;
    TF_RETURN_IF_ERROR(c.deform_dims(&d));
    using S = typename tf_cpu::StorageOf<T>::type;
    cpu::deform::DeformForward<F, S>(tf_cpu::Pool(c.ctx), d, tf_cpu::Storage<T>(c.in(0)),
                                     tf_cpu::Storage<T>(c.in(1)), tf_cpu::Storage<T>(c.in(2)),
                                     tf_cpu::Storage<T>(c.in(3)), tf_cpu::Storage<T>(c.out(0)),
                                     c.out_data<F>(1));
    return absl::OkStatus();
  }
};

template <typename T, typename F>
struct FusedOp<Fused::kDeformBackward, CPUDevice, T, F> {
  Status operator()(const Call& c) const {
    DeformDims d;
    TF_RETURN_IF_ERROR(c.deform_dims(&d));
    using S = typename tf_cpu::StorageOf<T>::type;
    Tensor dl;
    TF_RETURN_IF_ERROR(tf_cpu::Temp<F>(c, c.in(5).NumElements(), &dl));
    cpu::deform::DeformBackward<F, S>(
        tf_cpu::Pool(c.ctx), d, tf_cpu::Storage<T>(c.in(0)), tf_cpu::Storage<T>(c.in(1)),
        tf_cpu::Storage<T>(c.in(2)), tf_cpu::Storage<T>(c.in(3)), tf_cpu::Storage<T>(c.in(4)),
        c.in_data<F>(5), dl.flat<F>().data(), tf_cpu::Storage<T>(c.out(0)),
        tf_cpu::Storage<T>(c.out(1)), tf_cpu::Storage<T>(c.out(2)), tf_cpu::Storage<T>(c.out(3)));
    return absl::OkStatus();
  }
};

// SAPA-D's halves (sapa_op_kernels.h's DeformHalf, float and double): the core's
// DeformSimilarity / DeformAggregate and their backwards on the call's tensors.
template <DeformHalf kOp, typename T>
struct DeformHalfOp<kOp, CPUDevice, T> {
  Status operator()(const Call& c) const {
    DeformDims d;
    TF_RETURN_IF_ERROR(c.deform_dims(&d));
    const cpu::ParallelFor pool = tf_cpu::Pool(c.ctx);
    const T *a = c.in_data<T>(0), *b = c.in_data<T>(1), *x = c.in_data<T>(2);
    namespace deform = cpu::deform;
    switch (kOp) {
      case DeformHalf::kSimilarity:
        deform::DeformSimilarity<T>(pool, d, a, b, x, c.out_data<T>(0));
        break;
      case DeformHalf::kAggregate:
        deform::DeformAggregate<T>(pool, d, a, b, x, c.out_data<T>(0));
        break;
      case DeformHalf::kSimilarityBackward:
        deform::DeformSimilarityBackward<T>(pool, d, a, b, x, c.in_data<T>(3), c.out_data<T>(0),
                                            c.out_data<T>(1), c.out_data<T>(2));
        break;
      case DeformHalf::kAggregateBackward:
        deform::DeformAggregateBackward<T>(pool, d, a, b, x, c.in_data<T>(3), c.out_data<T>(0),
                                           c.out_data<T>(1), c.out_data<T>(2));
        break;
    }
    return absl::OkStatus();
  }
};

}  // namespace functor

// Every op of the table, for every type it lists, on DEVICE_CPU.
#define KERAS_SAPA_CPU_KERNEL(NAME, T, F) \
  KERAS_SAPA_REGISTER_KERNEL_TYPED(tensorflow::DEVICE_CPU, CPUDevice, NAME, T, F)
#define KERAS_SAPA_CPU_OP(NAME) KERAS_SAPA_OP_TYPES_##NAME(KERAS_SAPA_CPU_KERNEL, NAME)
KERAS_SAPA_OPS_CPU(KERAS_SAPA_CPU_OP)
#undef KERAS_SAPA_CPU_OP
#undef KERAS_SAPA_CPU_KERNEL

}  // namespace keras_sapa
