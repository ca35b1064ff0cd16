/* lstmkit CPU kernels: the BLAS the kernels call, set once by Python after loading. */
#include "lstm.h"

lk_sgemm_fn lk_sgemm;
lk_dgemm_fn lk_dgemm;

/* Fortran sgemm_/dgemm_ (LP64) of an already loaded library, or NULL for the built-in loop. */
void lk_set_blas(void *sgemm, void *dgemm)
{
    lk_sgemm = (lk_sgemm_fn)sgemm;
    lk_dgemm = (lk_dgemm_fn)dgemm;
}
