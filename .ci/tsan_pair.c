/* lstmkit's batch-1 pair path (lk_items, lk_pair_run) under ThreadSanitizer: forward and
 * backward of a layer whose W_hh is past L1 but within L2 (row, not small: it runs on the
 * calling thread and the helper), with the built-in GEMM (no BLAS, no OpenMP region entered).
 * Built and run by .ci/sanitize; any report is a failure (TSAN_OPTIONS=halt_on_error=1). */
#include <stdio.h>

#include "lstm.h"

int64_t lk_saved_elems_f32(const lk_layer *a);
int lk_forward_f32(const lk_layer *a);
int lk_backward_f32(const lk_layer *a, const lk_grads *g);
void lk_set_blas(void *sgemm, void *dgemm, void *threads);

static float *randoms(int64_t n)
{
    float *p = malloc((size_t)n * sizeof *p);
    for (int64_t k = 0; k < n; k++)
        p[k] = (float)rand() / (float)RAND_MAX - 0.5f;
    return p;
}

int main(void)
{
    enum { T = 50, I = 64, H = 96 };
    lk_set_blas(NULL, NULL, NULL);
    for (int call = 0; call < 20; call++) { /* inference and training in turn */
        lk_layer a = {.T = T, .B = 1, .I = I, .H = H, .P = H, .D = 1, .threads = 2};
        a.x = randoms(T * I), a.h0 = randoms(H), a.c0 = randoms(H);
        a.w[0][LK_W_IH] = randoms(4 * H * I), a.w[0][LK_W_HH] = randoms(4 * H * H);
        a.w[0][LK_B_IH] = randoms(4 * H), a.w[0][LK_B_HH] = randoms(4 * H);
        a.out = randoms(T * H), a.h_n = randoms(H), a.c_n = randoms(H), a.cells = randoms(T * H);
        const int train = call % 2;
        if (train)
            a.saved = randoms(lk_saved_elems_f32(&a));
        if (lk_forward_f32(&a) != 0)
            return 1;
        if (train) {
            lk_grads g = {.d_out = randoms(T * H), .d_x = randoms(T * I)};
            g.d_h0 = randoms(H), g.d_c0 = randoms(H);
            g.d_w[0][LK_W_IH] = randoms(4 * H * I), g.d_w[0][LK_W_HH] = randoms(4 * H * H);
            g.d_w[0][LK_B_IH] = randoms(4 * H), g.d_w[0][LK_B_HH] = randoms(4 * H);
            if (lk_backward_f32(&a, &g) != 0)
                return 1;
        }
    } /* the buffers are left to the process's end */
    puts("tsan_pair: no report");
    return 0;
}
