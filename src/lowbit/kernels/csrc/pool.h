/* A tiny persistent thread pool for lowbit's C kernels (see pool.c). */
#ifndef LOWBIT_POOL_H
#define LOWBIT_POOL_H
#include <stdint.h>

typedef void (*lowbit_chunk_fn)(void *ctx, int64_t chunk);

/* Run fn(ctx, i) for i = 0..nchunks-1 on the calling thread and up to nthreads-1
 * pool workers; returns when every chunk has finished. Not reentrant: calls from
 * several threads at once are serialized. */
void lowbit_parallel_for(lowbit_chunk_fn fn, void *ctx, int64_t nchunks, int nthreads);

#endif
