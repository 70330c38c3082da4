// TensorFlow GPU adapter of the keras_sapa ops: DEVICE_GPU kernels that hand TensorFlow's
// CUDA stream and the tensors' device pointers to the framework-free launcher
// (custom_ops/sapa/launcher/), which runs the NVRTC-built kernels through the driver API.
// Compiled with g++ alone: no CUDA headers, no CUDA runtime, no nvcc.
//
// The kernels (shape checks, output allocation) are the device-generic ones of
// sapa_op_kernels.h; this file supplies their GpuTag functors: the window primitives, the
// fused KerasSapa>Sapa / SapaGrad (the launcher's sapa_forward / sapa_backward) and SAPA-D's
// SapaDeform / SapaDeformGrad (the launcher's sapa_deform_forward / sapa_deform_backward)
// and its halves DeformSimilarity / DeformAggregate with their gradients.
// The kernel images are looked up once, in the directory of this library (keras_sapa/_lib/).

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

// The launcher's sizes of a SAPA-D call (an InvalidArgument where they are too large).
tensorflow::Status Dims(const Call& c, SapaDeformDims* out) {
  DeformDims d;
  TF_RETURN_IF_ERROR(c.deform_dims(&d));
  *out = SapaDeformDims{d.batch, d.height, d.width, d.up, d.points, d.groups, d.dim, d.channels};
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

// launch(stream) (a launcher status) on the op's CUstream, the images loaded.
template <typename Fn>
tensorflow::Status OnStream(tensorflow::OpKernelContext* ctx, Fn launch) {
  TF_RETURN_IF_ERROR(LoadImages());
  void* stream = nullptr;
  TF_RETURN_IF_ERROR(Stream(ctx, &stream));
  return Launched(launch(stream));
}

// A launcher workspace from TensorFlow's allocator: size(dtype, &dims, &bytes) bytes.
template <typename Dims>
tensorflow::Status Workspace(const Call& c, int (*size)(int, const Dims*, size_t*), int dtype,
                             const Dims& dims, Tensor* out) {
  size_t bytes = 0;
  TF_RETURN_IF_ERROR(Launched(size(dtype, &dims, &bytes)));
  return c.ctx->allocate_temp(tensorflow::DT_INT8,
                              TensorShape({static_cast<int64_t>(bytes)}), out);
}

// A window primitive: launch(stream, dtype, dims, a, b, out).
template <typename T>
tensorflow::Status Window(tensorflow::OpKernelContext* ctx, const WindowDims& dims,
                          decltype(&sapa_dot) launch, const T* a, const T* b, T* out) {
  const SapaDims d = Dims(dims);
  return OnStream(ctx, [&](void* s) { return launch(s, Dtype<T>::value, &d, a, b, out); });
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
struct FusedOp<Fused::kSapaForward, GpuTag, T, F> {
  Status operator()(const Call& c) const {
    SapaDims d = gpu_adapter::Dims(c.dims(c.size("d")));
    d.channels_v = c.size("C");
    return gpu_adapter::OnStream(c.ctx, [&](void* stream) {
      return sapa_forward(stream, gpu_adapter::Dtype<T>::value, &d, c.in_data<T>(0),
                          c.in_data<T>(1), c.in_data<T>(2), c.out_data<T>(0), c.out_data<F>(1));
    });
  }
};

// The launcher's sapa_backward (the logits' gradient, then three deterministic gathers),
// its dlogits scratch (sapa_backward_workspace bytes) from TensorFlow's allocator.
template <typename T, typename F>
struct FusedOp<Fused::kSapaBackward, GpuTag, T, F> {
  Status operator()(const Call& c) const {
    const int dtype = gpu_adapter::Dtype<T>::value;
    SapaDims d = gpu_adapter::Dims(c.dims(c.size("d")));  // query/key channels
    d.channels_v = c.size("C");                           // value channels
    Tensor dlogits;
    TF_RETURN_IF_ERROR(gpu_adapter::Workspace(c, sapa_backward_workspace, dtype, d, &dlogits));
    return gpu_adapter::OnStream(c.ctx, [&](void* stream) {
      return sapa_backward(stream, dtype, &d, c.in_data<T>(0), c.in_data<T>(1), c.in_data<T>(2),
                           c.in_data<T>(3), c.in_data<F>(4), dlogits.flat<int8_t>().data(),
                           c.out_data<T>(0), c.out_data<T>(1), c.out_data<T>(2));
    });
  }
};

// SAPA-D: one fused forward launch; the backward's launches (the launcher's
// sapa_deform_backward) with a workspace from TensorFlow's allocator.
template <typename T, typename F>
struct FusedOp<Fused::kDeformForward, GpuTag, T, F> {
  Status operator()(const Call& c) const {
    SapaDeformDims d;
    TF_RETURN_IF_ERROR(gpu_adapter::Dims(c, &d));
    return gpu_adapter::OnStream(c.ctx, [&](void* stream) {
      return sapa_deform_forward(stream, gpu_adapter::Dtype<T>::value, &d, c.in_data<T>(0),
                                 c.in_data<T>(1), c.in_data<T>(2), c.in_data<T>(3),
                                 c.out_data<T>(0), c.out_data<F>(1));
    });
  }
};

template <typename T, typename F>
struct FusedOp<Fused::kDeformBackward, GpuTag, T, F> {
  Status operator()(const Call& c) const {
    const int dtype = gpu_adapter::Dtype<T>::value;
    SapaDeformDims d;
    TF_RETURN_IF_ERROR(gpu_adapter::Dims(c, &d));
    Tensor workspace;
    TF_RETURN_IF_ERROR(gpu_adapter::Workspace(c, sapa_deform_workspace, dtype, d, &workspace));
    return gpu_adapter::OnStream(c.ctx, [&](void* stream) {
      return sapa_deform_backward(stream, dtype, &d, c.in_data<T>(0), c.in_data<T>(1),
                                  c.in_data<T>(2), c.in_data<T>(3), c.in_data<T>(4),
                                  c.in_data<F>(5), workspace.flat<int8_t>().data(),
                                  c.out_data<T>(0), c.out_data<T>(1), c.out_data<T>(2),
                                  c.out_data<T>(3));
    });
  }
};

// SAPA-D's halves (sapa_op_kernels.h's DeformHalf, float and double): the launcher's
// sapa_deform_similarity / _aggregate and their backwards, the call's tensors in the
// table's order (no workspace).
template <DeformHalf kOp, typename T>
struct DeformHalfOp<kOp, GpuTag, T> {
  Status operator()(const Call& c) const {
    SapaDeformDims d;
    TF_RETURN_IF_ERROR(gpu_adapter::Dims(c, &d));
    const int dtype = gpu_adapter::Dtype<T>::value;
    const T *a = c.in_data<T>(0), *b = c.in_data<T>(1), *x = c.in_data<T>(2);
    return gpu_adapter::OnStream(c.ctx, [&](void* stream) {
      switch (kOp) {
        case DeformHalf::kSimilarity:
          return sapa_deform_similarity(stream, dtype, &d, a, b, x, c.out_data<T>(0));
        case DeformHalf::kAggregate:
          return sapa_deform_aggregate(stream, dtype, &d, a, b, x, c.out_data<T>(0));
        case DeformHalf::kSimilarityBackward:
          return sapa_deform_similarity_backward(stream, dtype, &d, a, b, x, c.in_data<T>(3),
                                                 c.out_data<T>(0), c.out_data<T>(1),
                                                 c.out_data<T>(2));
        default:
          return sapa_deform_aggregate_backward(stream, dtype, &d, a, b, x, c.in_data<T>(3),
                                                c.out_data<T>(0), c.out_data<T>(1),
                                                c.out_data<T>(2));
      }
    });
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
