/* One OpenMP region split into contiguous ranges, shared by the compiled CPU kernels (cpu_kron.c,
 * cpu_merge.c; cpu_build.py hashes this header into every library's build name).
 *
 * Loaded into a process that has imported PyTorch, a kernel library shares PyTorch's OpenMP
 * runtime (the same libgomp.so.1), so its regions run on the threads PyTorch's own regions use:
 * no second pool competes with them for the cores. */
#ifndef CAMEX_CPU_PARALLEL_H
#define CAMEX_CPU_PARALLEL_H

#include <omp.h>

typedef void (*work_fn)(void *ctx, int thread, long start, long end);

/* Threads that get work: at most one per item, at least one. */
static int split_threads(int threads, long items) {
    if (threads > items) threads = (int)items;
    return threads < 1 ? 1 : threads;
}

/* fn(ctx, t, start, end) for `threads` contiguous ranges of [0, items), one per thread t. */
static void parallel(int threads, long items, work_fn fn, void *ctx) {
    if (threads == 1) {
        fn(ctx, 0, 0, items);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), got = omp_get_num_threads(); /* the runtime may give fewer */
        fn(ctx, t, items * t / got, items * (t + 1) / got);
    }
}

#endif
