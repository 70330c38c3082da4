/* SAPA-D's plain C entry points in _sapa_core.so (sapa_deform_core_c.cc), beside SAPA's
 * (sapa_core_c.h, whose return codes and thread pool they share).
 *
 * Tensors are dense, channels last, row-major, with D = groups * E, GP = groups * points:
 *   query (B, s*H, s*W, D), key (B, H, W, D), value (B, H, W, C), C % groups == 0,
 *   offsets (B, s*H, s*W, 2*GP): channel 2k shifts the point k = g*points + p along the
 *   width, 2k+1 along the height, in low-resolution pixels;
 *   out and grad (B, s*H, s*W, C), weights (B, s*H, s*W, GP).
 * weights is the per-group softmax that the backward needs (the forward skips it when
 * NULL). Every output is written whole. Returns KERAS_SAPA_OK, or KERAS_SAPA_BAD_SHAPE
 * (nothing written) when a size is negative, up, points or groups < 1, groups does not
 * divide dim and channels, or (H+1)*(W+1) does not fit in int32. Semantics:
 * shared/SAPA_SPEC.md, section "SAPA-D".
 */
#ifndef KERAS_SAPA_BINDINGS_SAPA_DEFORM_CORE_C_H_
#define KERAS_SAPA_BINDINGS_SAPA_DEFORM_CORE_C_H_

#include <stdint.h>

#include "sapa_core_c.h"

#ifdef __cplusplus
extern "C" {
#endif

int keras_sapa_deform_forward_f32(const float* query, const float* key, const float* value,
                                  const float* offsets, float* out, float* weights,
                                  int64_t batch, int64_t height, int64_t width, int64_t up,
                                  int64_t points, int64_t groups, int64_t dim,
                                  int64_t channels);
int keras_sapa_deform_forward_f64(const double* query, const double* key, const double* value,
                                  const double* offsets, double* out, double* weights,
                                  int64_t batch, int64_t height, int64_t width, int64_t up,
                                  int64_t points, int64_t groups, int64_t dim,
                                  int64_t channels);

/* (grad_query, grad_key, grad_value, grad_offsets) of the forward, given its weights. */
int keras_sapa_deform_backward_f32(const float* grad, const float* query, const float* key,
                                   const float* value, const float* offsets,
                                   const float* weights, float* grad_query, float* grad_key,
                                   float* grad_value, float* grad_offsets, int64_t batch,
                                   int64_t height, int64_t width, int64_t up, int64_t points,
                                   int64_t groups, int64_t dim, int64_t channels);
int keras_sapa_deform_backward_f64(const double* grad, const double* query, const double* key,
                                   const double* value, const double* offsets,
                                   const double* weights, double* grad_query, double* grad_key,
                                   double* grad_value, double* grad_offsets, int64_t batch,
                                   int64_t height, int64_t width, int64_t up, int64_t points,
                                   int64_t groups, int64_t dim, int64_t channels);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* KERAS_SAPA_BINDINGS_SAPA_DEFORM_CORE_C_H_ */
