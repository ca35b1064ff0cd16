/* lstmkit CPU kernels: the driver the cells share, written once. kernel.c (the plain cell) and
 * variant.c (the step variants) each bring a direction's cell; this file walks its steps and
 * rows and runs the directions on teams of threads.
 *
 * Include after real.h. Legend as in kernel.c: T steps, B batch, I input features, H cell
 * units, P size of h, D directions; R packed rows.
 *
 * A direction's sequence (lk_seq): the steps in the direction's order, the rows active at each
 * (lengths sorted non-increasing: rows 0..n_t-1), where each row's previous state comes from
 * (the step before, or h0 and c0 for a row that starts at this step), and the rows of the
 * output and of the cell states. A cell's direction struct begins with LK_SEQ, so that its own
 * code reads these fields as its own (w->T) and hands &w->seq to the driver; both name the same
 * memory (a union of lk_seq and the same fields, anonymous).
 *
 * Teams (run_teams): a bidirectional layer on two or more threads runs its directions side by
 * side, a team each; otherwise one team of every thread runs the directions one after the other
 * (lk_make_teams, the plan's one_team). Each member gets its rank; the team meets at a spin
 * barrier (team_wait). Inside the teams the BLAS runs on one thread per member.
 */
#ifndef LSTMKIT_DRIVER_H
#define LSTMKIT_DRIVER_H

#define LK_SEQ_FIELDS                                                                             \
    const lk_layer *a;                                                                            \
    int64_t d, rev; /* direction; rev: it walks the steps from the last */                       \
    int64_t T, B, I, H, P, D;                                                                     \
    const int64_t *off; /* (T + 1) packed row of (t, 0): the active rows of the steps before */  \
    const real *x, *xp; /* the input (T, B, I); packed by steps (x itself without lengths) */    \
    const real *h0, *c0;      /* this direction's initial states, (B, P) and (B, H) */           \
    real *out, *cells, *ring; /* ring: (2, B, H) the last two cell states when cells is NULL */

typedef struct {
    LK_SEQ_FIELDS
} lk_seq;

/* The first member of a cell's direction struct (see the file comment). */
#define LK_SEQ                                                                                    \
    union {                                                                                       \
        lk_seq seq;                                                                               \
        struct {                                                                                  \
            LK_SEQ_FIELDS                                                                         \
        };                                                                                        \
    }

/* Direction d of layer a; off, xp and ring are set once the workspace is laid out. */
static inline void seq_init(lk_seq *q, const lk_layer *a, int64_t d)
{
    q->a = a;
    q->d = d;
    q->rev = d == 1;
    q->T = a->T, q->B = a->B, q->I = a->I, q->H = a->H, q->P = a->P, q->D = a->D;
    q->x = a->x;
    q->h0 = (const real *)a->h0 + d * a->B * a->P;
    q->c0 = (const real *)a->c0 + d * a->B * a->H;
    q->out = a->out;
    q->cells = a->cells;
}

static inline real *out_row(const lk_seq *q, int64_t t, int64_t b)
{
    return q->out + (t * q->B + b) * q->D * q->P + q->d * q->P;
}
static inline real *cell_row(const lk_seq *q, int64_t t, int64_t b)
{
    if (q->cells != NULL)
        return q->cells + (t * q->B + b) * q->D * q->H + q->d * q->H;
    return q->ring + ((t & 1) * q->B + b) * q->H;
}

/* Step s of the direction: its time t, the step before in the direction's order, its active
 * rows n, the first `cont` of which continue from prev (the rest start at t), row0 = off[t]. */
typedef struct {
    int64_t t, prev, n, cont, row0;
} step_t;

static inline step_t make_step(const lk_seq *q, int64_t s)
{
    step_t st;
    st.t = q->rev ? q->T - 1 - s : s;
    st.prev = q->rev ? st.t + 1 : st.t - 1;
    st.n = lk_active(q->a, st.t);
    st.cont = s == 0 ? 0 : min64(st.n, lk_active(q->a, st.prev));
    st.row0 = q->off[st.t];
    return st;
}
static inline const real *h_prev(const lk_seq *q, const step_t *st, int64_t b)
{
    return b < st->cont ? out_row(q, st->prev, b) : q->h0 + b * q->P;
}
static inline const real *c_prev(const lk_seq *q, const step_t *st, int64_t b)
{
    return b < st->cont ? cell_row(q, st->prev, b) : q->c0 + b * q->H;
}

/* h_n and c_n of the direction: each row's last step in its order, or h0 and c0 for a row of
 * no steps. */
static inline void final_states(const lk_seq *q)
{
    const lk_layer *a = q->a;
    for (int64_t b = 0; b < q->B; b++) {
        const int64_t len = a->lengths ? a->lengths[b] : q->T;
        const int64_t last = q->rev ? 0 : len - 1;
        const real *h = len > 0 ? out_row(q, last, b) : q->h0 + b * q->P;
        const real *c = len > 0 ? cell_row(q, last, b) : q->c0 + b * q->H;
        memcpy((real *)a->h_n + (q->d * q->B + b) * q->P, h, (size_t)q->P * sizeof(real));
        memcpy((real *)a->c_n + (q->d * q->B + b) * q->H, c, (size_t)q->H * sizeof(real));
    }
}

/* ---- teams ---- */

/* A thread's place in the team that runs a direction. */
typedef struct {
    int rank, size;
    lk_barrier *bar;
    int *sense;
} team_t;

static inline void team_wait(const team_t *tm) { lk_barrier_wait(tm->bar, tm->sense); }

/* Runs fn(dirs[d], team) for every direction (see the file comment), dir_bytes apart. */
typedef void (*direction_fn)(void *dir, const team_t *tm);

static inline void run_teams(direction_fn fn, void *dirs, size_t dir_bytes, int64_t D, int threads)
{
    char *first = dirs;
    lk_barrier bars[2];
    if (threads <= 1) {
        int sense = 0;
        lk_barrier_init(&bars[0], 1);
        const team_t alone = {0, 1, &bars[0], &sense};
        for (int64_t d = 0; d < D; d++)
            fn(first + d * dir_bytes, &alone);
        return;
    }
    const lk_teams teams = lk_make_teams(D, threads);
    for (int k = 0; k < teams.teams; k++)
        lk_barrier_init(&bars[k], teams.size);
#pragma omp parallel num_threads(teams.teams * teams.size)
    {
        int sense = 0, id = 0, got = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        got = omp_get_num_threads();
#endif
        const int old = lk_blas_threads ? lk_blas_threads(1) : 0;
        if (got != teams.teams * teams.size) {
            /* Fewer threads than asked for (nested region, thread limit): thread 0 does all. */
            if (id == 0) {
                lk_barrier one;
                lk_barrier_init(&one, 1);
                const team_t alone = {0, 1, &one, &sense};
                for (int64_t d = 0; d < D; d++)
                    fn(first + d * dir_bytes, &alone);
            }
        } else {
            const int team = id / teams.size;
            const team_t tm = {id % teams.size, teams.size, &bars[team], &sense};
            for (int64_t d = team; d < D; d += teams.teams)
                fn(first + d * dir_bytes, &tm);
        }
        if (lk_blas_threads)
            lk_blas_threads(old);
    }
}

/* The most threads a call may use: torch.get_num_threads() (see lk_threads). */
static inline int max_threads(const lk_layer *a)
{
#ifdef _OPENMP
    return a->threads >= 1 ? (int)a->threads : omp_get_max_threads();
#else
    (void)a;
    return 1;
#endif
}

#endif
