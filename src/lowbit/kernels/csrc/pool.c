/*
 * A persistent thread pool in which the caller never waits for a worker that has
 * not started: chunks are claimed one at a time from an atomic ticket, the caller
 * claims chunks too, and it waits only for chunks that some thread has claimed.
 *
 * Why not OpenMP: a `parallel for` ends in a barrier that every team thread must
 * reach. On a busy machine (2 cores shared with other processes) a worker that is
 * not scheduled holds the caller for a whole scheduler slice (4-16 ms measured,
 * against a 150 us kernel). Here a late worker finds no chunks left and goes back
 * to sleep.
 *
 * ticket = generation << 40 | next chunk. A worker copies the job, then claims
 * chunk i with a CAS on (generation, i): the CAS fails if the job changed, so a
 * stale copy is never used. Workers spin for a short while after a job, then
 * sleep on a condition variable (the sleepers count and the ticket are
 * sequentially consistent, so a wake-up cannot be lost).
 */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#define MAX_WORKERS 63
#define IDX_BITS 40
#define IDX_MASK ((UINT64_C(1) << IDX_BITS) - 1)
#define SPIN 4000 /* ~100 us of pause before a worker sleeps */

static pthread_mutex_t run_mu = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;     /* sleep / wake, worker start */
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int nworkers;
static _Atomic uint64_t ticket;
static _Atomic int64_t done;
static _Atomic int sleepers;
static _Atomic(lowbit_chunk_fn) job_fn;
static _Atomic(void *) job_ctx;
static _Atomic int64_t job_chunks;
static _Atomic int job_workers; /* workers with index < this take part */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run chunks of the current job until none is left (or the job changes). */
static void work(int index) {
    for (;;) {
        uint64_t t = atomic_load(&ticket);
        if (index >= atomic_load_explicit(&job_workers, memory_order_relaxed)) return;
        lowbit_chunk_fn fn = atomic_load_explicit(&job_fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&job_ctx, memory_order_relaxed);
        int64_t n = atomic_load_explicit(&job_chunks, memory_order_relaxed);
        int64_t i = (int64_t)(t & IDX_MASK);
        if (fn == NULL || i >= n) return;
        if (atomic_compare_exchange_weak(&ticket, &t, t + 1)) {
            fn(ctx, i);
            atomic_fetch_add(&done, 1);
        }
    }
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    for (;;) {
        uint64_t seen = atomic_load(&ticket);
        work(index);
        int spins = 0;
        while (atomic_load(&ticket) == seen && spins < SPIN) {
            cpu_relax();
            spins++;
        }
        if (atomic_load(&ticket) != seen) continue;
        pthread_mutex_lock(&mu);
        atomic_fetch_add(&sleepers, 1);
        while (atomic_load(&ticket) == seen) pthread_cond_wait(&cv, &mu);
        atomic_fetch_sub(&sleepers, 1);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

static void after_fork_child(void) {
    /* the workers do not exist in a forked child: start new ones on demand */
    pthread_mutex_init(&run_mu, NULL);
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&cv, NULL);
    nworkers = 0;
    atomic_store(&sleepers, 0);
}

static int ensure_workers(int want) {
    static int atfork_done;
    if (want > MAX_WORKERS) want = MAX_WORKERS;
    pthread_mutex_lock(&mu);
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork_done = 1;
    }
    while (nworkers < want) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)nworkers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        nworkers++;
    }
    int have = nworkers;
    pthread_mutex_unlock(&mu);
    return have;
}

void lowbit_parallel_for(lowbit_chunk_fn fn, void *ctx, int64_t nchunks, int nthreads) {
    if (nthreads > nchunks) nthreads = (int)nchunks;
    if (nthreads <= 1) {
        for (int64_t i = 0; i < nchunks; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&run_mu);
    int workers = ensure_workers(nthreads - 1);
    if (workers > nthreads - 1) workers = nthreads - 1;
    atomic_store_explicit(&job_fn, fn, memory_order_relaxed);
    atomic_store_explicit(&job_ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&job_chunks, nchunks, memory_order_relaxed);
    atomic_store_explicit(&job_workers, workers, memory_order_relaxed);
    atomic_store(&done, 0);
    uint64_t gen = (atomic_load(&ticket) >> IDX_BITS) + 1;
    atomic_store(&ticket, gen << IDX_BITS); /* publishes the job (seq_cst) */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&mu);
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    int64_t mine = 0;
    for (;;) {
        uint64_t t = atomic_load(&ticket);
        int64_t i = (int64_t)(t & IDX_MASK);
        if (i >= nchunks) break;
        if (atomic_compare_exchange_weak(&ticket, &t, t + 1)) {
            fn(ctx, i);
            mine++;
        }
    }
    atomic_fetch_add(&done, mine);
    /* only chunks another thread claimed are left; yield if it was descheduled */
    for (int spins = 0; atomic_load(&done) < nchunks; spins++) {
        if (spins < 2000) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&run_mu);
}
