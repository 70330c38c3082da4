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
// Handlers: KerasSapaDeformForward / KerasSapaDeformBackward for the CPU platform,
// KerasSapaDeformForwardCuda / KerasSapaDeformBackwardCuda for CUDA (the launcher's SAPA-D
// entry points). The decoding and shape checks are the op table's (xla_ffi_ops.h).

#include "sapa_deform_core_c.h"
#include "xla_ffi_ops.h"

KERAS_SAPA_CPU_HANDLER_HALF(KerasSapaDeformForward, kSapaDeform, keras_sapa_deform_forward);
KERAS_SAPA_CPU_HANDLER_HALF(KerasSapaDeformBackward, kSapaDeformGrad,
                            keras_sapa_deform_backward);
KERAS_SAPA_CUDA_HANDLER(KerasSapaDeformForwardCuda, kSapaDeform, keras_sapa_deform_forward);
KERAS_SAPA_CUDA_HANDLER(KerasSapaDeformBackwardCuda, kSapaDeformGrad,
                        keras_sapa_deform_backward);
