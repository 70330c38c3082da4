// Entry points of the SAPA CUDA kernels (sapa_kernels.cuh), one extern "C" __global__
// function per instantiation so that the driver API finds them by a plain name:
//
//   sapa_dot_<t>_k<K>        tiled dot, K in {3, 5, 7}
//   sapa_dsoftmax_<t>_k<K>   tiled dot with the softmax-backward epilogue
//   sapa_fused_<t>_k<K>      tiled fused forward (softmax(dot) then gather)
//   sapa_gather_<t>[_wacc]   tiled gather (any K)
//   sapa_scatter_<t>[_wacc]  tiled scatter (any K)
//   sapa_dot_<t>_any, sapa_dsoftmax_<t>_any, sapa_fused_<t>_any, sapa_gather_<t>[_wacc]_any,
//   sapa_scatter_<t>[_wacc]_any   untiled, any K and s
//
// <t> is f32, f16, bf16 or f64. The weights of the fused kernels (attn) and the logits
// gradient of dsoftmax are in the accumulation type (float; double for f64); the _wacc
// gather/scatter (f16, bf16) read such weights, the plain ones read weights of type <t>.
// The list is mirrored in launcher/sapa_launcher.cc and checked by tests/test_cuda_build.py
// against the compiled images.

#include "sapa_kernels.cuh"
// SAPA-D's entry points (sapa_deform_*, listed in that header), in the same images.
#include "sapa_deform_kernels.cuh"

#define SAPA_ARGS ::sapa::Args g
#define SAPA_ACC(T) typename ::sapa::Acc<T>::type
// Launch bounds, chosen so that no kernel spills registers on any target
// (custom_ops/build.py runs ptxas verbose and fails the build on a spill; the table is
// recorded in build_info.json and checked by tests/test_cuda_build.py). A minimum of
// blocks per SM tells ptxas how many registers it may use, 65536 / (threads * blocks) at
// most 255; with the thread count alone it aimed lower and spilled on sm_60 / sm_70.
//
// The window and untiled kernels run 256 threads per block (the launcher's choice): up to
// 128 registers each, two blocks per SM.
#define SAPA_WINDOW_THREADS 256
#define SAPA_KERNEL extern "C" __global__ void __launch_bounds__(SAPA_WINDOW_THREADS, 2)
// The tiled dot / dsoftmax / fused kernels keep K*K logits (in the accumulation type) in
// registers: larger windows and double precision get fewer threads per block and so more
// registers per thread. The launcher reads each kernel's limit
// (CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK) when it sizes the tiles.
#define SAPA_TILED_THREADS(T, K) \
  ((K) >= 7 ? 256 : (K) == 5 ? (sizeof(T) == 8 ? 256 : 512) : (sizeof(T) == 8 ? 512 : 1024))
#define SAPA_BOUNDS_K3(T) __launch_bounds__(SAPA_TILED_THREADS(T, 3), 1)
#define SAPA_BOUNDS_K5(T) __launch_bounds__(SAPA_TILED_THREADS(T, 5), 1)
// K = 7 (49 logits; 98 registers in double): the thread count alone, which leaves ptxas
// its own schedule (with a minimum of one block it spilled the double kernel at 255).
#define SAPA_BOUNDS_K7(T) __launch_bounds__(SAPA_TILED_THREADS(T, 7))
#define SAPA_KERNEL_K(T, K) extern "C" __global__ void SAPA_BOUNDS_K##K(T)

#define SAPA_TILED_K(TN, T, A, K)                                                       \
  SAPA_KERNEL_K(T, K)                                                                   \
  sapa_dot_##TN##_k##K(SAPA_ARGS, const T* hi, const T* lo, T* out) {                   \
    ::sapa::dot_tiled<T, K, 0, T>(g, hi, lo, nullptr, out);                             \
  }                                                                                     \
  SAPA_KERNEL_K(T, K)                                                                   \
  sapa_dsoftmax_##TN##_k##K(SAPA_ARGS, const T* hi, const T* lo, const A* attn, A* out) { \
    ::sapa::dot_tiled<T, K, 1, A>(g, hi, lo, attn, out);                                \
  }                                                                                     \
  SAPA_KERNEL_K(T, K)                                                                   \
  sapa_fused_##TN##_k##K(SAPA_ARGS, const T* q, const T* k, const T* v, T* out, A* attn) { \
    ::sapa::fused_tiled<T, K>(g, q, k, v, out, attn);                                   \
  }

// Gather and scatter reading weights of type W; SUFFIX is "" (W = T) or _wacc (W = A).
#define SAPA_WINDOW(TN, T, W, SUFFIX)                                                       \
  SAPA_KERNEL sapa_gather_##TN##SUFFIX(SAPA_ARGS, const W* w, const T* lo, T* out) {        \
    ::sapa::gather_tiled<T, W>(g, w, lo, out);                                              \
  }                                                                                         \
  SAPA_KERNEL sapa_scatter_##TN##SUFFIX(SAPA_ARGS, const W* w, const T* hi, T* out) {       \
    ::sapa::scatter_tiled<T, W>(g, w, hi, out);                                             \
  }                                                                                         \
  SAPA_KERNEL sapa_gather_##TN##SUFFIX##_any(SAPA_ARGS, const W* w, const T* lo, T* out) {  \
    ::sapa::gather_any<T, W>(g, w, lo, out);                                                \
  }                                                                                         \
  SAPA_KERNEL sapa_scatter_##TN##SUFFIX##_any(SAPA_ARGS, const W* w, const T* hi, T* out) { \
    ::sapa::scatter_any<T, W>(g, w, hi, out);                                               \
  }

#define SAPA_TYPE(TN, T, A)                                                                 \
  SAPA_TILED_K(TN, T, A, 3)                                                                 \
  SAPA_TILED_K(TN, T, A, 5)                                                                 \
  SAPA_TILED_K(TN, T, A, 7)                                                                 \
  SAPA_WINDOW(TN, T, T, )                                                                   \
  SAPA_KERNEL sapa_dot_##TN##_any(SAPA_ARGS, const T* hi, const T* lo, T* out) {            \
    ::sapa::dot_any<T>(g, hi, lo, out);                                                     \
  }                                                                                         \
  SAPA_KERNEL sapa_dsoftmax_##TN##_any(SAPA_ARGS, const T* hi, const T* lo, const A* attn,  \
                                       A* out) {                                            \
    ::sapa::softmax_grad_any<T>(g, hi, lo, attn, out);                                      \
  }                                                                                         \
  SAPA_KERNEL sapa_fused_##TN##_any(SAPA_ARGS, const T* q, const T* k, const T* v, T* out,  \
                                    A* attn) {                                              \
    ::sapa::fused_any<T>(g, q, k, v, out, attn);                                            \
  }

SAPA_FOR_EACH_TYPE(SAPA_TYPE)
SAPA_FOR_EACH_WACC(SAPA_WINDOW)
