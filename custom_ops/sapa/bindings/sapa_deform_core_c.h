/* SAPA-D's plain C entry points in _sapa_core.so (sapa_deform_core_c.cc), beside SAPA's
 * (sapa_core_c.h, whose return codes and thread pool they share).
 *
 * Tensors are dense, channels last, row-major, with D = groups * E, GP = groups * points:
 *   query (B, s*H, s*W, D), key (B, H, W, D), value (B, H, W, C), C % groups == 0,
 *   offsets (B, s*H, s*W, 2*GP): channel 2k shifts the point k = g*points + p along the
 *   width, 2k+1 along the height, in low-resolution pixels;
 *   out and grad (B, s*H, s*W, C), weights and logits (B, s*H, s*W, GP).
 * weights is the per-group softmax that the backward needs (the forward skips it when
 * NULL). Every output is written whole. Each function takes the sizes
 *   (batch, height, width, up, points, groups, dim, channels)
 * (the halves ignore dim or channels: pass 0) and returns KERAS_SAPA_OK, or
 * KERAS_SAPA_BAD_SHAPE (nothing written) when a size is negative, up, points or
 * groups < 1, groups does not divide dim and channels, or (H+1)*(W+1) does not fit in
 * int32. Semantics: shared/SAPA_SPEC.md, section "SAPA-D".
 *
 *   keras_sapa_deform_forward_<t>(query, key, value, offsets, out, weights, sizes...)
 *   keras_sapa_deform_backward_<t>(grad, query, key, value, offsets, weights,
 *                                  grad_query, grad_key, grad_value, grad_offsets, ...)
 *
 * and the fused op's two halves (the frameworks bind them as ops of their own,
 * DeformSimilarity / DeformAggregate of the op table, float32 and float64):
 *
 *   keras_sapa_deform_similarity_<t>(query, key, offsets, logits, sizes...)
 *   keras_sapa_deform_similarity_backward_<t>(grad_logits, query, key, offsets,
 *                                             grad_query, grad_key, grad_offsets, ...)
 *   keras_sapa_deform_aggregate_<t>(weights, value, offsets, out, sizes...)
 *   keras_sapa_deform_aggregate_backward_<t>(grad, weights, value, offsets,
 *                                            grad_weights, grad_value, grad_offsets, ...)
 *
 * for <t> = f32 (float) and f64 (double); the fused pair also for f16 and bf16 (below).
 */
#ifndef KERAS_SAPA_BINDINGS_SAPA_DEFORM_CORE_C_H_
#define KERAS_SAPA_BINDINGS_SAPA_DEFORM_CORE_C_H_

#include <stdint.h>

#include "sapa_core_c.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KERAS_SAPA_DEFORM_SIZES                                                         \
  int64_t batch, int64_t height, int64_t width, int64_t up, int64_t points, int64_t groups, \
      int64_t dim, int64_t channels

/* The entry points of one element type T, named with `suffix`. */
#define KERAS_SAPA_DEFORM_DECLARE(suffix, T)                                                  \
  int keras_sapa_deform_forward_##suffix(const T* query, const T* key, const T* value,       \
                                         const T* offsets, T* out, T* weights,               \
                                         KERAS_SAPA_DEFORM_SIZES);                           \
  int keras_sapa_deform_backward_##suffix(                                                    \
      const T* grad, const T* query, const T* key, const T* value, const T* offsets,         \
      const T* weights, T* grad_query, T* grad_key, T* grad_value, T* grad_offsets,          \
      KERAS_SAPA_DEFORM_SIZES);                                                               \
  int keras_sapa_deform_similarity_##suffix(const T* query, const T* key, const T* offsets,  \
                                            T* logits, KERAS_SAPA_DEFORM_SIZES);             \
  int keras_sapa_deform_similarity_backward_##suffix(                                         \
      const T* grad_logits, const T* query, const T* key, const T* offsets, T* grad_query,   \
      T* grad_key, T* grad_offsets, KERAS_SAPA_DEFORM_SIZES);                                 \
  int keras_sapa_deform_aggregate_##suffix(const T* weights, const T* value, const T* offsets, \
                                           T* out, KERAS_SAPA_DEFORM_SIZES);                 \
  int keras_sapa_deform_aggregate_backward_##suffix(                                          \
      const T* grad, const T* weights, const T* value, const T* offsets, T* grad_weights,    \
      T* grad_value, T* grad_offsets, KERAS_SAPA_DEFORM_SIZES);

KERAS_SAPA_DEFORM_DECLARE(f32, float)
KERAS_SAPA_DEFORM_DECLARE(f64, double)

/* The fused pair in 16-bit storage, <t> = f16 (IEEE binary16) and bf16 (bfloat16): query,
 * key, value, offsets, out, grad and the gradients as their bits (uint16_t), converted
 * to float as the kernels read them; weights float32 (the backward's logits gradient is
 * the library's scratch, float32 too). */
#define KERAS_SAPA_DEFORM_HALF_DECLARE(suffix)                                               \
  int keras_sapa_deform_forward_##suffix(const uint16_t* query, const uint16_t* key,        \
                                         const uint16_t* value, const uint16_t* offsets,    \
                                         uint16_t* out, float* weights,                     \
                                         KERAS_SAPA_DEFORM_SIZES);                          \
  int keras_sapa_deform_backward_##suffix(                                                   \
      const uint16_t* grad, const uint16_t* query, const uint16_t* key,                     \
      const uint16_t* value, const uint16_t* offsets, const float* weights,                 \
      uint16_t* grad_query, uint16_t* grad_key, uint16_t* grad_value,                       \
      uint16_t* grad_offsets, KERAS_SAPA_DEFORM_SIZES);

KERAS_SAPA_DEFORM_HALF_DECLARE(f16)
KERAS_SAPA_DEFORM_HALF_DECLARE(bf16)

/* CUDA (see sapa_core_c.h's <c_abi>_cuda), on the launcher's entry points of the same
 * names (sapa_deform_forward, ..., sapa_deform_aggregate_backward); the fused backward's
 * scratch is the launcher's sapa_deform_workspace, the halves need none (dtype 0 or 3
 * only). KERAS_SAPA_NO_LAUNCHER where the launcher lacks the entry point. */
KERAS_SAPA_CUDA_DECLARE(keras_sapa_deform_forward)
KERAS_SAPA_CUDA_DECLARE(keras_sapa_deform_backward)

/* The halves' ops, X(Name, OpName, entry, stem): the op table's k<OpName>, the C entry
 * prefix <entry> and the launcher's sapa_<stem> (the bindings' handlers are named from
 * Name). */
#define KERAS_SAPA_DEFORM_HALVES(X)                                                         \
  X(DeformSimilarity, DeformSimilarity, keras_sapa_deform_similarity, deform_similarity)    \
  X(DeformSimilarityBackward, DeformSimilarityGrad, keras_sapa_deform_similarity_backward,  \
    deform_similarity_backward)                                                             \
  X(DeformAggregate, DeformAggregate, keras_sapa_deform_aggregate, deform_aggregate)        \
  X(DeformAggregateBackward, DeformAggregateGrad, keras_sapa_deform_aggregate_backward,     \
    deform_aggregate_backward)
#define KERAS_SAPA_DEFORM_HALVES_DECLARE(Name, OpName, entry, stem) KERAS_SAPA_CUDA_DECLARE(entry)
KERAS_SAPA_DEFORM_HALVES(KERAS_SAPA_DEFORM_HALVES_DECLARE)
#undef KERAS_SAPA_DEFORM_HALVES_DECLARE

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* KERAS_SAPA_BINDINGS_SAPA_DEFORM_CORE_C_H_ */
