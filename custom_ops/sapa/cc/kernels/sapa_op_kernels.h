// Device-generic OpKernels of the keras_sapa ops. Included by the CPU kernel file (which
// registers them for DEVICE_CPU) and by the GPU registration file (DEVICE_GPU).

#ifndef KERAS_SAPA_KERNELS_SAPA_OP_KERNELS_H_
#define KERAS_SAPA_KERNELS_SAPA_OP_KERNELS_H_

#include <string>

#include "../sapa_attrs.h"
#include "sapa_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace keras_sapa {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

namespace internal {

// Checks that `high` is (B, s*H, s*W, *) for `low` (B, H, W, *) and fills dims
// (channels excluded).
inline Status CheckHighLow(const Tensor& high, const char* high_name, const Tensor& low,
                           const char* low_name, int64_t kernel_size, int64_t up_factor,
                           WindowDims* dims) {
  if (high.dims() != 4 || low.dims() != 4) {
    return tsl::errors::InvalidArgument(
        high_name, " and ", low_name, " must be rank-4 (batch, height, width, channels). Received: ",
        high_name, ".shape=", high.shape().DebugString(), ", ", low_name,
        ".shape=", low.shape().DebugString());
  }
  if (high.dim_size(0) != low.dim_size(0) ||
      high.dim_size(1) != low.dim_size(1) * up_factor ||
      high.dim_size(2) != low.dim_size(2) * up_factor) {
    return tsl::errors::InvalidArgument(
        high_name, " must have the batch size of ", low_name, " and exactly up_factor=",
        up_factor, " times its height and width. Received: ", high_name, ".shape=",
        high.shape().DebugString(), ", ", low_name, ".shape=", low.shape().DebugString());
  }
  dims->batch = low.dim_size(0);
  dims->height = low.dim_size(1);
  dims->width = low.dim_size(2);
  dims->up = up_factor;
  dims->kernel = kernel_size;
  return absl::OkStatus();
}

inline Status CheckWindowChannels(const Tensor& weights, const char* name, int64_t kernel_size) {
  if (weights.dim_size(3) != kernel_size * kernel_size) {
    return tsl::errors::InvalidArgument(name, " must have kernel_size**2=",
                                        kernel_size * kernel_size, " channels. Received: ",
                                        name, ".shape=", weights.shape().DebugString());
  }
  return absl::OkStatus();
}

inline Status CheckSameShape(const Tensor& a, const char* a_name, const Tensor& b,
                             const char* b_name) {
  if (a.shape() != b.shape()) {
    return tsl::errors::InvalidArgument(a_name, " and ", b_name,
                                        " must have the same shape. Received: ", a_name,
                                        ".shape=", a.shape().DebugString(), ", ", b_name,
                                        ".shape=", b.shape().DebugString());
  }
  return absl::OkStatus();
}

inline Status CheckSameChannels(const Tensor& a, const char* a_name, const Tensor& b,
                                const char* b_name) {
  if (a.dim_size(3) != b.dim_size(3)) {
    return tsl::errors::InvalidArgument(a_name, " and ", b_name,
                                        " must have the same number of channels. Received: ",
                                        a_name, ".shape=", a.shape().DebugString(), ", ",
                                        b_name, ".shape=", b.shape().DebugString());
  }
  return absl::OkStatus();
}

inline TensorShape HighShape(const WindowDims& d, int64_t channels) {
  return TensorShape({d.batch, d.high_height(), d.high_width(), channels});
}

}  // namespace internal

// similarity = Dot(query, key).
template <typename Device, typename T>
class SimilarityOp : public OpKernel {
 public:
  explicit SimilarityOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadWindowAttrs(ctx, &kernel_size_, &up_factor_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& query = ctx->input(0);
    const Tensor& key = ctx->input(1);
    WindowDims dims;
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(query, "query", key, "key", kernel_size_,
                                               up_factor_, &dims));
    OP_REQUIRES_OK(ctx, internal::CheckSameChannels(query, "query", key, "key"));
    dims.channels = key.dim_size(3);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, internal::HighShape(dims, dims.window()), &out));
    if (out->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, functor::WindowDot<Device, T>()(ctx, dims, query.flat<T>().data(),
                                                         key.flat<T>().data(),
                                                         out->flat<T>().data()));
  }

 private:
  int64_t kernel_size_ = 1;
  int64_t up_factor_ = 1;
};

// (grad_query, grad_key) = (Gather(grad, key), Scatter(grad, query)).
template <typename Device, typename T>
class SimilarityGradOp : public OpKernel {
 public:
  explicit SimilarityGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadWindowAttrs(ctx, &kernel_size_, &up_factor_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& query = ctx->input(1);
    const Tensor& key = ctx->input(2);
    WindowDims dims;
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(query, "query", key, "key", kernel_size_,
                                               up_factor_, &dims));
    OP_REQUIRES_OK(ctx, internal::CheckSameChannels(query, "query", key, "key"));
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(grad, "grad", key, "key", kernel_size_,
                                               up_factor_, &dims));
    OP_REQUIRES_OK(ctx, internal::CheckWindowChannels(grad, "grad", kernel_size_));
    dims.channels = key.dim_size(3);
    Tensor* grad_query = nullptr;
    Tensor* grad_key = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, query.shape(), &grad_query));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, key.shape(), &grad_key));
    if (grad_query->NumElements() > 0) {
      OP_REQUIRES_OK(ctx, functor::WindowGather<Device, T>()(
                              ctx, dims, grad.flat<T>().data(), key.flat<T>().data(),
                              grad_query->flat<T>().data()));
    }
    if (grad_key->NumElements() > 0) {
      OP_REQUIRES_OK(ctx, functor::WindowScatter<Device, T>()(
                              ctx, dims, grad.flat<T>().data(), query.flat<T>().data(),
                              grad_key->flat<T>().data()));
    }
  }

 private:
  int64_t kernel_size_ = 1;
  int64_t up_factor_ = 1;
};

// output = Gather(weights, value).
template <typename Device, typename T>
class AggregateOp : public OpKernel {
 public:
  explicit AggregateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadWindowAttrs(ctx, &kernel_size_, &up_factor_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& weights = ctx->input(0);
    const Tensor& value = ctx->input(1);
    WindowDims dims;
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(weights, "weights", value, "value",
                                               kernel_size_, up_factor_, &dims));
    OP_REQUIRES_OK(ctx, internal::CheckWindowChannels(weights, "weights", kernel_size_));
    dims.channels = value.dim_size(3);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, internal::HighShape(dims, dims.channels), &out));
    if (out->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, functor::WindowGather<Device, T>()(ctx, dims, weights.flat<T>().data(),
                                                            value.flat<T>().data(),
                                                            out->flat<T>().data()));
  }

 private:
  int64_t kernel_size_ = 1;
  int64_t up_factor_ = 1;
};

// (grad_weights, grad_value) = (Dot(grad, value), Scatter(weights, grad)).
template <typename Device, typename T>
class AggregateGradOp : public OpKernel {
 public:
  explicit AggregateGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadWindowAttrs(ctx, &kernel_size_, &up_factor_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& weights = ctx->input(1);
    const Tensor& value = ctx->input(2);
    WindowDims dims;
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(weights, "weights", value, "value",
                                               kernel_size_, up_factor_, &dims));
    OP_REQUIRES_OK(ctx, internal::CheckWindowChannels(weights, "weights", kernel_size_));
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(grad, "grad", value, "value", kernel_size_,
                                               up_factor_, &dims));
    OP_REQUIRES_OK(ctx, internal::CheckSameChannels(grad, "grad", value, "value"));
    dims.channels = value.dim_size(3);
    Tensor* grad_weights = nullptr;
    Tensor* grad_value = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, weights.shape(), &grad_weights));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, value.shape(), &grad_value));
    if (grad_weights->NumElements() > 0) {
      OP_REQUIRES_OK(ctx, functor::WindowDot<Device, T>()(
                              ctx, dims, grad.flat<T>().data(), value.flat<T>().data(),
                              grad_weights->flat<T>().data()));
    }
    if (grad_value->NumElements() > 0) {
      OP_REQUIRES_OK(ctx, functor::WindowScatter<Device, T>()(
                              ctx, dims, weights.flat<T>().data(), grad.flat<T>().data(),
                              grad_value->flat<T>().data()));
    }
  }

 private:
  int64_t kernel_size_ = 1;
  int64_t up_factor_ = 1;
};

#define KERAS_SAPA_REGISTER_KERNELS(DEVICE_NAME, DEVICE, T)                                 \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("KerasSapa>Similarity").Device(DEVICE_NAME).TypeConstraint<T>("T"),              \
      ::keras_sapa::SimilarityOp<DEVICE, T>);                                               \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("KerasSapa>SimilarityGrad").Device(DEVICE_NAME).TypeConstraint<T>("T"),          \
      ::keras_sapa::SimilarityGradOp<DEVICE, T>);                                           \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("KerasSapa>Aggregate").Device(DEVICE_NAME).TypeConstraint<T>("T"),               \
      ::keras_sapa::AggregateOp<DEVICE, T>);                                                \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("KerasSapa>AggregateGrad").Device(DEVICE_NAME).TypeConstraint<T>("T"),           \
      ::keras_sapa::AggregateGradOp<DEVICE, T>);

}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_SAPA_OP_KERNELS_H_
