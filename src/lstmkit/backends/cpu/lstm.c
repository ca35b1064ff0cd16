/* lstmkit CPU kernels: the BLAS the kernels call, set once by Python after loading. */
#include "lstm.h"

lk_sgemm_fn lk_sgemm;
lk_dgemm_fn lk_dgemm;
lk_blas_threads_fn lk_blas_threads;

/* Fortran sgemm_/dgemm_ (LP64) of an already loaded library, or NULL for the built-in loop,
 * and the BLAS's per-thread thread-count setter (may be NULL). */
void lk_set_blas(void *sgemm, void *dgemm, void *threads)
{
    lk_sgemm = (lk_sgemm_fn)sgemm;
    lk_dgemm = (lk_dgemm_fn)dgemm;
    lk_blas_threads = (lk_blas_threads_fn)threads;
}

/* Sizes of the structures Python packs, checked when the library is loaded. */
int lk_layer_bytes(void) { return (int)sizeof(lk_layer); }
int lk_grads_bytes(void) { return (int)sizeof(lk_grads); }
int lk_variant_bytes(void) { return (int)sizeof(lk_variant); }
int lk_variant_grads_bytes(void) { return (int)sizeof(lk_variant_grads); }
