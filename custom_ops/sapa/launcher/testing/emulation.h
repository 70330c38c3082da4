// CUDA kernels on the CPU, for tests on machines without a GPU: what the two emulations
// share (emulated_libcuda.cc, the emulated driver the launcher drives; deform_emulated.cc,
// SAPA-D's kernels called directly by tests/test_deform_kernels.py).
//
// The kernel sources are compiled by g++ with the CUDA keywords mapped to host C++:
// every CUDA thread of a block is a std::thread (the same threads run the blocks one
// after another), __syncthreads() a std::barrier, atomicAdd a std::atomic_ref, dynamic
// shared memory one buffer per kernel family, filled with garbage before each block, as
// on a GPU. It proves the kernels' logic (indexing, phases, synchronisation), not their
// speed or anything specific to a GPU (memory model, warp behaviour).
//
// Include this first, then the kernel sources.

#ifndef KERAS_SAPA_LAUNCHER_TESTING_EMULATION_H_
#define KERAS_SAPA_LAUNCHER_TESTING_EMULATION_H_

#include <dlfcn.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
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
inline A atomicAdd(A* address, A value) {  // SAPA-D's scatter kernels
  return std::atomic_ref<A>(*address).fetch_add(value);
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// The dynamic shared memory of each kernel family (its `extern __shared__ smem_raw[]`).
namespace sapa {
alignas(16) unsigned char smem_raw[256 * 1024];
namespace deform {
alignas(16) unsigned char smem_raw[256 * 1024];
}  // namespace deform
}  // namespace sapa

namespace emu {

// This library's own handle, to find its kernels by name.
inline void* Self() {
  Dl_info info;
  dladdr(reinterpret_cast<void*>(&Self), &info);
  return dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
}

// Runs `body` as a grid of `grid` blocks of `block` threads: host thread t is CUDA thread
// t of every block in turn; each block has its own barrier (a thread that returns drops
// out of it) and starts with `smem` bytes of `shared` set to all ones.
template <typename Body>
void RunGrid(unsigned grid, unsigned block, unsigned char* shared, size_t smem, const Body& body) {
  std::vector<std::unique_ptr<std::barrier<>>> barriers;
  barriers.reserve(grid);
  for (unsigned b = 0; b < grid; ++b) barriers.emplace_back(new std::barrier<>(block));
  std::barrier<> phase(block);  // separates the blocks
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      for (unsigned b = 0; b < grid; ++b) {
        if (t == 0) std::memset(shared, 0xff, smem);  // garbage, as on a GPU
        phase.arrive_and_wait();
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        blockDim = {block, 1, 1};
        gridDim = {grid, 1, 1};
        t_barrier = barriers[b].get();
        body();
        t_barrier->arrive_and_drop();  // an exited CUDA thread no longer holds a barrier
        phase.arrive_and_wait();       // the whole block is done
      }
    });
  }
  for (auto& thread : threads) thread.join();
}

template <typename Args, size_t... I>
void CallWith(void* fn, const Args& args, void* const* p, std::index_sequence<I...>) {
  using Kernel = void (*)(Args, decltype((void)I, static_cast<void*>(nullptr))...);
  reinterpret_cast<Kernel>(fn)(args, p[I]...);
}

constexpr int kMaxPointers = 9;

// Calls the kernel fn(Args, void* x count); false when count is out of range.
template <typename Args, int N = 1>
bool CallKernel(void* fn, const Args& args, void* const* p, int count) {
  if constexpr (N > kMaxPointers) {
    return false;
  } else {
    if (count == N) {
      CallWith(fn, args, p, std::make_index_sequence<N>{});
      return true;
    }
    return CallKernel<Args, N + 1>(fn, args, p, count);
  }
}

}  // namespace emu

#endif  // KERAS_SAPA_LAUNCHER_TESTING_EMULATION_H_
