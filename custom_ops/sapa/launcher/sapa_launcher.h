// C interface of the SAPA kernel launcher: loads the NVRTC-built kernel images
// (keras_sapa/_lib/sapa_kernels.<target>.{cubin,ptx}) and launches them on a caller's
// CUDA stream through the driver API, which it opens with dlopen("libcuda.so.1"). No
// framework, no CUDA runtime, no CUDA headers: callers are the TensorFlow GPU adapter
// (custom_ops/sapa/cc/kernels/sapa_kernels_gpu.cc), the JAX/PyTorch CUDA bindings
// (custom_ops/sapa/bindings/sapa_core_c.cc, through dlopen) and, through ctypes,
// scripts/gpu_harness.py.
//
// Every function returns a SapaStatus; on failure sapa_last_error() (per thread) says
// what went wrong. Tensors are contiguous, channels last; pointers are device pointers;
// `stream` is a CUstream (NULL: the legacy default stream of the current context).
//
// Contexts: every entry point that touches the GPU pushes a context for its whole
// duration and pops it before returning, so it works from any thread, whatever context
// that thread has current: the stream's own context (cuStreamGetCtx), or for a NULL
// stream the calling thread's current context, else the primary context of the thread's
// device (sapa_set_device, default 0), which the launcher retains. Loaded modules are
// cached per (device, context): a context that is reset or replaced (a new context ID,
// cuCtxGetId, CUDA 12.0+ drivers) and a second device load their own module instead of
// reusing a stale handle. All entry points are thread-safe.

#ifndef KERAS_SAPA_LAUNCHER_SAPA_LAUNCHER_H_
#define KERAS_SAPA_LAUNCHER_SAPA_LAUNCHER_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum SapaStatus {
  SAPA_OK = 0,
  SAPA_ERR_NO_DRIVER = 1,   // libcuda.so.1 cannot be loaded or lacks a symbol
  SAPA_ERR_DRIVER = 2,      // a driver call failed (cuInit, context, attributes)
  SAPA_ERR_NO_IMAGE = 3,    // no kernel image for this GPU's architecture
  SAPA_ERR_LAUNCH = 4,      // cuLaunchKernel failed
  SAPA_ERR_INVALID = 5,     // bad arguments (dtype, sizes)
  SAPA_ERR_IO = 6,          // an image file cannot be read
  SAPA_ERR_MISMATCH = 7,    // sapa_self_test: a kernel's result differs from the CPU's
};

enum SapaDtype { SAPA_F32 = 0, SAPA_F16 = 1, SAPA_BF16 = 2, SAPA_F64 = 3 };

// Sizes of one call. hi = (batch, up*height, up*width, channels), lo = (batch, height,
// width, channels), weights = (batch, up*height, up*width, kernel*kernel); the fused
// forward's value and output have channels_v channels.
typedef struct SapaDims {
  int64_t batch, height, width, up, kernel, channels, channels_v;
} SapaDims;

const char* sapa_last_error(void);

// Opens the driver (driver_path NULL: "libcuda.so.1") and calls cuInit. Idempotent;
// called by every launch. SAPA_ERR_NO_DRIVER when the library cannot be opened.
int sapa_init(const char* driver_path);

// Registers a kernel image: target "sm_XY" (cubin) or "compute_XY" (PTX, NUL-terminated
// text). The data are copied.
int sapa_add_image(const char* target, const void* data, size_t size);
// Registers every sapa_kernels.<target>.cubin / .ptx file in dir; sets *count.
int sapa_load_image_dir(const char* dir, int* count);
// Forgets every image (not the modules already loaded). For tests.
void sapa_clear_images(void);
// The image chosen for compute capability major.minor: the newest cubin of the same
// major and minor <= the device's, else the newest PTX not newer than the device.
// Needs no GPU. SAPA_ERR_NO_IMAGE when none fits.
int sapa_select_image(int major, int minor, char* target, size_t target_size);
// The compute capability of the stream's device and the image chosen for it.
int sapa_device_info(void* stream, int* major, int* minor, char* target, size_t target_size);
// 1: use only the untiled kernels (for tests); 0: choose (default).
void sapa_set_untiled(int untiled);
// Name, grid, block and dynamic shared memory of the last launch on this thread.
int sapa_last_launch(char* name, size_t name_size, int64_t* grid, int* block, int* smem);

// --- Added in the second version of this interface (all earlier functions unchanged).

// The device whose primary context NULL-stream calls use on this thread when it has no
// current context (ordinal, default 0). SAPA_ERR_INVALID when negative.
int sapa_set_device(int ordinal);
// Modules loaded so far (one per (device, context) the launcher has run on, reloads
// after a context reset included); *entries: (device, context) entries in the cache.
int sapa_module_loads(int* loads, int* entries);

// Tiled launches use tile sizes chosen per (kernel, dtype, up, K) from the device's
// limits and occupancy. Only up <= SAPA_TILED_MAX_UP is tiled (larger factors use the
// untiled kernels), so the configurations a device can get form a finite list, which
// sapa_launch_configs enumerates and sapa_self_test runs.
#define SAPA_TILED_MAX_UP 8

typedef struct SapaLaunchConfig {
  char kernel[48];  // e.g. "sapa_fused_f16_k5"; untiled kernels end in "_any"
  int tile;         // anchors per tile side (SAPA-D: output points per block step); 0
                    // for an untiled kernel
  int block, smem;  // threads per block, dynamic shared memory in bytes
  int up, ksize;    // the (up, K) it is chosen for (an untiled kernel: the first); SAPA-D
                    // kernels: up and the points per output point G*P of the self-test
} SapaLaunchConfig;

// Every launch configuration the launcher can choose on the stream's device for dtype:
// for each entry point, up in 1..SAPA_TILED_MAX_UP and each odd K for which a tiled
// kernel fits, the kernel and tile it picks (block and shared memory depend on tile, up
// and K), each distinct (kernel, tile, up, K) once, and each untiled kernel once; then
// SAPA-D's fused kernels (sapa_deform_forward / _backward and the kernels they launch),
// each tile once (its shared memory grows with G*P: the entry lists it for the G*P the
// self-test runs). The halves' per-point kernels (sapa_deform_similarity / _aggregate and
// their backwards) are not listed yet, nor run by sapa_self_test: they are tested under the
// emulated driver only. Writes min(*count, capacity) entries; *count is the total.
int sapa_launch_configs(void* stream, int dtype, SapaLaunchConfig* out, int capacity,
                        int* count);

// First-use self-test. flags: a mask of dtypes (1 << SAPA_F32 | ... ; 0: all four), plus
// SAPA_SELF_TEST_PER_TILE to run only the first (up, K) of each (kernel, tile) instead of
// every configuration of sapa_launch_configs. Each configuration runs through the public
// entry points on a small case (two tiles per side, the second partial; batch 2; channels
// past one 16/32-wide chunk; SAPA-D: forward and backward, two or more tiles, offsets
// that drop some points; SAPA's fused backward, sapa_backward, once on the tiled kernels
// and once on the untiled ones) on the stream's device (it allocates, copies and
// synchronises itself) and is compared with a float64 CPU loop reference in this library (tolerance
// relative to 1 + |reference|: f64 1e-10, f32 1e-4, f16 4e-3, bf16 3e-2; unwritten
// elements fail). SAPA_OK when all agree; SAPA_ERR_MISMATCH with the first difference in
// sapa_last_error() (kernel, tile, block, shared memory, dtype, case, element, both
// values); SAPA_ERR_LAUNCH when a kernel faults (the context is then unusable); other
// statuses when the GPU cannot be used. *cases: entry-point runs (configurations).
#define SAPA_SELF_TEST_PER_TILE 256
int sapa_self_test(void* stream, int flags, int* cases);

// out (B,sH,sW,K*K) = dot(hi, lo)
int sapa_dot(void* stream, int dtype, const SapaDims* dims, const void* hi, const void* lo,
             void* out);
// out (B,sH,sW,D) = gather(w, lo)
int sapa_gather(void* stream, int dtype, const SapaDims* dims, const void* w, const void* lo,
                void* out);
// out (B,H,W,D) = scatter(w, hi)
int sapa_scatter(void* stream, int dtype, const SapaDims* dims, const void* w, const void* hi,
                 void* out);
// gather / scatter whose weights are in the accumulation type (float; double for F64).
int sapa_gather_acc(void* stream, int dtype, const SapaDims* dims, const void* w,
                    const void* lo, void* out);
int sapa_scatter_acc(void* stream, int dtype, const SapaDims* dims, const void* w,
                     const void* hi, void* out);
// Fused forward: attn = softmax(dot(q, k)) (B,sH,sW,K*K) in the accumulation type;
// out = gather(attn, v) (B,sH,sW,channels_v). q and k have `channels` channels.
int sapa_forward(void* stream, int dtype, const SapaDims* dims, const void* q, const void* k,
                 const void* v, void* out, void* attn);
// Gradient of the logits, in the accumulation type: out = attn * (dot(grad, v) -
// <attn, dot(grad, v)>); grad and v have `channels` channels, attn is the forward's.
int sapa_softmax_backward(void* stream, int dtype, const SapaDims* dims, const void* grad,
                          const void* v, const void* attn, void* out);

// --- Added with SAPA's fused backward entry point (all earlier functions unchanged).

// Bytes of the dlogits scratch sapa_backward needs for these sizes: the logits' gradient,
// (B, sH, sW, K*K) in the accumulation type (4 bytes per element; 8 for F64).
int sapa_backward_workspace(int dtype, const SapaDims* dims, size_t* bytes);
// Gradients of the fused forward with respect to query, key and value, from the
// output's gradient and the forward's attn (accumulation type), for the sizes of
// sapa_forward: query and key have `channels` channels (d), value, grad and grad_value
// `channels_v` (C). Four launches on the stream: dlogits = sapa_softmax_backward(grad,
// value, attn), grad_query = gather(dlogits, key), grad_key = scatter(dlogits, query),
// grad_value = scatter(attn, grad), each deterministic (no atomics). dlogits: device
// memory of sapa_backward_workspace bytes (its contents on return are the logits'
// gradient). The TensorFlow GPU adapter and the JAX/PyTorch CUDA bindings call this.
int sapa_backward(void* stream, int dtype, const SapaDims* dims, const void* grad,
                  const void* query, const void* key, const void* value, const void* attn,
                  void* dlogits, void* grad_query, void* grad_key, void* grad_value);

// --- SAPA-D (dynamic point selection; shared/SAPA_SPEC.md, section "SAPA-D").
//
// Sizes of one call, D = groups*E and C = groups*Cg: query (B, up*H, up*W, D), key (B, H,
// W, D), value (B, H, W, C), offsets (B, up*H, up*W, 2*groups*points) (channel 2k the
// shift along the width, 2k+1 along the height of point k = g*points + p), output and
// its gradient (B, up*H, up*W, C), attn (B, up*H, up*W, groups*points) in the
// accumulation type. D and C must be multiples of groups, (H+1)*(W+1) below 2**31.
typedef struct SapaDeformDims {
  int64_t batch, height, width, up, points, groups, dim, channels;
} SapaDeformDims;

// Fused forward: attn = softmax over the points of each group of the similarities at
// the sampled positions (NULL: not written), output = their weighted sum of the sampled
// values. One launch; blocks take `tile` output points at a time, the largest power of
// two with tile*G*P <= the block (256 threads).
int sapa_deform_forward(void* stream, int dtype, const SapaDeformDims* dims, const void* query,
                        const void* key, const void* value, const void* offsets, void* output,
                        void* attn);
// Bytes of device workspace sapa_deform_backward needs for these sizes.
int sapa_deform_workspace(int dtype, const SapaDeformDims* dims, size_t* bytes);
// Gradients of the fused forward with respect to query, key, value and offsets, from the
// output's gradient and the forward's attn: the logits' gradient, the query and offsets
// gradients per output point, then the key and value gradients (a scatter with atomics
// into an accumulation-type buffer, converted for f16/bf16): several launches on the
// stream, none of them deterministic in its summation order. workspace: device memory
// of sapa_deform_workspace bytes, 256-byte aligned.
int sapa_deform_backward(void* stream, int dtype, const SapaDeformDims* dims, const void* grad,
                         const void* query, const void* key, const void* value,
                         const void* offsets, const void* attn, void* workspace,
                         void* grad_query, void* grad_key, void* grad_value,
                         void* grad_offsets);

// --- SAPA-D's halves (float32 and float64 only: SAPA_ERR_INVALID for the others), with
// sapa_deform_forward's sizes (dim 0 for the aggregation's, channels 0 for the
// similarity's; each checks them). logits and weights: (B, up*H, up*W, groups*points).

// logits = the similarity of each query group with the key sampled at each of its points
// (0 for a dropped point). One launch.
int sapa_deform_similarity(void* stream, int dtype, const SapaDeformDims* dims,
                           const void* query, const void* key, const void* offsets,
                           void* logits);
// Its gradients with respect to query, key and offsets from the logits' gradient: per
// output point, then the key's (a scatter with atomics: its summation order is not
// fixed). Three launches, no workspace.
int sapa_deform_similarity_backward(void* stream, int dtype, const SapaDeformDims* dims,
                                    const void* grad_logits, const void* query, const void* key,
                                    const void* offsets, void* grad_query, void* grad_key,
                                    void* grad_offsets);
// output = sum over each group's points of weights * the value sampled there. One launch.
int sapa_deform_aggregate(void* stream, int dtype, const SapaDeformDims* dims,
                          const void* weights, const void* value, const void* offsets,
                          void* output);
// Its gradients with respect to weights, value and offsets from the output's gradient
// (the value's a scatter with atomics). Three launches, no workspace.
int sapa_deform_aggregate_backward(void* stream, int dtype, const SapaDeformDims* dims,
                                   const void* grad, const void* weights, const void* value,
                                   const void* offsets, void* grad_weights, void* grad_value,
                                   void* grad_offsets);

#ifdef __cplusplus
}
#endif

#endif  // KERAS_SAPA_LAUNCHER_SAPA_LAUNCHER_H_
