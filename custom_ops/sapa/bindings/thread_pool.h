// A small persistent thread pool serving the framework-free SAPA CPU kernel core as its
// ParallelFor (cpu::ParallelFor in kernels/cpu/sapa_cpu.h), for the bindings that do not
// get a pool from their framework (PyTorch through ctypes, the JAX/XLA FFI handlers).
//
// One pool per process, created on first use with KERAS_SAPA_NUM_THREADS threads, else
// the number of CPUs this process may run on. ParallelFor splits [0, units) into blocks,
// runs them on the workers and on the calling thread, and returns when all are done.
// Several ParallelFor calls may run at the same time (for instance two XLA host devices):
// each is a job of its own in the queue, and every caller works on its own job, so a
// call always finishes even when all workers are busy elsewhere.

#ifndef KERAS_SAPA_BINDINGS_THREAD_POOL_H_
#define KERAS_SAPA_BINDINGS_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../kernels/cpu/sapa_cpu.h"

namespace keras_sapa {
namespace bindings {

class ThreadPool {
 public:
  // A pool of `threads` threads in all: threads - 1 workers plus the calling thread.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn over disjoint ranges covering [0, units); see cpu::ParallelFor.
  void ParallelFor(int64_t units, int64_t cost_per_unit, const cpu::Range& fn);

  // The process-wide pool (created on first call).
  static ThreadPool& Global();
  // Replaces the process-wide pool by one of `threads` threads (<= 0: the default).
  // Not to be called while kernels run.
  static void ResetGlobal(int threads);
  // KERAS_SAPA_NUM_THREADS when set to a positive integer, else the CPUs available.
  static int DefaultThreads();

 private:
  struct Job {
    const cpu::Range* fn = nullptr;
    int64_t units = 0, block = 1, blocks = 0;
    std::atomic<int64_t> next{0};  // next block to claim
    std::atomic<int64_t> done{0};  // blocks finished
    std::mutex mu;
    std::condition_variable finished;
  };

  // Claims and runs blocks of `job` until none is left. True when it ran the last one.
  static void Work(Job& job);
  void WorkerLoop();

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stop_ = false;
};

// The core's ParallelFor on the process-wide pool.
cpu::ParallelFor GlobalParallelFor();

}  // namespace bindings
}  // namespace keras_sapa

#endif  // KERAS_SAPA_BINDINGS_THREAD_POOL_H_
