// Runs the SAPA-D CUDA kernels (kernels/cuda/sapa_deform_kernels.cuh) on the CPU, for
// tests on machines without a GPU (tests/test_deform_kernels.py), the way
// emulated_libcuda.cc runs the SAPA kernels: the kernel source compiled by g++ with the
// CUDA keywords mapped to host C++, every CUDA thread of a block a std::thread, blocks
// one after another, __syncthreads() a std::barrier, atomicAdd a std::atomic_ref, dynamic
// shared memory one buffer per block (filled with garbage first, as on a GPU).
//
//   int deform_emu_launch(const char* kernel, unsigned grid, unsigned block, size_t smem,
//                         const void* args, void** pointers, int count)
//
// calls the extern "C" kernel `kernel` with *(DeformArgs*)args and `count` pointers;
// returns 0, or 1 for an unknown kernel or a bad launch. It proves the kernels' logic
// (phases, indexing, synchronisation), not their speed.

#include <dlfcn.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
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
template <typename A>
inline A atomicAdd(A* address, A value) {
  return std::atomic_ref<A>(*address).fetch_add(value);
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

namespace sapa {
namespace deform {
alignas(16) unsigned char smem_raw[256 * 1024];
}
}  // namespace sapa

#include "../../kernels/cuda/sapa_deform_kernels.cuh"

namespace {

void* Self() {
  Dl_info info;
  dladdr(reinterpret_cast<void*>(&Self), &info);
  return dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
}

}  // namespace

extern "C" int deform_emu_launch(const char* kernel, unsigned grid, unsigned block,
                                 size_t smem, const void* args, void** pointers, int count) {
  if (grid == 0 || block == 0 || block > 256 || smem > sizeof(sapa::deform::smem_raw) ||
      count < 1 || count > 9) {
    return 1;
  }
  void* self = Self();
  void* fn = self ? dlsym(self, kernel) : nullptr;
  if (fn == nullptr) return 1;
  const sapa::deform::DeformArgs g = *static_cast<const sapa::deform::DeformArgs*>(args);
  void* p[9] = {};
  for (int i = 0; i < count; ++i) p[i] = pointers[i];
  typedef sapa::deform::DeformArgs DA;
  for (unsigned b = 0; b < grid; ++b) {
    std::memset(sapa::deform::smem_raw, 0xff, smem);
    std::barrier<> barrier(block);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        blockDim = {block, 1, 1};
        gridDim = {grid, 1, 1};
        t_barrier = &barrier;
        switch (count) {  // every kernel is (DeformArgs, pointer...)
          case 1: reinterpret_cast<void (*)(DA, void*)>(fn)(g, p[0]); break;
          case 2: reinterpret_cast<void (*)(DA, void*, void*)>(fn)(g, p[0], p[1]); break;
          case 4:
            reinterpret_cast<void (*)(DA, void*, void*, void*, void*)>(fn)(g, p[0], p[1], p[2],
                                                                          p[3]);
            break;
          case 6:
            reinterpret_cast<void (*)(DA, void*, void*, void*, void*, void*, void*)>(fn)(
                g, p[0], p[1], p[2], p[3], p[4], p[5]);
            break;
          case 9:
            reinterpret_cast<void (*)(DA, void*, void*, void*, void*, void*, void*, void*,
                                      void*, void*)>(fn)(g, p[0], p[1], p[2], p[3], p[4], p[5],
                                                         p[6], p[7], p[8]);
            break;
          default: break;
        }
        barrier.arrive_and_drop();  // an exited CUDA thread no longer holds a barrier
      });
    }
    for (auto& thread : threads) thread.join();
  }
  return 0;
}
