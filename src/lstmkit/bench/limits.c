/* Probes of what one core of this machine can do, for `lstmkit bench --limits`: the limits the
 * batch-1 kernels run into. Plain C, compiled on demand with the flags of the kernels' tier
 * (limits.py), so its vectors are the tier's: LK_VBYTES bytes (lk_vector_bytes()).
 *
 * lk_stream_fma: passes over a buffer of n floats, each vector of it feeding one FMA
 * into one of 8 accumulators, so a pass is bound by FMA throughput when the buffer sits in L1
 * and by the bandwidth of the cache level that holds it otherwise: the inner loop of a batch-1
 * step, whose weights are read once per step. Returns seconds for `passes` passes.
 *
 * lk_round_trip: two threads hand a counter back and forth `trips` times through one cache
 * line (each spins until the other has written): the least a per-step exchange between two
 * cores costs. Returns seconds per round trip, or -1 if the second thread cannot start.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#ifndef LK_VBYTES
#define LK_VBYTES 32
#endif
#define LANES (LK_VBYTES / 4)
typedef float vec __attribute__((vector_size(LK_VBYTES)));

int64_t lk_vector_bytes(void) { return LK_VBYTES; }

#if defined(__x86_64__) || defined(__i386__)
#define SPIN() __builtin_ia32_pause()
#else
#define SPIN() ((void)0)
#endif

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

double lk_stream_fma(const float *buf, int64_t n, int64_t passes, float *sink)
{
    vec acc[8] = {0};
    const vec scale = (vec){0} + 1.0f;
    const double start = now();
    for (int64_t p = 0; p < passes; p++) {
        for (int64_t i = 0; i + 8 * LANES <= n; i += 8 * LANES)
            for (int j = 0; j < 8; j++) {
                vec v;
                memcpy(&v, buf + i + LANES * j, sizeof v);
                acc[j] += scale * v;
            }
        __asm__ volatile("" : : : "memory"); /* every pass reads the buffer again */
    }
    const double seconds = now() - start;
    float total = 0;
    for (int j = 0; j < 8; j++)
        for (int k = 0; k < LANES; k++)
            total += acc[j][k];
    *sink = total; /* the sums are used, so the loads stay */
    return seconds;
}

static _Atomic int64_t turn __attribute__((aligned(64)));

static void *answer(void *arg)
{
    const int64_t trips = *(const int64_t *)arg;
    for (int64_t i = 0; i < trips; i++) {
        while (atomic_load_explicit(&turn, memory_order_acquire) != 2 * i + 1)
            SPIN();
        atomic_store_explicit(&turn, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

double lk_round_trip(int64_t trips)
{
    pthread_t other;
    atomic_store(&turn, 0);
    if (pthread_create(&other, NULL, answer, &trips) != 0)
        return -1;
    const double start = now();
    for (int64_t i = 0; i < trips; i++) {
        atomic_store_explicit(&turn, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&turn, memory_order_acquire) != 2 * i + 2)
            SPIN();
    }
    const double seconds = now() - start;
    pthread_join(other, NULL);
    return seconds / (double)trips;
}
