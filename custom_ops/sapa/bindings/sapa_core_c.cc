// _sapa_core.so: the thread pool and the C entry points of sapa_core_c.h, on the
// framework-free kernel core (kernels/cpu/sapa_cpu.h). Built with g++ alone.

#include "sapa_core_c.h"

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>

#include "../kernels/cpu/sapa_cpu.h"
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

template <typename T>
int Forward(const T* q, const T* k, const T* v, T* out, T* weights, int64_t batch,
            int64_t height, int64_t width, int64_t up, int64_t kernel, int64_t dim,
            int64_t channels) {
  cpu::Shape shape;
  if (!MakeShape(batch, height, width, up, kernel, dim, channels, &shape)) {
    return KERAS_SAPA_BAD_SHAPE;
  }
  cpu::SapaForward<T>(GlobalParallelFor(), shape, dim, channels, q, k, v, out, weights);
  return KERAS_SAPA_OK;
}

template <typename T>
int Backward(const T* g, const T* q, const T* k, const T* v, const T* w, T* dq, T* dk, T* dv,
             int64_t batch, int64_t height, int64_t width, int64_t up, int64_t kernel,
             int64_t dim, int64_t channels) {
  cpu::Shape shape;
  if (!MakeShape(batch, height, width, up, kernel, dim, channels, &shape)) {
    return KERAS_SAPA_BAD_SHAPE;
  }
  // The softmax backward's logits gradient, (B, sH, sW, K*K): scratch of the core.
  std::unique_ptr<T[]> dlogits(new T[std::max<int64_t>(1, shape.high_points() * shape.window())]);
  cpu::SapaBackward<T>(GlobalParallelFor(), shape, dim, channels, g, q, k, v, w, dlogits.get(),
                       dq, dk, dv);
  return KERAS_SAPA_OK;
}

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

#define KERAS_SAPA_DEFINE(suffix, T)                                                          \
  __attribute__((visibility("default"))) int keras_sapa_forward_##suffix(                     \
      const T* q, const T* k, const T* v, T* out, T* w, int64_t batch, int64_t height,       \
      int64_t width, int64_t up, int64_t kernel, int64_t dim, int64_t channels) {             \
    return Forward<T>(q, k, v, out, w, batch, height, width, up, kernel, dim, channels);     \
  }                                                                                           \
  __attribute__((visibility("default"))) int keras_sapa_backward_##suffix(                    \
      const T* g, const T* q, const T* k, const T* v, const T* w, T* dq, T* dk, T* dv,       \
      int64_t batch, int64_t height, int64_t width, int64_t up, int64_t kernel, int64_t dim, \
      int64_t channels) {                                                                     \
    return Backward<T>(g, q, k, v, w, dq, dk, dv, batch, height, width, up, kernel, dim,     \
                       channels);                                                             \
  }

KERAS_SAPA_DEFINE(f32, float)
KERAS_SAPA_DEFINE(f64, double)

#undef KERAS_SAPA_DEFINE

}  // extern "C"
