// TensorFlow GPU adapter of the keras_sapa ops: DEVICE_GPU kernels that hand TensorFlow's
// CUDA stream and the tensors' device pointers to the framework-free launcher
// (custom_ops/sapa/launcher/), which runs the NVRTC-built kernels through the driver API.
// Compiled with g++ alone: no CUDA headers, no CUDA runtime, no nvcc.
//
// The window ops' kernels (shape checks, output allocation) are the device-generic ones of
// sapa_op_kernels.h; this file supplies their GpuTag functors, and the GPU kernels of the
// fused KerasSapa>Sapa / SapaGrad (one fused forward launch; the backward is the logits
// gradient, then three deterministic gathers). The kernel images are looked up once, in
// the directory of this library (keras_sapa/_lib/).

#include <dlfcn.h>

#include <mutex>
#include <string>

#include "../../launcher/sapa_launcher.h"
#include "sapa_kernels.h"
#include "sapa_op_kernels.h"
#include "tensorflow/core/framework/device_base.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "xla/stream_executor/stream.h"

namespace keras_sapa {
namespace gpu_adapter {

template <typename T> struct Dtype;
template <> struct Dtype<float> { static constexpr int value = SAPA_F32; };
template <> struct Dtype<double> { static constexpr int value = SAPA_F64; };
template <> struct Dtype<Eigen::half> { static constexpr int value = SAPA_F16; };
template <> struct Dtype<Eigen::bfloat16> { static constexpr int value = SAPA_BF16; };

// Directory of this shared library (dladdr on one of its own functions).
std::string LibraryDir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&LibraryDir), &info) == 0 || info.dli_fname == nullptr) {
    return ".";
  }
  const std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

tensorflow::Status LoadImages() {
  static std::once_flag once;
  static int status = SAPA_OK;
  static std::string message;
  std::call_once(once, [] {
    int count = 0;
    const std::string dir = LibraryDir();
    status = sapa_load_image_dir(dir.c_str(), &count);
    if (status == SAPA_OK && count == 0) {
      status = SAPA_ERR_NO_IMAGE;
      message = "no kernel images (sapa_kernels.*.cubin/ptx) in " + dir +
                " (rebuild with `python custom_ops/build.py`)";
    } else if (status != SAPA_OK) {
      message = sapa_last_error();
    }
  });
  if (status != SAPA_OK) return tsl::errors::Unavailable("keras_sapa GPU kernels: ", message);
  return absl::OkStatus();
}

// The CUstream of the op's TensorFlow stream.
tensorflow::Status Stream(tensorflow::OpKernelContext* ctx, void** stream) {
  tensorflow::DeviceContext* device_context = ctx->op_device_context();
  if (device_context == nullptr || device_context->stream() == nullptr) {
    return tsl::errors::Internal("keras_sapa: the op has no GPU stream");
  }
  *stream = device_context->stream()->platform_specific_handle().stream;
  return absl::OkStatus();
}

SapaDims Dims(const WindowDims& d) {
  SapaDims out;
  out.batch = d.batch;
  out.height = d.height;
  out.width = d.width;
  out.up = d.up;
  out.kernel = d.kernel;
  out.channels = d.channels;
  out.channels_v = d.channels;
  return out;
}

// Runs launcher(stream, dtype, dims, a, b, out) and turns its status into a Status.
template <typename T, typename Launch>
tensorflow::Status Call(tensorflow::OpKernelContext* ctx, const WindowDims& dims,
                        Launch launch, const T* a, const T* b, T* out) {
  TF_RETURN_IF_ERROR(LoadImages());
  void* stream = nullptr;
  TF_RETURN_IF_ERROR(Stream(ctx, &stream));
  const SapaDims d = Dims(dims);
  const int status = launch(stream, Dtype<T>::value, &d, a, b, out);
  if (status != SAPA_OK) {
    return tsl::errors::Internal("keras_sapa GPU kernel failed (status ", status,
                                 "): ", sapa_last_error());
  }
  return absl::OkStatus();
}

// Checks query (B,sH,sW,d), key (B,H,W,d), value (B,H,W,C); fills dims (channels = d)
// and *channels = C.
tensorflow::Status CheckTriple(const Tensor& query, const Tensor& key, const Tensor& value,
                               int64_t kernel_size, int64_t up_factor, WindowDims* dims,
                               int64_t* channels) {
  TF_RETURN_IF_ERROR(internal::CheckHighLow(query, "query", key, "key", kernel_size, up_factor,
                                            dims));
  TF_RETURN_IF_ERROR(internal::CheckSameChannels(query, "query", key, "key"));
  if (value.dims() != 4 || value.dim_size(0) != key.dim_size(0) ||
      value.dim_size(1) != key.dim_size(1) || value.dim_size(2) != key.dim_size(2)) {
    return tsl::errors::InvalidArgument(
        "value must be (batch, height, width, channels) with the batch and spatial size of "
        "key. Received: value.shape=", value.shape().DebugString(),
        ", key.shape=", key.shape().DebugString());
  }
  dims->channels = key.dim_size(3);
  *channels = value.dim_size(3);
  return absl::OkStatus();
}

tensorflow::Status Launched(int status) {
  if (status != SAPA_OK) {
    return tsl::errors::Internal("keras_sapa GPU kernel failed (status ", status, "): ",
                                 sapa_last_error());
  }
  return absl::OkStatus();
}

// (output, weights) = fused forward; F is the type of the weights (the accumulation type).
template <typename T, typename F>
class SapaGpuOp : public OpKernel {
 public:
  explicit SapaGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadWindowAttrs(ctx, &kernel_size_, &up_factor_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& query = ctx->input(0);
    const Tensor& key = ctx->input(1);
    const Tensor& value = ctx->input(2);
    WindowDims dims;
    int64_t channels = 0;
    OP_REQUIRES_OK(ctx, CheckTriple(query, key, value, kernel_size_, up_factor_, &dims,
                                    &channels));
    Tensor* out = nullptr;
    Tensor* weights = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, internal::HighShape(dims, channels), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, internal::HighShape(dims, dims.window()),
                                             &weights));
    if (weights->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, LoadImages());
    void* stream = nullptr;
    OP_REQUIRES_OK(ctx, Stream(ctx, &stream));
    SapaDims d = Dims(dims);
    d.channels_v = channels;
    OP_REQUIRES_OK(ctx, Launched(sapa_forward(stream, Dtype<T>::value, &d,
                                              query.flat<T>().data(), key.flat<T>().data(),
                                              value.flat<T>().data(), out->flat<T>().data(),
                                              weights->flat<F>().data())));
  }

 private:
  int64_t kernel_size_ = 1;
  int64_t up_factor_ = 1;
};

// (grad_query, grad_key, grad_value): dlogits = weights * (Dot(grad, v) - <weights, .>),
// then grad_query = Gather(dlogits, key), grad_key = Scatter(dlogits, query),
// grad_value = Scatter(weights, grad).
template <typename T, typename F>
class SapaGradGpuOp : public OpKernel {
 public:
  explicit SapaGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadWindowAttrs(ctx, &kernel_size_, &up_factor_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& query = ctx->input(1);
    const Tensor& key = ctx->input(2);
    const Tensor& value = ctx->input(3);
    const Tensor& weights = ctx->input(4);
    WindowDims dims;
    int64_t channels = 0;
    OP_REQUIRES_OK(ctx, CheckTriple(query, key, value, kernel_size_, up_factor_, &dims,
                                    &channels));
    WindowDims check = dims;
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(grad, "grad", value, "value", kernel_size_,
                                               up_factor_, &check));
    OP_REQUIRES_OK(ctx, internal::CheckSameChannels(grad, "grad", value, "value"));
    OP_REQUIRES_OK(ctx, internal::CheckHighLow(weights, "weights", key, "key", kernel_size_,
                                               up_factor_, &check));
    OP_REQUIRES_OK(ctx, internal::CheckWindowChannels(weights, "weights", kernel_size_));
    Tensor *grad_query = nullptr, *grad_key = nullptr, *grad_value = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, query.shape(), &grad_query));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, key.shape(), &grad_key));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, value.shape(), &grad_value));
    if (weights.NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, LoadImages());
    void* stream = nullptr;
    OP_REQUIRES_OK(ctx, Stream(ctx, &stream));
    Tensor dlogits;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<F>::value,
                                           weights.shape(), &dlogits));
    const int dtype = Dtype<T>::value;
    SapaDims dq = Dims(dims);  // query/key channels
    SapaDims dv = dq;          // value channels
    dv.channels = channels;
    dv.channels_v = channels;
    const F* w = weights.flat<F>().data();
    F* dl = dlogits.flat<F>().data();
    OP_REQUIRES_OK(ctx, Launched(sapa_softmax_backward(stream, dtype, &dv, grad.flat<T>().data(),
                                                       value.flat<T>().data(), w, dl)));
    OP_REQUIRES_OK(ctx, Launched(sapa_gather_acc(stream, dtype, &dq, dl, key.flat<T>().data(),
                                                 grad_query->flat<T>().data())));
    OP_REQUIRES_OK(ctx, Launched(sapa_scatter_acc(stream, dtype, &dq, dl,
                                                  query.flat<T>().data(),
                                                  grad_key->flat<T>().data())));
    OP_REQUIRES_OK(ctx, Launched(sapa_scatter_acc(stream, dtype, &dv, w, grad.flat<T>().data(),
                                                  grad_value->flat<T>().data())));
  }

 private:
  int64_t kernel_size_ = 1;
  int64_t up_factor_ = 1;
};

}  // namespace gpu_adapter

namespace functor {

#define KERAS_SAPA_GPU_FUNCTORS(T)                                                          \
  template <>                                                                               \
  tensorflow::Status WindowDot<GpuTag, T>::operator()(                                      \
      tensorflow::OpKernelContext* ctx, const WindowDims& dims, const T* hi, const T* lo,   \
      T* out) const {                                                                       \
    return gpu_adapter::Call<T>(ctx, dims, sapa_dot, hi, lo, out);                          \
  }                                                                                         \
  template <>                                                                               \
  tensorflow::Status WindowGather<GpuTag, T>::operator()(                                   \
      tensorflow::OpKernelContext* ctx, const WindowDims& dims, const T* w, const T* lo,    \
      T* out) const {                                                                       \
    return gpu_adapter::Call<T>(ctx, dims, sapa_gather, w, lo, out);                        \
  }                                                                                         \
  template <>                                                                               \
  tensorflow::Status WindowScatter<GpuTag, T>::operator()(                                  \
      tensorflow::OpKernelContext* ctx, const WindowDims& dims, const T* w, const T* hi,    \
      T* out) const {                                                                       \
    return gpu_adapter::Call<T>(ctx, dims, sapa_scatter, w, hi, out);                       \
  }

KERAS_SAPA_GPU_FUNCTORS(float)
KERAS_SAPA_GPU_FUNCTORS(double)
KERAS_SAPA_GPU_FUNCTORS(Eigen::half)
KERAS_SAPA_GPU_FUNCTORS(Eigen::bfloat16)
#undef KERAS_SAPA_GPU_FUNCTORS

}  // namespace functor

#define KERAS_SAPA_REGISTER_GPU(T) KERAS_SAPA_REGISTER_KERNELS(tensorflow::DEVICE_GPU, GpuTag, T)
KERAS_SAPA_REGISTER_GPU(float);
KERAS_SAPA_REGISTER_GPU(double);
KERAS_SAPA_REGISTER_GPU(Eigen::half);
KERAS_SAPA_REGISTER_GPU(Eigen::bfloat16);
#undef KERAS_SAPA_REGISTER_GPU

#define KERAS_SAPA_REGISTER_FUSED_GPU(T, F)                                                  \
  REGISTER_KERNEL_BUILDER(Name("KerasSapa>Sapa")                                            \
                              .Device(tensorflow::DEVICE_GPU)                               \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<F>("Tweights"),                               \
                          gpu_adapter::SapaGpuOp<T, F>);                                    \
  REGISTER_KERNEL_BUILDER(Name("KerasSapa>SapaGrad")                                        \
                              .Device(tensorflow::DEVICE_GPU)                               \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<F>("Tweights"),                               \
                          gpu_adapter::SapaGradGpuOp<T, F>);
KERAS_SAPA_REGISTER_FUSED_GPU(float, float);
KERAS_SAPA_REGISTER_FUSED_GPU(double, double);
KERAS_SAPA_REGISTER_FUSED_GPU(Eigen::half, float);
KERAS_SAPA_REGISTER_FUSED_GPU(Eigen::bfloat16, float);
#undef KERAS_SAPA_REGISTER_FUSED_GPU

}  // namespace keras_sapa
