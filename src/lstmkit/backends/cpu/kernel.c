/* lstmkit's CPU kernels: one LSTM layer (both directions), forward and backward.
 *
 * Legend: T steps, B batch, I input features, H cell units, P size of h (proj_size or H),
 * G = 4H gates, D directions. V = lanes per vector (8 float / 4 double), Hp = H rounded up to V,
 * Gp = 4 Hp. Plain C ABI (no torch headers), called through ctypes by lstmkit.backends.cpu.
 *
 * Gate layout. Inside the kernels the gate columns are permuted into blocks of V units: block j
 * holds [i, f, g, o] of units jV..jV+V-1, each gate one vector. So one block is everything the
 * update of V units needs, a thread owning a range of blocks owns a contiguous range of gate
 * columns, and every recurrent weight matrix is packed into panels of 4V columns (a panel row is
 * four vectors, panel rows follow each other in memory). Padded units have zero weights and are
 * never written to a user-visible tensor, nor read into a real unit: a padded lane may hold NaN
 * (zero weights times an infinite input), so the projection reads m's first H units only and
 * the padded units' gate gradients are set to zero before dh and dx multiply them. Loads and
 * stores of a partial last vector are masked (vload_n, vstore_n): nothing is read or written
 * past the end of a row. Weight gradients come out in this order and are permuted back to
 * torch's (i, f, g, o) rows at the end.
 *
 * Forward, per direction and step, block by block: b_ih + b_hh + x_t W_ih^T + h_{t-1} W_hh^T,
 * by register tiles of 6 rows x 2 or 4 vectors (as many as the tier's registers hold; one row
 * takes 1 x 4) that walk the block's panel of W_ih^T, then of W_hh^T, in passes that stay in L2
 * (the plan's pass_bytes), and write the pre-activations to G, where the gate update of that
 * block reads them while they are still in L1. The input projection thus runs inside the step,
 * on the thread that owns the block, with no separate GEMM and no buffer of every step's
 * pre-activations (inference keeps one step's, G (B, Gp); training keeps every step's activated
 * gates, G (R, Gp)). With proj_size a second product h = m W_hr^T follows, split by columns of
 * P. Weights are packed on every call (a copy of each weight, by vector tiles: small next to the
 * work of a call, and nothing can go stale).
 *
 * Batch 1 (B = 1, no proj_size: the latency shapes) skips the panels: a step is a matrix-vector
 * product, bound by reading W_hh (from L1 when small, else L2), by its chain of dependent FMAs
 * and by the latency of the gate update. Weights whose [W_ih W_hh]^T fits in L1 are packed once
 * per call into rows of gate columns (wt) and each input of the step (x_t, then h_{t-1}) is
 * broadcast against its row, two unit blocks (8 accumulators) at a time, the input projection
 * included. Bigger ones are read as torch stores them: each gate vector is V dot products with
 * rows of W_hh, summed across lanes at the end (row_block), so nothing is packed or copied and
 * W_hh stays cached between calls; W_ih joins the dot products when it is small, else x W_ih^T
 * is computed by halves of the units before the loop. The gate update follows in registers.
 * Backward's dh = dA W_hh reads torch's rows of W_hh too, each half of the units adding its
 * share into a buffer of the step, and the weight and input gradients of thin shapes (up to 2V
 * columns, where the BLAS was several times off its FMA count) take register tiles of their
 * own over all steps (by blocks of steps, summed pairwise: see "Sums over the steps"). Except
 * for the small case in forward, a batch-1 layer runs as items in two halves (lk_items): on
 * two threads, the calling thread and a helper (lk_pair_run), each half of W_hh stays in its
 * own core's L2, the threads exchange one count per step, and either thread finishes alone what
 * its partner is late for (another process holding its core), so a busy core costs about the
 * speed of one thread, not a scheduler timeslice per step.
 *
 * Threads: one OpenMP parallel region for the whole sequence. A bidirectional layer gives each
 * direction its own team (one thread each on two cores: no synchronisation at all); within a
 * team each thread owns a range of unit blocks (and of P panels), whose weight panels stay in
 * its cache, and the team meets at a spin barrier once per step (twice with proj_size). Work
 * below about a millisecond runs on the calling thread, except a batch-1 direction past L1,
 * which pairs with the helper thread when torch allows two threads (see lk_items: it never
 * waits long for its partner). The kernels compute every element in
 * the same order whatever the thread count (the BLAS does not promise as much; MKL gave the
 * same bits for 1 and 2 threads in our tests).
 *
 * Variable lengths: lengths are sorted non-increasing, so the sequences active at step t are
 * rows 0..n_t-1; a step touches only those rows. Rows whose state starts at this step (t = 0
 * forward, t = length-1 backward) read h0 and c0 instead of the previous step. Internal
 * per-step buffers (gates, their gradients, m, dh) are packed like a PackedSequence: row
 * (t, b) is off[t] + b, R = off[T] rows in all, so no GEMM works on padding; the input is
 * packed the same way before its projection.
 *
 * Kept for backward (training only, in `saved`): the activated gates (R, Gp) and, with
 * proj_size, m = o * tanh(c) (R, Hp); the cell states are the `cells` tensor (T, B, D*H) and
 * h is the output. Backward walks the steps in reverse, writing the gate gradients dA into a
 * buffer of its own (the kept gates stay intact, so backward can run twice with retain_graph);
 * dh_{t-1} = dA_t W_hh is split by columns of P (two barriers per step), the bias gradient is
 * summed on the way, and the weight gradients dA^T x, dA^T h_{t-1} (h_{t-1} gathered per packed
 * row), dh^T m and dx = dA W_ih are large GEMMs after the loop.
 *
 * Sums over the steps. A weight or bias gradient is a sum over every packed row (thousands):
 * one running sum loses about one rounding of itself per term, which made them several times
 * less accurate than torch's (which sums per step, then the steps). So the bias gradient of
 * each step is a term of pairwise sums over the steps (sum_push), the weight GEMMs run by
 * chunks of rows summed pairwise (gemm_tn_rows), the thin register tiles by blocks of steps
 * summed pairwise; all of them in an order fixed by the steps alone, whatever the threads.
 */
#include "lstm.h"
#include "real.h"
#include "driver.h"

#define W (4 * V) /* columns per panel */
/* Batch 1 (see row_block), where W_hh fits a core's L2 (the plan's row_bytes; a bigger one
 * streams from L3 each step, where the panel path on every thread does better): weights that
 * fit L1d (small_bytes) are packed for broadcasts; above, W_ih that fits L1d (fuse_bytes) is read
 * inside the step, a bigger one by a GEMM. */

static int64_t clamp_lanes(int64_t n) { return n < 0 ? 0 : n > V ? V : n; }

/* ---- one direction of a layer: geometry, buffers and row addresses ---- */

typedef struct {
    LK_SEQ;             /* the sequence's steps and rows (driver.h) */
    int64_t Hb, Hp, Gp; /* unit blocks, padded units, padded gate columns */
    int64_t Pb, Pp;     /* panels of W columns over P, padded P */
    int proj, keep;     /* proj_size > 0; training (keep the gates) */
    int row, fuse;      /* batch 1 (see row_block); its input projection inside the step */
    int hoist;          /* panel path: x W_ih^T of every step before the loop (see geometry) */
    int small;          /* batch 1 with [W_ih W_hh]^T packed in wt (see row_blocks) */
    int pair;           /* row, not small, on two threads: each step's cells kept (lk_items) */
    int packed;         /* the packed weights below are already in place (lk_layer.packed) */
    real *G;                  /* gates: pre-activations, then activations; (R, Gp), packed, when
                                 kept for backward, else (B, Gp) for one step */
    real *m;                  /* proj: m = o * tanh(c), (R, Hp) kept, or (B, Hp) for one step */
    real *pre;                /* row without fuse: (R, G) x W_ih^T in torch's gate order */
    real *xw;                 /* hoist: (R, Gp) b + x W_ih^T, packed rows (G itself if kept) */
    real *wt;                 /* small: (I + P, Gp) [W_ih W_hh]^T, permuted columns */
    real *scratch;            /* row: each rank's output of BLAS calls (see lk_items) */
    const real *w_ih, *w_hh;  /* torch's weights, as given */
    /* forward weights, packed */
    real *wi;   /* W_ih^T panels of I rows, one per unit block (see panel_at) */
    real *wx;   /* backward: (Gp, I) permuted rows of W_ih, for dx = dA W_ih */
    real *bias; /* (Gp) b_ih + b_hh */
    real *wr;   /* W_hh^T panels of P rows, one per unit block (see panel_at) */
    real *wp;   /* proj: W_hr^T panels of Hp rows, one per W columns of P */
} dir_t;

static real *gate_row(const dir_t *w, int64_t t, int64_t b)
{
    return w->G + ((w->keep ? w->off[t] : 0) + b) * w->Gp;
}
static real *m_row(const dir_t *w, int64_t t, int64_t b)
{
    return w->m + (w->keep ? w->off[t] + b : b) * w->Hp;
}

/* Original row (q H + j) of permuted gate column `col`, or -1 for a padded unit. */
static int64_t torch_row(const dir_t *w, int64_t col)
{
    int64_t j = col / W * V + col % V, q = col % W / V;
    return j < w->H ? q * w->H + j : -1;
}

static void geometry(dir_t *w, const lk_layer *a, int64_t d)
{
    memset(w, 0, sizeof *w);
    seq_init(&w->seq, a, d);
    w->Hb = (a->H + V - 1) / V;
    w->Hp = w->Hb * V;
    w->Gp = 4 * w->Hp;
    w->Pb = (a->P + W - 1) / W;
    w->Pp = w->Pb * W;
    w->proj = a->w[d][LK_W_HR] != NULL;
    const lk_plan *plan = &lk_planned;
    w->row = a->B == 1 && !w->proj && (double)(4 * a->H * a->P) * sizeof(real) <= plan->row_bytes;
    w->small = w->row && (double)((a->I + a->P) * w->Gp) * sizeof(real) <= plan->small_bytes;
    w->fuse = w->small || (w->row && (double)(4 * a->H * a->I) * sizeof(real) <= plan->fuse_bytes);
    /* Fewer rows than a register tile's, and weights that do not stay in one core's L2 between
     * steps: inside the step, the projection would stream W_ih from L3 every step for the
     * work of a few rows; before the loop, one pass over W_ih serves every step's rows. */
    w->hoist = !w->row && a->B < TILE_ROWS &&
               (double)((a->I + a->P) * w->Gp) * sizeof(real) > plan->row_bytes;
    w->w_ih = a->w[d][LK_W_IH];
    w->w_hh = a->w[d][LK_W_HH];
}

/* ---- packing torch's weights into the kernel layouts ---- */

/* Weight panels: W columns by `rows` rows, stored as two halves of 2V columns one after the
 * other, so each pass of a 6 x 2 register tile streams contiguous memory. The offset of element
 * (k, c) of panel `panel` in a matrix of such panels: */
static int64_t panel_at(int64_t panel, int64_t rows, int64_t k, int64_t c)
{
    return ((panel * 2 + c / (2 * V)) * rows + k) * (2 * V) + c % (2 * V);
}

/* dst[k ld_dst + v] = src[v ld_src + k] for k < K, v < V; zero for v >= lanes: V rows of src
 * (`lanes` of them real) written as K vectors. By tiles of V x V through L1, so that every
 * load and store is a whole vector, not one scattered element. */
static void transpose_rows(const real *src, int64_t ld_src, int64_t lanes, int64_t K, real *dst,
                           int64_t ld_dst)
{
    for (int64_t k0 = 0; k0 < K; k0 += V) {
        const int64_t n = min64(V, K - k0);
        real tile[V][V];
        for (int64_t v = 0; v < V; v++)
            vstore(tile[v], v < lanes ? vload_n(src + v * ld_src + k0, n) : splat(0));
        for (int64_t j = 0; j < n; j++) {
            vec column;
            for (int64_t v = 0; v < V; v++)
                column[v] = tile[v][j];
            vstore(dst + (k0 + j) * ld_dst, column);
        }
    }
}

/* small: wt (I + P, Gp), row k the weights of input k (x_t, then h_{t-1}) for every gate
 * column: the V columns of gate q of unit block blk are V consecutive rows of torch's weights. */
static void pack_small(const dir_t *w, real *wt)
{
    for (int64_t blk = 0; blk < w->Hb; blk++)
        for (int q = 0; q < 4; q++) {
            const int64_t row = q * w->H + blk * V, lanes = clamp_lanes(w->H - blk * V);
            real *column = wt + blk * W + q * V;
            transpose_rows(w->w_ih + row * w->I, w->I, lanes, w->I, column, w->Gp);
            transpose_rows(w->w_hh + row * w->P, w->P, lanes, w->P, column + w->I * w->Gp, w->Gp);
        }
}

/* The forward weights of unit blocks [b0, b1) and of W columns of P [p0, p1): the bias, and on
 * the panel path W_ih^T and W_hh^T (and W_hr^T) into panels. Each thread of a team packs what
 * it owns, which is all it reads (the row path reads torch's weights as they are, or wt). */
static void pack_forward(const dir_t *w, int64_t b0, int64_t b1, int64_t p0, int64_t p1)
{
    const lk_layer *a = w->a;
    const real *w_ih = a->w[w->d][LK_W_IH], *w_hh = a->w[w->d][LK_W_HH];
    const real *b_ih = a->w[w->d][LK_B_IH], *b_hh = a->w[w->d][LK_B_HH];
    const real *w_hr = a->w[w->d][LK_W_HR];
    for (int64_t col = b0 * W; col < b1 * W; col++) {
        int64_t r = torch_row(w, col);
        w->bias[col] = r < 0 ? 0 : (b_ih ? b_ih[r] : 0) + (b_hh ? b_hh[r] : 0);
    }
    /* the V columns of gate q of unit block blk are V consecutive rows of torch's weight, and V
     * consecutive columns of a panel half */
    for (int64_t blk = b0; blk < b1 && !w->row; blk++)
        for (int q = 0; q < 4; q++) {
            const int64_t row = q * w->H + blk * V, lanes = clamp_lanes(w->H - blk * V);
            transpose_rows(w_ih + row * w->I, w->I, lanes, w->I,
                           w->wi + panel_at(blk, w->I, 0, q * V), 2 * V);
            transpose_rows(w_hh + row * w->P, w->P, lanes, w->P,
                           w->wr + panel_at(blk, w->P, 0, q * V), 2 * V);
        }
    for (int64_t pb = p0; pb < p1 && w->proj; pb++)
        for (int64_t j = 0; j < w->Hp; j++)
            for (int64_t c = 0; c < W; c++) {
                int64_t p = pb * W + c;
                w->wp[panel_at(pb, w->Hp, j, c)] = p < w->P && j < w->H ? w_hr[p * w->H + j] : 0;
            }
}

/* Backward layouts: ub = panels of W_hh (permuted rows, Gp rows each) over columns of P, for
 * dh = dA W_hh; wrb (Hb, P, V) = W_hr per unit block, for dm = dh W_hr. */
static void pack_backward(const dir_t *w, real *ub, real *wrb)
{
    const lk_layer *a = w->a;
    const real *w_hh = a->w[w->d][LK_W_HH], *w_hr = a->w[w->d][LK_W_HR];
    for (int64_t pb = 0; pb < w->Pb; pb++)
        for (int64_t col = 0; col < w->Gp; col++) {
            const int64_t r = torch_row(w, col);
            for (int64_t c = 0; c < W; c += 2 * V) { /* a panel half: 2V contiguous columns */
                const int64_t p = pb * W + c, n = r < 0 || p >= w->P ? 0 : min64(2 * V, w->P - p);
                real *dst = ub + panel_at(pb, w->Gp, col, c);
                memcpy(dst, w_hh + (r < 0 ? 0 : r * w->P + p), (size_t)n * sizeof(real));
                memset(dst + n, 0, (size_t)(2 * V - n) * sizeof(real));
            }
        }
    if (!w->proj)
        return;
    for (int64_t blk = 0; blk < w->Hb; blk++)
        for (int64_t p = 0; p < w->P; p++)
            for (int64_t v = 0; v < V; v++) {
                int64_t j = blk * V + v;
                wrb[(blk * w->P + p) * V + v] = j < w->H ? w_hr[p * w->H + j] : 0;
            }
}

/* dst (4H, cols) in torch's row order from src (Gp, cols) in the kernel's. */
static void unpermute(const dir_t *w, const real *src, real *dst, int64_t cols)
{
    for (int64_t col = 0; col < w->Gp; col++) {
        int64_t r = torch_row(w, col);
        if (r >= 0)
            memcpy(dst + r * cols, src + col * cols, (size_t)cols * sizeof(real));
    }
}

/* ---- panel products: C rows = init rows + bias + A rows x panel, one panel at a time ----
 * A panel is up to four vectors of columns (each its own column pointer, rows ld apart), so a
 * product can cover one unit block of W_hh (its four gates) or four blocks of W_hr. Rows of A
 * and C are addressed through rows_t: a base and a stride, and another pair from row `split` on
 * (rows that start from h0 instead of the previous step). */

typedef struct {
    real *base;
    int64_t stride, split;
    real *alt;
    int64_t alt_stride;
} rows_t;

typedef struct {
    const real *col[4]; /* each vector's column, or NULL past the panel's end */
    int64_t ld;         /* elements between rows */
    int64_t cols;       /* columns of C to store (the rest of the last vector is padding) */
} panel_t;

static rows_t rows(real *base, int64_t stride)
{
    rows_t r = {base, stride, INT64_MAX, NULL, 0};
    return r;
}
static rows_t rows_split(real *base, int64_t stride, int64_t split, real *alt, int64_t alt_stride)
{
    rows_t r = {base, stride, split, alt, alt_stride};
    return r;
}
LK_INLINE real *row_at(const rows_t *r, int64_t b)
{
    return b < r->split ? r->base + b * r->stride : r->alt + b * r->alt_stride;
}

/* acc[r][c] += sum_k a[r][k] b[c][k ld]; called with constant mr and nv, so the loops unroll
 * and acc lives in registers (see TILE_VECS for the shapes; 1 x 4 is the one-row shape). */
LK_INLINE void panel_mac(const int mr, const int nv, int64_t k, real *const *a,
                         const real *const *b, int64_t ld, vec acc[TILE_ROWS][4])
{
#pragma GCC unroll 4
    for (int64_t kk = 0; kk < k; kk++) {
        vec bv[4];
        for (int c = 0; c < nv; c++)
            bv[c] = vload(b[c] + kk * ld);
        for (int r = 0; r < mr; r++) {
            vec ar = splat(a[r][kk]);
            for (int c = 0; c < nv; c++)
                acc[r][c] += ar * bv[c];
        }
    }
}

/* Rows b0..b0+mr-1, vectors v0..v0+nv-1 of the panel. init (base NULL: none), bias (NULL:
 * none, else whole vectors) may be NULL. C = (init + bias) + the tile's sum over k, the sum
 * starting from zero (see panel_rows_per_pass). Rows of init and C are read and written only
 * in the panel's first `cols` columns: with proj_size they are output rows, which end at P
 * (init is C itself on every pass after the first). */
LK_INLINE void panel_tile(const int mr, const int nv, int64_t b0, int v0, int64_t k,
                          const rows_t *a, const panel_t *p, const rows_t *init,
                          const real *bias, const rows_t *c)
{
    real *arow[TILE_ROWS];
    vec acc[TILE_ROWS][4];
    int64_t lanes[4];
    for (int j = 0; j < nv; j++)
        lanes[j] = clamp_lanes(p->cols - (v0 + j) * V);
    for (int r = 0; r < mr; r++) {
        arow[r] = row_at(a, b0 + r);
        for (int j = 0; j < nv; j++)
            acc[r][j] = splat(0);
    }
    panel_mac(mr, nv, k, arow, p->col + v0, p->ld, acc);
    for (int r = 0; r < mr; r++) {
        real *crow = row_at(c, b0 + r);
        for (int j = 0; j < nv; j++) {
            const int64_t col = (v0 + j) * V;
            vec before = init->base != NULL ? vload_n(row_at(init, b0 + r) + col, lanes[j])
                                            : splat(0);
            if (bias != NULL)
                before += vload(bias + col);
            vstore_n(crow + col, before + acc[r][j], lanes[j]);
        }
    }
}

/* The tier's tile (TILE_ROWS x TILE_VECS, see tier_*.h) and the smaller ones for the rows left.
 * One compiled copy per tile shape (inlining them into every caller costs compile time and
 * gains nothing: a tile runs for hundreds of cycles). */
#define TILE(mr, nv)                                                                              \
    static __attribute__((noinline, noclone)) void tile_##mr##x##nv(                              \
        int64_t b0, int v0, int64_t k, const rows_t *a, const panel_t *p, const rows_t *init,    \
        const real *bias, const rows_t *c)                                                        \
    {                                                                                             \
        panel_tile(mr, nv, b0, v0, k, a, p, init, bias, c);                                      \
    }
#define TILE_OF(mr, nv) TILE(mr, nv) /* expands nv (TILE_VECS) before pasting it */
#define TILE_NAME(mr, nv) TILE_NAME_(mr, nv)
#define TILE_NAME_(mr, nv) tile_##mr##x##nv
_Static_assert(TILE_ROWS == 6, "the tiles below are those of six rows and the rows left");
TILE_OF(6, TILE_VECS)
TILE_OF(5, TILE_VECS)
TILE_OF(4, TILE_VECS)
TILE_OF(3, TILE_VECS)
TILE_OF(2, TILE_VECS)
TILE(1, 4)
#undef TILE
#undef TILE_OF

typedef void (*tile_fn)(int64_t b0, int v0, int64_t k, const rows_t *a, const panel_t *p,
                        const rows_t *init, const real *bias, const rows_t *c);
/* The tile for the rows left after the tiles of six, by count (one row takes all four vectors
 * at once). */
static const tile_fn leftover_tiles[TILE_ROWS] = {
    NULL,
    tile_1x4,
    TILE_NAME(2, TILE_VECS),
    TILE_NAME(3, TILE_VECS),
    TILE_NAME(4, TILE_VECS),
    TILE_NAME(5, TILE_VECS),
};

/* C = init + bias + A P for rows 0..n-1, over k in [k0, k1): tiles of 6 rows x TILE_VECS
 * vectors across the panel, the remaining rows in one smaller tile per TILE_VECS vectors; a
 * single row takes all four vectors at once. */
static void panel_rows_part(int64_t n, int64_t k0, int64_t k1, const rows_t *a, const panel_t *p,
                            const rows_t *init, const real *bias, const rows_t *c)
{
    rows_t ak = *a;
    ak.base = a->base != NULL ? a->base + k0 : NULL;
    ak.alt = a->alt != NULL ? a->alt + k0 : NULL;
    panel_t pk = *p;
    for (int j = 0; j < 4; j++)
        pk.col[j] = p->col[j] != NULL ? p->col[j] + k0 * p->ld : NULL;
    const int64_t k = k1 - k0;
    int64_t b = 0;
    for (; b + TILE_ROWS <= n; b += TILE_ROWS)
        for (int v0 = 0; v0 < 4; v0 += TILE_VECS)
            TILE_NAME(6, TILE_VECS)(b, v0, k, &ak, &pk, init, bias, c);
    if (n - b == 1)
        tile_1x4(b, 0, k, &ak, &pk, init, bias, c);
    else if (n > b)
        for (int v0 = 0; v0 < 4; v0 += TILE_VECS)
            leftover_tiles[n - b](b, v0, k, &ak, &pk, init, bias, c);
}

/* Rows of the panel per pass: the plan's pass_bytes of it, which stay in L2 while every row
 * tile reads them, and at most SUM_ROWS. Each pass sums its rows from zero and adds that to C:
 * one running sum over all of K (4H terms for dh = dA W_hh) loses about a rounding per term,
 * and a sum per pass of a bounded length keeps wide layers as accurate as torch's
 * (tests/test_accuracy.py; the bound is the numbers', not the machine's, and the
 * measurements are in benchmarks/README.md). */
#define SUM_ROWS 512
static int64_t panel_rows_per_pass(void)
{
    const int64_t rows = (int64_t)(lk_planned.pass_bytes / (double)(W * sizeof(real)));
    return rows < 1 ? 1 : rows > SUM_ROWS ? SUM_ROWS : rows;
}

static void panel_rows(int64_t n, int64_t k, const rows_t *a, const panel_t *p,
                       const rows_t *init, const real *bias, const rows_t *c)
{
    int64_t k0 = 0;
    do {
        const int64_t k1 = min64(k, k0 + panel_rows_per_pass());
        panel_rows_part(n, k0, k1, a, p, k0 == 0 ? init : c, k0 == 0 ? bias : NULL, c);
        k0 = k1;
    } while (k0 < k);
}

/* Panel `panel` of a packed matrix of panels of `rows` rows (see panel_at). */
static panel_t packed_panel(const real *matrix, int64_t panel, int64_t rows, int64_t cols)
{
    const real *first = matrix + panel_at(panel, rows, 0, 0);
    const real *second = matrix + panel_at(panel, rows, 0, 2 * V);
    panel_t p = {{first, first + V, second, second + V}, 2 * V, cols};
    return p;
}

/* ---- forward ---- */

static void zero_columns(real *row, int64_t begin, int64_t end)
{
    if (end > begin)
        memset(row + begin, 0, (size_t)(end - begin) * sizeof(real));
}

/* The update of unit block blk of row b from its pre-activations [i, f, g, o]: c and h (or m)
 * stored, and the activated gates into `kept` (training; NULL otherwise). */
LK_INLINE void update_block(const dir_t *w, const step_t *st, int64_t b, int64_t blk,
                            const vec pre[4], real *kept)
{
    const int64_t lanes = clamp_lanes(w->H - blk * V);
    vec i = v_sigmoid(pre[0]), f = v_sigmoid(pre[1]), g = v_tanh(pre[2]), o = v_sigmoid(pre[3]);
    vec c = f * vload_n(c_prev(&w->seq, st, b) + blk * V, lanes) + i * g;
    vec h = o * v_tanh(c);
    vstore_n(cell_row(&w->seq, st->t, b) + blk * V, c, lanes);
    if (w->proj)
        vstore(m_row(w, st->t, b) + blk * V, h);
    else
        vstore_n(out_row(&w->seq, st->t, b) + blk * V, h, lanes);
    if (kept != NULL) {
        vstore(kept, i);
        vstore(kept + V, f);
        vstore(kept + 2 * V, g);
        vstore(kept + 3 * V, o);
    }
}

/* The gate update of unit block blk for the active rows, from the pre-activations in G, two rows
 * per iteration (unrolled: their chains of exp and division overlap). */
static void gate_update(const dir_t *w, const step_t *st, int64_t blk)
{
#pragma GCC unroll 2
    for (int64_t b = 0; b < st->n; b++) {
        real *pre = gate_row(w, st->t, b) + blk * W;
        const vec gates[4] = {vload(pre), vload(pre + V), vload(pre + 2 * V), vload(pre + 3 * V)};
        update_block(w, st, b, blk, gates, w->keep ? pre : NULL);
    }
}

/* ---- batch 1: a step is matrix-vector products on torch's row-major weights ----
 * The gate q of unit block blk is V rows of W_hh (q H + blk V + v, a row of P weights each):
 * V dot products with h_{t-1}, each accumulated in a vector over chunks of V columns, then
 * summed across lanes (lane_sums), so no weight is packed or copied and every load is
 * contiguous. With `fuse`, the same accumulators first take the dot products of x_t with the
 * rows of W_ih (when W_ih is small enough to stay in cache beside W_hh); otherwise x W_ih^T for
 * every step is one GEMM before the loop, in torch's gate order (pre). The update follows in
 * registers. Rows of padded lanes repeat the block's first row and are never stored. */

/* acc[v] += src[0..n) * rows[v][0..n) by vectors, rows[v] = first + min(v, lanes - 1) ld. */
LK_INLINE void dot_rows(vec acc[V], const real *first, int64_t ld, int64_t lanes, const real *src,
                        int64_t n)
{
    const real *rows[V];
    for (int v = 0; v < V; v++)
        rows[v] = first + (v < lanes ? v : 0) * ld;
    int64_t k = 0;
    for (; k + V <= n; k += V) {
        const vec s = vload(src + k);
        for (int v = 0; v < V; v++)
            acc[v] += s * vload(rows[v] + k);
    }
    if (k < n) {
        const vec s = vload_n(src + k, n - k);
        for (int v = 0; v < V; v++)
            acc[v] += s * vload_n(rows[v] + k, n - k);
    }
}

/* Unit block blk of the one row of step st: its four gates, then the update. */
static void row_block(const dir_t *w, const step_t *st, int64_t blk)
{
    const int64_t lanes = clamp_lanes(w->H - blk * V), row = w->off[st->t];
    const real *h = h_prev(&w->seq, st, 0), *x = w->xp + row * w->I;
    vec pre[4];
    for (int q = 0; q < 4; q++) {
        const int64_t r0 = q * w->H + blk * V; /* torch's row of the block's first unit */
        vec acc[V];
        for (int v = 0; v < V; v++)
            acc[v] = splat(0);
        if (w->fuse)
            dot_rows(acc, w->w_ih + r0 * w->I, w->I, lanes, x, w->I);
        dot_rows(acc, w->w_hh + r0 * w->P, w->P, lanes, h, w->P);
        pre[q] = lane_sums(acc) + vload(w->bias + blk * W + q * V);
        if (!w->fuse)
            pre[q] += vload_n(w->pre + row * 4 * w->H + r0, lanes);
    }
    update_block(w, st, 0, blk, pre, w->keep ? gate_row(w, st->t, 0) + blk * W : NULL);
}

/* small: nb unit blocks from blk (1 or 2: 4 nb accumulators) of the one row of step st, each
 * input broadcast against its packed row of wt, so no sums across lanes. */
LK_INLINE void row_blocks(const dir_t *w, const step_t *st, int64_t blk, const int nb)
{
    const int64_t row = w->off[st->t];
    const real *x = w->xp + row * w->I, *h = h_prev(&w->seq, st, 0), *wt = w->wt + blk * W;
    vec acc[8];
    for (int j = 0; j < 4 * nb; j++)
        acc[j] = vload(w->bias + blk * W + j * V);
    for (int64_t k = 0; k < w->I; k++, wt += w->Gp) {
        const vec s = splat(x[k]);
        for (int j = 0; j < 4 * nb; j++)
            acc[j] += s * vload(wt + j * V);
    }
    for (int64_t k = 0; k < w->P; k++, wt += w->Gp) {
        const vec s = splat(h[k]);
        for (int j = 0; j < 4 * nb; j++)
            acc[j] += s * vload(wt + j * V);
    }
    for (int b = 0; b < nb; b++)
        update_block(w, st, 0, blk + b, acc + 4 * b,
                     w->keep ? gate_row(w, st->t, 0) + (blk + b) * W : NULL);
}

static __attribute__((noinline)) void row_blocks_1(const dir_t *w, const step_t *st, int64_t blk)
{
    row_blocks(w, st, blk, 1);
}
static __attribute__((noinline)) void row_blocks_2(const dir_t *w, const step_t *st, int64_t blk)
{
    row_blocks(w, st, blk, 2);
}

/* The whole sequence for one direction, as member `rank` of a team of `size` threads. */
static void forward_direction(const dir_t *w, const team_t *tm)
{
    int64_t b0, b1, p0, p1;
    lk_split(w->Hb, tm->rank, tm->size, &b0, &b1);
    lk_split(w->Pb, tm->rank, tm->size, &p0, &p1);
    const int64_t u0 = b0 * V, u1 = min64(b1 * V, w->H); /* own units */
    const int64_t DP = w->D * w->P;
    if (!w->row && !w->packed)
        pack_forward(w, b0, b1, p0, p1);
    const rows_t none = rows(NULL, 0);
    for (int64_t blk = b0; blk < b1 && w->hoist; blk++) { /* own columns: no barrier after */
        const panel_t pi = packed_panel(w->wi, blk, w->I, W);
        const rows_t x = rows((real *)w->xp, w->I), xw = rows(w->xw + blk * W, w->Gp);
        panel_rows(w->off[w->T], w->I, &x, &pi, &none, w->bias + blk * W, &xw);
    }
    for (int64_t s = 0; s < w->T; s++) {
        const step_t st = make_step(&w->seq, s);
        /* h_{t-1}: the previous step's output, or h0 for rows that start here */
        const rows_t h = rows_split(st.cont > 0 ? out_row(&w->seq, st.prev, 0) : NULL, DP, st.cont,
                                    (real *)w->h0, w->P);
        const rows_t gates = rows(w->G != NULL ? gate_row(w, st.t, 0) : NULL, w->Gp);
        for (int64_t blk = b0; blk < b1 && w->small && st.n > 0; blk += 2) {
            if (blk + 1 < b1)
                row_blocks_2(w, &st, blk);
            else
                row_blocks_1(w, &st, blk);
        }
        /* x_t: the packed input's rows of step t */
        const rows_t x = rows((real *)w->xp + w->off[st.t] * w->I, w->I);
        for (int64_t blk = b0; blk < b1 && !w->row; blk++) {
            const panel_t p = packed_panel(w->wr, blk, w->P, W);
            const rows_t g = rows(gates.base + blk * W, w->Gp);
            if (w->hoist) { /* b + x_t W_ih^T from before the loop */
                const rows_t xw = rows(w->xw + w->off[st.t] * w->Gp + blk * W, w->Gp);
                panel_rows(st.n, w->P, &h, &p, &xw, NULL, &g);
            } else {
                const panel_t pi = packed_panel(w->wi, blk, w->I, W);
                panel_rows(st.n, w->I, &x, &pi, &none, w->bias + blk * W, &g);
                panel_rows(st.n, w->P, &h, &p, &g, NULL, &g);
            }
            gate_update(w, &st, blk);
        }
        for (int64_t b = st.n; b < w->B; b++) { /* padded steps: zero output and cells */
            if (w->cells != NULL)
                zero_columns(cell_row(&w->seq, st.t, b), u0, u1);
            if (!w->proj)
                zero_columns(out_row(&w->seq, st.t, b), u0, u1);
        }
        if (w->proj) {
            team_wait(tm); /* m of this step complete */
            const rows_t m = rows(m_row(w, st.t, 0), w->Hp);
            for (int64_t pb = p0; pb < p1; pb++) {
                const panel_t p = packed_panel(w->wp, pb, w->Hp, w->P - pb * W);
                const rows_t out = rows(out_row(&w->seq, st.t, 0) + pb * W, DP);
                panel_rows(st.n, w->H, &m, &p, &none, NULL, &out); /* padded m: unread */
            }
            for (int64_t b = st.n; b < w->B; b++)
                zero_columns(out_row(&w->seq, st.t, b), p0 * W, min64(p1 * W, w->P));
        }
        team_wait(tm); /* h of this step complete */
    }
}

/* ---- batch 1 as items: work that either of two threads may do, in halves ----
 * A batch-1 layer with weights too big for L1 (row, not small) runs as a sequence of items
 * (the input projection, each step; in backward each step, then the weight gradients), each in
 * two halves of the unit blocks, [0, Hb/2) and [Hb/2, Hb): whatever the number of threads, the
 * same halves are computed by the same code, so the results are the same bits. On two threads
 * (lk_pair_run) rank r computes half r of an item, then waits for the other half about as long
 * as its own took; if the partner is late (descheduled, or not started yet) it computes that
 * half too, and while the partner stays away it waits only a quarter of that (so one thread
 * runs at one-thread speed; the partner, back, catches up by skipping finished items and
 * rejoins). A thread computes a half only after claiming it (one compare-and-swap on a count
 * of claimed items that only that thread's partner may also touch), so every value has one
 * writer: a thread that finds the half it waits for claimed waits for it to be done (the
 * partner is inside it). The claimant publishes the half with a release store of the done
 * count; the other thread reads its results only after an acquire load saw that count. An item
 * writes only memory of its own (the outputs, cells and gate rows of its step; per-step buffers
 * in backward). A BLAS call writes into scratch of the rank (`scratch`, one per thread), which
 * is then copied into place. lk_pair_run returns only when the helper is out of the job. */

typedef void (*item_fn)(const void *job, int64_t item, int half, int rank);

/* The counts of a sequence of items, per half: claimed by a thread, and finished. */
typedef struct {
    lk_count claimed[2], done[2];
} halves_t;

/* Whether this thread takes half h of item i (nobody has yet: claimed[h] is i). The claim
 * orders nothing: the inputs of item i were acquired through the done counts of item i - 1. */
static int claim(halves_t *c, int h, int64_t i)
{
    long long expected = i;
    return atomic_compare_exchange_strong_explicit(&c->claimed[h].n, &expected, i + 1,
                                                   memory_order_relaxed, memory_order_relaxed);
}

/* Half h of item i by this thread, then published. */
static void compute(const void *job, item_fn fn, halves_t *c, int64_t i, int h, int rank)
{
    fn(job, i, h, rank);
    atomic_store_explicit(&c->done[h].n, i + 1, memory_order_release);
}

/* Waits, as long as it takes, for half h of item i that the partner claimed (and so is
 * computing), yielding the core after a while (the partner may be descheduled inside it). */
static void wait_done(halves_t *c, int h, int64_t i)
{
    const uint64_t start = lk_ticks();
    while (lk_count_get(&c->done[h]) <= i)
        if (lk_ticks() - start < lk_waits.claimed_spin)
            lk_pause();
        else
            sched_yield();
}

/* Items 0..n-1, item i needing both halves of every item before it. `lag`: the items are
 * steps (for lk_pair_lag). */
static void lk_items(const void *job, item_fn fn, int64_t n, halves_t *c, int rank, int size,
                     int lag)
{
    if (size == 1) {
        for (int64_t i = 0; i < n; i++) {
            if (lag)
                lk_pair_lag(rank, i);
            fn(job, i, 0, rank);
            fn(job, i, 1, rank);
        }
        return;
    }
    const int own = rank, other = 1 - rank;
    int partner = 1; /* the partner kept up at the last item */
    for (int64_t i = 0; i < n; i++) {
        if (lag)
            lk_pair_lag(rank, i);
        const uint64_t start = lk_ticks();
        if (claim(c, own, i))
            compute(job, fn, c, i, own, rank);
        const uint64_t took = lk_ticks() - start;
        if (lk_count_wait(&c->done[other], i, partner ? 2 * took + lk_waits.slack : took / 4)) {
            partner = 1;
        } else if (claim(c, other, i)) {
            compute(job, fn, c, i, other, rank);
            if (partner && rank == 0)
                lk_pair_late();
            partner = 0;
        } else {
            wait_done(c, other, i);
        }
        wait_done(c, own, i); /* done unless the partner took it */
    }
}

/* Unit blocks of half `half`. */
static void half_blocks(const dir_t *w, int half, int64_t *b0, int64_t *b1)
{
    lk_split(w->Hb, half, 2, b0, b1);
}

/* The BLAS on one thread for the calling thread (the pair's threads split the work); returns
 * the setting to restore. */
static int blas_alone(void) { return lk_blas_threads ? lk_blas_threads(1) : 0; }
static void blas_restore(int old)
{
    if (lk_blas_threads)
        lk_blas_threads(old);
}

typedef struct {
    const dir_t *w;
    halves_t projection, steps;
} row_forward_t;

/* Units of the bigger half: half_units(w) * 4 * rows is a rank's scratch for rows. */
static int64_t half_units(const dir_t *w) { return (w->Hb + 1) / 2 * V; }

/* Without fuse: x W_ih^T of every step for the units of the half, into pre (R, 4H), through the
 * rank's scratch (R, 4 units of the half). */
static void row_projection_item(const void *job, int64_t item, int half, int rank)
{
    const dir_t *w = ((const row_forward_t *)job)->w;
    int64_t b0, b1;
    (void)item;
    half_blocks(w, half, &b0, &b1);
    const int64_t u0 = b0 * V, n = min64(b1 * V, w->H) - u0, R = w->off[w->T];
    real *tmp = w->scratch + rank * R * 4 * half_units(w);
    for (int q = 0; q < 4 && n > 0; q++)
        gemm(0, 1, R, n, w->I, 1, w->xp, w->I, w->w_ih + (q * w->H + u0) * w->I, w->I, 0,
             tmp + q * n, 4 * n);
    for (int64_t r = 0; r < R && n > 0; r++)
        for (int q = 0; q < 4; q++)
            memcpy(w->pre + r * 4 * w->H + q * w->H + u0, tmp + (r * 4 + q) * n,
                   (size_t)n * sizeof(real));
}

static void row_step_item(const void *job, int64_t s, int half, int rank)
{
    (void)rank;
    const dir_t *w = ((const row_forward_t *)job)->w;
    const step_t st = make_step(&w->seq, s);
    int64_t b0, b1;
    half_blocks(w, half, &b0, &b1);
    if (st.n == 0) { /* a padded step: zero output and cells */
        const int64_t u0 = b0 * V, u1 = min64(b1 * V, w->H);
        if (w->cells != NULL) /* else the ring: it holds the last cell state */
            zero_columns(cell_row(&w->seq, st.t, 0), u0, u1);
        zero_columns(out_row(&w->seq, st.t, 0), u0, u1);
        return;
    }
    for (int64_t blk = b0; blk < b1; blk++)
        row_block(w, &st, blk);
}

static void row_forward_job(void *arg, int rank, int size)
{
    row_forward_t *job = arg;
    const int blas = blas_alone();
    if (!job->w->fuse)
        lk_items(job, row_projection_item, 1, &job->projection, rank, size, 0);
    lk_items(job, row_step_item, job->w->T, &job->steps, rank, size, 1);
    blas_restore(blas);
}

/* A batch-1 direction on the calling thread, or on the pair when w->pair. */
static void row_forward(const dir_t *w)
{
    row_forward_t job;
    memset(&job, 0, sizeof job);
    job.w = w;
    if (w->pair)
        lk_pair_run(row_forward_job, &job);
    else
        row_forward_job(&job, 0, 1);
}

static void forward_direction_fn(void *dir, const team_t *tm)
{
    const dir_t *w = dir;
    if (!w->row || w->small)
        forward_direction(w, tm);
    else if (tm->rank == 0) /* the rest of the team has nothing to do */
        row_forward(w);
}

/* Elements of `saved` that a training forward needs (see the file comment). */
int64_t SUF(lk_saved_elems)(const lk_layer *a)
{
    dir_t w;
    geometry(&w, a, 0);
    return a->D * lk_packed_rows(a) * (w.Gp + (w.proj ? w.Hp : 0));
}

/* A direction's packed forward weights, from `arena`: the workspace, or lk_layer.packed. */
static void packed_weights(dir_t *w, lk_arena *arena)
{
    w->wi = w->row ? NULL : TAKE(arena, w->Hb * w->I * W);
    w->bias = TAKE(arena, w->Gp);
    w->wr = w->row ? NULL : TAKE(arena, w->Hb * w->P * W);
    w->wp = w->proj ? TAKE(arena, w->Pb * w->Hp * W) : NULL;
    w->wt = w->small ? TAKE(arena, (w->I + w->P) * w->Gp) : NULL;
}

/* ---- packed weights kept between calls ----
 * A short call spends much of its time packing its weights (transposes into panels, the summed
 * bias; benchmarks/README.md, "Measured behind the kernels' choices", has the numbers).
 * lk_layer.packed is a buffer the caller keeps between calls: a header (the layout), a copy of
 * every weight as it was when packed, then the packed arrays. A call whose layout matches and
 * whose weights equal the copy bit for bit (memcmp: exact, whatever changed them, be it an
 * optimizer step, p.data or a numpy view; and a read of each weight, cheaper than packing it)
 * uses the packed arrays as they are; any other packs into them and takes a new copy. Only the
 * panel and small paths pack enough to gain (the row path packs only the bias). */

#define PACKED_HEADER 16 /* int64: valid, V, sizeof(real), I, H, P, D, then per direction row,
                            small, proj and which of the five weights it has */

static size_t weight_bytes(const dir_t *w, int k)
{
    const int64_t sizes[LK_WEIGHTS] = {4 * w->H * w->I, 4 * w->H * w->P, 4 * w->H, 4 * w->H,
                                       w->P * w->H};
    return w->a->w[w->d][k] == NULL ? 0 : (size_t)sizes[k] * sizeof(real);
}

static void packed_header(const dir_t *dirs, const lk_layer *a, int64_t *h)
{
    memset(h, 0, PACKED_HEADER * sizeof *h);
    const int64_t head[7] = {1, V, sizeof(real), a->I, a->H, a->P, a->D};
    memcpy(h, head, sizeof head);
    for (int64_t d = 0; d < a->D; d++) {
        const dir_t *w = &dirs[d];
        int64_t present = 0;
        for (int k = 0; k < LK_WEIGHTS; k++)
            present |= (int64_t)(a->w[d][k] != NULL) << k;
        h[7 + 4 * d] = w->row, h[8 + 4 * d] = w->small, h[9 + 4 * d] = w->proj;
        h[10 + 4 * d] = present;
    }
}

/* Whether this layer keeps packed weights in lk_layer.packed (both directions pack alike). */
static int keeps_packed(const dir_t *dirs) { return !dirs[0].row || dirs[0].small; }

/* Lays out lk_layer.packed over `dirs` (base NULL: only measures); returns its bytes. On a
 * real buffer, marks the directions packed when the header and the copies match, and
 * otherwise invalidates the header and takes the new copies (the caller packs, then calls
 * packed_done). */
static size_t packed_layout(dir_t *dirs, const lk_layer *a, char *base)
{
    lk_arena arena = {base, 0};
    int64_t *header = lk_take(&arena, PACKED_HEADER, sizeof(int64_t));
    char *copies[2][LK_WEIGHTS];
    for (int64_t d = 0; d < a->D; d++)
        for (int k = 0; k < LK_WEIGHTS; k++)
            copies[d][k] = lk_take(&arena, weight_bytes(&dirs[d], k), 1);
    for (int64_t d = 0; d < a->D; d++)
        packed_weights(&dirs[d], &arena);
    if (base == NULL)
        return arena.used;
    int64_t now[PACKED_HEADER];
    packed_header(dirs, a, now);
    int same = memcmp(header, now, sizeof now) == 0;
    for (int64_t d = 0; d < a->D && same; d++)
        for (int k = 0; k < LK_WEIGHTS && same; k++) {
            const size_t bytes = weight_bytes(&dirs[d], k);
            same = bytes == 0 || memcmp(copies[d][k], a->w[d][k], bytes) == 0;
        }
    if (!same) {
        header[0] = 0; /* valid again only once packed (packed_done) */
        for (int64_t d = 0; d < a->D; d++)
            for (int k = 0; k < LK_WEIGHTS; k++)
                if (weight_bytes(&dirs[d], k) > 0)
                    memcpy(copies[d][k], a->w[d][k], weight_bytes(&dirs[d], k));
    }
    for (int64_t d = 0; d < a->D; d++)
        dirs[d].packed = same;
    return arena.used;
}

static void packed_done(const dir_t *dirs, const lk_layer *a)
{
    packed_header(dirs, a, a->packed);
}

int64_t SUF(lk_packed_elems)(const lk_layer *a)
{
    dir_t dirs[2];
    for (int64_t d = 0; d < a->D; d++)
        geometry(&dirs[d], a, d);
    if (!keeps_packed(dirs))
        return 0;
    return (int64_t)((packed_layout(dirs, a, NULL) + sizeof(real) - 1) / sizeof(real));
}

static size_t forward_workspace(dir_t *dirs, const lk_layer *a, int64_t R, char *base,
                                const void *packed)
{
    lk_arena arena = {base, 0};
    int64_t *off = lk_take(&arena, (size_t)a->T + 1, sizeof(int64_t));
    real *xp = a->lengths != NULL ? TAKE(&arena, R * a->I) : NULL;
    real *saved = a->saved;
    for (int64_t d = 0; d < a->D; d++) {
        dir_t *w = &dirs[d];
        w->off = off;
        w->xp = xp;
        if (packed == NULL)
            packed_weights(w, &arena);
        w->pre = w->row && !w->fuse ? TAKE(&arena, R * 4 * w->H) : NULL;
        w->scratch = w->row && !w->fuse ? TAKE(&arena, 2 * R * 4 * half_units(w)) : NULL;
        if (w->keep) {
            w->G = saved;
            w->m = w->proj ? saved + R * w->Gp : NULL;
            saved += R * (w->Gp + (w->proj ? w->Hp : 0));
        } else {
            w->G = w->row ? NULL : TAKE(&arena, a->B * w->Gp);
            w->m = w->proj ? TAKE(&arena, a->B * w->Hp) : NULL;
        }
        w->xw = !w->hoist ? NULL : w->keep ? w->G : TAKE(&arena, R * w->Gp);
        w->ring = a->cells == NULL && !w->pair ? TAKE(&arena, 2 * a->B * a->H) : NULL;
        if (a->cells == NULL && w->pair)
            w->cells = TAKE(&arena, a->T * a->B * a->H);
    }
    return arena.used;
}

/* Forward through one layer. 0 on success, -1 if memory ran out. */
int SUF(lk_forward)(const lk_layer *a)
{
    dir_t dirs[2];
    for (int64_t d = 0; d < a->D; d++) {
        geometry(&dirs[d], a, d);
        dirs[d].keep = a->saved != NULL;
        dirs[d].pair = a->D == 1 && dirs[d].row && !dirs[d].small && max_threads(a) >= 2;
    }
    const int64_t R = lk_packed_rows(a);
    char *packed = a->packed != NULL && keeps_packed(dirs) ? a->packed : NULL;
    lk_block *block = lk_workspace_take(forward_workspace(dirs, a, R, NULL, packed));
    if (block == NULL)
        return -1;
    char *work = block->p;
    const size_t TB = (size_t)(a->T * a->B) * sizeof(real);
    lk_advise_huge(a->out, TB * a->D * a->P);
    lk_advise_huge(a->cells, TB * a->D * a->H);
    if (a->saved != NULL)
        lk_advise_huge(a->saved, (size_t)SUF(lk_saved_elems)(a) * sizeof(real));
    forward_workspace(dirs, a, R, work, packed);
    if (packed != NULL)
        packed_layout(dirs, a, packed);
    lk_fill_offsets(a, (int64_t *)dirs[0].off);
    const real *xp = pack_input(a, dirs[0].off, (real *)dirs[0].xp);
    const int threads = lk_threads(a, lk_layer_flops(a));
    const int blas_threads = lk_blas_threads ? lk_blas_threads(threads) : 0;
    for (int64_t d = 0; d < a->D; d++) {
        dir_t *w = &dirs[d];
        w->xp = xp;
        if (w->row && !w->packed) /* the panel path packs inside forward_direction */
            pack_forward(w, 0, w->Hb, 0, 0);
        if (w->small && !w->packed)
            pack_small(w, w->wt);
    }
    if (dirs[0].pair)
        row_forward(&dirs[0]);
    else
        run_teams(forward_direction_fn, dirs, sizeof dirs[0], a->D, threads);
    for (int64_t d = 0; d < a->D; d++)
        final_states(&dirs[d].seq);
    if (packed != NULL && !dirs[0].packed)
        packed_done(dirs, a);
    if (lk_blas_threads)
        lk_blas_threads(blas_threads);
    lk_workspace_give(block);
    return 0;
}

/* ---- backward ---- */

typedef struct {
    dir_t f;
    const lk_grads *g;
    real *ub, *wrb; /* see pack_backward */
    real *dH;       /* (B, Pp) gradient of h from the step after */
    real *dC;       /* (B, Hp) gradient of c from the step after */
    real *dhs;      /* proj: (R, Pp) total dh per step, kept for dW_hr; else dH */
    real *db;       /* (Gp) bias gradient, permuted */
    real *db_steps; /* (sum_levels(T), Gp) pairwise sums of the steps' bias gradients */
    real *dA;       /* (R, Gp) gate gradients (the kept gates stay intact) */
    real *dm;       /* proj: (B, Hp) gradient of m = o * tanh(c) at the current step */
    /* row (batch 1, see lk_items): per-step buffers instead of dH and dC */
    real *part;    /* (T, 2, Pp) each half's sum dA_s W_hh over its units: dh of the step before */
    real *dcs;     /* (T, Hp) the gradient of c of the step before */
    real *hp;      /* (R, P) h_{t-1} of every packed row */
    real *scratch; /* each rank's output of BLAS calls */
} bdir_t;

static real *grad_row(const bdir_t *w, int64_t t, int64_t b)
{
    return w->dA + (w->f.off[t] + b) * w->f.Gp;
}

static real *dhs_row(const bdir_t *w, int64_t t, int64_t b)
{
    return w->f.proj ? w->dhs + (w->f.off[t] + b) * w->f.Pp : w->dH + b * w->f.Pp;
}

/* dhs[t] = dH + d_out[t] for the rows active at t, over columns [c0, c1) of P. */
static void add_output_grad(const bdir_t *w, int64_t t, int64_t c0, int64_t c1)
{
    const dir_t *f = &w->f;
    const real *d_out = w->g->d_out;
    const int64_t n = lk_active(f->a, t);
    for (int64_t b = 0; b < n; b++) {
        const real *dh = w->dH + b * f->Pp;
        real *dst = dhs_row(w, t, b);
        const real *grad = d_out ? d_out + (t * f->B + b) * f->D * f->P + f->d * f->P : NULL;
        for (int64_t c = c0; c < c1; c++)
            dst[c] = dh[c] + (grad != NULL && c < f->P ? grad[c] : 0);
    }
}

/* Gate gradients of unit block blk of row b at step st, given the gradients of its h (d_h) and
 * of its c from the step after (dc; lanes past H zero): dA into grads, the gradient of c_{t-1}
 * into dc_out, the four gate gradients into d (for the bias). */
LK_INLINE void block_backward(const bdir_t *w, const step_t *st, int64_t b, int64_t blk, vec d_h,
                              vec dc, real *grads, real *dc_out, vec d[4])
{
    const dir_t *f = &w->f;
    const real *d_cells = w->g->d_cells;
    const int64_t lanes = clamp_lanes(f->H - blk * V);
    const real *gates = gate_row(f, st->t, b) + blk * W;
    vec i = vload(gates), fg = vload(gates + V), g = vload(gates + 2 * V);
    vec o = vload(gates + 3 * V);
    vec c = vload_n(cell_row(&f->seq, st->t, b) + blk * V, lanes);
    vec tc = v_tanh(c);
    dc = dc + d_h * o * (1 - tc * tc);
    if (d_cells != NULL)
        dc += vload_n(d_cells + (st->t * f->B + b) * f->D * f->H + f->d * f->H + blk * V, lanes);
    d[0] = dc * g * i * (1 - i);
    d[1] = dc * vload_n(c_prev(&f->seq, st, b) + blk * V, lanes) * fg * (1 - fg);
    d[2] = dc * i * (1 - g * g);
    d[3] = d_h * tc * o * (1 - o);
    /* Padded units have no gradient: their lanes are 0, not what their gates made of a
     * non-finite input (0 * Inf), since dh and dx multiply them by zero weights. */
    for (int q = 0; q < 4 && lanes < V; q++)
        d[q] = vsel(first_lanes(lanes), d[q], splat(0));
    vstore(dc_out, dc * fg);
    for (int q = 0; q < 4; q++)
        vstore(grads + q * V, d[q]);
}

/* Gate gradients of unit block blk for the active rows, given dh (rows ld apart); dC is the
 * gradient of c from the step after, then of the step before. The step's bias gradient (its
 * rows summed) is term `count` of the pairwise sums over the steps (sum_push). */
static void gate_backward(const bdir_t *w, const step_t *st, int64_t count, int64_t blk,
                          const real *dh, int64_t ld)
{
    const dir_t *f = &w->f;
    vec db[4] = {splat(0), splat(0), splat(0), splat(0)};
    for (int64_t b = 0; b < st->n; b++) {
        real *dc_row = w->dC + b * f->Hp + blk * V;
        vec d[4];
        block_backward(w, st, b, blk, vload(dh + b * ld), vload(dc_row),
                       grad_row(w, st->t, b) + blk * W, dc_row, d);
        for (int q = 0; q < 4; q++)
            db[q] += d[q];
    }
    for (int q = 0; q < 4; q++)
        sum_push(w->db_steps + blk * W + q * V, f->Gp, count, db[q], V);
}

/* Batch 1: dh[c] = sum_col dA[col] W_hh[torch_row(col), c] over the gate columns of unit blocks
 * [b0, b1) and the nv vectors of dh's columns from c (the last one `full` or partial; past P
 * and up to c + 4V it writes zeros), by torch's rows of W_hh: even rows into one set of sums,
 * odd rows into another. nv and full are constants where it is inlined, so the sums stay in
 * registers and no vector past P is read. */
LK_INLINE void row_dh_chunk(const dir_t *f, const real *dA, real *dh, int64_t c, const int nv,
                            const int full, int64_t b0, int64_t b1)
{
    vec even[4], odd[4];
    const int64_t tail = clamp_lanes(f->P - c - (nv - 1) * V);
    for (int j = 0; j < nv; j++)
        even[j] = odd[j] = splat(0);
    for (int64_t blk = b0; blk < b1; blk++) {
        const int64_t lanes = clamp_lanes(f->H - blk * V);
        for (int q = 0; q < 4; q++) {
            const real *grad = dA + blk * W + q * V;
            const real *row = f->w_hh + (q * f->H + blk * V) * f->P + c;
#define LOAD(r, j) (full || (j) < nv - 1 ? vload((r) + (j) * V) : vload_n((r) + (j) * V, tail))
            int64_t v = 0;
            for (; v + 1 < lanes; v += 2, row += 2 * f->P) {
                const vec s0 = splat(grad[v]), s1 = splat(grad[v + 1]);
                for (int j = 0; j < nv; j++) {
                    even[j] += s0 * LOAD(row, j);
                    odd[j] += s1 * LOAD(row + f->P, j);
                }
            }
            if (v < lanes) {
                const vec s0 = splat(grad[v]);
                for (int j = 0; j < nv; j++)
                    even[j] += s0 * LOAD(row, j);
            }
#undef LOAD
        }
    }
    for (int j = 0; j < 4; j++)
        vstore(dh + c + j * V, j < nv ? even[j] + odd[j] : splat(0));
}

/* dh (Pp) = the part of dA W_hh from the unit blocks [b0, b1). */
static void row_dh(const dir_t *f, const real *dA, real *dh, int64_t b0, int64_t b1)
{
    for (int64_t c = 0; c < f->P; c += W) {
        const int64_t cols = min64(W, f->P - c), nv = (cols + V - 1) / V;
        const int full = cols == nv * V;
        switch (nv * 2 + full) {
        case 2: row_dh_chunk(f, dA, dh, c, 1, 0, b0, b1); break;
        case 3: row_dh_chunk(f, dA, dh, c, 1, 1, b0, b1); break;
        case 4: row_dh_chunk(f, dA, dh, c, 2, 0, b0, b1); break;
        case 5: row_dh_chunk(f, dA, dh, c, 2, 1, b0, b1); break;
        case 6: row_dh_chunk(f, dA, dh, c, 3, 0, b0, b1); break;
        case 7: row_dh_chunk(f, dA, dh, c, 3, 1, b0, b1); break;
        case 8: row_dh_chunk(f, dA, dh, c, 4, 0, b0, b1); break;
        default: row_dh_chunk(f, dA, dh, c, 4, 1, b0, b1); break;
        }
    }
}

static void backward_direction(const bdir_t *w, const team_t *tm)
{
    const dir_t *f = &w->f;
    const lk_grads *g = w->g;
    int64_t b0, b1, p0, p1;
    lk_split(f->Hb, tm->rank, tm->size, &b0, &b1);
    lk_split(f->Pb, tm->rank, tm->size, &p0, &p1);
    const int64_t u0 = b0 * V, u1 = b1 * V, c0 = p0 * W, c1 = p1 * W;
    const real *d_h_n = g->d_h_n ? (const real *)g->d_h_n + f->d * f->B * f->P : NULL;
    const real *d_c_n = g->d_c_n ? (const real *)g->d_c_n + f->d * f->B * f->H : NULL;
    for (int64_t b = 0; b < f->B; b++) { /* the final states' gradients enter first */
        real *dc = w->dC + b * f->Hp, *dh = w->dH + b * f->Pp;
        for (int64_t u = u0; u < u1; u++)
            dc[u] = d_c_n != NULL && u < f->H ? d_c_n[b * f->H + u] : 0;
        for (int64_t c = c0; c < c1; c++)
            dh[c] = d_h_n != NULL && c < f->P ? d_h_n[b * f->P + c] : 0;
    }
    add_output_grad(w, w->f.rev ? 0 : f->T - 1, c0, c1);
    team_wait(tm);
    const rows_t none = rows(NULL, 0), dH = rows(w->dH, f->Pp);
    for (int64_t s = f->T - 1; s >= 0; s--) {
        const step_t st = make_step(&f->seq, s);
        const rows_t dhs = rows(dhs_row(w, st.t, 0), f->Pp);
        if (f->proj) { /* dm = dh W_hr for the own unit blocks, four blocks per panel */
            const rows_t dm = rows(w->dm, f->Hp);
            for (int64_t blk = b0; blk < b1; blk += 4) {
                const real *first = w->wrb + blk * f->P * V;
                const int64_t blocks = min64(4, b1 - blk);
                panel_t p = {{first, NULL, NULL, NULL}, V, blocks * V};
                for (int64_t j = 1; j < 4; j++)
                    p.col[j] = j < blocks ? first + j * f->P * V : first;
                const rows_t dm_blk = rows(dm.base + blk * V, f->Hp);
                panel_rows(st.n, f->P, &dhs, &p, &none, NULL, &dm_blk);
            }
        }
        for (int64_t blk = b0; blk < b1; blk++) {
            if (f->proj)
                gate_backward(w, &st, f->T - 1 - s, blk, w->dm + blk * V, f->Hp);
            else
                gate_backward(w, &st, f->T - 1 - s, blk, dhs.base + blk * V, f->Pp);
        }
        team_wait(tm); /* dA of this step complete */
        const rows_t dA = rows(grad_row(w, st.t, 0), f->Gp);
        for (int64_t pb = p0; pb < p1; pb++) {
            const panel_t p = packed_panel(w->ub, pb, f->Gp, W);
            const rows_t dH_panel = rows(dH.base + pb * W, f->Pp);
            panel_rows(st.n, f->Gp, &dA, &p, &none, NULL, &dH_panel);
        }
        if (s > 0 && (f->proj || g->d_out != NULL))
            add_output_grad(w, st.prev, c0, c1);
        team_wait(tm); /* dh for the step before complete */
    }
    for (int64_t c = b0 * W; c < b1 * W; c += V)
        vstore(w->db + c, sum_total(w->db_steps + c, f->Gp, f->T, V));
}

static void backward_direction_fn(void *dir, const team_t *tm) { backward_direction(dir, tm); }

/* h_{t-1} of every packed row: the output of the step before, or h0 where a row starts. */
static void gather_h_prev(const dir_t *f, real *hp)
{
    for (int64_t s = 0; s < f->T; s++) {
        const step_t st = make_step(&f->seq, s);
        for (int64_t b = 0; b < st.n; b++)
            memcpy(hp + (f->off[st.t] + b) * f->P, h_prev(&f->seq, &st, b),
                   (size_t)f->P * sizeof(real));
    }
}

/* ---- batch 1: backward's products after the loop, where the steps are the one long side ----
 * BLAS calls of thin shapes (up to 2V columns, a thousand steps deep) ran several times slower
 * than the FMA count allows, so those take register tiles of their own (thin()); wider ones,
 * where these tiles lose to the BLAS, stay with gemm(). */

static int thin(const dir_t *w, int64_t columns)
{
    return w->row && (columns <= 2 * V || BLAS_GEMM == NULL);
}

/* Rows of Z and D that tn_tile sums in registers, before the block's sums join the pairwise
 * sums over the blocks (sum_push): short enough that no one running sum is long, long enough
 * that the pushes cost little next to the block's FMAs. */
#define TN_BLOCK_ROWS 32

/* C (K, ·) = Z^T D for rows kr (up to the tier's TILE_ROWS) of C (ldc apart) and 2 vectors of
 * its columns, over all R rows of Z (rows ldz apart) and D (rows Gp apart): by blocks of rows
 * in registers, summed pairwise over the blocks. Two vectors wide, so that the accumulators
 * and the two loads fit the registers of every tier (16 for avx2). */
LK_INLINE void tn_tile(const int kr, int64_t R, const real *z, int64_t ldz, const real *D,
                       int64_t Gp, real *C, int64_t ldc)
{
    real levels[SUM_LEVELS * 2 * TILE_ROWS * V]; /* level k of vector j at (k 2 TILE_ROWS + j) V */
    int64_t count = 0;
    for (int64_t t0 = 0; t0 < R; t0 += TN_BLOCK_ROWS, count++) {
        vec acc[TILE_ROWS][2];
        for (int r = 0; r < kr; r++)
            acc[r][0] = acc[r][1] = splat(0);
        const int64_t t1 = min64(R, t0 + TN_BLOCK_ROWS);
        for (int64_t t = t0; t < t1; t++, z += ldz, D += Gp) {
            const vec d0 = vload(D), d1 = vload(D + V);
            for (int r = 0; r < kr; r++) {
                const vec s = splat(z[r]);
                acc[r][0] += s * d0;
                acc[r][1] += s * d1;
            }
        }
        for (int r = 0; r < kr; r++)
            for (int j = 0; j < 2; j++)
                sum_push(levels + (2 * r + j) * V, 2 * TILE_ROWS * V, count, acc[r][j], V);
    }
    for (int r = 0; r < kr; r++)
        for (int j = 0; j < 2; j++)
            vstore(C + r * ldc + j * V,
                   sum_total(levels + (2 * r + j) * V, 2 * TILE_ROWS * V, count, V));
}

#define TN_TILE(kr)                                                                               \
    static __attribute__((noinline)) void tn_tile_##kr(                                           \
        int64_t R, const real *z, int64_t ldz, const real *D, int64_t Gp, real *C, int64_t ldc)   \
    {                                                                                             \
        tn_tile(kr, R, z, ldz, D, Gp, C, ldc);                                                    \
    }
TN_TILE(1)
TN_TILE(2)
TN_TILE(3)
TN_TILE(4)
TN_TILE(5)
TN_TILE(6)
#undef TN_TILE
typedef void (*tn_fn)(int64_t R, const real *z, int64_t ldz, const real *D, int64_t Gp, real *C,
                      int64_t ldc);
static const tn_fn tn_tiles[TILE_ROWS + 1] = {NULL,      tn_tile_1, tn_tile_2, tn_tile_3,
                                             tn_tile_4, tn_tile_5, tn_tile_6};

/* The rows of dst (4H, K) in torch's layout = (Z^T D)^T for gate columns [c0, c1) (whole unit
 * blocks): Z (R, K), D (R, Gp) the gate gradients; tmp holds K x (c1 - c0), then the GEMM's
 * pairwise sums. With a BLAS and more than 2V columns (not thin) GEMMs by chunks of rows
 * (gemm_tn_rows), else register tiles. */
static void row_weight_grad(const dir_t *w, int64_t R, const real *z, int64_t K, const real *D,
                            int64_t c0, int64_t c1, real *tmp, real *dst)
{
    const int64_t n = c1 - c0;
    if (!thin(w, K)) {
        gemm_tn_rows(n, K, R, D + c0, w->Gp, z, K, tmp, K, tmp + n * K);
        for (int64_t col = c0; col < c1; col++) {
            const int64_t r = torch_row(w, col);
            if (r >= 0)
                memcpy(dst + r * K, tmp + (col - c0) * K, (size_t)K * sizeof(real));
        }
        return;
    }
    for (int64_t c = c0; c < c1; c += 2 * V)
        for (int64_t k = 0; k < K; k += TILE_ROWS)
            tn_tiles[min64(TILE_ROWS, K - k)](R, z + k, K, D + c, w->Gp, tmp + k * n + c - c0, n);
    for (int64_t col = c0; col < c1; col++) {
        const int64_t r = torch_row(w, col);
        for (int64_t k = 0; k < K && r >= 0; k++)
            dst[r * K + k] = tmp[k * n + col - c0];
    }
}

/* C (R, N) = beta C + A (R, K) B (K, N), rows mr of C and nv vectors of its columns from n0
 * (the last one `lanes` wide); beta is 0 (C not read) or 1. */
LK_INLINE void nn_tile(const int mr, const int nv, int64_t K, const real *A, const real *B,
                       int64_t N, int64_t n0, int64_t lanes, real beta, real *C)
{
    vec acc[6][2];
    int64_t n[2];
    for (int j = 0; j < nv; j++)
        n[j] = j == nv - 1 ? lanes : V;
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nv; j++)
            acc[r][j] = beta == 0 ? splat(0) : vload_n(C + r * N + n0 + j * V, n[j]);
    for (int64_t k = 0; k < K; k++) {
        vec b[2];
        for (int j = 0; j < nv; j++)
            b[j] = vload_n(B + k * N + n0 + j * V, n[j]);
        for (int r = 0; r < mr; r++) {
            const vec s = splat(A[r * K + k]);
            for (int j = 0; j < nv; j++)
                acc[r][j] += s * b[j];
        }
    }
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nv; j++)
            vstore_n(C + r * N + n0 + j * V, acc[r][j], n[j]);
}

#define NN_TILE(mr, nv)                                                                           \
    static __attribute__((noinline)) void nn_tile_##mr##x##nv(                                    \
        int64_t K, const real *A, const real *B, int64_t N, int64_t n0, int64_t lanes, real beta, \
        real *C)                                                                                  \
    {                                                                                             \
        nn_tile(mr, nv, K, A, B, N, n0, lanes, beta, C);                                          \
    }
NN_TILE(6, 2)
NN_TILE(6, 1)
NN_TILE(1, 2)
NN_TILE(1, 1)
#undef NN_TILE

/* dx (R, I) = beta dx + dA (R, Gp) wx (Gp, I). */
static void row_input_grad(const dir_t *w, int64_t R, const real *dA, real beta, real *dx)
{
    const int64_t K = w->Gp, N = w->I;
    for (int64_t n0 = 0; n0 < N; n0 += 2 * V) {
        const int two = N - n0 > V;
        const int64_t lanes = clamp_lanes(N - n0 - (two ? V : 0));
        int64_t r = 0;
        for (; r + 6 <= R; r += 6)
            (two ? nn_tile_6x2 : nn_tile_6x1)(K, dA + r * K, w->wx, N, n0, lanes, beta, dx + r * N);
        for (; r < R; r++)
            (two ? nn_tile_1x2 : nn_tile_1x1)(K, dA + r * K, w->wx, N, n0, lanes, beta, dx + r * N);
    }
}

/* dx (R, I) = beta dx + dA (R, Gp) wx (Gp, I): register tiles where thin, else one GEMM. */
static void input_grad(const dir_t *w, int64_t R, const real *dA, real beta, real *dx)
{
    if (thin(w, w->I))
        row_input_grad(w, R, dA, beta, dx);
    else
        gemm(0, 0, R, w->I, w->Gp, 1, dA, w->Gp, w->wx, w->I, beta, dx, w->I);
}

/* ---- batch 1: backward as items (see lk_items) ----
 * Step s, half k: the gate gradients of the half's units, from dh = part[s+1][0] +
 * part[s+1][1] (+ d_out), and dc[s+1]; then part[s][k] = that half's share of dA_s W_hh (its
 * rows of W_hh: the ones forward read on this thread). So one exchange per step, and each dh
 * is summed in the same order whatever the threads. Then the weight gradients of each half's
 * gate columns (the bias summed over the steps in the order of the loop), then dx by halves of
 * the rows. */

typedef struct {
    const bdir_t *w;
    real *dxp; /* the packed input gradient, made in the job (one direction), or NULL */
    halves_t steps, weights, inputs;
} row_backward_t;

static void row_backward_item(const void *job, int64_t item, int half, int rank)
{
    const bdir_t *w = ((const row_backward_t *)job)->w;
    const dir_t *f = &w->f;
    const lk_grads *g = w->g;
    const int64_t s = f->T - 1 - item;
    const step_t st = make_step(&f->seq, s);
    (void)rank;
    if (st.n == 0)
        return;
    /* the step after (in this direction's order) read this one's state, or this is the last */
    const int next = s + 1 < f->T && make_step(&f->seq, s + 1).n > 0;
    const real *d_h_n = g->d_h_n ? (const real *)g->d_h_n + f->d * f->P : NULL;
    const real *d_c_n = g->d_c_n ? (const real *)g->d_c_n + f->d * f->H : NULL;
    const real *d_out = g->d_out ? (const real *)g->d_out + (st.t * f->D + f->d) * f->P : NULL;
    const real *part = w->part + (s + 1) * 2 * f->Pp, *dc_next = w->dcs + (s + 1) * f->Hp;
    real *dA = grad_row(w, st.t, 0);
    int64_t b0, b1;
    half_blocks(f, half, &b0, &b1);
    for (int64_t blk = b0; blk < b1; blk++) {
        const int64_t u = blk * V, lanes = clamp_lanes(f->H - u);
        vec dh = next    ? vload_n(part + u, lanes) + vload_n(part + f->Pp + u, lanes)
                 : d_h_n ? vload_n(d_h_n + u, lanes)
                         : splat(0);
        if (d_out != NULL)
            dh += vload_n(d_out + u, lanes);
        const vec dc = next    ? vload_n(dc_next + u, lanes)
                       : d_c_n ? vload_n(d_c_n + u, lanes)
                               : splat(0);
        vec d[4];
        block_backward(w, &st, 0, blk, dh, dc, dA + blk * W, w->dcs + s * f->Hp + u, d);
    }
    row_dh(f, dA, w->part + (s * 2 + half) * f->Pp, b0, b1);
}

/* Rows of a rank's scratch: (4 half units, max(I, P)) weight gradients and their pairwise
 * sums (gemm_tn_rows), or (R/2, I) of dx. */
static int64_t row_scratch(const dir_t *f, int64_t R)
{
    const int64_t IP = f->I > f->P ? f->I : f->P;
    const int64_t weights = 4 * half_units(f) * IP + gemm_levels(4 * half_units(f), IP, R);
    const int64_t inputs = (R + 1) / 2 * f->I;
    return weights > inputs ? weights : inputs;
}

static void row_weights_item(const void *job, int64_t item, int half, int rank)
{
    const bdir_t *w = ((const row_backward_t *)job)->w;
    const dir_t *f = &w->f;
    void *const *dw = w->g->d_w[f->d];
    const int64_t R = f->off[f->T];
    int64_t b0, b1;
    (void)item;
    half_blocks(f, half, &b0, &b1);
    const int64_t c0 = b0 * W, c1 = b1 * W;
    real *tmp = w->scratch + rank * row_scratch(f, R);
    if (dw[LK_B_IH] != NULL || dw[LK_B_HH] != NULL) {
        for (int64_t c = c0; c < c1; c += V) { /* in the loop's order: the last step first */
            real levels[SUM_LEVELS * V];
            int64_t count = 0;
            for (int64_t s = f->T - 1; s >= 0; s--) {
                const step_t st = make_step(&f->seq, s);
                if (st.n > 0)
                    sum_push(levels, V, count++, vload(grad_row(w, st.t, 0) + c), V);
            }
            vstore(tmp + c - c0, sum_total(levels, V, count, V));
        }
        for (int64_t col = c0; col < c1; col++) {
            const int64_t r = torch_row(f, col);
            for (int k = LK_B_IH; k <= LK_B_HH && r >= 0; k++)
                if (dw[k] != NULL)
                    ((real *)dw[k])[r] = tmp[col - c0];
        }
    }
    if (dw[LK_W_IH] != NULL)
        row_weight_grad(f, R, f->xp, f->I, w->dA, c0, c1, tmp, dw[LK_W_IH]);
    if (dw[LK_W_HH] != NULL)
        row_weight_grad(f, R, w->hp, f->P, w->dA, c0, c1, tmp, dw[LK_W_HH]);
}

static void row_inputs_item(const void *job, int64_t item, int half, int rank)
{
    const row_backward_t *j = job;
    const dir_t *f = &j->w->f;
    const int64_t R = f->off[f->T];
    int64_t r0, r1;
    (void)item;
    lk_split(R, half, 2, &r0, &r1);
    real *tmp = j->w->scratch + rank * row_scratch(f, R);
    input_grad(f, r1 - r0, j->w->dA + r0 * f->Gp, 0, tmp);
    memcpy(j->dxp + r0 * f->I, tmp, (size_t)((r1 - r0) * f->I) * sizeof(real));
}

static void row_backward_job(void *arg, int rank, int size)
{
    row_backward_t *job = arg;
    const int blas = blas_alone();
    lk_items(job, row_backward_item, job->w->f.T, &job->steps, rank, size, 1);
    lk_items(job, row_weights_item, 1, &job->weights, rank, size, 0);
    if (job->dxp != NULL)
        lk_items(job, row_inputs_item, 1, &job->inputs, rank, size, 0);
    blas_restore(blas);
}

/* A batch-1 direction's backward, on the pair when `pair`; dxp as in row_backward_t. */
static void row_backward(const bdir_t *w, real *dxp, int pair)
{
    row_backward_t job;
    memset(&job, 0, sizeof job);
    job.w = w;
    job.dxp = dxp;
    if (pair)
        lk_pair_run(row_backward_job, &job);
    else
        row_backward_job(&job, 0, 1);
}

static void row_backward_fn(void *dir, const team_t *tm)
{
    if (tm->rank == 0)
        row_backward(dir, NULL, 0);
}

/* d_h0 and d_c0 of a batch-1 direction: what its first step passed back, or d_h_n and d_c_n
 * when it has no step. */
static void row_initial_grads(const bdir_t *w)
{
    const dir_t *f = &w->f;
    const lk_grads *g = w->g;
    int64_t first = 0;
    while (first < f->T && make_step(&f->seq, first).n == 0)
        first++;
    const int none = first == f->T;
    const real *part = w->part + first * 2 * f->Pp, *dc = w->dcs + first * f->Hp;
    const real *d_h_n = g->d_h_n ? (const real *)g->d_h_n + f->d * f->P : NULL;
    const real *d_c_n = g->d_c_n ? (const real *)g->d_c_n + f->d * f->H : NULL;
    real *d_h0 = g->d_h0 ? (real *)g->d_h0 + f->d * f->P : NULL;
    real *d_c0 = g->d_c0 ? (real *)g->d_c0 + f->d * f->H : NULL;
    for (int64_t c = 0; c < f->P && d_h0 != NULL; c++)
        d_h0[c] = !none ? part[c] + part[f->Pp + c] : d_h_n ? d_h_n[c] : 0;
    for (int64_t u = 0; u < f->H && d_c0 != NULL; u++)
        d_c0[u] = !none ? dc[u] : d_c_n ? d_c_n[u] : 0;
}

/* Weight, bias and initial-state gradients of one direction after the loop, and its part of
 * the packed input gradient dxp (beta: 0 for the first direction, 1 to add the second). */
static void parameter_grads(const bdir_t *w, int64_t R, real *tmp, real *hp, real *levels,
                            real *dxp, real beta)
{
    const dir_t *f = &w->f;
    const lk_grads *g = w->g;
    const int64_t d = f->d;
    void *const *dw = g->d_w[d];
    if (dw[LK_B_IH] != NULL)
        unpermute(f, w->db, dw[LK_B_IH], 1);
    if (dw[LK_B_HH] != NULL)
        unpermute(f, w->db, dw[LK_B_HH], 1);
    if (dw[LK_W_IH] != NULL) {
        gemm_tn_rows(f->Gp, f->I, R, w->dA, f->Gp, f->xp, f->I, tmp, f->I, levels);
        unpermute(f, tmp, dw[LK_W_IH], f->I);
    }
    if (dw[LK_W_HH] != NULL) {
        gather_h_prev(f, hp);
        gemm_tn_rows(f->Gp, f->P, R, w->dA, f->Gp, hp, f->P, tmp, f->P, levels);
        unpermute(f, tmp, dw[LK_W_HH], f->P);
    }
    if (dw[LK_W_HR] != NULL)
        gemm_tn_rows(f->P, f->H, R, w->dhs, f->Pp, f->m, f->Hp, dw[LK_W_HR], f->H, levels);
    if (dxp != NULL)
        input_grad(f, R, w->dA, beta, dxp);
    for (int64_t b = 0; b < f->B; b++) {
        if (g->d_h0 != NULL)
            memcpy((real *)g->d_h0 + (d * f->B + b) * f->P, w->dH + b * f->Pp,
                   (size_t)f->P * sizeof(real));
        if (g->d_c0 != NULL)
            memcpy((real *)g->d_c0 + (d * f->B + b) * f->H, w->dC + b * f->Hp,
                   (size_t)f->H * sizeof(real));
    }
}

typedef struct {
    real *tmp; /* (Gp, max(I, P)) a weight gradient before its rows are put in torch's order */
    real *hp;  /* (R, P) h_{t-1} of every packed row */
    real *dxp; /* (R, I) packed input gradient, for lengths */
    real *levels; /* the weight gradients' pairwise sums (gemm_tn_rows) */
} bshared_t;

static size_t backward_workspace(bdir_t *dirs, const lk_layer *a, int64_t R, char *base,
                                 bshared_t *shared)
{
    lk_arena arena = {base, 0};
    int64_t *off = lk_take(&arena, (size_t)a->T + 1, sizeof(int64_t));
    real *xp = a->lengths != NULL ? TAKE(&arena, R * a->I) : NULL;
    const dir_t *f0 = &dirs[0].f;
    shared->tmp = TAKE(&arena, f0->Gp * (a->I > a->P ? a->I : a->P));
    shared->hp = TAKE(&arena, R * a->P);
    shared->dxp = a->lengths != NULL ? TAKE(&arena, R * a->I) : NULL;
    const int64_t IP = a->I > a->P ? a->I : a->P;
    const int64_t weights = gemm_levels(f0->Gp, IP, R), proj = gemm_levels(a->P, a->H, R);
    shared->levels = f0->row ? NULL : TAKE(&arena, weights > proj ? weights : proj);
    real *saved = a->saved;
    for (int64_t d = 0; d < a->D; d++) {
        bdir_t *w = &dirs[d];
        dir_t *f = &w->f;
        f->off = off;
        f->xp = xp;
        f->G = saved;
        f->m = f->proj ? saved + R * f->Gp : NULL;
        saved += R * (f->Gp + (f->proj ? f->Hp : 0));
        w->ub = f->row ? NULL : TAKE(&arena, f->Pb * f->Gp * W);
        w->wrb = f->proj ? TAKE(&arena, f->Hb * f->P * V) : NULL;
        f->wx = TAKE(&arena, f->Gp * f->I);
        w->dH = TAKE(&arena, a->B * f->Pp);
        w->dC = TAKE(&arena, a->B * f->Hp);
        w->db = TAKE(&arena, f->Gp);
        w->db_steps = f->row ? NULL : TAKE(&arena, sum_levels(a->T) * f->Gp);
        w->dA = TAKE(&arena, R * f->Gp);
        w->dm = f->proj ? TAKE(&arena, a->B * f->Hp) : NULL;
        w->dhs = f->proj ? TAKE(&arena, R * f->Pp) : NULL;
        w->part = f->row ? TAKE(&arena, a->T * 2 * f->Pp) : NULL;
        w->dcs = f->row ? TAKE(&arena, a->T * f->Hp) : NULL;
        w->hp = f->row ? TAKE(&arena, R * a->P) : NULL;
        w->scratch = f->row ? TAKE(&arena, 2 * row_scratch(f, R)) : NULL;
    }
    return arena.used;
}

/* Backward through one layer run by lk_forward with `saved` and `cells`. 0 on success, -1 if
 * memory ran out. Reads `saved` only, so it can run again (retain_graph). */
int SUF(lk_backward)(const lk_layer *a, const lk_grads *g)
{
    bdir_t dirs[2];
    bshared_t shared;
    for (int64_t d = 0; d < a->D; d++) {
        memset(&dirs[d], 0, sizeof dirs[d]);
        geometry(&dirs[d].f, a, d);
        dirs[d].f.keep = 1;
        dirs[d].g = g;
    }
    const int64_t R = lk_packed_rows(a);
    lk_block *block = lk_workspace_take(backward_workspace(dirs, a, R, NULL, &shared));
    if (block == NULL)
        return -1;
    char *work = block->p;
    lk_advise_huge(g->d_x, (size_t)(a->T * a->B * a->I) * sizeof(real));
    for (int64_t d = 0; d < a->D; d++) {
        lk_advise_huge(g->d_w[d][LK_W_IH], (size_t)(4 * a->H * a->I) * sizeof(real));
        lk_advise_huge(g->d_w[d][LK_W_HH], (size_t)(4 * a->H * a->P) * sizeof(real));
    }
    backward_workspace(dirs, a, R, work, &shared);
    lk_fill_offsets(a, (int64_t *)dirs[0].f.off);
    const real *xp = pack_input(a, dirs[0].f.off, (real *)dirs[0].f.xp);
    for (int64_t d = 0; d < a->D; d++) {
        bdir_t *w = &dirs[d];
        w->f.xp = xp;
        if (!w->f.row)
            pack_backward(&w->f, w->ub, w->wrb);
        for (int64_t col = 0; col < w->f.Gp; col++) { /* permuted W_ih rows for dx = dA W_ih */
            int64_t r = torch_row(&w->f, col);
            if (r >= 0)
                memcpy(w->f.wx + col * a->I, (const real *)a->w[d][LK_W_IH] + r * a->I,
                       (size_t)a->I * sizeof(real));
            else
                memset(w->f.wx + col * a->I, 0, (size_t)a->I * sizeof(real));
        }
    }
    const int threads = lk_threads(a, 2 * lk_layer_flops(a));
    const int blas_threads = lk_blas_threads ? lk_blas_threads(threads) : 0;
    real *dx = g->d_x == NULL ? NULL : a->lengths != NULL ? shared.dxp : g->d_x;
    if (dirs[0].f.row) {
        for (int64_t d = 0; d < a->D; d++)
            if (g->d_w[d][LK_W_HH] != NULL)
                gather_h_prev(&dirs[d].f, dirs[d].hp);
        if (a->D == 1) {
            row_backward(&dirs[0], dx, !dirs[0].f.small && max_threads(a) >= 2);
        } else {
            run_teams(row_backward_fn, dirs, sizeof dirs[0], a->D, threads);
            for (int64_t d = 0; d < a->D && dx != NULL; d++)
                input_grad(&dirs[d].f, R, dirs[d].dA, d == 0 ? 0 : 1, dx);
        }
        for (int64_t d = 0; d < a->D; d++)
            row_initial_grads(&dirs[d]);
    } else {
        run_teams(backward_direction_fn, dirs, sizeof dirs[0], a->D, threads);
        for (int64_t d = 0; d < a->D; d++)
            parameter_grads(&dirs[d], R, shared.tmp, shared.hp, shared.levels, dx,
                            d == 0 ? 0 : 1);
    }
    if (dx != NULL && dx != g->d_x)
        unpack_input_grad(a, dirs[0].f.off, dx, g->d_x);
    if (lk_blas_threads)
        lk_blas_threads(blas_threads);
    lk_workspace_give(block);
    return 0;
}

/* ---- the approximations on their own, for tests ---- */

void SUF(lk_tanh)(const real *x, real *y, int64_t n)
{
    for (int64_t k = 0; k < n; k += V)
        vstore_n(y + k, v_tanh(vload_n(x + k, min64(V, n - k))), min64(V, n - k));
}

void SUF(lk_sigmoid)(const real *x, real *y, int64_t n)
{
    for (int64_t k = 0; k < n; k += V)
        vstore_n(y + k, v_sigmoid(vload_n(x + k, min64(V, n - k))), min64(V, n - k));
}
