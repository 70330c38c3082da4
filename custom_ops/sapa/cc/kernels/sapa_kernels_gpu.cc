// TensorFlow GPU adapter of the keras_sapa ops: DEVICE_GPU kernels that hand TensorFlow's
// CUDA stream and the tensors' device pointers to the framework-free launcher
// (custom_ops/sapa/launcher/), which runs the NVRTC-built kernels through the driver API.
// Compiled with g++ alone: no CUDA headers, no CUDA runtime, no nvcc.
//
// The kernels (shape checks, output allocation) are the device-generic ones of
// sapa_op_kernels.h; this file supplies their GpuTag functors: the window primitives and
// the fused KerasSapa>Sapa / SapaGrad (one fused forward launch; the backward is the logits
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

tensorflow::Status Launched(int status) {
  if (status != SAPA_OK) {
    return tsl::errors::Internal("keras_sapa GPU kernel failed (status ", status, "): ",
                                 sapa_last_error());
  }
  return absl::OkStatus();
}

// The images loaded and the op's CUstream.
tensorflow::Status Prepare(tensorflow::OpKernelContext* ctx, void** stream) {
  TF_RETURN_IF_ERROR(LoadImages());
  return Stream(ctx, stream);
}

// A window primitive: launch(stream, dtype, dims, a, b, out).
template <typename T>
tensorflow::Status Window(tensorflow::OpKernelContext* ctx, const WindowDims& dims,
                          decltype(&sapa_dot) launch, const T* a, const T* b, T* out) {
  void* stream = nullptr;
  TF_RETURN_IF_ERROR(Prepare(ctx, &stream));
  const SapaDims d = Dims(dims);
  return Launched(launch(stream, Dtype<T>::value, &d, a, b, out));
}

}  // namespace gpu_adapter

namespace functor {

template <typename T>
struct WindowDot<GpuTag, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* hi, const T* lo,
                    T* out) const {
    return gpu_adapter::Window<T>(ctx, d, sapa_dot, hi, lo, out);
  }
};

template <typename T>
struct WindowGather<GpuTag, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* lo,
                    T* out) const {
    return gpu_adapter::Window<T>(ctx, d, sapa_gather, w, lo, out);
  }
};

template <typename T>
struct WindowScatter<GpuTag, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* hi,
                    T* out) const {
    return gpu_adapter::Window<T>(ctx, d, sapa_scatter, w, hi, out);
  }
};

// One fused forward launch; F is the type of the weights (the accumulation type).
template <typename T, typename F>
struct SapaForward<GpuTag, T, F> {
  Status operator()(OpKernelContext* ctx, const WindowDims& dims, int64_t channels,
                    const Tensor& query, const Tensor& key, const Tensor& value, Tensor* output,
                    Tensor* weights) const {
    void* stream = nullptr;
    TF_RETURN_IF_ERROR(gpu_adapter::Prepare(ctx, &stream));
    SapaDims d = gpu_adapter::Dims(dims);
    d.channels_v = channels;
    return gpu_adapter::Launched(sapa_forward(
        stream, gpu_adapter::Dtype<T>::value, &d, query.flat<T>().data(), key.flat<T>().data(),
        value.flat<T>().data(), output->flat<T>().data(), weights->flat<F>().data()));
  }
};

// dlogits = weights * (Dot(grad, v) - <weights, .>), then grad_query = Gather(dlogits,
// key), grad_key = Scatter(dlogits, query), grad_value = Scatter(weights, grad).
template <typename T, typename F>
struct SapaBackward<GpuTag, T, F> {
  Status operator()(OpKernelContext* ctx, const WindowDims& dims, int64_t channels,
                    const Tensor& grad, const Tensor& query, const Tensor& key,
                    const Tensor& value, const Tensor& weights, Tensor* grad_query,
                    Tensor* grad_key, Tensor* grad_value) const {
    void* stream = nullptr;
    TF_RETURN_IF_ERROR(gpu_adapter::Prepare(ctx, &stream));
    Tensor dlogits;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DataTypeToEnum<F>::value,
                                          weights.shape(), &dlogits));
    const int dtype = gpu_adapter::Dtype<T>::value;
    SapaDims dq = gpu_adapter::Dims(dims);  // query/key channels
    SapaDims dv = dq;                       // value channels
    dv.channels = channels;
    dv.channels_v = channels;
    const F* w = weights.flat<F>().data();
    F* dl = dlogits.flat<F>().data();
    using gpu_adapter::Launched;
    TF_RETURN_IF_ERROR(Launched(sapa_softmax_backward(stream, dtype, &dv, grad.flat<T>().data(),
                                                      value.flat<T>().data(), w, dl)));
    TF_RETURN_IF_ERROR(Launched(sapa_gather_acc(stream, dtype, &dq, dl, key.flat<T>().data(),
                                                grad_query->flat<T>().data())));
    TF_RETURN_IF_ERROR(Launched(sapa_scatter_acc(stream, dtype, &dq, dl, query.flat<T>().data(),
                                                 grad_key->flat<T>().data())));
    return Launched(sapa_scatter_acc(stream, dtype, &dv, w, grad.flat<T>().data(),
                                     grad_value->flat<T>().data()));
  }
};

}  // namespace functor

// Every op of the table, for every type it lists, on DEVICE_GPU.
#define KERAS_SAPA_GPU_KERNEL(NAME, T, F) \
  KERAS_SAPA_REGISTER_KERNEL_TYPED(tensorflow::DEVICE_GPU, GpuTag, NAME, T, F)
#define KERAS_SAPA_GPU_OP(NAME) KERAS_SAPA_OP_TYPES_##NAME(KERAS_SAPA_GPU_KERNEL, NAME)
KERAS_SAPA_OPS_GPU(KERAS_SAPA_GPU_OP)
#undef KERAS_SAPA_GPU_OP
#undef KERAS_SAPA_GPU_KERNEL

}  // namespace keras_sapa
