/* lstmkit CPU kernels: the C ABI shared with Python (lstmkit.backends.cpu) and small helpers
 * shared by the float and double builds of kernel.c. See kernel.c for the design. */
#ifndef LSTMKIT_LSTM_H
#define LSTMKIT_LSTM_H
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#define LK_INLINE static inline __attribute__((always_inline))
#ifndef LK_VBYTES /* bytes per vector: the build passes its tier's width (lstmkit.backends.cpu.machine) */
#define LK_VBYTES 32
#endif
#ifndef LK_VREGS /* vector registers: the build passes its tier's count */
#define LK_VREGS 16
#endif
/* What a call's plan derives from the machine (its caches, its vector width), set once per
 * process by lk_set_plan from lstmkit.backends.cpu.machine.plan, which says why each value is
 * what it is (`lstmkit backends` prints them); until then, those of a core with 32 KB of L1d,
 * 512 KB of L2 and 32-byte vectors. Every field is 8 bytes (a double), as Python packs it. */
typedef struct {
    double row_bytes;    /* batch 1: the row path where W_hh (4H x P) fits one core's L2 */
    double small_bytes;  /* batch 1: [W_ih W_hh]^T packed for broadcasts where it fits L1d */
    double fuse_bytes;   /* batch 1: W_ih read inside the step where it fits L1d */
    double pass_bytes;   /* panel path: bytes of a weight panel per pass, kept in L2 */
    double serial_flops; /* below this many flops a call runs on one thread: waking a second
                            one costs more than it saves, much more when a core is taken */
    double one_team;     /* nonzero: two directions share one team of every thread, one
                            direction after the other, instead of a team each side by side */
    /* waits, in nanoseconds (lk_waits has them in lk_ticks) */
    double barrier_spin_ns; /* a team's barrier spins this long, then yields its core */
    double claimed_spin_ns; /* a batch-1 thread waits so for the half its partner claimed */
    double slack_ns;        /* a batch-1 partner's head start (see lk_items in kernel.c) */
    double idle_spin_ns;    /* the pair's helper spins so for the next job, then sleeps */
    double join_spin_ns;    /* the caller spins so for a helper still in the job, then sleeps */
    double keep_bytes;      /* the biggest workspace kept between calls (lk_workspace_give) */
} lk_plan;
extern lk_plan lk_planned;

/* The plan's waits in lk_ticks, from the tick rate measured once per process (lk_set_plan). */
typedef struct {
    uint64_t barrier_spin, claimed_spin, slack, idle_spin, join_spin;
    double per_ns; /* lk_ticks per nanosecond */
} lk_wait_ticks;
extern lk_wait_ticks lk_waits;

/* Nanoseconds of the monotonic clock. */
static inline uint64_t lk_now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* A clock for short waits: the time-stamp counter where there is one, else nanoseconds. */
static inline uint64_t lk_ticks(void)
{
#if defined(__x86_64__) || defined(__i386__)
    return __builtin_ia32_rdtsc();
#else
    return lk_now_ns();
#endif
}

static inline void lk_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* A direction's weights, in the order of lstmkit.reference.LayerWeights. */
enum lk_weight {
    LK_W_IH, /* (G, I) */
    LK_W_HH, /* (G, P) */
    LK_B_IH, /* (G,) or NULL */
    LK_B_HH, /* (G,) or NULL */
    LK_W_HR, /* (P, H) or NULL */
    LK_WEIGHTS
};

/* One layer, as lstmkit.backends.cpu passes it (every field 8 bytes, mirrored there by a
 * struct.Struct). Tensors are contiguous, of one dtype. */
typedef struct {
    int64_t T, B, I, H, P, D;
    int64_t threads;        /* most threads to use: torch.get_num_threads() */
    const int64_t *lengths; /* (B,) non-increasing, in [0, T]; NULL: every sequence has T steps */
    const void *x;          /* (T, B, I) */
    const void *h0, *c0;    /* (D, B, P), (D, B, H) */
    const void *w[2][LK_WEIGHTS];  /* per direction, in torch's layout (see lk_weight) */
    void *out;                     /* (T, B, D*P) */
    void *h_n, *c_n;               /* (D, B, P), (D, B, H) */
    void *cells;                   /* (T, B, D*H) every cell state, or NULL (inference) */
    void *saved;                   /* lk_saved_elems_*() elements kept for backward, or NULL */
    void *packed; /* lk_packed_elems_*() elements that outlive the call, where the forward keeps
                     its packed weights between calls (kernel.c), or NULL; one call at a time */
} lk_layer;

/* Gradients for backward: incoming ones may be NULL (zero), wanted ones NULL (not needed). */
typedef struct {
    const void *d_out, *d_h_n, *d_c_n, *d_cells;
    void *d_x, *d_h0, *d_c0;
    void *d_w[2][LK_WEIGHTS];
} lk_grads;

/* One lstmkit.LSTMCell step (cell.c), as lstmkit.backends.cpu.cell passes it (every field 8
 * bytes, mirrored there by a struct.Struct). N rows, H units, I inputs, G = 4H gates; tensors
 * contiguous, of one dtype. */
typedef struct {
    int64_t N, H, I;
    const void *x, *h;          /* (N, I), (N, H); x NULL: `gates` already holds the products */
    const void *w_ih, *w_hh;    /* (G, I), (G, H) */
    const void *b_ih, *b_hh;    /* (G,) each, or NULL */
    const void *c;              /* (N, H) */
    void *gates;                /* (N, G): the activations when kept for backward, or NULL */
    void *h_out, *c_out;        /* (N, H) */
} lk_cell;

/* A step's gradients: incoming ones may be NULL (zero), wanted ones NULL (not needed). */
typedef struct {
    const void *acts, *c_out;    /* what the forward kept: activations (N, G) and c' */
    const void *d_h, *d_c;       /* incoming, (N, H) */
    void *d_gates;               /* (N, G) scratch */
    void *d_c_prev, *db_ih, *db_hh, *d_x, *d_h_prev, *d_w_ih, *d_w_hh;
} lk_cell_grads;

/* ---- BLAS: Fortran gemm from a library the caller found (torch's MKL), else a plain loop ---- */

typedef void (*lk_sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                            const float *, const float *, const int *, const float *, const int *,
                            const float *, float *, const int *);
typedef void (*lk_dgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                            const double *, const double *, const int *, const double *,
                            const int *, const double *, double *, const int *);
extern lk_sgemm_fn lk_sgemm; /* NULL: no BLAS, the kernels' own loop is used */
extern lk_dgemm_fn lk_dgemm;
/* The BLAS's thread count for the calling thread (MKL_Set_Num_Threads_Local: returns the old
 * one, 0 meaning "the global setting"), or NULL if the BLAS has no such control. */
typedef int (*lk_blas_threads_fn)(int);
extern lk_blas_threads_fn lk_blas_threads;
/* lk_blas_threads sets the BLAS's and lstmkit's own GEMM's (gemm.h) thread counts for the
 * calling thread; this reads the own one (1 until set). */
int lk_gemm_threads(void);

/* ---- a barrier for one team: sense-reversing, spinning, yielding when a core is taken ---- */

typedef struct {
    _Alignas(64) atomic_int arrived;
    _Alignas(64) atomic_int sense;
    int size;
} lk_barrier;

static inline void lk_barrier_init(lk_barrier *b, int size)
{
    atomic_init(&b->arrived, 0);
    atomic_init(&b->sense, 0);
    b->size = size;
}

static inline void lk_barrier_wait(lk_barrier *b, int *local_sense)
{
    if (b->size <= 1)
        return;
    int sense = !*local_sense;
    *local_sense = sense;
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == b->size - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->sense, sense, memory_order_release);
        return;
    }
    const uint64_t start = lk_ticks();
    while (atomic_load_explicit(&b->sense, memory_order_acquire) != sense)
        if (lk_ticks() - start < lk_waits.barrier_spin)
            lk_pause();
        else
            sched_yield(); /* the partner may be descheduled: give the core away */
}

/* ---- a pair: the calling thread and one helper thread, for work the caller can finish alone ----
 * lk_pair_run(fn, arg) runs fn(arg, 0, size) on the calling thread and, when the process's
 * helper thread is free, fn(arg, 1, 2) on it (size 2); otherwise fn(arg, 0, 1) alone. The helper
 * may start late or not at all, and may be descheduled at any moment: fn must let either rank
 * finish the whole job alone (see lk_items in kernel.c). lk_pair_run returns once rank 0 has
 * returned and the helper is not inside fn; it never waits for a helper that has not started.
 * The helper is one thread per process, started on first use; it spins briefly for the next job
 * and then sleeps. */
typedef void (*lk_pair_fn)(void *arg, int rank, int size);
void lk_pair_run(lk_pair_fn fn, void *arg);
/* Called by rank 0 when it computes work of rank 1: lk_pair_run then runs the next few jobs
 * alone (the helper's core is likely busy). */
void lk_pair_late(void);

/* Test hook: rank `rank` sleeps `micros` microseconds before step `step` of a paired job (see
 * lk_pair_set_lag in lstm.c), as a descheduled thread would; micros 0 switches it off. */
void lk_pair_lag(int rank, int64_t step);

/* A count of items (claimed, or finished) that only grows, on a cache line of its own. */
typedef struct {
    _Alignas(64) atomic_llong n;
    char pad[64 - sizeof(atomic_llong)];
} lk_count;

static inline long long lk_count_get(lk_count *c)
{
    return atomic_load_explicit(&c->n, memory_order_acquire);
}

/* Waits at most `ticks` for c > n; returns whether it is. */
static inline int lk_count_wait(lk_count *c, long long n, uint64_t ticks)
{
    if (lk_count_get(c) > n)
        return 1;
    for (const uint64_t start = lk_ticks(); lk_ticks() - start < ticks;)
        if (lk_count_get(c) > n)
            return 1;
        else
            lk_pause();
    return 0;
}

/* Big buffers are written page by page on first use, and each 4 KB page costs a fault (in a
 * VM, more than its zeroing; benchmarks/README.md has the numbers). Where the kernel allows
 * it, 2 MB pages cost one fault each; this asks for them over the 2 MB-aligned part of a buffer
 * not yet touched. A hint only: nothing changes but the page size. */
#define LK_HUGE_PAGE ((size_t)2 << 20)

static inline void lk_advise_huge(void *p, size_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    uintptr_t begin = ((uintptr_t)p + LK_HUGE_PAGE - 1) & ~(LK_HUGE_PAGE - 1);
    uintptr_t end = ((uintptr_t)p + bytes) & ~(LK_HUGE_PAGE - 1);
    if (p != NULL && end > begin)
        madvise((void *)begin, end - begin, MADV_HUGEPAGE);
#else
    (void)p, (void)bytes;
#endif
}

/* A workspace: `bytes` at `p`, aligned for 2 MB pages when it is big enough to use them.
 * lk_workspace_take gives one of at least `bytes` (NULL if memory ran out), lk_workspace_give
 * takes it back. The process keeps the biggest given back, up to the plan's keep_bytes, for
 * the next call: a fresh one is written page by page on first use, and each page costs a fault
 * and its zeroing. Lock-free: concurrent calls each take their own. */
typedef struct {
    void *p;
    size_t bytes;
} lk_block;
lk_block *lk_workspace_take(size_t bytes);
void lk_workspace_give(lk_block *block);

/* [begin, end) of `count` items for member `rank` of `size`, contiguous and balanced. */
static inline void lk_split(int64_t count, int rank, int size, int64_t *begin, int64_t *end)
{
    *begin = count * rank / size;
    *end = count * (rank + 1) / size;
}

static inline int64_t lk_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* Sequences active at step t: lengths are non-increasing, so they are rows 0..n-1. */
static inline int64_t lk_active(const lk_layer *a, int64_t t)
{
    if (a->lengths == NULL)
        return a->B;
    int64_t lo = 0, hi = a->B; /* first row with length <= t */
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (a->lengths[mid] > t)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Threads for `flops` of work: one below the plan's serial_flops, else `requested` (below 1:
 * the calling thread's OpenMP count). */
static inline int lk_threads_for(int64_t requested, double flops)
{
    int n = (int)requested;
#ifdef _OPENMP
    if (n < 1)
        n = omp_get_max_threads();
#else
    n = 1;
#endif
    return flops < lk_planned.serial_flops ? 1 : n;
}

/* Threads for this call: one below the plan's serial_flops, else up to a->threads. */
static inline int lk_threads(const lk_layer *a, double flops)
{
    return lk_threads_for(a->threads, flops);
}

/* Teams: two directions on two or more threads run side by side, each with half the threads
 * (unless the plan says one_team: the tuner measured that faster here); otherwise one team runs
 * the directions one after the other. */
typedef struct {
    int teams, size;
} lk_teams;

static inline lk_teams lk_make_teams(int64_t D, int threads)
{
    lk_teams t = {1, threads};
    if (D == 2 && threads >= 2 && lk_planned.one_team == 0) {
        t.teams = 2;
        t.size = threads / 2;
    }
    return t;
}

/* ---- the step variants (variant.c): lstmkit.reference.Variant for one direction ---- */

/* Its parameters, in the order of lstmkit.reference.Variant; each NULL when off. */
enum lk_variant_param {
    LK_LN_W_IH, /* (G,) gain of LN(W_ih x) */
    LK_LN_B_IH, /* (G,) shift of LN(W_ih x) */
    LK_LN_W_HH, /* (G,) gain of LN(W_hh h) */
    LK_LN_B_HH, /* (G,) */
    LK_LN_W_C,  /* (H,) gain of LN(c) */
    LK_LN_B_C,  /* (H,) */
    LK_PEEP,    /* (3H,) w_ci, w_cf, w_co */
    LK_VARIANT_PARAMS
};

/* One direction's variant (every field 8 bytes, mirrored by a struct.Struct in Python). The
 * zoneout keep-masks, if given, replace the constant keep probability. */
typedef struct {
    const void *param[LK_VARIANT_PARAMS];
    const void *recurrent_mask; /* (B, P) scaled dropout mask on h_{t-1}, or NULL */
    const void *zoneout_cell;   /* (T, B, H) 0/1 keep-masks, or NULL */
    const void *zoneout_hidden; /* (T, B, P) likewise, or NULL */
    double zoneout_cell_keep;   /* without masks: the keep probability z_c (0: off) */
    double zoneout_hidden_keep; /* z_h */
} lk_variant;

/* Gradients of the variant parameters per direction: NULL where not wanted. */
typedef struct {
    void *d_param[2][LK_VARIANT_PARAMS];
} lk_variant_grads;

/* ---- workspaces: carved from one block; a first pass with base NULL only measures ---- */

typedef struct {
    char *base;
    size_t used;
} lk_arena;

static inline void *lk_take(lk_arena *arena, size_t count, size_t size)
{
    void *p = arena->base + arena->used;
    arena->used += (count * size + 63) / 64 * 64;
    return p;
}

/* ---- packed rows (lengths): step t's active rows are off[t] .. off[t] + n_t - 1 ---- */

/* off[t] = active rows of the steps before t, so off[T] = R. */
static inline void lk_fill_offsets(const lk_layer *a, int64_t *off)
{
    off[0] = 0;
    for (int64_t t = 0; t < a->T; t++)
        off[t + 1] = off[t] + lk_active(a, t);
}

/* R: the active rows of every step. */
static inline int64_t lk_packed_rows(const lk_layer *a)
{
    int64_t rows = 0;
    for (int64_t t = 0; t < a->T; t++)
        rows += lk_active(a, t);
    return rows;
}

/* Floating-point operations of a layer's forward pass, for the choice of thread count. */
static inline double lk_layer_flops(const lk_layer *a)
{
    double per_row = 8.0 * a->H * (a->I + a->P) + (a->w[0][LK_W_HR] ? 2.0 * a->H * a->P : 0);
    return per_row * a->T * a->B * a->D;
}

#endif
