// A small persistent thread pool for the quantized kernels: the caller and
// its workers split a job's tasks; workers spin briefly between jobs because
// a decode step runs hundreds of short matmuls back to back.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_harmony_core::quant {

class Pool {
public:
  // The process-wide pool (never destroyed: its idle threads do no MLX work,
  // so they are safe to abandon at exit).
  static Pool& instance();

  // Threads taking part in a job, the caller included.
  int threads() const {
    return threads_;
  }
  // Sets the thread count (>= 1) for the next jobs.
  void set_threads(int n);

  // Runs task(0 .. n-1) on the pool and the calling thread; returns when all
  // are done. A second caller while a job runs does its tasks alone.
  void run(int64_t n, const std::function<void(int64_t)>& task);

private:
  Pool();
  void worker(int index);
  void work(uint64_t job);

  int threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex busy_;
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  // Each hot atomic on its own cache line: idle workers poll generation_.
  alignas(64) std::atomic<uint64_t> generation_{0};
  // (job << 32) | next task index: a worker late for one job never claims
  // a task of the next.
  alignas(64) std::atomic<uint64_t> next_{0};
  uint64_t job_ = 0;
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<int64_t> size_{0};
  std::atomic<int> active_workers_{0};
  const std::function<void(int64_t)>* task_ = nullptr;
};

} // namespace mlx_harmony_core::quant
