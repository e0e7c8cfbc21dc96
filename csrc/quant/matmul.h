// Quantized matrix products over the kernels of kernel.h: the fused GEMV for
// few rows, dequantized tiles through the BLAS (OpenBLAS on Linux) for many.
#pragma once

#include "quant/kernel.h"

#include <vector>

// The BLAS MLX itself calls: the OpenBLAS shim on Linux (loaded globally
// before mlx.core), Accelerate on macOS.
extern "C" void cblas_sgemm(int order,
                            int trans_a,
                            int trans_b,
                            int m,
                            int n,
                            int k,
                            float alpha,
                            const float* a,
                            int lda,
                            const float* b,
                            int ldb,
                            float beta,
                            float* c,
                            int ldc);

namespace mlx_harmony_core::quant {

// Rows of x at or above which dequantizing tiles for the BLAS beats the GEMV.
int gemm_rows();
void set_gemm_rows(int rows);
// Work (weight bytes times rows of x) from which a GEMV pass is split over
// the thread pool.
int64_t parallel_bytes();
void set_parallel_bytes(int64_t bytes);

// x as the kernels read it for one matrix (4-bit formats deinterleaved) and
// its per-group sums.
struct Prepared {
  const float* x = nullptr;
  std::vector<float> xbuf, xsum;
};

// y = x @ a^T for a in the transposed layout (a.rows outputs of a.cols).
struct Job {
  QMatrix a;
  const float* x; // nx rows of a.cols floats, natural order
  int64_t nx;
  std::vector<float*> y; // nx output rows of a.rows floats
  // x prepared for a (prepare()) where the caller runs several jobs on one x
  // (a split pass: parts of one matrix); nullptr: matmul_t prepares it.
  const Prepared* ready = nullptr;
};

// Fills p for job's matrix and x (what matmul_t does per job).
void prepare(const Job& job, Prepared& p);
// Whether x prepared for a serves b too (same format, width and groups).
bool same_layout(const QMatrix& a, const QMatrix& b);

// Runs every job, the GEMV-sized ones together in one parallel pass.
void matmul_t(std::vector<Job>& jobs);

// y (nx x a.cols, row-major) = x (nx x a.rows) @ a, a in the plain layout.
void matmul_n(const QMatrix& a, const float* x, int64_t nx, float* y);

} // namespace mlx_harmony_core::quant
