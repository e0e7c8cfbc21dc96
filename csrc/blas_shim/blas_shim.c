/* Exports the standard CBLAS GEMM names MLX's CPU backend calls and forwards
 * them to scipy-openblas32's prefixed symbols. Loaded with RTLD_GLOBAL before
 * mlx.core, so libmlx's references bind here instead of reference BLAS. */
#include <stdatomic.h>

typedef int blasint; /* scipy-openblas32: 32-bit (LP64) integers */

void scipy_cblas_sgemm(int,
                       int,
                       int,
                       blasint,
                       blasint,
                       blasint,
                       float,
                       const float*,
                       blasint,
                       const float*,
                       blasint,
                       float,
                       float*,
                       blasint);
void scipy_cblas_dgemm(int,
                       int,
                       int,
                       blasint,
                       blasint,
                       blasint,
                       double,
                       const double*,
                       blasint,
                       const double*,
                       blasint,
                       double,
                       double*,
                       blasint);
void scipy_cblas_cgemm(int,
                       int,
                       int,
                       blasint,
                       blasint,
                       blasint,
                       const void*,
                       const void*,
                       blasint,
                       const void*,
                       blasint,
                       const void*,
                       void*,
                       blasint);

/* How many calls went through the shim: proof, in tests, that it is used. */
static atomic_long calls;

__attribute__((visibility("default"))) long mhc_blas_shim_calls(void) {
  return atomic_load_explicit(&calls, memory_order_relaxed);
}

__attribute__((visibility("default"))) void cblas_sgemm(int order,
                                                        int ta,
                                                        int tb,
                                                        blasint m,
                                                        blasint n,
                                                        blasint k,
                                                        float alpha,
                                                        const float* a,
                                                        blasint lda,
                                                        const float* b,
                                                        blasint ldb,
                                                        float beta,
                                                        float* c,
                                                        blasint ldc) {
  atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
  scipy_cblas_sgemm(
      order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

__attribute__((visibility("default"))) void cblas_dgemm(int order,
                                                        int ta,
                                                        int tb,
                                                        blasint m,
                                                        blasint n,
                                                        blasint k,
                                                        double alpha,
                                                        const double* a,
                                                        blasint lda,
                                                        const double* b,
                                                        blasint ldb,
                                                        double beta,
                                                        double* c,
                                                        blasint ldc) {
  atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
  scipy_cblas_dgemm(
      order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

__attribute__((visibility("default"))) void cblas_cgemm(int order,
                                                        int ta,
                                                        int tb,
                                                        blasint m,
                                                        blasint n,
                                                        blasint k,
                                                        const void* alpha,
                                                        const void* a,
                                                        blasint lda,
                                                        const void* b,
                                                        blasint ldb,
                                                        const void* beta,
                                                        void* c,
                                                        blasint ldc) {
  atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
  scipy_cblas_cgemm(
      order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
