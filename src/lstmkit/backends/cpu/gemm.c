/* lstmkit CPU kernels: one GEMM as the kernels call it, exported for the tuner, which times
 * lstmkit's own GEMM against the BLAS on this machine (lstmkit.backends.cpu.tuner), and for the
 * tests, which check the own GEMM against torch.mm. Compiled once per element type. */
#include "lstm.h"
#include "real.h"

/* Row-major C (m x n) = alpha op(A) op(B) + beta C on `threads` threads, by the BLAS the
 * kernels call (own == 0; lstmkit's own GEMM when they have none) or by lstmkit's own GEMM
 * (own != 0). 0 on success, -1 if the own GEMM's buffers could not be had. */
int SUF(lk_gemm)(int own, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                 const real *A, int64_t lda, const real *B, int64_t ldb, double beta, real *C,
                 int64_t ldc, int threads)
{
    const int old = lk_blas_threads(threads);
    int status = 0;
    if (own && m > 0 && n > 0 && k > 0)
        status = own_gemm(trans_a, trans_b, m, n, k, (real)alpha, A, lda, B, ldb, (real)beta, C,
                          ldc);
    else
        gemm(trans_a, trans_b, m, n, k, (real)alpha, A, lda, B, ldb, (real)beta, C, ldc);
    lk_blas_threads(old);
    return status;
}
