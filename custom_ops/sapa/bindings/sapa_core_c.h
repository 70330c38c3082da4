/* Plain C entry points of the framework-free SAPA CPU kernels (_sapa_core.so), for
 * bindings that call them through a C ABI: PyTorch through ctypes
 * (keras_sapa/ops/_torch_kernels.py) and the XLA FFI handlers (sapa_xla_ffi.cc).
 *
 * Tensors are dense, channels last, row-major:
 *   query (B, s*H, s*W, dim), key (B, H, W, dim), value (B, H, W, channels),
 *   out and grad (B, s*H, s*W, channels), weights (B, s*H, s*W, K*K).
 * weights is the window softmax (padded points included) that the backward needs; the
 * forward skips it when weights is NULL. Every call runs on the library's thread pool
 * (KERAS_SAPA_NUM_THREADS threads, else the CPUs available) and returns 0, or
 * KERAS_SAPA_BAD_SHAPE when a size is negative, up < 1 or kernel is not a positive odd
 * integer (nothing is written then). The semantics are those of shared/SAPA_SPEC.md.
 *
 * Element types: _f32 (float) and _f64 (double) throughout; _f16 (IEEE binary16) and
 * _bf16 (bfloat16) take query, key, value, out, grad and the gradients as 16-bit storage
 * (their bits, uint16_t), converted to float tile by tile inside the kernels, and
 * weights in float32 (the accumulation type, as TensorFlow's Tweights).
 */
#ifndef KERAS_SAPA_BINDINGS_SAPA_CORE_C_H_
#define KERAS_SAPA_BINDINGS_SAPA_CORE_C_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KERAS_SAPA_CORE_ABI 1
#define KERAS_SAPA_OK 0
#define KERAS_SAPA_BAD_SHAPE 1
#define KERAS_SAPA_NO_LAUNCHER 2  /* CUDA: keras_sapa_cuda_open has not succeeded */
#define KERAS_SAPA_CUDA_FAILED 3  /* CUDA: the launcher failed (keras_sapa_cuda_error) */

/* KERAS_SAPA_CORE_ABI of the library: callers check it before anything else. */
int keras_sapa_core_abi(void);

/* Threads of the pool (the caller included); set_num_threads(n <= 0) restores the
 * default. Not to be called while kernels run. */
int keras_sapa_num_threads(void);
void keras_sapa_set_num_threads(int threads);

int keras_sapa_forward_f32(const float* query, const float* key, const float* value,
                           float* out, float* weights, int64_t batch, int64_t height,
                           int64_t width, int64_t up, int64_t kernel, int64_t dim,
                           int64_t channels);
int keras_sapa_forward_f64(const double* query, const double* key, const double* value,
                           double* out, double* weights, int64_t batch, int64_t height,
                           int64_t width, int64_t up, int64_t kernel, int64_t dim,
                           int64_t channels);

/* (grad_query, grad_key, grad_value) of the forward, given its weights (the softmax's
 * logits gradient is scratch of the library, in the weights' type). */
int keras_sapa_backward_f32(const float* grad, const float* query, const float* key,
                            const float* value, const float* weights, float* grad_query,
                            float* grad_key, float* grad_value, int64_t batch,
                            int64_t height, int64_t width, int64_t up, int64_t kernel,
                            int64_t dim, int64_t channels);
int keras_sapa_backward_f64(const double* grad, const double* query, const double* key,
                            const double* value, const double* weights, double* grad_query,
                            double* grad_key, double* grad_value, int64_t batch,
                            int64_t height, int64_t width, int64_t up, int64_t kernel,
                            int64_t dim, int64_t channels);

/* 16-bit storage (see above): inputs and outputs as bits, weights float32. */
#define KERAS_SAPA_HALF_DECLARE(suffix)                                                      \
  int keras_sapa_forward_##suffix(const uint16_t* query, const uint16_t* key,               \
                                  const uint16_t* value, uint16_t* out, float* weights,     \
                                  int64_t batch, int64_t height, int64_t width, int64_t up, \
                                  int64_t kernel, int64_t dim, int64_t channels);           \
  int keras_sapa_backward_##suffix(const uint16_t* grad, const uint16_t* query,             \
                                   const uint16_t* key, const uint16_t* value,              \
                                   const float* weights, uint16_t* grad_query,              \
                                   uint16_t* grad_key, uint16_t* grad_value, int64_t batch, \
                                   int64_t height, int64_t width, int64_t up,               \
                                   int64_t kernel, int64_t dim, int64_t channels);

KERAS_SAPA_HALF_DECLARE(f16)
KERAS_SAPA_HALF_DECLARE(bf16)

/* CUDA, through the launcher (custom_ops/sapa/launcher/sapa_launcher.h, its C API the
 * only contract): keras_sapa_cuda_open dlopens libsapa_launcher.so at `launcher_path`
 * and registers the kernel images in `image_dir` (NULL: none, the caller registered
 * them through the launcher itself). Until it succeeds, the CUDA entry points return
 * KERAS_SAPA_NO_LAUNCHER. Opening another path later replaces the launcher (for tests).
 * keras_sapa_cuda_error: the last CUDA failure's message on this thread. */
int keras_sapa_cuda_open(const char* launcher_path, const char* image_dir);
const char* keras_sapa_cuda_error(void);

/* <c_abi>_cuda(stream, dtype, tensors, sizes, scratch): an op on a CUstream (NULL: the
 * current context's default stream), every tensor a device pointer, inputs then
 * outputs in the op table's order, `sizes` the CPU entry point's size arguments, dtype
 * the launcher's SapaDtype (0 float32, 3 float64; 1 float16 and 2 bfloat16 keep
 * `weights` in float32), `scratch` device memory of <c_abi>_cuda_scratch bytes (256-byte
 * aligned; NULL when 0). Asynchronous on the stream. <c_abi>_cuda_scratch sets *bytes. */
typedef int (*KerasSapaCudaFn)(void* stream, int dtype, void* const* tensors,
                               const int64_t* sizes, void* scratch);
typedef int (*KerasSapaCudaScratchFn)(int dtype, const int64_t* sizes, int64_t* bytes);
#define KERAS_SAPA_CUDA_DECLARE(prefix)                                                     \
  int prefix##_cuda(void* stream, int dtype, void* const* tensors, const int64_t* sizes, \
                    void* scratch);                                                      \
  int prefix##_cuda_scratch(int dtype, const int64_t* sizes, int64_t* bytes);

KERAS_SAPA_CUDA_DECLARE(keras_sapa_forward)
KERAS_SAPA_CUDA_DECLARE(keras_sapa_backward)

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* KERAS_SAPA_BINDINGS_SAPA_CORE_C_H_ */
