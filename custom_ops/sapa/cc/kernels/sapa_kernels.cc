// CPU kernels of the keras_sapa ops, and their registration for DEVICE_CPU: thin
// TensorFlow adapters of the framework-free kernel core (custom_ops/sapa/kernels/cpu/),
// which gets TensorFlow's intra-op thread pool as its ParallelFor.
//
// Ops: the four window ops (Similarity, Aggregate and their gradients, composed from the
// core's Dot / Gather / Scatter) and the fused pair Sapa / SapaGrad (the core's
// SapaForward / SapaBackward).
//
// float and double compute in their own type; half and bfloat16 are converted to float,
// computed in float, and the results rounded once. The fused op's saved weights (the
// softmax) stay in float (double for double inputs).

#define EIGEN_USE_THREADS

#include <algorithm>
#include <functional>
#include <type_traits>

#include "../../kernels/cpu/sapa_cpu.h"
#include "../sapa_attrs.h"
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

inline cpu::Shape CoreShape(const WindowDims& d) {
  cpu::Shape shape;
  shape.batch = d.batch;
  shape.height = d.height;
  shape.width = d.width;
  shape.up = d.up;
  shape.kernel = d.kernel;
  return shape;
}

template <typename T>
void Dot(OpKernelContext* ctx, const WindowDims& d, const T* hi, const T* lo, T* out) {
  cpu::Dot<T>(Pool(ctx), CoreShape(d), d.channels, hi, lo, out);
}

template <typename T>
void Gather(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* lo, T* out) {
  cpu::Gather<T>(Pool(ctx), CoreShape(d), d.channels, w, lo, out);
}

template <typename T>
void Scatter(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* hi, T* out) {
  cpu::Scatter<T>(Pool(ctx), CoreShape(d), d.channels, w, hi, out);
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

}  // namespace tf_cpu

namespace functor {

template <typename T>
struct WindowDot<CPUDevice, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* hi, const T* lo,
                    T* out) const {
    if constexpr (tf_cpu::Compute<T>::kNative) {
      tf_cpu::Dot<T>(ctx, d, hi, lo, out);
      return absl::OkStatus();
    } else {
      return tf_cpu::ViaFloat<T>(ctx, hi, d.high_points() * d.channels, lo,
                              d.low_points() * d.channels, out, d.high_points() * d.window(),
                              [&](const float* fh, const float* fl, float* fo) {
                                tf_cpu::Dot<float>(ctx, d, fh, fl, fo);
                              });
    }
  }
};

template <typename T>
struct WindowGather<CPUDevice, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* lo,
                    T* out) const {
    if constexpr (tf_cpu::Compute<T>::kNative) {
      tf_cpu::Gather<T>(ctx, d, w, lo, out);
      return absl::OkStatus();
    } else {
      return tf_cpu::ViaFloat<T>(ctx, w, d.high_points() * d.window(), lo,
                              d.low_points() * d.channels, out, d.high_points() * d.channels,
                              [&](const float* fw, const float* fl, float* fo) {
                                tf_cpu::Gather<float>(ctx, d, fw, fl, fo);
                              });
    }
  }
};

template <typename T>
struct WindowScatter<CPUDevice, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* hi,
                    T* out) const {
    if constexpr (tf_cpu::Compute<T>::kNative) {
      tf_cpu::Scatter<T>(ctx, d, w, hi, out);
      return absl::OkStatus();
    } else {
      return tf_cpu::ViaFloat<T>(ctx, w, d.high_points() * d.window(), hi,
                              d.high_points() * d.channels, out, d.low_points() * d.channels,
                              [&](const float* fw, const float* fh, float* fo) {
                                tf_cpu::Scatter<float>(ctx, d, fw, fh, fo);
                              });
    }
  }
};

}  // namespace functor

// ------------------------------------------------------------------------ fused ops

namespace tf_cpu {

// Checks the (query, key, value) triple of the fused ops and fills dims (channels
// excluded); *dim and *channels get d and C.
inline Status CheckTriple(const Tensor& query, const Tensor& key, const Tensor& value,
                          int64_t kernel_size, int64_t up_factor, WindowDims* dims,
                          int64_t* dim, int64_t* channels) {
  TF_RETURN_IF_ERROR(internal::CheckHighLow(query, "query", key, "key", kernel_size,
                                            up_factor, dims));
  TF_RETURN_IF_ERROR(internal::CheckSameChannels(query, "query", key, "key"));
  TF_RETURN_IF_ERROR(internal::CheckHighLow(query, "query", value, "value", kernel_size,
                                            up_factor, dims));
  *dim = key.dim_size(3);
  *channels = value.dim_size(3);
  return absl::OkStatus();
}

// A float (or T) view of an input: the input itself when T is the compute type F, else a
// converted temporary.
template <typename T, typename F>
Status ComputeView(OpKernelContext* ctx, const Tensor& in, Tensor* tmp, const F** out) {
  if constexpr (std::is_same<T, F>::value) {
    *out = in.flat<T>().data();
    return absl::OkStatus();
  } else {
    TF_RETURN_IF_ERROR(ToFloat(ctx, in.flat<T>().data(), in.NumElements(), tmp));
    *out = tmp->flat<float>().data();
    return absl::OkStatus();
  }
}

// An output of type T computed in F: the output itself, or a float temporary rounded into
// it by Finish().
template <typename T, typename F>
struct ComputeOut {
  Tensor tmp;
  Tensor* target = nullptr;
  F* data = nullptr;

  Status Init(OpKernelContext* ctx, Tensor* out) {
    target = out;
    if constexpr (std::is_same<T, F>::value) {
      data = out->flat<T>().data();
    } else {
      TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DataTypeToEnum<F>::value,
                                            TensorShape({out->NumElements()}), &tmp));
      data = tmp.flat<F>().data();
    }
    return absl::OkStatus();
  }

  void Finish(OpKernelContext* ctx) {
    if constexpr (!std::is_same<T, F>::value) {
      FromFloat(ctx, tmp, target->NumElements(), target->flat<T>().data());
    }
  }
};

}  // namespace tf_cpu

// (output, weights) = SapaForward(query, key, value); F (float or double) is the compute
// type and the type of the saved weights.
template <typename T, typename F>
class SapaOp : public OpKernel {
 public:
  explicit SapaOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadWindowAttrs(ctx, &kernel_size_, &up_factor_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& query = ctx->input(0);
    const Tensor& key = ctx->input(1);
    const Tensor& value = ctx->input(2);
    WindowDims dims;
    int64_t dim = 0, channels = 0;
    OP_REQUIRES_OK(ctx, tf_cpu::CheckTriple(query, key, value, kernel_size_, up_factor_, &dims,
                                            &dim, &channels));
    Tensor* out = nullptr;
    Tensor* weights = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, internal::HighShape(dims, channels), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, internal::HighShape(dims, dims.window()),
                                             &weights));
    if (weights->NumElements() == 0) return;
    Tensor tq, tk, tv;
    const F *q = nullptr, *k = nullptr, *v = nullptr;
    OP_REQUIRES_OK(ctx, (tf_cpu::ComputeView<T, F>(ctx, query, &tq, &q)));
    OP_REQUIRES_OK(ctx, (tf_cpu::ComputeView<T, F>(ctx, key, &tk, &k)));
    OP_REQUIRES_OK(ctx, (tf_cpu::ComputeView<T, F>(ctx, value, &tv, &v)));
    tf_cpu::ComputeOut<T, F> o;
    OP_REQUIRES_OK(ctx, o.Init(ctx, out));
    cpu::SapaForward<F>(tf_cpu::Pool(ctx), tf_cpu::CoreShape(dims), dim, channels, q, k, v,
                        o.data, weights->flat<F>().data());
    o.Finish(ctx);
  }

 private:
  int64_t kernel_size_ = 1;
  int64_t up_factor_ = 1;
};

// (grad_query, grad_key, grad_value) = SapaBackward(grad, query, key, value, weights).
template <typename T, typename F>
class SapaGradOp : public OpKernel {
 public:
  explicit SapaGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadWindowAttrs(ctx, &kernel_size_, &up_factor_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& query = ctx->input(1);
    const Tensor& key = ctx->input(2);
    const Tensor& value = ctx->input(3);
    const Tensor& weights = ctx->input(4);
    WindowDims dims;
    int64_t dim = 0, channels = 0;
    OP_REQUIRES_OK(ctx, tf_cpu::CheckTriple(query, key, value, kernel_size_, up_factor_, &dims,
                                            &dim, &channels));
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(grad, "grad", value, "value", kernel_size_,
                                               up_factor_, &dims));
    OP_REQUIRES_OK(ctx, internal::CheckSameChannels(grad, "grad", value, "value"));
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(weights, "weights", key, "key", kernel_size_,
                                               up_factor_, &dims));
    OP_REQUIRES_OK(ctx, internal::CheckWindowChannels(weights, "weights", kernel_size_));
    Tensor *grad_query = nullptr, *grad_key = nullptr, *grad_value = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, query.shape(), &grad_query));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, key.shape(), &grad_key));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, value.shape(), &grad_value));
    if (weights.NumElements() == 0) return;
    Tensor tg, tq, tk, tv, dlogits;
    const F *g = nullptr, *q = nullptr, *k = nullptr, *v = nullptr;
    OP_REQUIRES_OK(ctx, (tf_cpu::ComputeView<T, F>(ctx, grad, &tg, &g)));
    OP_REQUIRES_OK(ctx, (tf_cpu::ComputeView<T, F>(ctx, query, &tq, &q)));
    OP_REQUIRES_OK(ctx, (tf_cpu::ComputeView<T, F>(ctx, key, &tk, &k)));
    OP_REQUIRES_OK(ctx, (tf_cpu::ComputeView<T, F>(ctx, value, &tv, &v)));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<F>::value,
                                           TensorShape({weights.NumElements()}), &dlogits));
    tf_cpu::ComputeOut<T, F> dq, dk, dv;
    OP_REQUIRES_OK(ctx, dq.Init(ctx, grad_query));
    OP_REQUIRES_OK(ctx, dk.Init(ctx, grad_key));
    OP_REQUIRES_OK(ctx, dv.Init(ctx, grad_value));
    cpu::SapaBackward<F>(tf_cpu::Pool(ctx), tf_cpu::CoreShape(dims), dim, channels, g, q, k, v,
                         weights.flat<F>().data(), dlogits.flat<F>().data(), dq.data, dk.data,
                         dv.data);
    dq.Finish(ctx);
    dk.Finish(ctx);
    dv.Finish(ctx);
  }

 private:
  int64_t kernel_size_ = 1;
  int64_t up_factor_ = 1;
};

#define KERAS_SAPA_REGISTER_FUSED_CPU(T, F)                                                  \
  REGISTER_KERNEL_BUILDER(Name("KerasSapa>Sapa")                                            \
                              .Device(tensorflow::DEVICE_CPU)                               \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<F>("Tweights"),                               \
                          SapaOp<T, F>);                                                    \
  REGISTER_KERNEL_BUILDER(Name("KerasSapa>SapaGrad")                                        \
                              .Device(tensorflow::DEVICE_CPU)                               \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<F>("Tweights"),                               \
                          SapaGradOp<T, F>);
KERAS_SAPA_REGISTER_FUSED_CPU(float, float);
KERAS_SAPA_REGISTER_FUSED_CPU(double, double);
KERAS_SAPA_REGISTER_FUSED_CPU(Eigen::half, float);
KERAS_SAPA_REGISTER_FUSED_CPU(Eigen::bfloat16, float);
#undef KERAS_SAPA_REGISTER_FUSED_CPU

#define KERAS_SAPA_REGISTER_CPU(T) KERAS_SAPA_REGISTER_KERNELS(tensorflow::DEVICE_CPU, CPUDevice, T)
KERAS_SAPA_REGISTER_CPU(float);
KERAS_SAPA_REGISTER_CPU(double);
KERAS_SAPA_REGISTER_CPU(Eigen::half);
KERAS_SAPA_REGISTER_CPU(Eigen::bfloat16);
#undef KERAS_SAPA_REGISTER_CPU

}  // namespace keras_sapa
