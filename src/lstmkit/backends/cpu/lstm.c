/* lstmkit CPU kernels: the BLAS the kernels call and the plan's thresholds, set once by Python
 * after loading; workspaces; the batch-1 helper thread. */
#include "lstm.h"

lk_sgemm_fn lk_sgemm;
lk_dgemm_fn lk_dgemm;
lk_blas_threads_fn lk_blas_threads;

/* The GEMMs' thread count for the calling thread: lstmkit's own (gemm.h), and the BLAS's with
 * its per-thread setter when it has one (MKL_Set_Num_Threads_Local). The two are always set
 * together, so the old count returned for restoring is the own one (0: never set, which the own
 * GEMM reads as one thread and MKL as its global setting). */
static _Thread_local int own_gemm_threads;
static lk_blas_threads_fn blas_set_threads;
static int gemm_set_threads(int threads)
{
    const int old = own_gemm_threads;
    own_gemm_threads = threads;
    if (blas_set_threads != NULL)
        blas_set_threads(threads);
    return old;
}
int lk_gemm_threads(void) { return own_gemm_threads > 0 ? own_gemm_threads : 1; }

/* Fortran sgemm_/dgemm_ (LP64) of an already loaded library, each NULL for lstmkit's own GEMM
 * (gemm.h), and the BLAS's per-thread thread-count setter (may be NULL). */
void lk_set_blas(void *sgemm, void *dgemm, void *threads)
{
    lk_sgemm = (lk_sgemm_fn)sgemm;
    lk_dgemm = (lk_dgemm_fn)dgemm;
    blas_set_threads = (lk_blas_threads_fn)threads;
    lk_blas_threads = gemm_set_threads;
}

/* Sizes of the structures Python packs, checked when the library is loaded. */
int lk_layer_bytes(void) { return (int)sizeof(lk_layer); }
int lk_grads_bytes(void) { return (int)sizeof(lk_grads); }
int lk_variant_bytes(void) { return (int)sizeof(lk_variant); }
int lk_variant_grads_bytes(void) { return (int)sizeof(lk_variant_grads); }
int lk_plan_bytes(void) { return (int)sizeof(lk_plan); }

/* ---- the plan's machine-derived thresholds (see lk_plan in lstm.h) ---- */

lk_plan lk_planned = {524288.0, 32768.0, 32768.0, 65536.0, 4.0e7,    0.0,
                      20000.0,  50000.0, 1000.0,  50000.0, 5000.0, 67108864.0};
lk_wait_ticks lk_waits = {20000, 50000, 1000, 50000, 5000, 1.0};

/* lk_ticks per nanosecond: counted over a millisecond of the monotonic clock (the time-stamp
 * counter's rate is the CPU's, not a constant); 1 where lk_ticks is that clock. */
static double measure_ticks_per_ns(void)
{
#if defined(__x86_64__) || defined(__i386__)
    const uint64_t t0 = lk_now_ns(), k0 = lk_ticks();
    uint64_t t1;
    while ((t1 = lk_now_ns()) - t0 < 1000000)
        ;
    return (double)(lk_ticks() - k0) / (double)(t1 - t0);
#else
    return 1.0;
#endif
}

double lk_ticks_per_ns(void) { return lk_waits.per_ns; }

/* Called when Python loads the library, before any kernel runs (and by the tuner, between
 * calls); the tick rate is measured on the first call. */
void lk_set_plan(const lk_plan *plan)
{
    static double per_ns;
    if (per_ns == 0)
        per_ns = measure_ticks_per_ns();
    lk_planned = *plan;
    lk_waits.per_ns = per_ns;
    lk_waits.barrier_spin = (uint64_t)(plan->barrier_spin_ns * per_ns);
    lk_waits.claimed_spin = (uint64_t)(plan->claimed_spin_ns * per_ns);
    lk_waits.slack = (uint64_t)(plan->slack_ns * per_ns);
    lk_waits.idle_spin = (uint64_t)(plan->idle_spin_ns * per_ns);
    lk_waits.join_spin = (uint64_t)(plan->join_spin_ns * per_ns);
}

/* ---- workspaces (see lk_workspace_take in lstm.h) ---- */

static _Atomic(lk_block *) kept_block;

static void block_free(lk_block *block)
{
    if (block != NULL) {
        free(block->p);
        free(block);
    }
}

lk_block *lk_workspace_take(size_t bytes)
{
    lk_block *block = atomic_exchange(&kept_block, NULL);
    if (block != NULL && block->bytes >= bytes)
        return block;
    block_free(block); /* too small: the new one, bigger, is kept after this call */
    block = malloc(sizeof *block);
    if (block == NULL)
        return NULL;
    if (bytes < 2 * LK_HUGE_PAGE) {
        block->bytes = bytes + 64;
        block->p = malloc(block->bytes);
    } else {
        block->bytes = (bytes + LK_HUGE_PAGE - 1) & ~(LK_HUGE_PAGE - 1);
        block->p = aligned_alloc(LK_HUGE_PAGE, block->bytes);
        lk_advise_huge(block->p, block->bytes);
    }
    if (block->p == NULL) {
        free(block);
        return NULL;
    }
    return block;
}

void lk_workspace_give(lk_block *block)
{
    if ((double)block->bytes > lk_planned.keep_bytes) {
        block_free(block);
        return;
    }
    /* Each exchange hands over whatever was kept, which nobody else uses: keep the bigger of
     * this block and the one kept, free the other (or what another call gave back meanwhile). */
    lk_block *other = atomic_exchange(&kept_block, block);
    if (other != NULL && other->bytes > block->bytes)
        other = atomic_exchange(&kept_block, other);
    block_free(other);
}

/* ---- the pair's helper thread (see lk_pair_run in lstm.h) ----
 * One job at a time: the caller posts it (state POSTED); the helper takes it (TAKEN) and, when
 * fn returns, gives the state back (IDLE). A caller that finishes first withdraws a job nobody
 * took, so it never waits for a helper that is not running; it waits only for a helper inside
 * fn, spinning briefly, then asleep (which frees its core for a descheduled helper). */

#include <pthread.h>
#include <signal.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

enum { PAIR_IDLE, PAIR_POSTED, PAIR_TAKEN };
#define PAIR_JOIN_NS 20000      /* a longer wait for the helper to leave makes the job late */
#define PAIR_BACKOFF_MAX 256    /* most jobs run alone after late ones, before the next try */

static struct {
    atomic_int state;    /* PAIR_*, also the futex word both sides sleep on */
    atomic_int sleeping; /* the helper sleeps on state */
    atomic_int waiting;  /* the caller sleeps on state */
    atomic_int owned;    /* a caller holds the helper (concurrent callers run alone) */
    atomic_int started;  /* 1 running, -1 could not be started */
    atomic_int late;     /* the caller did some of the helper's work in this job */
    int backoff, skip;   /* after late jobs: run `skip` more alone; backoff doubles per late job */
    lk_pair_fn fn;
    void *arg;
} pair;
static pthread_mutex_t pair_start = PTHREAD_MUTEX_INITIALIZER;

static void pair_sleep(atomic_int *word, int value)
{
#ifdef __linux__
    syscall(SYS_futex, (int *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
#else
    (void)word, (void)value;
    sched_yield();
#endif
}

static void pair_wake(atomic_int *word)
{
#ifdef __linux__
    syscall(SYS_futex, (int *)word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
#else
    (void)word;
#endif
}

static int min_int(int a, int b) { return a < b ? a : b; }

static void *pair_helper(void *unused)
{
    (void)unused;
    for (;;) {
        const uint64_t idle_since = lk_ticks();
        while (atomic_load(&pair.state) != PAIR_POSTED) {
            lk_pause();
            if (lk_ticks() - idle_since < lk_waits.idle_spin)
                continue;
            atomic_store(&pair.sleeping, 1);
            if (atomic_load(&pair.state) == PAIR_IDLE)
                pair_sleep(&pair.state, PAIR_IDLE);
            atomic_store(&pair.sleeping, 0);
        }
        int posted = PAIR_POSTED;
        if (!atomic_compare_exchange_strong(&pair.state, &posted, PAIR_TAKEN))
            continue; /* withdrawn */
        pair.fn(pair.arg, 1, 2);
        atomic_store(&pair.state, PAIR_IDLE);
        if (atomic_load(&pair.waiting))
            pair_wake(&pair.state);
    }
    return NULL;
}

/* A forked child has no helper: the next job starts one. */
static void pair_forked(void)
{
    atomic_store(&pair.state, PAIR_IDLE);
    atomic_store(&pair.sleeping, 0);
    atomic_store(&pair.waiting, 0);
    atomic_store(&pair.owned, 0);
    atomic_store(&pair.started, 0);
    pair.backoff = pair.skip = 0;
}

static int pair_ready(void)
{
    if (atomic_load_explicit(&pair.started, memory_order_acquire) != 0)
        return atomic_load(&pair.started) > 0;
    pthread_mutex_lock(&pair_start);
    if (atomic_load(&pair.started) == 0) {
        static int fork_handler;
        if (!fork_handler)
            fork_handler = pthread_atfork(NULL, NULL, pair_forked) == 0;
        pthread_attr_t attr;
        pthread_t thread;
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with the caller's threads */
        int ok = pthread_attr_init(&attr) == 0;
        ok = ok && pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED) == 0;
        ok = ok && pthread_create(&thread, &attr, pair_helper, NULL) == 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        atomic_store(&pair.started, ok && fork_handler ? 1 : -1);
    }
    pthread_mutex_unlock(&pair_start);
    return atomic_load(&pair.started) > 0;
}

void lk_pair_late(void) { atomic_store_explicit(&pair.late, 1, memory_order_relaxed); }

/* A job is late when the caller did some of the helper's work, the helper never took it, or
 * the caller waited for it to leave. After a late job the next `backoff` jobs run alone (so a
 * helper whose core another process holds costs a try now and then, not every call); backoff
 * doubles with each late try and falls back to none after a job on time. */
void lk_pair_run(lk_pair_fn fn, void *arg)
{
    if (!pair_ready() || atomic_exchange(&pair.owned, 1)) {
        fn(arg, 0, 1);
        return;
    }
    if (pair.skip > 0) {
        pair.skip--;
        atomic_store(&pair.owned, 0);
        fn(arg, 0, 1);
        return;
    }
    atomic_store_explicit(&pair.late, 0, memory_order_relaxed);
    pair.fn = fn;
    pair.arg = arg;
    atomic_store(&pair.state, PAIR_POSTED);
    if (atomic_load(&pair.sleeping))
        pair_wake(&pair.state);
    fn(arg, 0, 2);
    int posted = PAIR_POSTED, late = atomic_load_explicit(&pair.late, memory_order_relaxed);
    if (atomic_compare_exchange_strong(&pair.state, &posted, PAIR_IDLE)) {
        late = 1;
    } else {
        const uint64_t finished = lk_now_ns(), spin_since = lk_ticks();
        while (atomic_load(&pair.state) == PAIR_TAKEN &&
               lk_ticks() - spin_since < lk_waits.join_spin)
            lk_pause();
        atomic_store(&pair.waiting, 1);
        while (atomic_load(&pair.state) == PAIR_TAKEN)
            pair_sleep(&pair.state, PAIR_TAKEN);
        atomic_store(&pair.waiting, 0);
        late |= lk_now_ns() - finished > PAIR_JOIN_NS;
    }
    if (late) {
        pair.skip = pair.backoff;
        pair.backoff = pair.backoff == 0 ? 1 : min_int(2 * pair.backoff, PAIR_BACKOFF_MAX);
    } else {
        pair.backoff = 0;
    }
    atomic_store(&pair.owned, 0);
}

/* ---- the test hook of lk_pair_lag ---- */

static atomic_int lag_rank = -1;
static atomic_llong lag_step, lag_micros;

/* From now on, rank `rank` of every paired job sleeps `micros` us before step `step`. */
void lk_pair_set_lag(int rank, int64_t step, int64_t micros)
{
    atomic_store(&lag_rank, rank);
    atomic_store(&lag_step, step);
    atomic_store(&lag_micros, micros);
}

void lk_pair_lag(int rank, int64_t step)
{
    const long long micros = atomic_load_explicit(&lag_micros, memory_order_relaxed);
    if (micros == 0 || rank != atomic_load(&lag_rank) || step != atomic_load(&lag_step))
        return;
    struct timespec t = {micros / 1000000, micros % 1000000 * 1000};
    nanosleep(&t, NULL);
}
