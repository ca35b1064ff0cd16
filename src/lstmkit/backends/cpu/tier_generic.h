/* lstmkit CPU kernels, the portable tier (generic): GCC's vectors in plain C, no instruction
 * set assumed; what aarch64 and any other CPU get (the compiler maps the vectors to NEON, SSE
 * or scalars).
 *
 * Included by real.h (never directly) for any build that is not AVX with 32-byte vectors nor
 * AVX-512 F with 64-byte ones. Blends, NaN-keeping max and min, partial loads and stores
 * (memcpy of the first n lanes) and lane sums in plain C; and the register tile of the panel
 * products.
 */
#ifndef LSTMKIT_TIER_H
#define LSTMKIT_TIER_H
#define LK_TIER "generic"
LK_INLINE vec vsel(ivec mask, vec a, vec b) { return (vec)(((ivec)a & mask) | ((ivec)b & ~mask)); }
LK_INLINE vec vmax_nan(real lo, vec x) { return vsel(x < lo, splat(lo), x); }
LK_INLINE vec vmin_nan(real hi, vec x) { return vsel(x > hi, splat(hi), x); }
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
LK_INLINE vec lane_sums(const vec s[V])
{
    vec sums;
    for (int v = 0; v < V; v++) {
        real sum = 0;
        for (int k = 0; k < V; k++)
            sum += s[v][k];
        sums[v] = sum;
    }
    return sums;
}

/* The register tile of the panel products (kernel.c's panel_tile): TILE_ROWS rows of A by
 * TILE_VECS vectors of a panel's four, sized for the build's LK_VREGS vector registers (the
 * tier's count, see lstmkit.backends.cpu.machine): the accumulators, one load per vector and a
 * broadcast fit them (6 x 4 + 4 + 1 = 29 of 32; 6 x 2 + 2 + 1 = 15 of 16). */
#define TILE_ROWS 6
#if LK_VREGS >= 32
#define TILE_VECS 4
#else
#define TILE_VECS 2
#endif

#endif
