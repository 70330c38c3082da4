// _sapa_jax.so: XLA FFI handlers of the fused SAPA forward and backward, for JAX
// (keras_sapa/ops/_jax_kernels.py registers them with jax.ffi.register_ffi_target).
// They call the C entry points of _sapa_core.so (linked, found through $ORIGIN), so JAX
// and PyTorch share one kernel build, one thread pool and one CUDA launcher glue.
//
//   keras_sapa_forward  (query, key, value; kernel_size, up_factor) -> (out, weights)
//   keras_sapa_backward (grad, query, key, value, weights; kernel_size, up_factor)
//                                                           -> (dquery, dkey, dvalue)
//
// float16 / bfloat16 go to the core in 16-bit storage (weights float32), converted per
// tile inside the kernels.
//
// Handlers: KerasSapaForward / KerasSapaBackward for the CPU platform, and
// KerasSapaForwardCuda / KerasSapaBackwardCuda for CUDA (on XLA's stream, through the
// CUDA launcher that _sapa_core.so opens: keras_sapa_cuda_open). The decoding and shape
// checks are the op table's (xla_ffi_ops.h).

#include "xla_ffi_ops.h"

KERAS_SAPA_CPU_HANDLER_HALF(KerasSapaForward, kSapa, keras_sapa_forward);
KERAS_SAPA_CPU_HANDLER_HALF(KerasSapaBackward, kSapaGrad, keras_sapa_backward);
KERAS_SAPA_CUDA_HANDLER(KerasSapaForwardCuda, kSapa, keras_sapa_forward);
KERAS_SAPA_CUDA_HANDLER(KerasSapaBackwardCuda, kSapaGrad, keras_sapa_backward);
