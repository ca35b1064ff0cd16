/* lstmkit CPU kernels, ISA tier avx512 (AVX-512 F): 64-byte vectors, 32 vector registers and
 * mask registers.
 *
 * Included by real.h (never directly) where the unit is built with AVX-512 F and LK_VBYTES 64.
 * Gives what GCC's generic vectors have no form for: blends, max and min that keep NaN, loads
 * and stores of the first n lanes (through mask registers: nothing past them is touched), lane
 * sums; and the register tile of the panel products.
 */
#ifndef LSTMKIT_TIER_H
#define LSTMKIT_TIER_H
#define LK_TIER "avx512"
#include <immintrin.h>
#if LK_DOUBLE
typedef __m512d xvec;
typedef __mmask8 lane_mask;
#define X86(name) _mm512_##name##_pd
#define LANES4(a, b, imm) _mm512_shuffle_f64x2(a, b, imm)
/* all-ones lanes (negative as integers) to a mask register */
#define MASK_OF(m) _mm512_cmplt_epi64_mask((__m512i)(m), _mm512_setzero_si512())
#else
typedef __m512 xvec;
typedef __mmask16 lane_mask;
#define X86(name) _mm512_##name##_ps
#define LANES4(a, b, imm) _mm512_shuffle_f32x4(a, b, imm)
#define MASK_OF(m) _mm512_cmplt_epi32_mask((__m512i)(m), _mm512_setzero_si512())
#endif
LK_INLINE lane_mask first_n(int64_t n) { return (lane_mask)((1u << n) - 1); } /* n < V */
LK_INLINE vec vsel(ivec mask, vec a, vec b)
{
    return (vec)X86(mask_blend)(MASK_OF(mask), (xvec)b, (xvec)a);
}
/* As for AVX: max and min return their second operand when one is NaN, so NaN stays NaN. */
LK_INLINE vec vmax_nan(real lo, vec x) { return (vec)X86(max)((xvec)splat(lo), (xvec)x); }
LK_INLINE vec vmin_nan(real hi, vec x) { return (vec)X86(min)((xvec)splat(hi), (xvec)x); }
/* Masked loads and stores touch only the lanes of the mask (no fault past a buffer's end). */
LK_INLINE vec vload_n(const real *p, int64_t n)
{
    if (n == V)
        return vload(p);
    return (vec)X86(maskz_loadu)(first_n(n), p);
}
LK_INLINE void vstore_n(real *p, vec v, int64_t n)
{
    if (n == V)
        vstore(p, v);
    else
        X86(mask_storeu)(p, first_n(n), (xvec)v);
}
/* Lane v of the result: the sum of the lanes of s[v]. Adjacent lanes are added in pairs
 * within each 128-bit block (twice for float, once for double), until each block of the four
 * vectors left holds one partial sum per input vector; a transpose of the 128-bit blocks then
 * adds the four partial sums of each input vector. */
LK_INLINE xvec pair_sums(xvec a, xvec b)
{
#if LK_DOUBLE
    return X86(add)(X86(shuffle)(a, b, 0x00), X86(shuffle)(a, b, 0xFF));
#else
    return X86(add)(X86(shuffle)(a, b, 0x88), X86(shuffle)(a, b, 0xDD));
#endif
}
LK_INLINE vec lane_sums(const vec s[V])
{
    xvec w[4];
#if LK_DOUBLE
    for (int k = 0; k < 4; k++)
        w[k] = pair_sums((xvec)s[2 * k], (xvec)s[2 * k + 1]);
#else
    for (int k = 0; k < 4; k++)
        w[k] = pair_sums(pair_sums((xvec)s[4 * k], (xvec)s[4 * k + 1]),
                         pair_sums((xvec)s[4 * k + 2], (xvec)s[4 * k + 3]));
#endif
    /* block k of the result: the sum of w[k]'s four blocks */
    const xvec ab = X86(add)(LANES4(w[0], w[1], 0x44), LANES4(w[0], w[1], 0xEE));
    const xvec cd = X86(add)(LANES4(w[2], w[3], 0x44), LANES4(w[2], w[3], 0xEE));
    return (vec)X86(add)(LANES4(ab, cd, 0x88), LANES4(ab, cd, 0xDD));
}
#undef MASK_OF

/* The register tile of the panel products (kernel.c's panel_tile): TILE_ROWS rows of A by
 * TILE_VECS vectors of a panel's four. The accumulators, one load per vector and a broadcast
 * fit the 32 registers: 6 x 4 + 4 + 1 = 29, the whole panel at once, which reads each row of A
 * once and does twice the FMAs per load of the 6 x 2 tile. */
#define TILE_ROWS 6
#define TILE_VECS 4

#endif
