// Runs the SAPA-D CUDA kernels (kernels/cuda/sapa_deform_kernels.cuh) on the CPU with no
// driver in between, for tests/test_deform_kernels.py, through the emulation the
// emulated driver uses (emulation.h: every CUDA thread a fiber, __syncthreads() a barrier
// of the block's scheduler, atomicAdd a std::atomic_ref). The launcher's own SAPA-D entry points run
// the same kernels through emulated_libcuda.cc (tests/test_launcher.py).
//
//   int deform_emu_launch(const char* kernel, unsigned grid, unsigned block, size_t smem,
//                         const void* args, void** pointers, int count)
//
// calls the extern "C" kernel `kernel` with *(DeformArgs*)args and `count` pointers;
// returns 0, or 1 for an unknown kernel or a bad launch.

#include "emulation.h"
// emulation.h first: the kernels read its CUDA stand-ins.
#include "../../kernels/cuda/sapa_deform_kernels.cuh"

extern "C" int deform_emu_launch(const char* kernel, unsigned grid, unsigned block,
                                 size_t smem, const void* args, void** pointers, int count) {
  if (grid == 0 || block == 0 || block > 256 || smem > sizeof(sapa::deform::smem_raw) ||
      count < 1 || count > emu::kMaxPointers) {
    return 1;
  }
  void* self = emu::Self();
  void* fn = self ? dlsym(self, kernel) : nullptr;
  if (fn == nullptr) return 1;
  const sapa::deform::DeformArgs g = *static_cast<const sapa::deform::DeformArgs*>(args);
  emu::RunGrid(grid, block, sapa::deform::smem_raw, smem,
               [&] { emu::CallKernel(fn, g, pointers, count); });
  return 0;
}
