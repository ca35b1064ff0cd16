/* lstmkit's CPU kernels for the step variants: layer norm, peepholes, zoneout and recurrent
 * dropout (lstmkit.reference.Variant, whose lstm_step is the definition), one layer in both
 * directions, forward and backward. Plain calls take kernel.c; this file is the variant step.
 *
 * Legend: T steps, B batch, I input features, H cell units, P size of h (proj_size or H),
 * G = 4H gates, D directions, R packed rows. Gate columns keep torch's order (blocks i, f, g, o
 * of H each), so torch's weights are used as they are and their gradients come out in place.
 *
 * One code path; each variant is a flag tested per row or per vector (ln_ih, ln_hh, ln_c, peep,
 * zc, zh, a recurrent mask). Layer norm needs statistics over a whole row of gates (4H) or of c
 * (H), so the row passes are split by rows of the batch, never by units.
 *
 * Threads: one OpenMP region per call, the teams of driver.h (a bidirectional layer on two
 * threads runs its directions side by side, one thread each; otherwise one team of every
 * thread runs the directions in turn). Within a team the GEMMs are split by columns (each
 * member calls the BLAS, on one thread, for its columns: a step's work is too small for the
 * BLAS's own threads, which cost a wake-up per call and much more when another process holds a
 * core) and the row passes by rows, with a spin barrier between (three or four per step).
 *
 * Forward, per direction: the input projection X = x W_ih^T of every step is one GEMM before the
 * loop, normalised row by row in place when LN(W_ih x) is on. Per step: h_{t-1} (times the
 * recurrent mask) is gathered into hm, Y = hm W_hh^T is a BLAS GEMM on the active rows, and one
 * fused pass per row normalises Y, adds the gains, shifts and biases, the peepholes on c_{t-1},
 * and computes the gates and c' (pass A); after the statistics of c' (LN(c)), pass B computes
 * o * tanh(LN(c')) and zoneout of c. With proj_size, h' = m W_hr^T is a GEMM into the output
 * rows, then zoneout of h in place.
 *
 * Variable lengths work as in kernel.c: rows active at step t are 0..n_t-1, per-step buffers
 * kept for backward are packed (row off[t] + b, R = off[T] rows), rows that start at step t
 * read h0 and c0, padded steps output zeros and carry the state.
 *
 * Kept for backward (training, in `saved`, per direction): the activated gates (R, G), which
 * are written over X unless LN(W_ih x) is on; then the normalised X (R, G); the normalised Y
 * (R, G) with LN(W_hh h); hm (R, P); with proj_size m = o * tanh(LN(c')) (R, H); and per row
 * the reciprocal standard deviations of X, Y and c' and the mean of c' (R, 4) with any LN. The
 * cell states are the `cells` tensor (after zoneout), h is the output; c' = f c_{t-1} + i g is
 * recomputed from the gates. Backward walks the steps in reverse: per row two passes give the
 * gate gradients dA (the first collects LN(c)'s row sums), LN(W_hh h)'s backward gives dY, and
 * dh_{t-1} = mask * (dY W_hh) + zoneout's carry is one GEMM. The LN gains and shifts of the
 * products, the biases, dx and the weight gradients come after the loop: column sums (pairwise
 * over the rows, see kernel.c's "Sums over the steps"), LN(W_ih x)'s backward row by row, and
 * large GEMMs after the teams, on the calling thread with the BLAS's threads (dW_ih = dX^T x,
 * dW_hh = dY^T hm, dW_hr = dh'^T m by chunks of rows summed pairwise; dx = dX W_ih).
 */
#include "lstm.h"
#include "real.h"
#include "driver.h"

#define LN_EPS 1e-5
/* Per-row statistics kept for backward, (R, STATS). */
enum { STAT_RSTD_X, STAT_RSTD_Y, STAT_MEAN_C, STAT_RSTD_C, STATS };

/* ---- rows: statistics and layer norm's backward over one row ---- */

/* The mean and the reciprocal standard deviation 1 / sqrt(var + eps) of x (n), with the biased
 * variance computed in two passes (the one-pass formula cancels where the mean is large). */
static void row_stats(const real *x, int64_t n, real *mean_out, real *rstd_out)
{
    vec sum = {};
    for (int64_t j = 0; j < n; j += V)
        sum += vload_n(x + j, min64(V, n - j));
    const real mean = vsum(sum) / (real)n;
    vec squares = {};
    for (int64_t j = 0; j < n; j += V) {
        const int64_t lanes = min64(V, n - j);
        vec centred = vload_n(x + j, lanes) - mean;
        if (lanes < V)
            centred = vsel(first_lanes(lanes), centred, splat(0));
        squares += centred * centred;
    }
    *mean_out = mean;
    *rstd_out = (real)(1 / sqrt((double)(vsum(squares) / (real)n) + LN_EPS));
}

/* x (n) normalised in place, (x - mean) * rstd; returns rstd. */
static real normalize(real *x, int64_t n)
{
    real mean, rstd;
    row_stats(x, n, &mean, &rstd);
    for (int64_t j = 0; j < n; j += V) {
        const int64_t lanes = min64(V, n - j);
        vstore_n(x + j, (vload_n(x + j, lanes) - mean) * rstd, lanes);
    }
    return rstd;
}

/* dx = rstd (dz - mean(dz) - xhat mean(dz xhat)) with dz = dy gain: the gradient of v through
 * LN(v) = gain xhat + shift, xhat = (v - mean) rstd. dx may be dy. */
static void layer_norm_backward(const real *dy, const real *gain, const real *xhat, real rstd,
                                int64_t n, real *dx)
{
    vec s1 = {}, s2 = {};
    for (int64_t j = 0; j < n; j += V) {
        const int64_t lanes = min64(V, n - j);
        const vec dz = vload_n(dy + j, lanes) * vload_n(gain + j, lanes);
        s1 += dz;
        s2 += dz * vload_n(xhat + j, lanes);
    }
    const real mean1 = vsum(s1) / (real)n, mean2 = vsum(s2) / (real)n;
    for (int64_t j = 0; j < n; j += V) {
        const int64_t lanes = min64(V, n - j);
        const vec dz = vload_n(dy + j, lanes) * vload_n(gain + j, lanes);
        vstore_n(dx + j, rstd * (dz - mean1 - vload_n(xhat + j, lanes) * mean2), lanes);
    }
}

/* ---- one direction: geometry, flags, buffers ---- */

/* A buffer of rows: packed over the sequence (row off[t] + b of R, kept for backward) or one
 * step's rows (row b, reused every step). */
typedef struct {
    real *base;
    int64_t ld;
    int packed;
} rowbuf;

typedef struct {
    LK_SEQ; /* the sequence's steps and rows (driver.h) */
    int64_t G, R;
    int proj, keep;                  /* proj_size > 0; training (keep what backward needs) */
    int ln_ih, ln_hh, ln_c, peep;    /* the variants' flags */
    int zc, zh;                      /* zoneout of c, of h */
    const real *w_ih, *w_hh, *w_hr;  /* torch's layout */
    const real *g_ih, *g_hh;         /* (G) LN gains of the products */
    const real *g_c, *b_c;           /* (H) LN(c) gain and shift */
    const real *w_peep;              /* (3H) */
    const real *mask;                /* (B, P) recurrent dropout, or NULL */
    const real *zc_mask, *zh_mask;   /* (T, B, H), (T, B, P) keep-masks, or NULL */
    real zc_keep, zh_keep;           /* the keep probabilities without masks */
    real *bias;                      /* (G) b_ih + b_hh + the LN shifts of both products */
    rowbuf X, A, Y, hm, m, stats;    /* see the file comment */
} vdir;

static real *row_of(const rowbuf *r, const step_t *st, int64_t b)
{
    return r->base + ((r->packed ? st->row0 : 0) + b) * r->ld;
}
/* Zoneout's keep probability for units [j, j + lanes) of row b at step t: the mask's or z. */
LK_INLINE vec keep_c(const vdir *w, const step_t *st, int64_t b, int64_t j, int64_t lanes)
{
    if (w->zc_mask == NULL)
        return splat(w->zc_keep);
    return vload_n(w->zc_mask + (st->t * w->B + b) * w->H + j, lanes);
}
LK_INLINE vec keep_h(const vdir *w, const step_t *st, int64_t b, int64_t j, int64_t lanes)
{
    if (w->zh_mask == NULL)
        return splat(w->zh_keep);
    return vload_n(w->zh_mask + (st->t * w->B + b) * w->P + j, lanes);
}

static void geometry(vdir *w, const lk_layer *a, const lk_variant *variants, int64_t d)
{
    const lk_variant *v = &variants[d];
    memset(w, 0, sizeof *w);
    seq_init(&w->seq, a, d);
    w->G = 4 * a->H;
    w->proj = a->w[d][LK_W_HR] != NULL;
    w->w_ih = a->w[d][LK_W_IH];
    w->w_hh = a->w[d][LK_W_HH];
    w->w_hr = a->w[d][LK_W_HR];
    w->g_ih = v->param[LK_LN_W_IH];
    w->g_hh = v->param[LK_LN_W_HH];
    w->g_c = v->param[LK_LN_W_C];
    w->b_c = v->param[LK_LN_B_C];
    w->w_peep = v->param[LK_PEEP];
    w->ln_ih = w->g_ih != NULL;
    w->ln_hh = w->g_hh != NULL;
    w->ln_c = w->g_c != NULL;
    w->peep = w->w_peep != NULL;
    w->mask = v->recurrent_mask;
    w->zc_mask = v->zoneout_cell;
    w->zh_mask = v->zoneout_hidden;
    w->zc_keep = (real)v->zoneout_cell_keep;
    w->zh_keep = (real)v->zoneout_hidden_keep;
    w->zc = w->zc_mask != NULL || w->zc_keep != 0;
    w->zh = w->zh_mask != NULL || w->zh_keep != 0;
}

/* b_ih + b_hh + the LN shifts of both products: everything added to the gates' sum. */
static void fill_bias(const vdir *w, const lk_variant *v)
{
    const real *parts[4] = {w->a->w[w->d][LK_B_IH], w->a->w[w->d][LK_B_HH],
                            w->ln_ih ? v->param[LK_LN_B_IH] : NULL,
                            w->ln_hh ? v->param[LK_LN_B_HH] : NULL};
    for (int64_t j = 0; j < w->G; j++) {
        real sum = 0;
        for (int k = 0; k < 4; k++)
            sum += parts[k] != NULL ? parts[k][j] : 0;
        w->bias[j] = sum;
    }
}

static rowbuf buffer(real *base, int64_t ld, int packed)
{
    rowbuf r = {base, ld, packed};
    return r;
}

/* Rows kept (packed) or per step, from the saved block when kept, else from the arena. */
static rowbuf carve(real **saved, lk_arena *arena, int keep, int64_t R, int64_t B, int64_t ld)
{
    if (keep) {
        rowbuf r = buffer(*saved, ld, 1);
        *saved += R * ld;
        return r;
    }
    return buffer(TAKE(arena, B * ld), ld, 0);
}

/* The buffers of one direction (see the file comment); `saved` is advanced past its part. */
static void direction_buffers(vdir *w, real **saved, lk_arena *arena)
{
    const int64_t R = w->R, B = w->B, keep = w->keep;
    w->bias = TAKE(arena, w->G);
    w->X = keep ? carve(saved, arena, 1, R, B, w->G) : buffer(TAKE(arena, R * w->G), w->G, 1);
    w->A = w->ln_ih ? carve(saved, arena, keep, R, B, w->G) : w->X;
    w->Y = carve(saved, arena, keep && w->ln_hh, R, B, w->G);
    w->hm = carve(saved, arena, keep, R, B, w->P);
    w->m = w->proj ? carve(saved, arena, keep, R, B, w->H) : buffer(NULL, 0, 0);
    const int ln = w->ln_ih || w->ln_hh || w->ln_c;
    w->stats = ln ? carve(saved, arena, keep, R, B, STATS) : buffer(NULL, 0, 0);
    w->ring = w->cells == NULL ? TAKE(arena, 2 * B * w->H) : NULL;
}

/* Elements of `saved` one direction keeps (see the file comment). */
static int64_t saved_elems(const vdir *w)
{
    const int64_t ln = w->ln_ih || w->ln_hh || w->ln_c;
    return w->R * (w->G + (w->ln_ih ? w->G : 0) + (w->ln_hh ? w->G : 0) + w->P +
                   (w->proj ? w->H : 0) + (ln ? STATS : 0));
}

int64_t SUF(lk_variant_saved_elems)(const lk_layer *a, const lk_variant *v)
{
    int64_t total = 0;
    for (int64_t d = 0; d < a->D; d++) {
        vdir w;
        geometry(&w, a, v, d);
        w.R = lk_packed_rows(a);
        total += saved_elems(&w);
    }
    return total;
}

/* This thread's [begin, end) of n rows. */
static void my_rows(const team_t *tm, int64_t n, int64_t *begin, int64_t *end)
{
    lk_split(n, tm->rank, tm->size, begin, end);
}

/* This thread's [begin, end) of n columns, in whole vectors of 16 floats or doubles. */
static void my_columns(const team_t *tm, int64_t n, int64_t *begin, int64_t *end)
{
    int64_t b0, b1;
    lk_split((n + 15) / 16, tm->rank, tm->size, &b0, &b1);
    *begin = min64(b0 * 16, n);
    *end = min64(b1 * 16, n);
}

/* ---- forward ---- */

/* dst = keep * prev + (1 - keep) * dst over n elements: zoneout (exact for 0/1 keep). */
static void zoneout_row(real *dst, const real *prev, const real *mask, real keep, int64_t n)
{
    for (int64_t j = 0; j < n; j += V) {
        const int64_t lanes = min64(V, n - j);
        const vec k = mask != NULL ? vload_n(mask + j, lanes) : splat(keep);
        vstore_n(dst + j, k * vload_n(prev + j, lanes) + (1 - k) * vload_n(dst + j, lanes),
                 lanes);
    }
}

/* The step for row b once Y = hm W_hh^T is in place: pass A the gates and c', pass B
 * o * tanh(LN(c')) and zoneout of c (and of h without proj_size). */
static void cell_forward(const vdir *w, const step_t *st, int64_t b)
{
    const int64_t H = w->H;
    const real *x = row_of(&w->X, st, b), *cp = c_prev(&w->seq, st, b);
    real *y = row_of(&w->Y, st, b), *gates = row_of(&w->A, st, b);
    real *c = cell_row(&w->seq, st->t, b);
    real *stats = w->stats.base != NULL ? row_of(&w->stats, st, b) : NULL;
    if (w->ln_hh)
        stats[STAT_RSTD_Y] = normalize(y, w->G);
    for (int64_t j = 0; j < H; j += V) {
        const int64_t lanes = min64(V, H - j);
        vec pre[4];
        for (int q = 0; q < 4; q++) {
            const int64_t at = q * H + j;
            vec px = vload_n(x + at, lanes), py = vload_n(y + at, lanes);
            if (w->ln_ih)
                px *= vload_n(w->g_ih + at, lanes);
            if (w->ln_hh)
                py *= vload_n(w->g_hh + at, lanes);
            pre[q] = px + py + vload_n(w->bias + at, lanes);
        }
        const vec cpv = vload_n(cp + j, lanes);
        if (w->peep) {
            pre[0] += vload_n(w->w_peep + j, lanes) * cpv;
            pre[1] += vload_n(w->w_peep + H + j, lanes) * cpv;
        }
        const vec i = v_sigmoid(pre[0]), f = v_sigmoid(pre[1]), g = v_tanh(pre[2]);
        const vec cn = f * cpv + i * g;
        if (w->peep)
            pre[3] += vload_n(w->w_peep + 2 * H + j, lanes) * cn;
        const vec o = v_sigmoid(pre[3]);
        vstore_n(gates + j, i, lanes);
        vstore_n(gates + H + j, f, lanes);
        vstore_n(gates + 2 * H + j, g, lanes);
        vstore_n(gates + 3 * H + j, o, lanes);
        vstore_n(c + j, cn, lanes);
    }
    real mean = 0, rstd = 1;
    if (w->ln_c) {
        row_stats(c, H, &mean, &rstd);
        stats[STAT_MEAN_C] = mean;
        stats[STAT_RSTD_C] = rstd;
    }
    real *h = w->proj ? row_of(&w->m, st, b) : out_row(&w->seq, st->t, b);
    const real *hp = w->zh && !w->proj ? h_prev(&w->seq, st, b) : NULL;
    for (int64_t j = 0; j < H; j += V) {
        const int64_t lanes = min64(V, H - j);
        const vec cn = vload_n(c + j, lanes);
        vec shown = cn;
        if (w->ln_c)
            shown = (cn - mean) * rstd * vload_n(w->g_c + j, lanes) + vload_n(w->b_c + j, lanes);
        vec hv = vload_n(gates + 3 * H + j, lanes) * v_tanh(shown);
        if (hp != NULL) {
            const vec k = keep_h(w, st, b, j, lanes);
            hv = k * vload_n(hp + j, lanes) + (1 - k) * hv;
        }
        vstore_n(h + j, hv, lanes);
        if (w->zc) {
            const vec k = keep_c(w, st, b, j, lanes);
            vstore_n(c + j, k * vload_n(cp + j, lanes) + (1 - k) * cn, lanes);
        }
    }
}

static void forward_direction(void *dir, const team_t *tm)
{
    const vdir *w = dir;
    const int64_t G = w->G, P = w->P, H = w->H, DP = w->D * w->P;
    int64_t g0, g1, p0, p1, r0, r1;
    my_columns(tm, G, &g0, &g1);
    my_columns(tm, P, &p0, &p1);
    gemm(0, 1, w->R, g1 - g0, w->I, 1, w->xp, w->I, w->w_ih + g0 * w->I, w->I, 0, w->X.base + g0,
         G);
    if (w->ln_ih) {
        team_wait(tm); /* X complete */
        my_rows(tm, w->R, &r0, &r1);
        for (int64_t r = r0; r < r1; r++) {
            const real rstd = normalize(w->X.base + r * G, G);
            if (w->keep)
                w->stats.base[r * STATS + STAT_RSTD_X] = rstd;
        }
    }
    for (int64_t s = 0; s < w->T; s++) {
        const step_t st = make_step(&w->seq, s);
        my_rows(tm, st.n, &r0, &r1);
        for (int64_t b = r0; b < r1; b++) { /* hm = mask * h_{t-1} */
            const real *src = h_prev(&w->seq, &st, b);
            real *dst = row_of(&w->hm, &st, b);
            if (w->mask == NULL)
                memcpy(dst, src, (size_t)P * sizeof(real));
            else
                for (int64_t j = 0; j < P; j++)
                    dst[j] = src[j] * w->mask[b * P + j];
        }
        team_wait(tm); /* hm complete (and X, and the previous step) */
        gemm(0, 1, st.n, g1 - g0, P, 1, row_of(&w->hm, &st, 0), P, w->w_hh + g0 * P, P, 0,
             row_of(&w->Y, &st, 0) + g0, G);
        team_wait(tm); /* Y complete */
        for (int64_t b = r0; b < r1; b++)
            cell_forward(w, &st, b);
        int64_t pad0, pad1; /* padded steps: zero output and cells */
        my_rows(tm, w->B - st.n, &pad0, &pad1);
        for (int64_t b = st.n + pad0; b < st.n + pad1; b++) {
            memset(out_row(&w->seq, st.t, b), 0, (size_t)P * sizeof(real));
            if (w->cells != NULL)
                memset(cell_row(&w->seq, st.t, b), 0, (size_t)H * sizeof(real));
        }
        if (w->proj) {
            team_wait(tm); /* m complete */
            gemm(0, 1, st.n, p1 - p0, H, 1, row_of(&w->m, &st, 0), H, w->w_hr + p0 * H, H, 0,
                 out_row(&w->seq, st.t, 0) + p0, DP);
            if (w->zh)
                for (int64_t b = 0; b < st.n; b++)
                    zoneout_row(out_row(&w->seq, st.t, b) + p0, h_prev(&w->seq, &st, b) + p0,
                                w->zh_mask ? w->zh_mask + (st.t * w->B + b) * P + p0 : NULL,
                                w->zh_keep, p1 - p0);
        }
        team_wait(tm); /* h of this step complete */
    }
}

static size_t forward_workspace(vdir *dirs, const lk_layer *a, char *base)
{
    lk_arena arena = {base, 0};
    int64_t *off = lk_take(&arena, (size_t)a->T + 1, sizeof(int64_t));
    real *xp = a->lengths != NULL ? TAKE(&arena, dirs[0].R * a->I) : NULL;
    real *saved = a->saved;
    for (int64_t d = 0; d < a->D; d++) {
        dirs[d].off = off;
        dirs[d].xp = xp;
        direction_buffers(&dirs[d], &saved, &arena);
    }
    return arena.used;
}

/* Forward through one layer with the variants v[0..D-1]. 0 on success, -1 if memory ran out.
 * Training (a->saved not NULL) needs a->cells. */
int SUF(lk_variant_forward)(const lk_layer *a, const lk_variant *v)
{
    vdir dirs[2];
    const int64_t R = lk_packed_rows(a);
    for (int64_t d = 0; d < a->D; d++) {
        geometry(&dirs[d], a, v, d);
        dirs[d].R = R;
        dirs[d].keep = a->saved != NULL;
    }
    lk_block *block = lk_workspace_take(forward_workspace(dirs, a, NULL));
    if (block == NULL)
        return -1;
    char *work = block->p;
    forward_workspace(dirs, a, work);
    lk_fill_offsets(a, (int64_t *)dirs[0].off);
    const real *xp = pack_input(a, dirs[0].off, (real *)dirs[0].xp);
    for (int64_t d = 0; d < a->D; d++) {
        dirs[d].xp = xp;
        fill_bias(&dirs[d], v + d);
    }
    const int threads = lk_threads(a, lk_layer_flops(a));
    const int blas_threads = lk_blas_threads ? lk_blas_threads(threads) : 0;
    run_teams(forward_direction, dirs, sizeof dirs[0], a->D, threads);
    for (int64_t d = 0; d < a->D; d++)
        final_states(&dirs[d].seq);
    if (lk_blas_threads)
        lk_blas_threads(blas_threads);
    lk_workspace_give(block);
    return 0;
}

/* ---- backward ---- */

typedef struct {
    vdir f;
    const lk_grads *g;
    void *const *d_param; /* this direction's variant parameter gradients (lk_variant_grads) */
    real *dH, *dC;        /* (B, P), (B, H) gradients of h and c from the step after */
    rowbuf dA;            /* (R, G) gate pre-activation gradients */
    rowbuf dY;            /* (R, G) gradient of W_hh hm: dA itself without LN(W_hh h) */
    real *dX;             /* (R, G) gradient of W_ih x: dA, or LN(W_ih x)'s backward of it */
    rowbuf dh;            /* gradient of h' before zoneout: (R, P) with proj (for dW_hr) */
    real *dm;             /* proj: (B, H) gradient of m = dh' W_hr */
    real *tmp;            /* (B, P) dY W_hh before the recurrent mask */
    real *db, *dg_ih, *dg_hh; /* (G) sums over rows: bias, LN gains of the products */
    real *sums;           /* (sum_levels(R), 3, G) their pairwise sums (see column_sums) */
    real *own;            /* (threads, OWN * H) each thread's part, see own_t */
} vback;

/* What each thread of a team writes for itself: scratch rows, and sums over its rows that are
 * added up after the loop. OWN rows of H. */
typedef struct {
    real *y, *dn;               /* one row's tanh(LN(c')) and LN(c)'s normalised gradient */
    real *dg_c, *db_c, *dpeep;  /* sums: LN(c) gain and shift (H), peepholes (3H) */
} own_t;
#define OWN 7

static own_t own_part(const vback *w, int rank)
{
    const int64_t H = w->f.H;
    real *base = w->own + rank * OWN * H;
    own_t o = {base, base + H, base + 2 * H, base + 3 * H, base + 4 * H};
    return o;
}

LK_INLINE void accumulate(real *sum, int64_t j, vec v, int64_t lanes)
{
    vstore_n(sum + j, vload_n(sum + j, lanes) + v, lanes);
}

/* Gate gradients of row b at step st from dm (the gradient of o * tanh(LN(c'))) and dC: pass 1
 * recomputes tanh(LN(c')) and sums LN(c)'s row terms, pass 2 writes dA and dC for c_{t-1}. */
static void cell_backward(const vback *w, const own_t *own, const step_t *st, int64_t b,
                          const real *dm)
{
    const vdir *f = &w->f;
    const int64_t H = f->H;
    const real *gates = row_of(&f->A, st, b), *cp = c_prev(&f->seq, st, b);
    const real *stats = f->stats.base != NULL ? row_of(&f->stats, st, b) : NULL;
    const real *d_cells = w->g->d_cells;
    const real *dcell =
        d_cells ? d_cells + (st->t * f->B + b) * f->D * H + f->d * H : NULL;
    real *dc = w->dC + b * H, *dA = row_of(&w->dA, st, b);
    const real mean = f->ln_c ? stats[STAT_MEAN_C] : 0, rstd = f->ln_c ? stats[STAT_RSTD_C] : 1;
    vec s1 = {}, s2 = {};
    for (int64_t j = 0; j < H; j += V) {
        const int64_t lanes = min64(V, H - j);
        const vec i = vload_n(gates + j, lanes), fg = vload_n(gates + H + j, lanes);
        const vec g = vload_n(gates + 2 * H + j, lanes);
        const vec cn = fg * vload_n(cp + j, lanes) + i * g;
        vec shown = cn, nhat = {};
        if (f->ln_c) {
            nhat = (cn - mean) * rstd;
            shown = nhat * vload_n(f->g_c + j, lanes) + vload_n(f->b_c + j, lanes);
        }
        const vec y = v_tanh(shown);
        vstore_n(own->y + j, y, lanes);
        if (f->ln_c) {
            const vec o = vload_n(gates + 3 * H + j, lanes);
            const vec dshown = vload_n(dm + j, lanes) * o * (1 - y * y);
            const vec dn = dshown * vload_n(f->g_c + j, lanes);
            s1 += dn;
            s2 += dn * nhat;
            vstore_n(own->dn + j, dn, lanes);
            accumulate(own->dg_c, j, dshown * nhat, lanes);
            accumulate(own->db_c, j, dshown, lanes);
        }
    }
    const real mean1 = vsum(s1) / (real)H, mean2 = vsum(s2) / (real)H;
    for (int64_t j = 0; j < H; j += V) {
        const int64_t lanes = min64(V, H - j);
        const vec i = vload_n(gates + j, lanes), fg = vload_n(gates + H + j, lanes);
        const vec g = vload_n(gates + 2 * H + j, lanes), o = vload_n(gates + 3 * H + j, lanes);
        const vec cpv = vload_n(cp + j, lanes), cn = fg * cpv + i * g;
        const vec y = vload_n(own->y + j, lanes), dmv = vload_n(dm + j, lanes);
        const vec d_o = dmv * y * o * (1 - o);
        vec dcn;
        if (f->ln_c)
            dcn = rstd * (vload_n(own->dn + j, lanes) - mean1 - (cn - mean) * rstd * mean2);
        else
            dcn = dmv * o * (1 - y * y);
        vec dct = vload_n(dc + j, lanes), carry = {};
        if (dcell != NULL)
            dct += vload_n(dcell + j, lanes);
        if (f->zc) {
            const vec k = keep_c(f, st, b, j, lanes);
            dcn += (1 - k) * dct;
            carry = k * dct;
        } else {
            dcn += dct;
        }
        if (f->peep)
            dcn += d_o * vload_n(f->w_peep + 2 * H + j, lanes);
        const vec d_i = dcn * g * i * (1 - i), d_f = dcn * cpv * fg * (1 - fg);
        const vec d_g = dcn * i * (1 - g * g);
        vec dcp = dcn * fg + carry;
        if (f->peep) {
            dcp += d_i * vload_n(f->w_peep + j, lanes) + d_f * vload_n(f->w_peep + H + j, lanes);
            accumulate(own->dpeep, j, d_i * cpv, lanes);
            accumulate(own->dpeep + H, j, d_f * cpv, lanes);
            accumulate(own->dpeep + 2 * H, j, d_o * cn, lanes);
        }
        vstore_n(dc + j, dcp, lanes);
        vstore_n(dA + j, d_i, lanes);
        vstore_n(dA + H + j, d_f, lanes);
        vstore_n(dA + 2 * H + j, d_g, lanes);
        vstore_n(dA + 3 * H + j, d_o, lanes);
    }
    if (f->ln_hh)
        layer_norm_backward(dA, f->g_hh, row_of(&f->Y, st, b), stats[STAT_RSTD_Y], f->G,
                            row_of(&w->dY, st, b));
}

/* dh' = (1 - keep) (dH + d_out) for rows [r0, r1), and dH keeps zoneout's carry. */
static void output_grads(const vback *w, const step_t *st, int64_t r0, int64_t r1)
{
    const vdir *f = &w->f;
    const real *d_out = w->g->d_out;
    for (int64_t b = r0; b < r1; b++) {
        real *dH = w->dH + b * f->P, *dh = row_of(&w->dh, st, b);
        const real *grad = d_out ? d_out + (st->t * f->B + b) * f->D * f->P + f->d * f->P : NULL;
        for (int64_t j = 0; j < f->P; j += V) {
            const int64_t lanes = min64(V, f->P - j);
            vec total = vload_n(dH + j, lanes);
            if (grad != NULL)
                total += vload_n(grad + j, lanes);
            if (f->zh) {
                const vec k = keep_h(f, st, b, j, lanes);
                vstore_n(dh + j, (1 - k) * total, lanes);
                vstore_n(dH + j, k * total, lanes);
            } else {
                vstore_n(dh + j, total, lanes);
            }
        }
    }
}

/* Sums over every packed row for columns [c0, c1): the bias gradient, and the LN gains' of
 * both products; pairwise over the rows (sum_push, level k of sum i at (3 k + i) G). */
static void column_sums(const vback *w, int64_t c0, int64_t c1)
{
    const vdir *f = &w->f;
    const int64_t G = f->G, n = c1 - c0;
    if (n <= 0)
        return;
    real *const out[3] = {w->db, w->dg_ih, w->dg_hh};
    const int on[3] = {1, f->ln_ih, f->ln_hh};
    for (int64_t r = 0; r < f->R; r++) {
        const real *dA = w->dA.base + r * G;
        for (int64_t j = c0; j < c1; j += V) {
            const int64_t lanes = min64(V, c1 - j);
            const vec d = vload_n(dA + j, lanes);
            sum_push(w->sums + j, 3 * G, r, d, lanes);
            if (f->ln_ih)
                sum_push(w->sums + G + j, 3 * G, r, d * vload_n(f->X.base + r * G + j, lanes),
                         lanes);
            if (f->ln_hh)
                sum_push(w->sums + 2 * G + j, 3 * G, r,
                         d * vload_n(f->Y.base + r * G + j, lanes), lanes);
        }
    }
    for (int i = 0; i < 3; i++)
        for (int64_t j = c0; j < c1; j += V) {
            const int64_t lanes = min64(V, c1 - j);
            const vec total = on[i] ? sum_total(w->sums + i * G + j, 3 * G, f->R, lanes) : splat(0);
            vstore_n(out[i] + j, total, lanes);
        }
}

static void copy_out(void *dst, const real *src, int64_t n)
{
    if (dst != NULL)
        memcpy(dst, src, (size_t)n * sizeof(real));
}

static void backward_direction(void *dir, const team_t *tm)
{
    const vback *w = dir;
    const vdir *f = &w->f;
    const int64_t P = f->P, H = f->H, G = f->G;
    const own_t own = own_part(w, tm->rank);
    int64_t h0, h1, p0, p1, g0, g1, r0, r1;
    my_columns(tm, H, &h0, &h1);
    my_columns(tm, P, &p0, &p1);
    my_columns(tm, G, &g0, &g1);
    for (int64_t s = f->T - 1; s >= 0; s--) {
        const step_t st = make_step(&f->seq, s);
        my_rows(tm, st.n, &r0, &r1);
        output_grads(w, &st, r0, r1);
        if (f->proj) {
            team_wait(tm); /* dh' complete */
            gemm(0, 0, st.n, h1 - h0, P, 1, row_of(&w->dh, &st, 0), P, f->w_hr + h0, H, 0,
                 w->dm + h0, H);
            team_wait(tm); /* dm complete */
        }
        for (int64_t b = r0; b < r1; b++)
            cell_backward(w, &own, &st, b, f->proj ? w->dm + b * H : row_of(&w->dh, &st, b));
        team_wait(tm); /* dY complete */
        /* dh_{t-1} = mask * (dY W_hh) + zoneout's carry (already in dH) */
        const real *dY = row_of(&w->dY, &st, 0);
        if (f->mask == NULL) {
            gemm(0, 0, st.n, p1 - p0, G, 1, dY, G, f->w_hh + p0, P, f->zh ? 1 : 0, w->dH + p0, P);
        } else {
            gemm(0, 0, st.n, p1 - p0, G, 1, dY, G, f->w_hh + p0, P, 0, w->tmp + p0, P);
            for (int64_t b = 0; b < st.n; b++)
                for (int64_t k = b * P + p0; k < b * P + p1; k++)
                    w->dH[k] = (f->zh ? w->dH[k] : 0) + f->mask[k] * w->tmp[k];
        }
        team_wait(tm); /* dh_{t-1} complete */
    }
    column_sums(w, g0, g1);
    if (f->ln_ih) {
        team_wait(tm); /* the sums have read dA, which may become dX in place */
        my_rows(tm, f->R, &r0, &r1);
        for (int64_t r = r0; r < r1; r++)
            layer_norm_backward(w->dA.base + r * G, f->g_ih, f->X.base + r * G,
                                f->stats.base[r * STATS + STAT_RSTD_X], G, w->dX + r * G);
    }
}

/* After the loop: the threads' sums added up (`threads` parts, zero where no thread ran), and
 * the gradients of biases, variant parameters and initial states written out. */
static void direction_grads(const vback *w, int threads)
{
    const vdir *f = &w->f;
    const lk_grads *g = w->g;
    const int64_t B = f->B, P = f->P, H = f->H, G = f->G;
    const own_t total = own_part(w, 0);
    for (int rank = 1; rank < threads; rank++) {
        const own_t part = own_part(w, rank);
        for (int64_t k = 0; k < 5 * H; k++)
            total.dg_c[k] += part.dg_c[k];
    }
    void *const *dw = g->d_w[f->d];
    copy_out(dw[LK_B_IH], w->db, G);
    copy_out(dw[LK_B_HH], w->db, G);
    copy_out(w->d_param[LK_LN_W_IH], w->dg_ih, G);
    copy_out(w->d_param[LK_LN_B_IH], w->db, G);
    copy_out(w->d_param[LK_LN_W_HH], w->dg_hh, G);
    copy_out(w->d_param[LK_LN_B_HH], w->db, G);
    copy_out(w->d_param[LK_LN_W_C], total.dg_c, H);
    copy_out(w->d_param[LK_LN_B_C], total.db_c, H);
    copy_out(w->d_param[LK_PEEP], total.dpeep, 3 * H);
    copy_out(g->d_h0 ? (real *)g->d_h0 + f->d * B * P : NULL, w->dH, B * P);
    copy_out(g->d_c0 ? (real *)g->d_c0 + f->d * B * H : NULL, w->dC, B * H);
}

/* The final states' gradients enter first; every thread's sums start at zero. */
static void initial_grads(const vback *w, int threads)
{
    const vdir *f = &w->f;
    const int64_t BP = f->B * f->P, BH = f->B * f->H;
    const real *d_h_n = w->g->d_h_n ? (const real *)w->g->d_h_n + f->d * BP : NULL;
    const real *d_c_n = w->g->d_c_n ? (const real *)w->g->d_c_n + f->d * BH : NULL;
    for (int64_t k = 0; k < BP; k++)
        w->dH[k] = d_h_n ? d_h_n[k] : 0;
    for (int64_t k = 0; k < BH; k++)
        w->dC[k] = d_c_n ? d_c_n[k] : 0;
    memset(w->own, 0, (size_t)(threads * OWN * f->H) * sizeof(real));
}

static size_t backward_workspace(vback *dirs, const lk_layer *a, int threads, char *base,
                                 real **dxp, real **levels)
{
    lk_arena arena = {base, 0};
    int64_t *off = lk_take(&arena, (size_t)a->T + 1, sizeof(int64_t));
    const int64_t R = dirs[0].f.R, B = a->B;
    real *xp = a->lengths != NULL ? TAKE(&arena, R * a->I) : NULL;
    *dxp = a->lengths != NULL ? TAKE(&arena, R * a->I) : NULL;
    const int64_t IP = a->I > a->P ? a->I : a->P;
    const int64_t weights = gemm_levels(4 * a->H, IP, R), proj = gemm_levels(a->P, a->H, R);
    *levels = TAKE(&arena, weights > proj ? weights : proj);
    real *saved = a->saved;
    for (int64_t d = 0; d < a->D; d++) {
        vback *w = &dirs[d];
        vdir *f = &w->f;
        f->off = off;
        f->xp = xp;
        direction_buffers(f, &saved, &arena);
        const int64_t H = f->H, G = f->G, P = f->P;
        w->dH = TAKE(&arena, B * P);
        w->dC = TAKE(&arena, B * H);
        w->dA = buffer(TAKE(&arena, R * G), G, 1);
        w->dY = f->ln_hh ? buffer(TAKE(&arena, R * G), G, 1) : w->dA;
        /* LN(W_ih x)'s backward goes in place when dA is free after the loop */
        w->dX = f->ln_ih && !f->ln_hh ? TAKE(&arena, R * G) : w->dA.base;
        w->dh = f->proj ? buffer(TAKE(&arena, R * P), P, 1) : buffer(TAKE(&arena, B * P), P, 0);
        w->dm = f->proj ? TAKE(&arena, B * H) : NULL;
        w->tmp = f->mask ? TAKE(&arena, B * P) : NULL;
        w->db = TAKE(&arena, G);
        w->dg_ih = TAKE(&arena, G);
        w->dg_hh = TAKE(&arena, G);
        w->sums = TAKE(&arena, sum_levels(R) * 3 * G);
        w->own = TAKE(&arena, threads * OWN * H);
    }
    return arena.used;
}

/* Backward through one layer run by lk_variant_forward with `saved` and `cells`. 0 on success,
 * -1 if memory ran out. Reads `saved` only, so it can run again (retain_graph). */
int SUF(lk_variant_backward)(const lk_layer *a, const lk_variant *v, const lk_grads *g,
                             const lk_variant_grads *dv)
{
    vback dirs[2];
    const int64_t R = lk_packed_rows(a);
    for (int64_t d = 0; d < a->D; d++) {
        memset(&dirs[d], 0, sizeof dirs[d]);
        geometry(&dirs[d].f, a, v, d);
        dirs[d].f.R = R;
        dirs[d].f.keep = 1;
        dirs[d].g = g;
        dirs[d].d_param = dv->d_param[d];
    }
    const int threads = lk_threads(a, 2 * lk_layer_flops(a));
    real *dxp, *levels;
    lk_block *block =
        lk_workspace_take(backward_workspace(dirs, a, threads, NULL, &dxp, &levels));
    if (block == NULL)
        return -1;
    char *work = block->p;
    backward_workspace(dirs, a, threads, work, &dxp, &levels);
    const int64_t *off = dirs[0].f.off;
    lk_fill_offsets(a, (int64_t *)off);
    const real *xp = pack_input(a, off, (real *)dirs[0].f.xp);
    for (int64_t d = 0; d < a->D; d++)
        initial_grads(&dirs[d], threads);
    const int blas_threads = lk_blas_threads ? lk_blas_threads(threads) : 0;
    run_teams(backward_direction, dirs, sizeof dirs[0], a->D, threads);
    for (int64_t d = 0; d < a->D; d++)
        direction_grads(&dirs[d], threads);
    real *dx = g->d_x == NULL ? NULL : a->lengths != NULL ? dxp : g->d_x;
    for (int64_t d = 0; d < a->D; d++) { /* the large products, with every thread */
        const vback *w = &dirs[d];
        const vdir *f = &w->f;
        void *const *dw = g->d_w[d];
        const int64_t G = f->G, I = f->I, P = f->P, H = f->H;
        if (dw[LK_W_IH] != NULL)
            gemm_tn_rows(G, I, R, w->dX, G, xp, I, dw[LK_W_IH], I, levels);
        if (dw[LK_W_HH] != NULL)
            gemm_tn_rows(G, P, R, w->dY.base, G, f->hm.base, P, dw[LK_W_HH], P, levels);
        if (dw[LK_W_HR] != NULL)
            gemm_tn_rows(P, H, R, w->dh.base, P, f->m.base, H, dw[LK_W_HR], H, levels);
        if (dx != NULL)
            gemm(0, 0, R, I, G, 1, w->dX, G, f->w_ih, I, d == 0 ? 0 : 1, dx, I);
    }
    if (dx != NULL && dx != g->d_x)
        unpack_input_grad(a, off, dx, g->d_x);
    if (lk_blas_threads)
        lk_blas_threads(blas_threads);
    lk_workspace_give(block);
    return 0;
}
