// SAPA-D's XLA FFI handlers (CPU) in _sapa_jax.so, beside SAPA's (sapa_xla_ffi.cc), for
// JAX (keras_sapa/ops/_jax_deform_kernels.py registers them). They call the C entry points
// of _sapa_core.so (sapa_deform_core_c.h), so JAX and PyTorch share one kernel build and
// one thread pool.
//
//   keras_sapa_deform_forward  (query, key, value, offsets; num_points, up_factor, groups)
//                                                        -> (out, weights)
//   keras_sapa_deform_backward (grad, query, key, value, offsets, weights; same attributes)
//                                                        -> (dquery, dkey, dvalue, doffsets)
//
// and the fused op's halves (the table's DeformSimilarity / DeformAggregate and their
// gradients), each on its C entry point of the same name:
//
//   keras_sapa_deform_similarity           (query, key, offsets; attributes) -> logits
//   keras_sapa_deform_similarity_backward  (grad, query, key, offsets) -> (dquery, dkey,
//                                                                         doffsets)
//   keras_sapa_deform_aggregate            (weights, value, offsets) -> out
//   keras_sapa_deform_aggregate_backward   (grad, weights, value, offsets) -> (dweights,
//                                                                   dvalue, doffsets)
//
// Handlers: KerasSapaDeform<Op> for the CPU platform (KerasSapaDeformForward, ...,
// KerasSapaDeformAggregateBackward), KerasSapaDeform<Op>Cuda for CUDA (the launcher's
// SAPA-D entry points). The decoding and shape checks are the op table's (xla_ffi_ops.h).

#include "sapa_deform_core_c.h"
#include "xla_ffi_ops.h"

KERAS_SAPA_CPU_HANDLER_HALF(KerasSapaDeformForward, kSapaDeform, keras_sapa_deform_forward);
KERAS_SAPA_CPU_HANDLER_HALF(KerasSapaDeformBackward, kSapaDeformGrad,
                            keras_sapa_deform_backward);
KERAS_SAPA_CUDA_HANDLER(KerasSapaDeformForwardCuda, kSapaDeform, keras_sapa_deform_forward);
KERAS_SAPA_CUDA_HANDLER(KerasSapaDeformBackwardCuda, kSapaDeformGrad,
                        keras_sapa_deform_backward);
// The CPU and CUDA handlers of each half.
#define KERAS_SAPA_DEFORM_HALF_HANDLERS(Name, OpName, entry, stem) \
  KERAS_SAPA_CPU_HANDLER(KerasSapa##Name, k##OpName, entry);     \
  KERAS_SAPA_CUDA_HANDLER(KerasSapa##Name##Cuda, k##OpName, entry);
KERAS_SAPA_DEFORM_HALVES(KERAS_SAPA_DEFORM_HALF_HANDLERS)
#undef KERAS_SAPA_DEFORM_HALF_HANDLERS
