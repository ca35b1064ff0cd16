/* lstmkit CPU kernels: one LSTMCell step (lstmkit.LSTMCell), forward and backward. Legend:
 * N rows, H units, G = 4H gates in torch's order i, f, g, o, row-major.
 *
 * The products (x W_ih^T + h W_hh^T before the forward, dgates W and dgates^T x after the
 * backward) of a small step are the kernels' gemm (the BLAS or lstmkit's own GEMM, as tuned),
 * called from here so that the step is one call from Python: there a step's cost is its calls,
 * and six torch.mm calls cost more than the whole step's arithmetic. Bigger steps pass x NULL
 * and make the products by torch.mm, whose BLAS is threaded and tuned for those shapes. The
 * gate math uses the kernels' own sigmoid and tanh (real.h), in one pass over the gates. Each
 * row is computed by one thread in a fixed order, and the bias gradient sums the rows in
 * order, so results do not depend on the thread count. Training keeps the gate
 * activations (N x G, written over the gates) for backward; tanh(c') is recomputed there.
 * Compiled once per element type. */
#include "lstm.h"
#include "real.h"

/* Sets the GEMMs' threads for a step of `flops` (lk_threads_for) and returns the count to
 * restore. */
static int cell_threads(double flops)
{
    const int n = lk_threads_for(0, flops);
    return lk_blas_threads != NULL ? lk_blas_threads(n) : 0;
}

static void cell_threads_restore(int old)
{
    if (lk_blas_threads != NULL)
        lk_blas_threads(old);
}

/* One step (lk_cell in lstm.h): h_out, c_out from x, h, c and the weights. `gates` is written
 * with the activations sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) for backward; NULL in
 * inference, where the step takes its own scratch. x NULL: gates already holds the products
 * (h and the weights are not read). */
void SUF(lk_cell_forward)(const lk_cell *a)
{
    const int64_t N = a->N, H = a->H, I = a->I, G = 4 * H;
    const real *x = a->x, *h = a->h, *w_ih = a->w_ih, *w_hh = a->w_hh;
    const real *b_ih = a->b_ih, *b_hh = a->b_hh, *c = a->c;
    real *h_out = a->h_out, *c_out = a->c_out;
    const int keep = a->gates != NULL;
    real *gates = keep ? a->gates : malloc((size_t)(N * G) * sizeof(real));
    if (gates == NULL)
        abort();
    if (x != NULL) {
        const int old = cell_threads(2.0 * (double)(N * G * (I + H)));
        gemm(0, 1, N, G, I, 1, x, I, w_ih, I, 0, gates, G);
        gemm(0, 1, N, G, H, 1, h, H, w_hh, H, 1, gates, G);
        cell_threads_restore(old);
    }
    for (int64_t n = 0; n < N; n++) {
        real *row = gates + n * G;
        for (int64_t k = 0; k < H; k += V) {
            const int64_t m = min64(V, H - k);
            vec a[4];
            for (int q = 0; q < 4; q++) {
                a[q] = vload_n(row + q * H + k, m);
                if (b_ih)
                    a[q] += vload_n(b_ih + q * H + k, m);
                if (b_hh)
                    a[q] += vload_n(b_hh + q * H + k, m);
            }
            const vec i = v_sigmoid(a[0]), f = v_sigmoid(a[1]), g = v_tanh(a[2]);
            const vec o = v_sigmoid(a[3]);
            const vec c_next = f * vload_n(c + n * H + k, m) + i * g;
            vstore_n(c_out + n * H + k, c_next, m);
            vstore_n(h_out + n * H + k, o * v_tanh(c_next), m);
            if (keep) {
                vstore_n(row + k, i, m);
                vstore_n(row + H + k, f, m);
                vstore_n(row + 2 * H + k, g, m);
                vstore_n(row + 3 * H + k, o, m);
            }
        }
    }
    if (!keep)
        free(gates);
}

/* From the step `a` (its x, h, c and weights) and what its forward kept (g->acts, g->c_out) and
 * the incoming dh', dc' (each NULL for zero): the gates' gradient d_gates (N x G, before the
 * activations, scratch), dc (N x H), the bias gradient, the sum of d_gates' rows, into db_ih
 * and db_hh (G each), then dx = d_gates W_ih (N x I), dh = d_gates W_hh (N x H),
 * dW_ih = d_gates^T x (G x I) and dW_hh = d_gates^T h (G x H); each output NULL when not
 * wanted (all four NULL when the caller makes those products). */
void SUF(lk_cell_backward)(const lk_cell *a, const lk_cell_grads *g)
{
    const int64_t N = a->N, H = a->H, I = a->I;
    const real *x = a->x, *h = a->h, *w_ih = a->w_ih, *w_hh = a->w_hh, *c = a->c;
    const real *acts = g->acts, *c_out = g->c_out, *dh = g->d_h, *dc = g->d_c;
    real *d_gates = g->d_gates, *d_c = g->d_c_prev, *db_ih = g->db_ih, *db_hh = g->db_hh;
    real *d_x = g->d_x, *d_h = g->d_h_prev, *d_w_ih = g->d_w_ih, *d_w_hh = g->d_w_hh;
    const int64_t G = 4 * H;
    real *db = db_ih ? db_ih : db_hh;
    if (db)
        for (int64_t j = 0; j < G; j++)
            db[j] = 0;
    for (int64_t n = 0; n < N; n++) {
        const real *a = acts + n * G;
        real *d = d_gates + n * G;
        for (int64_t k = 0; k < H; k += V) {
            const int64_t m = min64(V, H - k);
            const vec i = vload_n(a + k, m), f = vload_n(a + H + k, m);
            const vec g = vload_n(a + 2 * H + k, m), o = vload_n(a + 3 * H + k, m);
            const vec dhv = dh ? vload_n(dh + n * H + k, m) : splat(0);
            const vec t = v_tanh(vload_n(c_out + n * H + k, m));
            vec dcv = dc ? vload_n(dc + n * H + k, m) : splat(0);
            dcv += dhv * o * (1 - t * t);
            const vec cv = vload_n(c + n * H + k, m);
            vstore_n(d + k, dcv * g * i * (1 - i), m);
            vstore_n(d + H + k, dcv * cv * f * (1 - f), m);
            vstore_n(d + 2 * H + k, dcv * i * (1 - g * g), m);
            vstore_n(d + 3 * H + k, dhv * t * o * (1 - o), m);
            if (d_c)
                vstore_n(d_c + n * H + k, dcv * f, m);
        }
        if (db)
            for (int64_t j = 0; j < G; j++)
                db[j] += d[j];
    }
    if (db_ih && db_hh)
        for (int64_t j = 0; j < G; j++)
            db_hh[j] = db_ih[j];
    if (!d_x && !d_h && !d_w_ih && !d_w_hh)
        return;
    const int old = cell_threads(2.0 * (double)(N * G * (I + H)));
    if (d_x)
        gemm(0, 0, N, I, G, 1, d_gates, G, w_ih, I, 0, d_x, I);
    if (d_h)
        gemm(0, 0, N, H, G, 1, d_gates, G, w_hh, H, 0, d_h, H);
    if (d_w_ih)
        gemm(1, 0, G, I, N, 1, d_gates, G, x, I, 0, d_w_ih, I);
    if (d_w_hh)
        gemm(1, 0, G, H, N, 1, d_gates, G, h, H, 0, d_w_hh, H);
    cell_threads_restore(old);
}
