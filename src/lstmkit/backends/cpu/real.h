/* lstmkit CPU kernels: what kernel.c and variant.c share for one element type.
 *
 * Include after lstm.h in a unit compiled with -DLK_DOUBLE=0 (float) or -DLK_DOUBLE=1 (double).
 * Defines `real`, `vec` (LK_VBYTES bytes: V lanes of real), loads and stores of the first n
 * lanes, tanh and sigmoid on vectors accurate to a few ulp, and a row-major GEMM through the
 * BLAS Python handed over (lk_sgemm / lk_dgemm) or a plain loop.
 */
#ifndef LSTMKIT_REAL_H
#define LSTMKIT_REAL_H

#if !defined(LK_DOUBLE)
#error "compile with -DLK_DOUBLE=0 (float) or -DLK_DOUBLE=1 (double)"
#endif

#if LK_DOUBLE
typedef double real;
typedef int64_t ival;
typedef uint64_t uval;
#define BLAS_GEMM lk_dgemm
#else
typedef float real;
typedef int32_t ival;
typedef uint32_t uval;
#define BLAS_GEMM lk_sgemm
#endif
/* entry points: name_f32, name_f64; a second, narrower copy of kernel.c (LK_NARROW, see
 * build.py) adds _narrow */
#if LK_DOUBLE && defined(LK_NARROW)
#define SUF(name) name##_f64_narrow
#elif LK_DOUBLE
#define SUF(name) name##_f64
#elif defined(LK_NARROW)
#define SUF(name) name##_f32_narrow
#else
#define SUF(name) name##_f32
#endif

#define V ((int64_t)(LK_VBYTES / sizeof(real))) /* lanes per vector */
typedef real vec __attribute__((vector_size(LK_VBYTES)));
typedef ival ivec __attribute__((vector_size(LK_VBYTES)));
typedef uval uvec __attribute__((vector_size(LK_VBYTES)));

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- vectors: GCC's generic vectors; the rest (blends, partial loads and stores, lane sums)
 * from the tier's file ---- */

/* x - 0 is x exactly (0 + x is not, for x = -0), so this compiles to a plain broadcast. */
LK_INLINE vec splat(real x) { return x - (vec){}; }
LK_INLINE vec vload(const real *p)
{
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}
LK_INLINE void vstore(real *p, vec v) { memcpy(p, &v, sizeof v); }

/* The tier's vector operations and register tile (one file per ISA tier), chosen by what
 * the unit is compiled for: AVX with 32-byte vectors, AVX-512 F with 64-byte ones, else the
 * portable one. */
#if defined(__AVX__) && LK_VBYTES == 32
#include "tier_avx2.h"
#elif defined(__AVX512F__) && LK_VBYTES == 64
#include "tier_avx512.h"
#else
#include "tier_generic.h"
#endif

/* ---- tanh and sigmoid, vectorised, accurate to float / double rounding (a few ulp) ----
 * exp: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by its Taylor polynomial
 * (truncation far below one ulp), 2^n put into the exponent bits. The round-to-integer adds
 * and subtracts 1.5 * 2^mantissa_bits, so the integer n also sits in the low bits of the sum.
 * tanh: from e^(-2|x|) by the same reduction (see v_tanh). Measured against double tanh and
 * sigmoid over [-12, 12] and a log sweep of tiny values: float tanh 2.2 ulp, sigmoid 2.1 ulp;
 * double tanh 2.0 ulp, sigmoid 2.0 ulp (tests/test_cpu_backend.py). NaN propagates. */
#if LK_DOUBLE
#define EXP_LO -708.0
#define EXP_HI 708.0
#define EXP_SHIFTER 6755399441055744.0 /* 1.5 * 2^52 */
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
#define EXP_BIAS 1023
#define MANT_BITS 52
static const real exp_taylor[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                  1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                                  1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                                  1.0 / 24.0,         1.0 / 6.0,         0.5,
                                  1.0,                1.0};
#else
#define EXP_LO -87.0f
#define EXP_HI 88.0f
#define EXP_SHIFTER 12582912.0f /* 1.5 * 2^23 */
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define EXP_BIAS 127
#define MANT_BITS 23
static const real exp_taylor[] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f,
                                  1.0f / 6.0f,    0.5f,          1.0f,          1.0f};
#endif
#define LOG2E ((real)1.44269504088896340736)
#define EXP_TERMS ((int)(sizeof exp_taylor / sizeof exp_taylor[0]))

/* 2^n as a real, n the integer in the low bits of `shifted` (see above): the biased exponent
 * put into the exponent bits. In unsigned arithmetic, where shifting into the sign bit is
 * defined (n + EXP_BIAS is at least 1 for the inputs of v_exp and v_tanh). */
LK_INLINE vec exp2_int(vec shifted)
{
    const uvec n = (uvec)shifted - (uvec)splat(EXP_SHIFTER);
    return (vec)((n + EXP_BIAS) << MANT_BITS);
}

/* e^x for x in [EXP_LO, EXP_HI]; 0 below and infinity above, so that sigmoid and tanh saturate
 * exactly (sigmoid(-800) is 0, not e^-EXP_HI). NaN stays NaN. */
LK_INLINE vec v_exp(vec x)
{
    const ivec under = (ivec)(x < EXP_LO), over = (ivec)(x > EXP_HI);
    x = vmin_nan(EXP_HI, vmax_nan(EXP_LO, x));
    vec shifted = x * LOG2E + EXP_SHIFTER;
    vec n = shifted - EXP_SHIFTER;
    vec r = x - n * LN2_HI;
    r = r - n * LN2_LO;
    vec p = splat(exp_taylor[0]);
    for (int k = 1; k < EXP_TERMS; k++)
        p = p * r + exp_taylor[k];
    return vsel(over, splat((real)INFINITY), (vec)((ivec)(p * exp2_int(shifted)) & ~under));
}

LK_INLINE vec v_sigmoid(vec x) { return 1 / (1 + v_exp(-x)); }

/* tanh |x| = (1 - e) / (1 + e) with e = e^(-2|x|) = 2^n (1 + q), q = e^r - 1, the sign of x
 * put back. q is v_exp's polynomial without its constant term, r + r^2/2 + ..., so it keeps its
 * bits where it is small, and numerator and denominator are each one rounding from q:
 * (1 - 2^n) - 2^n q and (1 + 2^n) + 2^n q, where 1 -+ 2^n is exact. So there is no cancellation
 * near 0 (n = 0: -q / (2 + q)). From |x| = 5/8 on (tanh > 1/2) it is 1 - 2e / (1 + e): the
 * rounding errors of the quotient are those of a number below 1/2, so the result is about
 * correctly rounded where tanh saturates, and 1 - tanh^2 (backward's derivative, a difference
 * of nearly equal numbers there) keeps its digits instead of losing twice as many as torch's.
 * One division serves both. Below EXP_LO, e is 0 to working precision and tanh exactly 1. */
LK_INLINE vec v_tanh(vec x)
{
    const ivec sign = (ivec)((uvec){} + ((uval)1 << (sizeof(real) * 8 - 1)));
    const vec y = vmax_nan(EXP_LO, -2 * (vec)((ivec)x & ~sign));
    const vec shifted = y * LOG2E + EXP_SHIFTER;
    const vec n = shifted - EXP_SHIFTER;
    vec r = y - n * LN2_HI;
    r = r - n * LN2_LO;
    vec p = splat(exp_taylor[0]);
    for (int k = 1; k < EXP_TERMS - 1; k++)
        p = p * r + exp_taylor[k];
    const vec q = p * r;
    const vec scale = exp2_int(shifted);
    const ivec saturating = (ivec)(y < (real)-1.25);
    const vec num = vsel(saturating, 2 * (scale + scale * q), (1 - scale) - scale * q);
    const vec quotient = num / ((1 + scale) + scale * q);
    const vec t = vsel(saturating, 1 - quotient, quotient);
    return (vec)((ivec)t | ((ivec)x & sign));
}

/* Lanes [0, n) of a vector set, for the last, partial vector of a row. */
LK_INLINE ivec first_lanes(int64_t n)
{
    ivec lanes;
    for (int64_t k = 0; k < V; k++)
        lanes[k] = k;
    return lanes < (ival)n;
}

/* The sum of a vector's lanes. */
LK_INLINE real vsum(vec v)
{
    real s = 0;
    for (int64_t k = 0; k < V; k++)
        s += v[k];
    return s;
}

/* ---- pairwise sums over many terms (steps, blocks of rows) ----
 * One running sum over thousands of terms (a gradient summed over every step) loses about a
 * rounding of the running sum per term, so its error grows with the number of terms; summed in
 * pairs, then pairs of pairs, it grows with their log2. sum_push adds term number `count` (0, 1,
 * 2, ...) of a sequence of vectors to a binary counter of partial sums: level k (ld reals after
 * level k - 1) holds the sum of 2^k consecutive terms while bit k of the count is set. sum_total
 * is the sum of the levels of `count` terms, the smallest first (the first `lanes` of each
 * vector are read and written). Levels need no initial value; the order depends on the count
 * alone, never on who computes a column (threads). */
#define SUM_LEVELS 48 /* levels for up to 2^48 terms */
LK_INLINE void sum_push(real *levels, int64_t ld, int64_t count, vec x, int64_t lanes)
{
    int k = 0;
    for (; count >> k & 1; k++)
        x = vload_n(levels + k * ld, lanes) + x;
    vstore_n(levels + k * ld, x, lanes);
}
LK_INLINE vec sum_total(const real *levels, int64_t ld, int64_t count, int64_t lanes)
{
    vec total = splat(0);
    for (int k = 0; count >> k != 0; k++)
        if (count >> k & 1)
            total += vload_n(levels + k * ld, lanes);
    return total;
}
/* Levels that `count` terms need (at least 1). */
static inline int64_t sum_levels(int64_t count)
{
    int64_t k = 1;
    while (count >> k != 0)
        k++;
    return k;
}

#include "gemm.h"

/* ---- GEMM on row-major matrices: C (m x n) = alpha op(A) op(B) + beta C ---- */

static inline void blas_call(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                             real alpha, const real *A, int64_t lda, const real *B, int64_t ldb,
                             real beta, real *C, int64_t ldc)
{
    /* Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T. */
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mm = (int)n, nn = (int)m, kk = (int)k;
    const int la = (int)ldb, lb = (int)lda, lc = (int)ldc;
    BLAS_GEMM(&tb, &ta, &mm, &nn, &kk, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

/* The BLAS on one thread per piece: the larger of m and n in pieces fixed by the shape alone
 * (at most BLAS_PIECES, at least 64 wide), the threads taking whole pieces. A BLAS on several
 * threads of its own may split k between them (MKL did, for a thin dx = dA W_ih), and then the
 * sums, and the bits, depend on the thread count; one piece on one BLAS thread is the same
 * computation whoever runs it. */
#define BLAS_PIECES 8
static inline void blas_gemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                             real alpha, const real *A, int64_t lda, const real *B, int64_t ldb,
                             real beta, real *C, int64_t ldc)
{
    const int by_rows = m >= n;
    const int64_t span = by_rows ? m : n;
    int64_t piece = (span + BLAS_PIECES - 1) / BLAS_PIECES;
    piece = piece < 64 ? 64 : (piece + 15) / 16 * 16;
    const int64_t pieces = (span + piece - 1) / piece;
    int threads = lk_gemm_threads();
#ifdef _OPENMP
    if (omp_in_parallel())
        threads = 1;
#endif
    threads = threads > pieces ? (int)pieces : threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int old = lk_blas_threads != NULL ? lk_blas_threads(1) : 0;
#pragma omp for schedule(static)
        for (int64_t q = 0; q < pieces; q++) {
            const int64_t s0 = q * piece, len = min64(piece, span - s0);
            if (by_rows) /* rows s0.. of C and of op(A) */
                blas_call(trans_a, trans_b, len, n, k, alpha, trans_a ? A + s0 : A + s0 * lda,
                          lda, B, ldb, beta, C + s0 * ldc, ldc);
            else /* columns s0.. of C and of op(B) */
                blas_call(trans_a, trans_b, m, len, k, alpha, A, lda,
                          trans_b ? B + s0 * ldb : B + s0, ldb, beta, C + s0, ldc);
        }
        if (lk_blas_threads != NULL)
            lk_blas_threads(old);
    }
}

static inline void gemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, real alpha,
                 const real *A, int64_t lda, const real *B, int64_t ldb, real beta, real *C,
                 int64_t ldc)
{
    if (m == 0 || n == 0)
        return;
    if (BLAS_GEMM != NULL && k > 0) {
        blas_gemm(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    if (k > 0 && own_gemm(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) == 0)
        return;
    /* Without k, or without memory for the own GEMM's buffers: a plain loop, rows split across
     * threads when there is enough work. */
#pragma omp parallel for schedule(static) if ((double)m * n * k > 1e7)
    for (int64_t i = 0; i < m; i++) {
        real *c = C + i * ldc;
        for (int64_t j = 0; j < n; j++)
            c[j] = beta == 0 ? 0 : beta * c[j];
        for (int64_t p = 0; p < k; p++) {
            const real a_ip = alpha * (trans_a ? A[p * lda + i] : A[i * lda + p]);
            if (trans_b)
                for (int64_t j = 0; j < n; j++)
                    c[j] += a_ip * B[j * ldb + p];
            else
                for (int64_t j = 0; j < n; j++)
                    c[j] += a_ip * B[p * ldb + j];
        }
    }
}

/* C (m x n, ldc) = A^T B over k rows: A (k x m, lda), B (k x n, ldb), row-major; for the
 * weight gradients, whose k is every step's rows (thousands). One GEMM over all k keeps one
 * running sum per element (a BLAS blocks k too, but adds its blocks one after the other, and
 * small shapes not at all), so the rows go in chunks of GEMM_CHUNK_ROWS, one GEMM each, summed
 * pairwise (as sum_push, whole matrices: chunk c goes into the free level, the full ones below
 * are added to it). `levels`: gemm_levels(m, n, k) reals. The chunks are fixed by the shape
 * and the plan, so the sums are the same whatever the threads. 256 rows keep the BLAS near its
 * speed. A result bigger than L2 (the plan's row_bytes) takes proportionally longer chunks:
 * adding levels that stream from memory cost as much as a third of the GEMMs (H = 1024), and a
 * GEMM that size blocks its k itself. */
#define GEMM_CHUNK_ROWS 256
static inline int64_t gemm_chunk_rows(int64_t m, int64_t n)
{
    const double l2s = (double)m * (double)n * sizeof(real) / lk_planned.row_bytes;
    return l2s > 1 ? GEMM_CHUNK_ROWS * (int64_t)ceil(l2s) : GEMM_CHUNK_ROWS;
}
static inline int64_t gemm_levels(int64_t m, int64_t n, int64_t k)
{
    const int64_t per = gemm_chunk_rows(m, n), chunks = (k + per - 1) / per;
    return chunks <= 1 ? 0 : sum_levels(chunks) * m * n;
}
static inline void gemm_tn_rows(int64_t m, int64_t n, int64_t k, const real *A, int64_t lda,
                                const real *B, int64_t ldb, real *C, int64_t ldc, real *levels)
{
    const int64_t per = gemm_chunk_rows(m, n), chunks = (k + per - 1) / per, mn = m * n;
    if (chunks <= 1) {
        gemm(1, 0, m, n, k, 1, A, lda, B, ldb, 0, C, ldc);
        return;
    }
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t r0 = c * per, rows = min64(per, k - r0);
        int64_t j = 0;
        while (c >> j & 1)
            j++;
        real *slot = levels + j * mn;
        gemm(1, 0, m, n, rows, 1, A + r0 * lda, lda, B + r0 * ldb, ldb, 0, slot, n);
        for (int64_t below = 0; below < j; below++)
            for (int64_t e = 0; e < mn; e++)
                slot[e] = levels[below * mn + e] + slot[e];
    }
    for (int64_t i = 0; i < m; i++) {
        real *c = C + i * ldc;
        for (int64_t e = 0; e < n; e++)
            c[e] = 0;
        for (int64_t j = 0; chunks >> j != 0; j++)
            for (int64_t e = 0; e < n && (chunks >> j & 1); e++)
                c[e] += levels[j * mn + i * n + e];
    }
}

/* A workspace's next `count` reals (see lk_arena). */
#define TAKE(arena, count) ((real *)lk_take(arena, (size_t)(count), sizeof(real)))

/* x packed by steps (rows off[t] + b), for lengths; the padded x itself otherwise. */
static inline const real *pack_input(const lk_layer *a, const int64_t *off, real *xp)
{
    if (a->lengths == NULL)
        return a->x;
    for (int64_t t = 0; t < a->T; t++)
        memcpy(xp + off[t] * a->I, (const real *)a->x + t * a->B * a->I,
               (size_t)((off[t + 1] - off[t]) * a->I) * sizeof(real));
    return xp;
}

/* The reverse of pack_input for the input's gradient: packed rows dxp into d_x (T, B, I),
 * zero at padded steps (they get no gradient). */
static inline void unpack_input_grad(const lk_layer *a, const int64_t *off, const real *dxp,
                                     void *d_x)
{
    memset(d_x, 0, (size_t)(a->T * a->B * a->I) * sizeof(real));
    for (int64_t t = 0; t < a->T; t++)
        memcpy((real *)d_x + t * a->B * a->I, dxp + off[t] * a->I,
               (size_t)((off[t + 1] - off[t]) * a->I) * sizeof(real));
}

#endif
