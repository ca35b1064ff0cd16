/* lstmkit CPU kernels: lstmkit's own GEMM, for when no BLAS was found or when the tuner measured
 * it faster than the BLAS on this machine (lstmkit.backends.cpu.tuner).
 *
 * Include from real.h only (it needs `real`, `vec`, V and the masked loads and stores).
 * Row-major C (m x n) = alpha op(A) op(B) + beta C, blocked as the BLAS libraries do: for each
 * block of KC rows of op(B) (its panels of NR columns in L1 while a block of op(A) streams past
 * them) and each block of MC rows of op(A) (kept in L2), op(A) is packed into slivers of MR rows
 * (an element of each row per k, contiguous) and op(B) into panels of NR columns (a row of NR
 * per k, contiguous), zero-padded, and a register tile of MR x NR accumulators walks them. The
 * tile is the tier's (TILE_ROWS rows by TILE_VECS vectors, see tier_*.h): the accumulators, the
 * loads of op(B) and a broadcast fit its vector registers.
 * KC, MC and NC come from the plan's cache sizes (lk_planned), not from one CPU.
 *
 * Threads: the calling thread's lstmkit GEMM thread count (lk_gemm_threads, set where the
 * kernels set the BLAS's), split by whole tiles of the larger of m and n. Every element of C is
 * computed by one thread, in the same order (its k blocks one after the other) whatever the
 * count, so one and two threads give the same bits. Inside a parallel region it runs on the
 * calling thread alone (the kernels set one thread there).
 */
#ifndef LSTMKIT_GEMM_H
#define LSTMKIT_GEMM_H

#define GEMM_MR TILE_ROWS /* the tier's register tile (tier_*.h) */
#define GEMM_NV TILE_VECS
#define GEMM_NR (GEMM_NV * V)

typedef struct {
    int64_t kc, mc, nc;
} gemm_blocks;

/* Lanes of a vector that hold elements, of n left (0..V). */
static inline int64_t gemm_lanes(int64_t n) { return n < 0 ? 0 : n > V ? V : n; }

/* Block sizes from the plan: a panel of op(B) (KC x NR) takes half of L1d (small_bytes is
 * L1d), a block of op(A) (MC x KC) a quarter of L2 (pass_bytes is an eighth), a block of op(B)
 * (KC x NC) half of L2. */
static inline gemm_blocks gemm_blocking(void)
{
    gemm_blocks b;
    int64_t kc = (int64_t)(lk_planned.small_bytes / 2 / (double)(GEMM_NR * sizeof(real)));
    kc = kc < 64 ? 64 : kc > 512 ? 512 : kc;
    b.kc = kc / 8 * 8;
    int64_t mc = (int64_t)(2 * lk_planned.pass_bytes / (double)(b.kc * sizeof(real)));
    b.mc = mc < GEMM_MR ? GEMM_MR : mc / GEMM_MR * GEMM_MR;
    int64_t nc = (int64_t)(4 * lk_planned.pass_bytes / (double)(b.kc * sizeof(real)));
    b.nc = nc < GEMM_NR ? GEMM_NR : nc / GEMM_NR * GEMM_NR;
    return b;
}

/* op(A)[i0.., p0..] into slivers of MR rows: dst[(s kc + kk) MR + r] = op(A)[i0 + s MR + r,
 * p0 + kk], zero past row m. */
static inline void gemm_pack_a(int trans, const real *A, int64_t lda, int64_t i0, int64_t rows,
                               int64_t p0, int64_t kc, real *dst)
{
    for (int64_t s = 0; s * GEMM_MR < rows; s++) {
        real *d = dst + s * kc * GEMM_MR;
        const int64_t r0 = i0 + s * GEMM_MR, live = min64(GEMM_MR, rows - s * GEMM_MR);
        if (trans) { /* op(A)[i, p] = A[p lda + i]: rows of A hold the sliver's rows side by side */
            for (int64_t kk = 0; kk < kc; kk++) {
                const real *src = A + (p0 + kk) * lda + r0;
                for (int64_t r = 0; r < GEMM_MR; r++)
                    d[kk * GEMM_MR + r] = r < live ? src[r] : 0;
            }
        } else {
            for (int64_t r = 0; r < GEMM_MR; r++) {
                if (r >= live) {
                    for (int64_t kk = 0; kk < kc; kk++)
                        d[kk * GEMM_MR + r] = 0;
                    continue;
                }
                const real *src = A + (r0 + r) * lda + p0;
                for (int64_t kk = 0; kk < kc; kk++)
                    d[kk * GEMM_MR + r] = src[kk];
            }
        }
    }
}

/* op(B)[p0.., j0..] into panels of NR columns: dst[(j kc + kk) NR + c] = op(B)[p0 + kk,
 * j0 + j NR + c], zero past column n. */
static inline void gemm_pack_b(int trans, const real *B, int64_t ldb, int64_t p0, int64_t kc,
                               int64_t j0, int64_t cols, real *dst)
{
    for (int64_t j = 0; j * GEMM_NR < cols; j++) {
        real *d = dst + j * kc * GEMM_NR;
        const int64_t c0 = j0 + j * GEMM_NR, live = min64(GEMM_NR, cols - j * GEMM_NR);
        if (trans) { /* op(B)[p, c] = B[c ldb + p] */
            for (int64_t c = 0; c < GEMM_NR; c++) {
                if (c >= live) {
                    for (int64_t kk = 0; kk < kc; kk++)
                        d[kk * GEMM_NR + c] = 0;
                    continue;
                }
                const real *src = B + (c0 + c) * ldb + p0;
                for (int64_t kk = 0; kk < kc; kk++)
                    d[kk * GEMM_NR + c] = src[kk];
            }
        } else {
            for (int64_t kk = 0; kk < kc; kk++) {
                const real *src = B + (p0 + kk) * ldb + c0;
                for (int64_t v = 0; v < GEMM_NV; v++)
                    vstore(d + kk * GEMM_NR + v * V, vload_n(src + v * V, gemm_lanes(live - v * V)));
            }
        }
    }
}

/* The tile: C[rows, cols] (at most MR x NR) = beta C + alpha sum_kk a[kk] b[kk] on the first
 * k block (first != 0; beta 0 reads no C), + alpha sum on the others. */
static __attribute__((noinline)) void gemm_tile(int64_t kc, const real *a, const real *b,
                                                real *C, int64_t ldc, int64_t rows, int64_t cols,
                                                int first, real alpha, real beta)
{
    vec acc[GEMM_MR][GEMM_NV];
    for (int r = 0; r < GEMM_MR; r++)
        for (int v = 0; v < GEMM_NV; v++)
            acc[r][v] = splat(0);
#pragma GCC unroll 4
    for (int64_t kk = 0; kk < kc; kk++) {
        vec bv[GEMM_NV];
        for (int v = 0; v < GEMM_NV; v++)
            bv[v] = vload(b + kk * GEMM_NR + v * V);
        for (int r = 0; r < GEMM_MR; r++) {
            const vec ar = splat(a[kk * GEMM_MR + r]);
            for (int v = 0; v < GEMM_NV; v++)
                acc[r][v] += ar * bv[v];
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        real *c = C + r * ldc;
        for (int v = 0; v < GEMM_NV; v++) {
            const int64_t lanes = gemm_lanes(cols - v * V);
            if (lanes == 0)
                break;
            vec sum = alpha == 1 ? acc[r][v] : alpha * acc[r][v];
            if (!first)
                sum = vload_n(c + v * V, lanes) + sum;
            else if (beta != 0)
                sum = (beta == 1 ? vload_n(c + v * V, lanes) : beta * vload_n(c + v * V, lanes)) + sum;
            vstore_n(c + v * V, sum, lanes);
        }
    }
}

/* The blocked loops over C[i0.., j0..] (m x n of it), with buffers for one A and one B block. */
static inline void gemm_blocked(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                                real alpha, const real *A, int64_t lda, const real *B, int64_t ldb,
                                real beta, real *C, int64_t ldc, int64_t i0, int64_t j0,
                                const gemm_blocks *bl, real *abuf, real *bbuf)
{
    for (int64_t jc = 0; jc < n; jc += bl->nc) {
        const int64_t nc = min64(bl->nc, n - jc);
        for (int64_t pc = 0; pc < k; pc += bl->kc) {
            const int64_t kc = min64(bl->kc, k - pc);
            gemm_pack_b(trans_b, B, ldb, pc, kc, j0 + jc, nc, bbuf);
            for (int64_t ic = 0; ic < m; ic += bl->mc) {
                const int64_t mc = min64(bl->mc, m - ic);
                gemm_pack_a(trans_a, A, lda, i0 + ic, mc, pc, kc, abuf);
                for (int64_t jr = 0; jr < nc; jr += GEMM_NR)
                    for (int64_t ir = 0; ir < mc; ir += GEMM_MR)
                        gemm_tile(kc, abuf + ir * kc, bbuf + jr * kc,
                                  C + (i0 + ic + ir) * ldc + j0 + jc + jr, ldc,
                                  min64(GEMM_MR, mc - ir), min64(GEMM_NR, nc - jr), pc == 0,
                                  alpha, beta);
            }
        }
    }
}

/* lstmkit's GEMM (see the top of this file). Returns 0, or -1 if its buffers could not be had
 * (nothing written: the caller takes its plain loop). */
static inline int own_gemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, real alpha,
                           const real *A, int64_t lda, const real *B, int64_t ldb, real beta,
                           real *C, int64_t ldc)
{
    const gemm_blocks bl = gemm_blocking();
    int threads = lk_gemm_threads();
    if ((double)m * n * k * 2 < lk_planned.serial_flops)
        threads = 1;
    /* split by whole tiles of the larger dimension */
    const int by_rows = m > n;
    const int64_t unit = by_rows ? GEMM_MR : GEMM_NR, span = by_rows ? m : n;
    const int64_t tiles = (span + unit - 1) / unit;
    if (threads > tiles)
        threads = (int)tiles;
    if (threads < 1)
        threads = 1;
    const int64_t kc = min64(bl.kc, k);
    const size_t a_elems = (size_t)((min64(bl.mc, m) + GEMM_MR) * kc);
    const size_t b_elems = (size_t)((min64(bl.nc, n) + GEMM_NR) * kc);
    void *mem = NULL;
    if (posix_memalign(&mem, 64, (a_elems + b_elems) * sizeof(real) * (size_t)threads) != 0)
        return -1;
    real *buf = mem;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int rank = 0, size = 1;
#ifdef _OPENMP
        rank = omp_get_thread_num();
        size = omp_get_num_threads();
#endif
        int64_t t0, t1;
        lk_split(tiles, rank, size, &t0, &t1);
        const int64_t s0 = min64(t0 * unit, span), s1 = min64(t1 * unit, span);
        real *abuf = buf + (size_t)rank * (a_elems + b_elems), *bbuf = abuf + a_elems;
        if (s1 > s0) {
            if (by_rows)
                gemm_blocked(trans_a, trans_b, s1 - s0, n, k, alpha, A, lda, B, ldb, beta, C, ldc,
                             s0, 0, &bl, abuf, bbuf);
            else
                gemm_blocked(trans_a, trans_b, m, s1 - s0, k, alpha, A, lda, B, ldb, beta, C, ldc,
                             0, s0, &bl, abuf, bbuf);
        }
    }
    free(buf);
    return 0;
}

#endif
