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

/* (grad_query, grad_key, grad_value) of the forward, given its weights. */
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

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* KERAS_SAPA_BINDINGS_SAPA_CORE_C_H_ */
