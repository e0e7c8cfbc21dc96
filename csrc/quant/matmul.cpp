#include "quant/matmul.h"

#include "quant/pool.h"

#include <algorithm>
#include <atomic>
#include <cstring>

namespace mlx_harmony_core::quant {

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Dequantized tile size for the BLAS route: large enough for an efficient
// GEMM, small enough to stay in the last-level cache.
constexpr int64_t kTileBytes = 4 << 20;

std::atomic<int> gemm_rows_{16};
// Below this much work (weight bytes times rows of x) a GEMV pass runs on the
// calling thread alone: waking a worker costs more than it saves, and on a
// small machine a spinning worker takes the core Python needs.
std::atomic<int64_t> parallel_bytes_{1 << 20};

int64_t tile_rows(int64_t cols, int64_t rows) {
  int64_t t = kTileBytes / (4 * cols);
  t = std::max<int64_t>(64, t / 16 * 16);
  return std::min(t, rows);
}

// Splits [0, n) into about tasks_per_thread pieces per thread.
int64_t piece(int64_t n, int64_t min_piece) {
  const int64_t want = int64_t(Pool::instance().threads()) * 4;
  return std::max(min_piece, (n + want - 1) / want);
}

// Dequantizes rows [r0, r1) of a into out, in parallel.
void dequant_parallel(
    const Isa& isa, const QMatrix& a, int64_t r0, int64_t r1, float* out) {
  const int64_t step = piece(r1 - r0, 4);
  const int64_t tasks = (r1 - r0 + step - 1) / step;
  Pool::instance().run(tasks, [&](int64_t t) {
    const int64_t s = r0 + t * step, e = std::min(r1, s + step);
    isa.dequant(a, s, e, out + (s - r0) * a.cols);
  });
}

// A thread's tile buffers for the BLAS route, kept across calls: a fresh
// 4 MB vector per matmul was zero-filled (and page-faulted) every time.
struct Tiles {
  std::vector<float> w, y;
};

Tiles& tiles(int64_t w_floats, int64_t y_floats) {
  thread_local Tiles t;
  if (int64_t(t.w.size()) < w_floats) {
    t.w.resize(w_floats);
  }
  if (int64_t(t.y.size()) < y_floats) {
    t.y.resize(y_floats);
  }
  return t;
}

void gemm_t(const Isa& isa, Job& job) {
  const QMatrix& a = job.a;
  const int64_t N = a.rows, K = a.cols, tn = tile_rows(K, N);
  Tiles& t = tiles(tn * K, job.nx * tn);
  std::vector<float>&tile = t.w, &ytile = t.y;
  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t nb = std::min(tn, N - n0);
    dequant_parallel(isa, a, n0, n0 + nb, tile.data());
    cblas_sgemm(kRowMajor,
                kNoTrans,
                kTrans,
                int(job.nx),
                int(nb),
                int(K),
                1.f,
                job.x,
                int(K),
                tile.data(),
                int(K),
                0.f,
                ytile.data(),
                int(nb));
    for (int64_t r = 0; r < job.nx; ++r) {
      std::memcpy(job.y[r] + n0, ytile.data() + r * nb, nb * sizeof(float));
    }
  }
}

// The GEMV inputs of one job: x in the kernel's layout (the job's own rows
// where that is natural order) and its group sums.
void prepare_for(const Isa& isa, const Job& job, Prepared& p) {
  const QMatrix& a = job.a;
  const int64_t K = a.cols, G = a.groups();
  if (a.format == Format::Affine8 || a.format == Format::AffineN) {
    p.x = job.x;
  } else {
    p.xbuf.resize(job.nx * K);
    for (int64_t r = 0; r < job.nx; ++r) {
      deinterleave(job.x + r * K, K, isa.chunk, p.xbuf.data() + r * K);
    }
    p.x = p.xbuf.data();
  }
  p.xsum.clear();
  if (a.format != Format::Mxfp4) {
    p.xsum.resize(job.nx * G);
    for (int64_t r = 0; r < job.nx; ++r) {
      const float* xr = job.x + r * K;
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int j = 0; j < a.group; ++j) {
          s += xr[g * a.group + j];
        }
        p.xsum[r * G + g] = s;
      }
    }
  }
}

struct Task {
  size_t job;
  int64_t n0, n1;
};

// A thread's GEMV scratch, reused across calls: a decode step makes hundreds
// of small calls, and the pool's tasks only read the caller's.
struct Scratch {
  std::vector<size_t> small;
  std::vector<Prepared> prep;
  std::vector<const Prepared*> ready;
  std::vector<Task> tasks;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

} // namespace

void prepare(const Job& job, Prepared& p) {
  prepare_for(active(), job, p);
}

bool same_layout(const QMatrix& a, const QMatrix& b) {
  return a.format == b.format && a.cols == b.cols && a.group == b.group &&
         a.bits == b.bits;
}

int64_t parallel_bytes() {
  return parallel_bytes_.load(std::memory_order_relaxed);
}

void set_parallel_bytes(int64_t bytes) {
  parallel_bytes_.store(std::max<int64_t>(0, bytes), std::memory_order_relaxed);
}

int gemm_rows() {
  return gemm_rows_.load(std::memory_order_relaxed);
}

void set_gemm_rows(int rows) {
  gemm_rows_.store(std::max(1, rows), std::memory_order_relaxed);
}

void matmul_t(std::vector<Job>& jobs) {
  const Isa& isa = active();
  const int64_t big = gemm_rows();
  // GEMV jobs share one parallel pass: (job, block of output rows) tasks.
  Scratch& sc = scratch();
  std::vector<size_t>& small = sc.small;
  small.clear();
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (jobs[j].nx >= big) {
      gemm_t(isa, jobs[j]);
    } else if (jobs[j].nx > 0) {
      small.push_back(j);
    }
  }
  if (small.empty()) {
    return;
  }
  std::vector<Prepared>& prep = sc.prep;
  if (prep.size() < small.size()) {
    prep.resize(small.size());
  }
  int64_t rows = 0, bytes = 0;
  // The x each job reads: its caller's where given, else prepared here.
  std::vector<const Prepared*>& ready = sc.ready;
  ready.assign(small.size(), nullptr);
  for (size_t s = 0; s < small.size(); ++s) {
    const Job& job = jobs[small[s]];
    if (job.ready) {
      ready[s] = job.ready;
    } else {
      prepare_for(isa, job, prep[s]);
      ready[s] = &prep[s];
    }
    rows += job.a.rows;
    // Each row of x is a pass over the weights (cached after the first).
    bytes += job.a.rows * job.a.row_bytes() * job.nx;
  }
  const bool parallel =
      bytes >= parallel_bytes_.load(std::memory_order_relaxed);
  if (!parallel) { // several small jobs (a decode step's experts): this thread
    for (size_t s = 0; s < small.size(); ++s) {
      const Job& job = jobs[small[s]];
      isa.gemv(job.a,
               ready[s]->x,
               ready[s]->xsum.empty() ? nullptr : ready[s]->xsum.data(),
               int(job.nx),
               job.y.data(),
               0,
               job.a.rows);
    }
    return;
  }
  const int64_t step = piece(rows, 16);
  std::vector<Task>& tasks = sc.tasks;
  tasks.clear();
  for (size_t s = 0; s < small.size(); ++s) {
    const int64_t N = jobs[small[s]].a.rows;
    for (int64_t n0 = 0; n0 < N; n0 += step) {
      tasks.push_back({s, n0, std::min(N, n0 + step)});
    }
  }
  Pool::instance().run(int64_t(tasks.size()), [&](int64_t t) {
    const Task& k = tasks[t];
    const Job& job = jobs[small[k.job]];
    const Prepared& p = *ready[k.job];
    isa.gemv(job.a,
             p.x,
             p.xsum.empty() ? nullptr : p.xsum.data(),
             int(job.nx),
             job.y.data(),
             k.n0,
             k.n1);
  });
}

void matmul_n(const QMatrix& a, const float* x, int64_t nx, float* y) {
  const Isa& isa = active();
  const int64_t K = a.rows, N = a.cols, tk = tile_rows(N, K);
  std::vector<float>& tile = tiles(tk * N, 0).w;
  for (int64_t k0 = 0; k0 < K; k0 += tk) {
    const int64_t kb = std::min(tk, K - k0);
    dequant_parallel(isa, a, k0, k0 + kb, tile.data());
    cblas_sgemm(kRowMajor,
                kNoTrans,
                kNoTrans,
                int(nx),
                int(N),
                int(kb),
                1.f,
                x + k0,
                int(K),
                tile.data(),
                int(N),
                k0 == 0 ? 0.f : 1.f,
                y,
                int(N));
  }
}

} // namespace mlx_harmony_core::quant
