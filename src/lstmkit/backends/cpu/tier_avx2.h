/* lstmkit CPU kernels, ISA tier avx2 (AVX2 + FMA): 32-byte vectors, 16 vector registers.
 *
 * Included by real.h (never directly) where the unit is built with AVX and LK_VBYTES 32: the
 * avx2 tier's build, and the narrow copy of kernel.c in a wider tier's build. Gives what GCC's
 * generic vectors have no form for: blends, max and min that keep NaN, loads and stores of the
 * first n lanes (AVX's masked moves), lane sums; and the register tile of the panel products.
 */
#ifndef LSTMKIT_TIER_H
#define LSTMKIT_TIER_H
#define LK_TIER "avx2"
#include <immintrin.h>
#if LK_DOUBLE
typedef __m256d xvec;
#define X86(name) _mm256_##name##_pd
static const ivec lane_index = {0, 1, 2, 3};
#else
typedef __m256 xvec;
#define X86(name) _mm256_##name##_ps
static const ivec lane_index = {0, 1, 2, 3, 4, 5, 6, 7};
#endif
/* mask ? a : b, lane by lane (mask lanes all ones or all zeros) */
LK_INLINE vec vsel(ivec mask, vec a, vec b) { return (vec)X86(blendv)((xvec)b, (xvec)a, (xvec)mask); }
/* max(lo, x) and min(hi, x); a NaN x stays NaN (the instructions return the second operand). */
LK_INLINE vec vmax_nan(real lo, vec x) { return (vec)X86(max)((xvec)splat(lo), (xvec)x); }
LK_INLINE vec vmin_nan(real hi, vec x) { return (vec)X86(min)((xvec)splat(hi), (xvec)x); }
/* The first n lanes (0 <= n <= V) of p; the others are zero and p[n..] is not touched. */
LK_INLINE vec vload_n(const real *p, int64_t n)
{
    if (n == V)
        return vload(p);
    return (vec)X86(maskload)(p, (__m256i)(lane_index < (ival)n));
}
LK_INLINE void vstore_n(real *p, vec v, int64_t n)
{
    if (n == V)
        vstore(p, v);
    else
        X86(maskstore)(p, (__m256i)(lane_index < (ival)n), (xvec)v);
}
/* Lane v of the result: the sum of the lanes of s[v] (pairwise adds, then the two halves). */
LK_INLINE vec lane_sums(const vec s[V])
{
#if LK_DOUBLE
    xvec t0 = X86(hadd)((xvec)s[0], (xvec)s[1]), t1 = X86(hadd)((xvec)s[2], (xvec)s[3]);
#else
    xvec u0 = X86(hadd)((xvec)s[0], (xvec)s[1]), u1 = X86(hadd)((xvec)s[2], (xvec)s[3]);
    xvec u2 = X86(hadd)((xvec)s[4], (xvec)s[5]), u3 = X86(hadd)((xvec)s[6], (xvec)s[7]);
    xvec t0 = X86(hadd)(u0, u1), t1 = X86(hadd)(u2, u3);
#endif
    return (vec)X86(add)(X86(permute2f128)(t0, t1, 0x20), X86(permute2f128)(t0, t1, 0x31));
}

/* The register tile of the panel products (kernel.c's panel_tile): TILE_ROWS rows of A by
 * TILE_VECS vectors of a panel's four. The accumulators, one load per vector and a broadcast
 * fit the 16 registers: 6 x 2 + 2 + 1 = 15, so a panel takes two tiles. The narrow copy of an
 * AVX-512 build has 32 (LK_VREGS): 6 x 4 + 4 + 1 = 29, the whole panel at once. */
#define TILE_ROWS 6
#if LK_VREGS >= 32
#define TILE_VECS 4
#else
#define TILE_VECS 2
#endif

#endif
