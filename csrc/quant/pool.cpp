#include "quant/pool.h"

#include <chrono>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MHC_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define MHC_PAUSE() asm volatile("yield")
#else
#define MHC_PAUSE()
#endif

namespace mlx_harmony_core::quant {

namespace {

// How long an idle worker spins before it sleeps: longer than the gap
// between two matmuls of a decode step, short enough not to steal a core.
constexpr auto kSpin = std::chrono::microseconds(200);

int available_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return CPU_COUNT(&set);
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

} // namespace

Pool& Pool::instance() {
  static Pool* pool = new Pool();
  return *pool;
}

Pool::Pool() : threads_(available_cores()) {}

void Pool::set_threads(int n) {
  std::lock_guard<std::mutex> lock(busy_);
  threads_ = n < 1 ? 1 : n;
}

void Pool::work(uint64_t job) {
  uint64_t v = next_.load(std::memory_order_acquire);
  for (;;) {
    if ((v >> 32) != job) {
      return;
    }
    // Check the bound before claiming: a claim past the end does not keep
    // the job running, so after it the caller may start the next job and
    // size_ / task_ would be that job's (its task run twice, counted twice,
    // and the caller returning while one still writes). A successful claim
    // below the bound keeps this job running, so task_ stays its own; a
    // size_ read from a newer job fails the claim (next_ moved on).
    const int64_t i = static_cast<int64_t>(v & 0xffffffffu);
    if (i >= size_.load(std::memory_order_acquire)) {
      return;
    }
    if (!next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
      continue;
    }
    (*task_)(i);
    done_.fetch_add(1, std::memory_order_acq_rel);
    v = next_.load(std::memory_order_acquire);
  }
}

void Pool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t g = generation_.load(std::memory_order_acquire);
    if (g == seen) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      int spins = 0;
      while ((g = generation_.load(std::memory_order_acquire)) == seen) {
        MHC_PAUSE();
        if (++spins % 64 != 0) {
          continue;
        }
        // A spinning worker must not keep a core from a thread with work
        // (the step's caller, Python building the next step): the caller
        // takes every task a late worker has not claimed.
        std::this_thread::yield();
        if (std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          wake_.wait(lock, [&] {
            return generation_.load(std::memory_order_acquire) != seen;
          });
        }
      }
    }
    seen = g;
    // Workers past the job's thread count sit it out.
    if (index < active_workers_.load(std::memory_order_acquire)) {
      work(g & 0xffffffffu);
    }
  }
}

void Pool::run(int64_t n, const std::function<void(int64_t)>& task) {
  std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
  if (!lock.owns_lock() || threads_ <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) {
      task(i);
    }
    return;
  }
  const int want = threads_ - 1;
  while (static_cast<int>(workers_.size()) < want) {
    const int index = static_cast<int>(workers_.size());
    workers_.emplace_back([this, index] { worker(index); });
    workers_.back().detach();
  }
  const uint64_t job = ++job_ & 0xffffffffu;
  task_ = &task;
  done_.store(0, std::memory_order_relaxed);
  size_.store(n, std::memory_order_release);
  active_workers_.store(want, std::memory_order_release);
  next_.store(job << 32, std::memory_order_release);
  {
    std::lock_guard<std::mutex> sleep(sleep_mutex_);
    generation_.store(job, std::memory_order_release);
  }
  wake_.notify_all();
  work(job);
  while (done_.load(std::memory_order_acquire) < n) {
    MHC_PAUSE();
  }
}

} // namespace mlx_harmony_core::quant
