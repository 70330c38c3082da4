// _sapa_core.so: the thread pool and the C entry points of sapa_core_c.h, on the
// framework-free kernel core (kernels/cpu/sapa_cpu.h), and the CUDA entry points on the
// launcher (opened with dlopen: the core links no CUDA). Built with g++ alone.

#include "sapa_core_c.h"
#include "sapa_deform_core_c.h"  // KERAS_SAPA_DEFORM_HALVES

#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>

#include "../kernels/cpu/sapa_cpu.h"
#include "../launcher/sapa_launcher.h"  // types and signatures only: dlsym'd at open
#include "storage.h"
#include "thread_pool.h"

namespace keras_sapa {
namespace bindings {

namespace {
// Below this many cycles in all, a call runs on the calling thread; blocks are at least
// this big too, so that waking a worker is always worth it.
constexpr int64_t kMinBlockCost = 20000;

std::mutex global_mu;
std::unique_ptr<ThreadPool> global_pool;
}  // namespace

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < std::max(threads, 1); ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::Work(Job& job) {
  for (;;) {
    const int64_t b = job.next.fetch_add(1);
    if (b >= job.blocks) return;
    const int64_t begin = b * job.block;
    (*job.fn)(begin, std::min(job.units, begin + job.block));
    if (job.done.fetch_add(1) + 1 == job.blocks) {
      std::lock_guard<std::mutex> lock(job.mu);
      job.finished.notify_all();
    }
  }
}

void ThreadPool::WorkerLoop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      job = queue_.front();
      if (job->next.load() >= job->blocks) {  // nothing left to claim: drop it
        queue_.pop_front();
        continue;
      }
    }
    Work(*job);
  }
}

void ThreadPool::ParallelFor(int64_t units, int64_t cost_per_unit, const cpu::Range& fn) {
  if (units <= 0) return;
  const int64_t cost = std::max<int64_t>(cost_per_unit, 1);
  const int64_t by_cost = std::max<int64_t>(1, units * cost / kMinBlockCost);
  const int64_t blocks_wanted = std::min({units, by_cost, int64_t(threads()) * 4});
  if (workers_.empty() || blocks_wanted <= 1) {
    fn(0, units);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->units = units;
  job->block = (units + blocks_wanted - 1) / blocks_wanted;
  job->blocks = (units + job->block - 1) / job->block;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(job);
  }
  wake_.notify_all();
  Work(*job);
  {
    std::unique_lock<std::mutex> lock(job->mu);
    job->finished.wait(lock, [&] { return job->done.load() == job->blocks; });
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = std::find(queue_.begin(), queue_.end(), job);
  if (it != queue_.end()) queue_.erase(it);
}

int ThreadPool::DefaultThreads() {
  if (const char* env = std::getenv("KERAS_SAPA_NUM_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n > 0) return static_cast<int>(std::min(n, 1024L));
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPool& ThreadPool::Global() {
  std::lock_guard<std::mutex> lock(global_mu);
  if (!global_pool) global_pool.reset(new ThreadPool(DefaultThreads()));
  return *global_pool;
}

void ThreadPool::ResetGlobal(int threads) {
  std::lock_guard<std::mutex> lock(global_mu);
  global_pool.reset();
  global_pool.reset(new ThreadPool(threads > 0 ? threads : DefaultThreads()));
}

cpu::ParallelFor GlobalParallelFor() {
  ThreadPool* pool = &ThreadPool::Global();
  return [pool](int64_t units, int64_t cost, const cpu::Range& fn) {
    pool->ParallelFor(units, cost, fn);
  };
}

namespace {

bool MakeShape(int64_t batch, int64_t height, int64_t width, int64_t up, int64_t kernel,
               int64_t dim, int64_t channels, cpu::Shape* shape) {
  if (batch < 0 || height < 0 || width < 0 || dim < 0 || channels < 0 || up < 1 ||
      kernel < 1 || kernel % 2 == 0) {
    return false;
  }
  shape->batch = batch;
  shape->height = height;
  shape->width = width;
  shape->up = up;
  shape->kernel = kernel;
  return true;
}

// F: the accumulation type (weights, the logits' gradient); S: the core's storage type
// of the other tensors (half types converted per tile inside the kernels); C: S's C type.
template <typename F, typename S, typename C>
int Forward(const C* q, const C* k, const C* v, C* out, F* weights, int64_t batch,
            int64_t height, int64_t width, int64_t up, int64_t kernel, int64_t dim,
            int64_t channels) {
  cpu::Shape shape;
  if (!MakeShape(batch, height, width, up, kernel, dim, channels, &shape)) {
    return KERAS_SAPA_BAD_SHAPE;
  }
  cpu::SapaForward<F, S>(GlobalParallelFor(), shape, dim, channels, Storage<S>(q),
                         Storage<S>(k), Storage<S>(v), Storage<S>(out), weights);
  return KERAS_SAPA_OK;
}

template <typename F, typename S, typename C>
int Backward(const C* g, const C* q, const C* k, const C* v, const F* w, C* dq, C* dk, C* dv,
             int64_t batch, int64_t height, int64_t width, int64_t up, int64_t kernel,
             int64_t dim, int64_t channels) {
  cpu::Shape shape;
  if (!MakeShape(batch, height, width, up, kernel, dim, channels, &shape)) {
    return KERAS_SAPA_BAD_SHAPE;
  }
  // The softmax backward's logits gradient, (B, sH, sW, K*K): scratch of the core.
  std::unique_ptr<F[]> dlogits(new F[std::max<int64_t>(1, shape.high_points() * shape.window())]);
  cpu::SapaBackward<F, S>(GlobalParallelFor(), shape, dim, channels, Storage<S>(g),
                          Storage<S>(q), Storage<S>(k), Storage<S>(v), w, dlogits.get(),
                          Storage<S>(dq), Storage<S>(dk), Storage<S>(dv));
  return KERAS_SAPA_OK;
}

// ---------------------------------------------------------------------------- CUDA

// The launcher's entry points this library uses, dlsym'd from libsapa_launcher.so.
struct Launcher {
  void* handle = nullptr;
  std::string path;
  decltype(&sapa_load_image_dir) load_image_dir = nullptr;
  decltype(&sapa_last_error) last_error = nullptr;
  decltype(&sapa_forward) forward = nullptr;
  decltype(&sapa_backward_workspace) backward_workspace = nullptr;
  decltype(&sapa_backward) backward = nullptr;
  // SAPA-D (NULL where the launcher predates them).
  decltype(&sapa_deform_forward) deform_forward = nullptr;
  decltype(&sapa_deform_workspace) deform_workspace = nullptr;
  decltype(&sapa_deform_backward) deform_backward = nullptr;
  // SAPA-D's halves (NULL where the launcher predates them).
  decltype(&sapa_deform_similarity) deform_similarity = nullptr;
  decltype(&sapa_deform_similarity_backward) deform_similarity_backward = nullptr;
  decltype(&sapa_deform_aggregate) deform_aggregate = nullptr;
  decltype(&sapa_deform_aggregate_backward) deform_aggregate_backward = nullptr;
};

std::mutex launcher_mu;
std::shared_ptr<const Launcher> launcher;  // guarded by launcher_mu
thread_local std::string cuda_error;

int CudaFail(int code, const std::string& message) {
  cuda_error = message;
  return code;
}

std::shared_ptr<const Launcher> CurrentLauncher() {
  std::lock_guard<std::mutex> lock(launcher_mu);
  return launcher;
}

int OpenLauncher(const char* path, const char* image_dir) {
  if (path == nullptr) return CudaFail(KERAS_SAPA_NO_LAUNCHER, "no launcher path");
  auto l = std::make_shared<Launcher>();
  l->path = path;
  l->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (l->handle == nullptr) {
    const char* why = dlerror();
    return CudaFail(KERAS_SAPA_NO_LAUNCHER,
                    std::string("cannot load the CUDA launcher: ") + (why ? why : path));
  }
  bool ok = true;
  auto sym = [&](auto* slot, const char* name, bool required = true) {
    *slot = reinterpret_cast<std::remove_pointer_t<decltype(slot)>>(dlsym(l->handle, name));
    if (*slot == nullptr && required) {
      ok = false;
      cuda_error = std::string(path) + " has no " + name;
    }
  };
  sym(&l->load_image_dir, "sapa_load_image_dir");
  sym(&l->last_error, "sapa_last_error");
  sym(&l->forward, "sapa_forward");
  sym(&l->backward_workspace, "sapa_backward_workspace");
  sym(&l->backward, "sapa_backward");
  if (!ok) return KERAS_SAPA_NO_LAUNCHER;
  sym(&l->deform_forward, "sapa_deform_forward", false);
  sym(&l->deform_workspace, "sapa_deform_workspace", false);
  sym(&l->deform_backward, "sapa_deform_backward", false);
  sym(&l->deform_similarity, "sapa_deform_similarity", false);
  sym(&l->deform_similarity_backward, "sapa_deform_similarity_backward", false);
  sym(&l->deform_aggregate, "sapa_deform_aggregate", false);
  sym(&l->deform_aggregate_backward, "sapa_deform_aggregate_backward", false);
  if (image_dir != nullptr) {
    int count = 0;
    if (l->load_image_dir(image_dir, &count) != SAPA_OK) {
      return CudaFail(KERAS_SAPA_NO_LAUNCHER, l->last_error());
    }
    if (count == 0) {
      return CudaFail(KERAS_SAPA_NO_LAUNCHER,
                      std::string("no kernel images (sapa_kernels.*.cubin/ptx) in ") + image_dir);
    }
  }
  std::lock_guard<std::mutex> lock(launcher_mu);
  launcher = std::move(l);  // a replaced launcher stays loaded (no dlclose)
  return KERAS_SAPA_OK;
}

// The launcher's SapaDims of SAPA's core sizes (batch, height, width, up, kernel, dim,
// channels): query and key have `dim` channels, value and output `channels`.
SapaDims CudaDims(const int64_t* z) {
  return SapaDims{z[0], z[1], z[2], z[3], z[4], z[5], z[6]};
}

bool ValidSizes(const int64_t* z) {
  cpu::Shape shape;
  return MakeShape(z[0], z[1], z[2], z[3], z[4], z[5], z[6], &shape);
}

bool HasDeform(const Launcher& l) {
  return l.deform_forward && l.deform_workspace && l.deform_backward;
}

// The open launcher (with SAPA-D's entry points when `deform`), else null and *rc set.
std::shared_ptr<const Launcher> OpenOr(bool deform, int* rc) {
  std::shared_ptr<const Launcher> l = CurrentLauncher();
  if (!l) {
    *rc = CudaFail(KERAS_SAPA_NO_LAUNCHER, "the CUDA launcher is not open");
  } else if (deform && !HasDeform(*l)) {
    *rc = CudaFail(KERAS_SAPA_NO_LAUNCHER, l->path + " has no SAPA-D entry points");
    l.reset();
  }
  return l;
}

// Runs `launch` (a sequence of launcher calls returning SapaStatus) on the open launcher,
// for sizes that `valid` accepts.
template <typename Fn>
int WithLauncher(bool valid, Fn launch, bool deform = false) {
  int rc = KERAS_SAPA_OK;
  std::shared_ptr<const Launcher> l = OpenOr(deform, &rc);
  if (!l) return rc;
  if (!valid) return CudaFail(KERAS_SAPA_BAD_SHAPE, "bad sizes");
  const int status = launch(*l);
  if (status != SAPA_OK) {
    return CudaFail(KERAS_SAPA_CUDA_FAILED, "launcher status " + std::to_string(status) + ": " +
                                                l->last_error());
  }
  return KERAS_SAPA_OK;
}

// tensors: query, key, value, out, weights.
int ForwardCuda(void* stream, int dtype, void* const* t, const int64_t* z, void*) {
  return WithLauncher(ValidSizes(z), [&](const Launcher& l) {
    const SapaDims d = CudaDims(z);
    return l.forward(stream, dtype, &d, t[0], t[1], t[2], t[3], t[4]);
  });
}

// tensors: grad, query, key, value, weights, dquery, dkey, dvalue; scratch: the logits'
// gradient. The launcher's sapa_backward, as the TensorFlow GPU adapter calls it.
int BackwardCuda(void* stream, int dtype, void* const* t, const int64_t* z, void* scratch) {
  return WithLauncher(ValidSizes(z), [&](const Launcher& l) {
    const SapaDims d = CudaDims(z);
    return l.backward(stream, dtype, &d, t[0], t[1], t[2], t[3], t[4], scratch, t[5], t[6],
                      t[7]);
  });
}

int NoScratch(int, const int64_t*, int64_t* bytes) {
  *bytes = 0;
  return KERAS_SAPA_OK;
}

// Bytes of a launcher workspace: query(launcher, &size), the launcher's entry point
// `name`, on the open launcher (with SAPA-D's entry points when `deform`).
template <typename Fn>
int LauncherWorkspace(bool deform, const char* name, Fn query, int64_t* bytes) {
  *bytes = 0;
  int rc = KERAS_SAPA_OK;
  std::shared_ptr<const Launcher> l = OpenOr(deform, &rc);
  if (!l) return rc;
  size_t size = 0;
  if (query(*l, &size) != SAPA_OK) {
    return CudaFail(KERAS_SAPA_BAD_SHAPE, std::string(name) + ": " + l->last_error());
  }
  *bytes = static_cast<int64_t>(size);
  return KERAS_SAPA_OK;
}

// The logits' gradient, as the launcher's sapa_backward_workspace sizes it.
int BackwardScratch(int dtype, const int64_t* z, int64_t* bytes) {
  *bytes = 0;
  if (!ValidSizes(z)) return CudaFail(KERAS_SAPA_BAD_SHAPE, "bad sizes");
  const SapaDims d = CudaDims(z);
  return LauncherWorkspace(
      false, "sapa_backward_workspace",
      [&](const Launcher& l, size_t* size) { return l.backward_workspace(dtype, &d, size); },
      bytes);
}

// SAPA-D: the sizes (batch, height, width, up, points, groups, dim, channels) are
// SapaDeformDims field for field; the launcher checks them.
SapaDeformDims DeformDims(const int64_t* z) {
  return SapaDeformDims{z[0], z[1], z[2], z[3], z[4], z[5], z[6], z[7]};
}

// tensors: query, key, value, offsets, out, weights.
int DeformForwardCuda(void* stream, int dtype, void* const* t, const int64_t* z, void*) {
  const SapaDeformDims d = DeformDims(z);
  return WithLauncher(
      true,
      [&](const Launcher& l) {
        return l.deform_forward(stream, dtype, &d, t[0], t[1], t[2], t[3], t[4], t[5]);
      },
      true);
}

// tensors: grad, query, key, value, offsets, weights, dquery, dkey, dvalue, doffsets.
int DeformBackwardCuda(void* stream, int dtype, void* const* t, const int64_t* z,
                       void* scratch) {
  const SapaDeformDims d = DeformDims(z);
  return WithLauncher(
      true,
      [&](const Launcher& l) {
        return l.deform_backward(stream, dtype, &d, t[0], t[1], t[2], t[3], t[4], t[5],
                                 scratch, t[6], t[7], t[8], t[9]);
      },
      true);
}

int DeformScratch(int dtype, const int64_t* z, int64_t* bytes) {
  const SapaDeformDims d = DeformDims(z);
  return LauncherWorkspace(
      true, "sapa_deform_workspace",
      [&](const Launcher& l, size_t* size) { return l.deform_workspace(dtype, &d, size); },
      bytes);
}

// SAPA-D's halves: the launcher's entry `entry` (sapa_deform_similarity, ...) on the
// tensors, inputs then outputs in the table's order (3 + 1 for a forward, 4 + 3 for a
// backward), with the sizes of the SAPA-D entry points (dim or channels 0).
template <typename Fn>
int DeformHalfCuda(Fn Launcher::*entry, void* stream, int dtype, void* const* t,
                   const int64_t* z) {
  const SapaDeformDims d = DeformDims(z);
  std::shared_ptr<const Launcher> current = CurrentLauncher();
  if (current && current.get()->*entry == nullptr) {
    return CudaFail(KERAS_SAPA_NO_LAUNCHER, current->path + " has no SAPA-D halves");
  }
  return WithLauncher(
      true,
      [&](const Launcher& l) {
        if constexpr (std::is_same_v<Fn, decltype(&sapa_deform_similarity)>) {
          return (l.*entry)(stream, dtype, &d, t[0], t[1], t[2], t[3]);
        } else {
          return (l.*entry)(stream, dtype, &d, t[0], t[1], t[2], t[3], t[4], t[5], t[6]);
        }
      },
      true);
}

#define KERAS_SAPA_DEFORM_HALF_CUDA(Name, OpName, entry, stem)                   \
  int Name##Cuda(void* stream, int dtype, void* const* t, const int64_t* z, void*) { \
    return DeformHalfCuda(&Launcher::stem, stream, dtype, t, z);                   \
  }
KERAS_SAPA_DEFORM_HALVES(KERAS_SAPA_DEFORM_HALF_CUDA)
#undef KERAS_SAPA_DEFORM_HALF_CUDA

}  // namespace
}  // namespace bindings
}  // namespace keras_sapa

using keras_sapa::bindings::Backward;
using keras_sapa::bindings::Forward;
using keras_sapa::bindings::ThreadPool;

extern "C" {

__attribute__((visibility("default"))) int keras_sapa_core_abi(void) {
  return KERAS_SAPA_CORE_ABI;
}

__attribute__((visibility("default"))) int keras_sapa_num_threads(void) {
  return ThreadPool::Global().threads();
}

__attribute__((visibility("default"))) void keras_sapa_set_num_threads(int threads) {
  ThreadPool::ResetGlobal(threads);
}

// The entry points of one element type: C the C ABI's type of the tensors, F that of
// the weights, S the core's storage type.
#define KERAS_SAPA_DEFINE(suffix, C, F, S)                                                    \
  __attribute__((visibility("default"))) int keras_sapa_forward_##suffix(                     \
      const C* q, const C* k, const C* v, C* out, F* w, int64_t batch, int64_t height,       \
      int64_t width, int64_t up, int64_t kernel, int64_t dim, int64_t channels) {             \
    return Forward<F, S>(q, k, v, out, w, batch, height, width, up, kernel, dim, channels);  \
  }                                                                                           \
  __attribute__((visibility("default"))) int keras_sapa_backward_##suffix(                    \
      const C* g, const C* q, const C* k, const C* v, const F* w, C* dq, C* dk, C* dv,       \
      int64_t batch, int64_t height, int64_t width, int64_t up, int64_t kernel, int64_t dim, \
      int64_t channels) {                                                                     \
    return Backward<F, S>(g, q, k, v, w, dq, dk, dv, batch, height, width, up, kernel, dim,  \
                          channels);                                                          \
  }

KERAS_SAPA_DEFINE(f32, float, float, float)
KERAS_SAPA_DEFINE(f64, double, double, double)
KERAS_SAPA_DEFINE(f16, uint16_t, float, keras_sapa::cpu::Half)
KERAS_SAPA_DEFINE(bf16, uint16_t, float, keras_sapa::cpu::BFloat16)

#undef KERAS_SAPA_DEFINE

__attribute__((visibility("default"))) int keras_sapa_cuda_open(const char* launcher_path,
                                                                const char* image_dir) {
  return keras_sapa::bindings::OpenLauncher(launcher_path, image_dir);
}

__attribute__((visibility("default"))) const char* keras_sapa_cuda_error(void) {
  return keras_sapa::bindings::cuda_error.c_str();
}

// <prefix>_cuda and <prefix>_cuda_scratch of sapa_core_c.h on `run` and `scratch`.
#define KERAS_SAPA_CUDA_DEFINE(prefix, run, scratch)                                       \
  __attribute__((visibility("default"))) int prefix##_cuda(                                \
      void* stream, int dtype, void* const* tensors, const int64_t* sizes, void* work) {   \
    return keras_sapa::bindings::run(stream, dtype, tensors, sizes, work);                 \
  }                                                                                        \
  __attribute__((visibility("default"))) int prefix##_cuda_scratch(                        \
      int dtype, const int64_t* sizes, int64_t* bytes) {                                   \
    return keras_sapa::bindings::scratch(dtype, sizes, bytes);                             \
  }

KERAS_SAPA_CUDA_DEFINE(keras_sapa_forward, ForwardCuda, NoScratch)
KERAS_SAPA_CUDA_DEFINE(keras_sapa_backward, BackwardCuda, BackwardScratch)
KERAS_SAPA_CUDA_DEFINE(keras_sapa_deform_forward, DeformForwardCuda, NoScratch)
KERAS_SAPA_CUDA_DEFINE(keras_sapa_deform_backward, DeformBackwardCuda, DeformScratch)
#define KERAS_SAPA_DEFORM_HALF_DEFINE(Name, OpName, entry, stem) \
  KERAS_SAPA_CUDA_DEFINE(entry, Name##Cuda, NoScratch)
KERAS_SAPA_DEFORM_HALVES(KERAS_SAPA_DEFORM_HALF_DEFINE)
#undef KERAS_SAPA_DEFORM_HALF_DEFINE

#undef KERAS_SAPA_CUDA_DEFINE

}  // extern "C"
