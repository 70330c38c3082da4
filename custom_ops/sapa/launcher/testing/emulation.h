// CUDA kernels on the CPU, for tests on machines without a GPU: what the two emulations
// share (emulated_libcuda.cc, the emulated driver the launcher drives; deform_emulated.cc,
// SAPA-D's kernels called directly by tests/test_deform_kernels.py).
//
// The kernel sources are compiled by g++ with the CUDA keywords mapped to host C++:
// every CUDA thread of a block is a fiber (a ucontext with its own stack) of the calling
// thread; __syncthreads() switches back to the block's scheduler, which resumes every
// fiber in turn until each has reached the barrier or returned, then starts the next
// round (a returned thread no longer holds the barrier); blocks run one after another;
// atomicAdd is a std::atomic_ref; dynamic shared memory one buffer per kernel family,
// filled with garbage before each block, as on a GPU. It proves the kernels' logic
// (indexing, phases, synchronisation), not their speed or anything specific to a GPU
// (memory model, warp behaviour). Fibers instead of one std::thread per CUDA thread: the
// same schedule semantics without an OS context switch per thread and barrier, so
// blocks of 1024 threads run in milliseconds.
//
// Include this first, then the kernel sources.

#ifndef KERAS_SAPA_LAUNCHER_TESTING_EMULATION_H_
#define KERAS_SAPA_LAUNCHER_TESTING_EMULATION_H_

#include <dlfcn.h>
#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
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

namespace emu {
// The running block's scheduler, the fiber (CUDA thread) it resumed, and whether that
// fiber came back waiting at a barrier (else it returned).
thread_local ucontext_t* t_scheduler = nullptr;
thread_local ucontext_t* t_fiber = nullptr;
thread_local bool t_waiting = false;
}  // namespace emu

inline void __syncthreads() {
  emu::t_waiting = true;
  swapcontext(emu::t_fiber, emu::t_scheduler);
}
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

// A CUDA thread: its context, its stack, and whether it returned.
struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
};

constexpr size_t kFiberStack = 64 * 1024;
thread_local const void* t_body = nullptr;

template <typename Body>
void FiberMain() {
  (*static_cast<const Body*>(t_body))();
}

// Runs `body` as a grid of `grid` blocks of `block` threads (fibers of the calling
// thread, see above); each block starts with `smem` bytes of `shared` set to all ones.
template <typename Body>
void RunGrid(unsigned grid, unsigned block, unsigned char* shared, size_t smem, const Body& body) {
  thread_local std::vector<Fiber> fibers;  // stacks kept for the next launches
  if (fibers.size() < block) fibers.resize(block);
  for (unsigned t = 0; t < block; ++t) {
    if (!fibers[t].stack) fibers[t].stack.reset(new char[kFiberStack]);
  }
  ucontext_t scheduler;
  t_body = &body;
  t_scheduler = &scheduler;
  for (unsigned b = 0; b < grid; ++b) {
    std::memset(shared, 0xff, smem);  // garbage, as on a GPU
    blockIdx = {b, 0, 0};
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    for (unsigned t = 0; t < block; ++t) {
      Fiber& f = fibers[t];
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kFiberStack;
      f.context.uc_link = &scheduler;  // where a returning thread goes
      makecontext(&f.context, &FiberMain<Body>, 0);
      f.done = false;
    }
    // A round resumes every live thread until its next __syncthreads() or its return.
    for (unsigned live = block; live > 0;) {
      live = 0;
      for (unsigned t = 0; t < block; ++t) {
        Fiber& f = fibers[t];
        if (f.done) continue;
        threadIdx = {t, 0, 0};
        t_fiber = &f.context;
        t_waiting = false;
        swapcontext(&scheduler, &f.context);  // back at a barrier, or returned (uc_link)
        f.done = !t_waiting;
        live += f.done ? 0 : 1;
      }
    }
  }
  t_body = nullptr;
  t_scheduler = t_fiber = nullptr;
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
