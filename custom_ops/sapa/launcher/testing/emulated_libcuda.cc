// An emulated libcuda.so.1 that RUNS the SAPA CUDA kernels on the CPU, for tests on
// machines without a GPU.
//
// The kernel source (kernels/cuda/sapa_kernels.cu) is compiled here by g++ with the CUDA
// keywords mapped to host C++: every CUDA thread of a block is a std::thread, blocks run
// one after another, __syncthreads() is a std::barrier, dynamic shared memory is one
// buffer per block. cuLaunchKernel runs the named kernel with the launcher's grid, block
// and shared memory size, so a test drives the real launcher (tile choice, fallbacks,
// arguments) and the real kernel code on host memory. It proves the kernels' logic, not
// their speed or anything specific to a GPU (memory model, warp behaviour).

#include <dlfcn.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};
thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;
thread_local std::barrier<>* t_barrier;
inline void __syncthreads() { t_barrier->arrive_and_wait(); }
inline float __expf(float x) { return std::exp(x); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

namespace sapa {
alignas(16) unsigned char smem_raw[256 * 1024];
}

#include "../../kernels/cuda/sapa_kernels.cu"

namespace {

int g_major = 8, g_minor = 0, g_sms = 1;
int g_launches = 0;

void* Self() {
  Dl_info info;
  dladdr(reinterpret_cast<void*>(&Self), &info);
  return dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
}

}  // namespace

extern "C" {

void emu_configure(int major, int minor, int sms) {
  g_major = major;
  g_minor = minor;
  g_sms = sms;
}
int emu_launches(void) { return g_launches; }

int cuInit(unsigned) { return 0; }
int cuDriverGetVersion(int* v) { *v = 12090; return 0; }
int cuGetErrorName(int, const char** name) { *name = "EMULATED_ERROR"; return 0; }
int cuGetErrorString(int, const char** text) { *text = "emulated driver"; return 0; }
int cuStreamGetCtx(void*, void** ctx) { *ctx = reinterpret_cast<void*>(0x5000 + g_major * 10 + g_minor); return 0; }
int cuCtxPushCurrent_v2(void*) { return 0; }
int cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = nullptr; return 0; }
int cuCtxGetDevice(int* device) { *device = 0; return 0; }
int cuDeviceGetAttribute(int* value, int attribute, int) {
  switch (attribute) {
    case 75: *value = g_major; return 0;
    case 76: *value = g_minor; return 0;
    case 16: *value = g_sms; return 0;
    case 1: *value = 1024; return 0;
    case 8: *value = 48 * 1024; return 0;
    case 5: *value = 2147483647; return 0;
    default: *value = 0; return 1;
  }
}
int cuModuleLoadData(void** module, const void*) { *module = Self(); return *module ? 0 : 500; }
int cuModuleGetFunction(void** fn, void* module, const char* name) {
  *fn = dlsym(module, name);
  return *fn ? 0 : 500;
}
// The limit a kernel's __launch_bounds__ sets (SAPA_BOUND_<K> in sapa_kernels.cu).
int cuFuncGetAttribute(int* value, int attribute, void* fn) {
  Dl_info info;
  if (attribute != 0 || !dladdr(fn, &info) || !info.dli_sname) return 1;
  const std::string name = info.dli_sname;
  *value = name.find("_k7") != std::string::npos ? SAPA_BOUND_7
           : name.find("_k5") != std::string::npos ? SAPA_BOUND_5 : 1024;
  return 0;
}
int cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void*, int block, size_t smem) {
  int by_threads = 2048 / block;
  int by_smem = smem ? static_cast<int>((164 * 1024) / smem) : 32;
  *blocks = std::min(std::min(by_threads, by_smem), 32);
  return 0;
}

int cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz, unsigned smem, void*, void** params, void**) {
  if (gy != 1 || gz != 1 || by != 1 || bz != 1 || bx == 0 || bx > 1024) return 1;
  if (smem > sizeof(sapa::smem_raw)) return 1;
  Dl_info info;
  if (!dladdr(fn, &info) || !info.dli_sname) return 500;
  const std::string name = info.dli_sname;
  int pointers = 3;
  if (name.rfind("sapa_fused", 0) == 0) pointers = 5;
  if (name.rfind("sapa_dsoftmax", 0) == 0) pointers = 4;
  const sapa::Args args = *static_cast<sapa::Args*>(params[0]);
  void* p[5] = {};
  for (int i = 0; i < pointers; ++i) p[i] = *static_cast<void**>(params[1 + i]);
  // Every kernel is (Args, pointer...): called through the matching pointer count.
  typedef void (*K3)(sapa::Args, void*, void*, void*);
  typedef void (*K4)(sapa::Args, void*, void*, void*, void*);
  typedef void (*K5)(sapa::Args, void*, void*, void*, void*, void*);
  for (unsigned block = 0; block < gx; ++block) {
    std::memset(sapa::smem_raw, 0xff, smem);  // garbage, as on a GPU
    std::barrier<> barrier(bx);
    std::vector<std::thread> threads;
    threads.reserve(bx);
    for (unsigned t = 0; t < bx; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = {t, 0, 0};
        blockIdx = {block, 0, 0};
        blockDim = {bx, 1, 1};
        gridDim = {gx, 1, 1};
        t_barrier = &barrier;
        if (pointers == 3) reinterpret_cast<K3>(fn)(args, p[0], p[1], p[2]);
        if (pointers == 4) reinterpret_cast<K4>(fn)(args, p[0], p[1], p[2], p[3]);
        if (pointers == 5) reinterpret_cast<K5>(fn)(args, p[0], p[1], p[2], p[3], p[4]);
        barrier.arrive_and_drop();  // an exited CUDA thread no longer holds a barrier
      });
    }
    for (auto& thread : threads) thread.join();
  }
  ++g_launches;
  return 0;
}

}  // extern "C"
