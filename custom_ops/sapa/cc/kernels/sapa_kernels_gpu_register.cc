// Registers the CUDA kernels (sapa_kernels_gpu.cu.cc) for DEVICE_GPU. Built into the
// separate library _sapa_ops_gpu.so, loaded after _sapa_ops.so (which defines the ops).

#if GOOGLE_CUDA

#include "sapa_kernels.h"
#include "sapa_op_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace keras_sapa {
namespace functor {

#define KERAS_SAPA_DECLARE_GPU(T)                    \
  extern template struct WindowDot<GpuTag, T>;       \
  extern template struct WindowGather<GpuTag, T>;    \
  extern template struct WindowScatter<GpuTag, T>;
KERAS_SAPA_DECLARE_GPU(float);
KERAS_SAPA_DECLARE_GPU(double);
KERAS_SAPA_DECLARE_GPU(Eigen::half);
KERAS_SAPA_DECLARE_GPU(Eigen::bfloat16);
#undef KERAS_SAPA_DECLARE_GPU

}  // namespace functor

#define KERAS_SAPA_REGISTER_GPU(T) KERAS_SAPA_REGISTER_KERNELS(tensorflow::DEVICE_GPU, GpuTag, T)
KERAS_SAPA_REGISTER_GPU(float);
KERAS_SAPA_REGISTER_GPU(double);
KERAS_SAPA_REGISTER_GPU(Eigen::half);
KERAS_SAPA_REGISTER_GPU(Eigen::bfloat16);
#undef KERAS_SAPA_REGISTER_GPU

}  // namespace keras_sapa

#endif  // GOOGLE_CUDA
