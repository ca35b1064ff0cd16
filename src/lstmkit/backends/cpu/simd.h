/* lstmkit CPU kernels: vectors of one element type and the nonlinearities on them.
 *
 * Include after lstm.h in a unit compiled with -DLK_DOUBLE=0 (float) or 1 (double). Defines
 * `real`, `vec` (LK_VBYTES bytes: 8 floats or 4 doubles, V lanes), loads and stores of the
 * first n lanes (the rest read as zero), and exp, sigmoid and tanh accurate to a few ulp.
 * Written with GCC's generic vectors and bit operations only, so the same source serves AVX2
 * and narrower machines, and with no finite-math assumption: NaN propagates. */
#ifndef LSTMKIT_SIMD_H
#define LSTMKIT_SIMD_H

#if !defined(LK_DOUBLE)
#error "define LK_DOUBLE (0: float, 1: double) before including simd.h"
#endif

#if LK_DOUBLE
typedef double real;
typedef int64_t ival;
#else
typedef float real;
typedef int32_t ival;
#endif

#define V ((int64_t)(LK_VBYTES / sizeof(real))) /* lanes per vector */
typedef real vec __attribute__((vector_size(LK_VBYTES)));
typedef ival ivec __attribute__((vector_size(LK_VBYTES)));

/* x - 0 is x exactly (0 + x is not, for x = -0), so this is a plain broadcast. */
LK_INLINE vec splat(real x) { return x - (vec){}; }

LK_INLINE vec vload(const real *p)
{
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

LK_INLINE void vstore(real *p, vec v) { memcpy(p, &v, sizeof v); }

/* The first n lanes (0 < n <= V) of p, the others zero; p[n..] is not read. */
LK_INLINE vec vload_n(const real *p, int64_t n)
{
    if (n == V)
        return vload(p);
    vec v = {};
    memcpy(&v, p, (size_t)n * sizeof(real));
    return v;
}

LK_INLINE void vstore_n(real *p, vec v, int64_t n)
{
    if (n == V)
        vstore(p, v);
    else
        memcpy(p, &v, (size_t)n * sizeof(real));
}

/* mask ? a : b lane by lane, for masks from a vector comparison (lanes all ones or zeros). */
LK_INLINE vec vselect(ivec mask, vec a, vec b)
{
    return (vec)(((ivec)a & mask) | ((ivec)b & ~mask));
}

LK_INLINE real vsum(vec v)
{
    real s = 0;
    for (int64_t k = 0; k < V; k++)
        s += v[k];
    return s;
}

/* ---- e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by Taylor terms to below half an ulp ----
 * n is rounded by adding 1.5 * 2^mantissa_bits (the sum's low bits then hold n as an integer,
 * which becomes 2^n by a shift into the exponent field); ln2 is split in a part exact in a few
 * bits and a remainder, so r = x - n ln2 keeps full precision. Past +-EXP_CLAMP (where 2^n
 * would leave the normal numbers) the result is 0 or infinity, so sigmoid and tanh saturate
 * to exactly 0 and 1 there. */
#if LK_DOUBLE
#define EXP_CLAMP 708.0
#define ROUNDER 6755399441055744.0 /* 1.5 * 2^52 */
#define LN2_HEAD 6.93147180369123816490e-01
#define LN2_TAIL 1.90821492927058770002e-10
#define EXP_DEGREE 13
#define EXPONENT_BIAS 1023
#define MANTISSA_BITS 52
#else
#define EXP_CLAMP 87.0f
#define ROUNDER 12582912.0f /* 1.5 * 2^23 */
#define LN2_HEAD 0.693359375f
#define LN2_TAIL -2.12194440e-4f
#define EXP_DEGREE 7
#define EXPONENT_BIAS 127
#define MANTISSA_BITS 23
#endif

LK_INLINE vec v_exp(vec x)
{
    const ivec below = x < -EXP_CLAMP, above = x > EXP_CLAMP;
    x = vselect(below, splat(-EXP_CLAMP), x);
    x = vselect(above, splat(EXP_CLAMP), x);
    const vec rounded = x * (real)1.44269504088896340736 + ROUNDER;
    const vec n = rounded - ROUNDER;
    const vec r = (x - n * LN2_HEAD) - n * LN2_TAIL;
    /* Horner over 1 + r (1 + r/2 (1 + r/3 (...))): each factor 1/k is exact enough, and the
     * nesting keeps every partial sum near 1. */
    vec p = splat(1);
    for (int k = EXP_DEGREE; k >= 1; k--)
        p = 1 + r * p * (real)(1.0 / k);
    const ivec two_n = ((ivec)rounded - (ivec)splat(ROUNDER) + EXPONENT_BIAS) << MANTISSA_BITS;
    const vec result = vselect(below, splat(0), p * (vec)two_n);
    return vselect(above, splat((real)INFINITY), result);
}

LK_INLINE vec v_sigmoid(vec x) { return 1 / (1 + v_exp(-x)); }

/* tanh: an odd series below TANH_SERIES_BELOW, where 1 - 2 / (e^2|x| + 1) would cancel, that
 * formula above it with x's sign put back. Series coefficients: tanh x = sum_k a_k x^(2k+1),
 * a_k = 2^(2k+2) (2^(2k+2) - 1) B_(2k+2) / (2k+2)! with Bernoulli numbers B. */
#if LK_DOUBLE
#define TANH_SERIES_BELOW 0.5
#define TANH_TERMS 16
#else
#define TANH_SERIES_BELOW 0.5f
#define TANH_TERMS 8
#endif
static const double tanh_series[16] = {
    1.0,
    -1.0 / 3.0,
    2.0 / 15.0,
    -17.0 / 315.0,
    62.0 / 2835.0,
    -1382.0 / 155925.0,
    21844.0 / 6081075.0,
    -929569.0 / 638512875.0,
    6404582.0 / 10854718875.0,
    -443861162.0 / 1856156927625.0,
    18888466084.0 / 194896477400625.0,
    -113927491862.0 / 2900518163668125.0,
    58870668456604.0 / 3698160658676859375.0,
    -8374643517010684.0 / 1298054391195577640625.0,
    689005380505609448.0 / 263505041412702261046875.0,
    -129848163681107301953.0 / 122529844256906551386796875.0,
};

LK_INLINE vec v_tanh(vec x)
{
    const ivec sign_bit = (ivec){} + ((ival)1 << (sizeof(real) * 8 - 1));
    const vec magnitude = (vec)((ivec)x & ~sign_bit);
    const vec x2 = x * x;
    vec p = splat((real)tanh_series[TANH_TERMS - 1]);
    for (int k = TANH_TERMS - 2; k >= 0; k--)
        p = p * x2 + (real)tanh_series[k];
    const vec series = x * p;
    vec closed = 1 - 2 / (v_exp(magnitude + magnitude) + 1);
    closed = (vec)((ivec)closed | ((ivec)x & sign_bit));
    return vselect(magnitude < TANH_SERIES_BELOW, series, closed);
}

#endif
