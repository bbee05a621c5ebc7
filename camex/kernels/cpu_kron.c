/* CPU kernels for the curvature's mode products and factor gradients (issue 20).
 *
 * A mode product multiplies a small square factor (d = 16..128) into one mode of a large tensor.
 * As a GEMM one of its dimensions is d, so BLAS libraries spend a large share of the time packing
 * the large operand into their panel layout: on the project's AVX2 VM those products ran at
 * 24-58 GFLOP/s against 82 for a square GEMM. Here the large operand is read in place: the
 * factor (at most 64 KiB) sits in L1/L2, the large operand streams through a 6 x 16 register tile
 * of broadcast-FMA updates (4 x 16 where 6 would compute rows it drops, 4 x 24 for a 24-wide
 * operand); only the first mode's rows are packed (gemm_packed). A factor gradient
 * (a contraction over every mode but one) transposes chunks of one operand in 8 x 8 register blocks
 * and reuses the same tile; for the last mode it reads both operands in place, one transposed
 * through the tile's strides (1.5x PyTorch's single GEMM on the T5 shape's last mode, one thread).
 *
 * Built at first use by camex/kernels/cpu_kron.py (gcc -O3 -mavx2 -mfma -fopenmp); fp32, threaded,
 * row-major, every leading dimension in elements.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_parallel.h"

#define MR 6 /* a 6 x 16 tile: 12 accumulators hide the FMA latency, 15 of AVX2's 16 registers */
#define NR 16
#define NC 64 /* columns of B per panel: K x NC floats stay in L1 while the rows of A sweep it */

static inline void store_row(float *c, __m256 v, __m256 al, __m256 be, int accumulate) {
    v = _mm256_mul_ps(al, v);
    if (accumulate) v = _mm256_fmadd_ps(be, _mm256_loadu_ps(c), v);
    _mm256_storeu_ps(c, v);
}

/* C[i, j] = beta * C[i, j] + alpha * sum_k A[i*rsa + k*csa] * B[k*ldb + j] on an mr x 16 tile
 * (mr <= R, R = 6 or 4, a constant once inlined: a 4-row tile does not compute rows it drops). Named
 * accumulators: GCC keeps an array of them in memory. Rows past mr repeat row 0 (valid memory) and
 * are not stored. */
static inline __attribute__((always_inline)) void tile16_rows(const int R, int mr, int K, const float *A, long rsa,
                                                              long csa, const float *B, long ldb, float *C, long ldc,
                                                              float alpha, float beta) {
    const float *a0 = A, *a1 = mr > 1 ? A + rsa : A, *a2 = mr > 2 ? A + 2 * rsa : A;
    const float *a3 = mr > 3 ? A + 3 * rsa : A, *a4 = mr > 4 ? A + 4 * rsa : A, *a5 = mr > 5 ? A + 5 * rsa : A;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int k = 0; k < K; k++) {
        const float *b = B + (long)k * ldb;
        long o = (long)k * csa;
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), a;
        a = _mm256_broadcast_ss(a0 + o); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(a1 + o); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(a2 + o); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(a3 + o); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
        if (R > 4) {
            a = _mm256_broadcast_ss(a4 + o); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
            a = _mm256_broadcast_ss(a5 + o); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
        }
    }
    __m256 al = _mm256_set1_ps(alpha), be = _mm256_set1_ps(beta);
    int acc = beta != 0.0f;
    store_row(C, c00, al, be, acc); store_row(C + 8, c01, al, be, acc);
    if (mr > 1) { store_row(C + ldc, c10, al, be, acc); store_row(C + ldc + 8, c11, al, be, acc); }
    if (mr > 2) { store_row(C + 2 * ldc, c20, al, be, acc); store_row(C + 2 * ldc + 8, c21, al, be, acc); }
    if (mr > 3) { store_row(C + 3 * ldc, c30, al, be, acc); store_row(C + 3 * ldc + 8, c31, al, be, acc); }
    if (R > 4 && mr > 4) { store_row(C + 4 * ldc, c40, al, be, acc); store_row(C + 4 * ldc + 8, c41, al, be, acc); }
    if (R > 4 && mr > 5) { store_row(C + 5 * ldc, c50, al, be, acc); store_row(C + 5 * ldc + 8, c51, al, be, acc); }
}

static void tile16(int mr, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C, long ldc,
                   float alpha, float beta) {
    if (mr > 4) tile16_rows(6, mr, K, A, rsa, csa, B, ldb, C, ldc, alpha, beta);
    else tile16_rows(4, mr, K, A, rsa, csa, B, ldb, C, ldc, alpha, beta);
}

/* The same on an mr x 24 tile (mr <= 4): 24 columns (a mode or factor of size 24) in one tile of 12
 * accumulators rather than a 16-column tile and an 8-column one of 6, too few to hide the latency. */
static void tile24(int mr, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C, long ldc,
                   float alpha, float beta) {
    const float *a0 = A, *a1 = mr > 1 ? A + rsa : A, *a2 = mr > 2 ? A + 2 * rsa : A, *a3 = mr > 3 ? A + 3 * rsa : A;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
    for (int k = 0; k < K; k++) {
        const float *b = B + (long)k * ldb;
        long o = (long)k * csa;
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), b2 = _mm256_loadu_ps(b + 16), a;
        a = _mm256_broadcast_ss(a0 + o);
        c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01); c02 = _mm256_fmadd_ps(a, b2, c02);
        a = _mm256_broadcast_ss(a1 + o);
        c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11); c12 = _mm256_fmadd_ps(a, b2, c12);
        a = _mm256_broadcast_ss(a2 + o);
        c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21); c22 = _mm256_fmadd_ps(a, b2, c22);
        a = _mm256_broadcast_ss(a3 + o);
        c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31); c32 = _mm256_fmadd_ps(a, b2, c32);
    }
    __m256 al = _mm256_set1_ps(alpha), be = _mm256_set1_ps(beta);
    int acc = beta != 0.0f;
    store_row(C, c00, al, be, acc); store_row(C + 8, c01, al, be, acc); store_row(C + 16, c02, al, be, acc);
    if (mr > 1) {
        store_row(C + ldc, c10, al, be, acc); store_row(C + ldc + 8, c11, al, be, acc);
        store_row(C + ldc + 16, c12, al, be, acc);
    }
    if (mr > 2) {
        store_row(C + 2 * ldc, c20, al, be, acc); store_row(C + 2 * ldc + 8, c21, al, be, acc);
        store_row(C + 2 * ldc + 16, c22, al, be, acc);
    }
    if (mr > 3) {
        store_row(C + 3 * ldc, c30, al, be, acc); store_row(C + 3 * ldc + 8, c31, al, be, acc);
        store_row(C + 3 * ldc + 16, c32, al, be, acc);
    }
}

/* The same on an mr x 8 tile. */
static void tile8(int mr, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C, long ldc,
                  float alpha, float beta) {
    const float *a0 = A, *a1 = mr > 1 ? A + rsa : A, *a2 = mr > 2 ? A + 2 * rsa : A;
    const float *a3 = mr > 3 ? A + 3 * rsa : A, *a4 = mr > 4 ? A + 4 * rsa : A, *a5 = mr > 5 ? A + 5 * rsa : A;
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
    for (int k = 0; k < K; k++) {
        __m256 b0 = _mm256_loadu_ps(B + (long)k * ldb);
        long o = (long)k * csa;
        c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + o), b0, c0);
        c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(a1 + o), b0, c1);
        c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(a2 + o), b0, c2);
        c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(a3 + o), b0, c3);
        c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(a4 + o), b0, c4);
        c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(a5 + o), b0, c5);
    }
    __m256 al = _mm256_set1_ps(alpha), be = _mm256_set1_ps(beta);
    int acc = beta != 0.0f;
    store_row(C, c0, al, be, acc);
    if (mr > 1) store_row(C + ldc, c1, al, be, acc);
    if (mr > 2) store_row(C + 2 * ldc, c2, al, be, acc);
    if (mr > 3) store_row(C + 3 * ldc, c3, al, be, acc);
    if (mr > 4) store_row(C + 4 * ldc, c4, al, be, acc);
    if (mr > 5) store_row(C + 5 * ldc, c5, al, be, acc);
}

static void tile_scalar(int mr, int nr, int K, const float *A, long rsa, long csa, const float *B, long ldb,
                        float *C, long ldc, float alpha, float beta) {
    for (int r = 0; r < mr; r++) {
        float acc[NR] = {0};
        for (int k = 0; k < K; k++) {
            float a = A[r * rsa + (long)k * csa];
            const float *b = B + (long)k * ldb;
            for (int j = 0; j < nr; j++) acc[j] += a * b[j];
        }
        float *c = C + (long)r * ldc;
        for (int j = 0; j < nr; j++) c[j] = (beta != 0.0f ? beta * c[j] : 0.0f) + alpha * acc[j];
    }
}

static void tile(int mr, int nr, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C,
                 long ldc, float alpha, float beta) {
    if (nr == 16) {
        tile16(mr, K, A, rsa, csa, B, ldb, C, ldc, alpha, beta);
    } else if (nr >= 8) { /* 8 columns on vectors, the rest scalar */
        tile8(mr, K, A, rsa, csa, B, ldb, C, ldc, alpha, beta);
        if (nr > 8) tile_scalar(mr, nr - 8, K, A, rsa, csa, B + 8, ldb, C + 8, ldc, alpha, beta);
    } else {
        tile_scalar(mr, nr, K, A, rsa, csa, B, ldb, C, ldc, alpha, beta);
    }
}

/* Rows of the next tile of a column strip with `left` rows to go: tiles of 6 rows, 4 where that drops
 * no computed row (8 = 4 + 4 rather than 6 + a 2-row tile that computes 6). */
static inline int rows_step(int left, int most) {
    if (most == 4 || left == 4 || left == 8 || left < 4) return left < 4 ? left : 4;
    return left < 6 ? left : 6;
}

/* C[M x N] = beta * C + alpha * A[M x K] B[K x N]; A read at i*rsa + k*csa, B rows contiguous. */
static void gemm(int M, int N, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C,
                 long ldc, float alpha, float beta) {
    for (int jp = 0; jp < N; jp += NC) {
        int jn = N - jp < NC ? N - jp : NC;
        if (jp + NC < N) /* the next panel's K rows are far apart: too many streams for the prefetcher */
            for (int k = 0; k < K; k++)
                for (int l = 0; l < NC && jp + NC + l < N; l += 16)
                    _mm_prefetch((const char *)(B + (long)k * ldb + jp + NC + l), _MM_HINT_T0);
        for (int i = 0; i < M;) {
            int mr = rows_step(M - i, jn == 24 ? 4 : MR);
            const float *a = A + (long)i * rsa;
            float *c = C + (long)i * ldc;
            if (jn == 24) { /* a 24-column panel (d = 24, or N's last 24): one tile */
                tile24(mr, K, a, rsa, csa, B + jp, ldb, c + jp, ldc, alpha, beta);
            } else {
                for (int j = jp; j < jp + jn; j += NR) {
                    int nr = jp + jn - j < NR ? jp + jn - j : NR;
                    tile(mr, nr, K, a, rsa, csa, B + j, ldb, c + j, ldc, alpha, beta);
                }
            }
            i += mr;
        }
    }
}

/* The first mode's large operand is one tensor's rows far apart (a multiple of 4 KiB for most shapes):
 * read in place, its K rows of a panel map to the same few cache sets and evict one another, and
 * K streams defeat the prefetchers. Each panel of PW columns is therefore copied together first, a
 * long sequential run per row (measured 1.1-1.3x on the T5 shape's first mode, none for later ones). */
#define PW 512
#define PK 64
static __thread float packed[PK * PW] __attribute__((aligned(64)));

static void gemm_packed(int M, int N, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C,
                        long ldc, float alpha, float beta) {
    if (K > PK) {
        gemm(M, N, K, A, rsa, csa, B, ldb, C, ldc, alpha, beta);
        return;
    }
    for (int jp = 0; jp < N; jp += PW) {
        int jn = N - jp < PW ? N - jp : PW;
        for (int k = 0; k < K; k++) memcpy(packed + k * jn, B + (long)k * ldb + jp, sizeof(float) * jn);
        gemm(M, jn, K, A, rsa, csa, packed, jn, C + jp, ldc, alpha, beta);
    }
}

typedef struct {
    long pre, post, slab, chunk, chunks;
    int d;
    const float *F, *X, *ft;
    long fn, fi, fj;
    float *Y;
    float alpha, beta;
} mode_job;

#define ROWS 1536 /* rows of the last mode's product per work item (a multiple of the 6-row tile) */

static void mode_last_items(void *p, int thread, long start, long end) { /* item = (expert, row chunk) */
    mode_job *j = p;
    (void)thread;
    for (long it = start; it < end; it++) {
        long e = it / j->chunks, r0 = (it % j->chunks) * ROWS;
        int rows = j->pre - r0 < ROWS ? (int)(j->pre - r0) : ROWS;
        long off = e * j->slab + r0 * j->d;
        gemm(rows, j->d, j->d, j->X + off, j->d, 1, j->ft + e * j->d * j->d, j->d, j->Y + off, j->d, j->alpha, j->beta);
    }
}

static void mode_items(void *p, int thread, long start, long end) { /* item = (expert, row, column chunk) */
    mode_job *j = p;
    (void)thread;
    for (long it = start; it < end; it++) {
        long c0 = (it % j->chunks) * j->chunk, rest = it / j->chunks, a = rest % j->pre, e = rest / j->pre;
        int cols = j->post - c0 < j->chunk ? (int)(j->post - c0) : (int)j->chunk;
        long off = e * j->slab + a * j->d * j->post + c0;
        (j->pre == 1 ? gemm_packed : gemm)(j->d, cols, j->d, j->F + e * j->fn, j->fi, j->fj, j->X + off, j->post,
                                           j->Y + off, j->post, j->alpha, j->beta);
    }
}

/* Mode product for n experts: Y[e, a, i, b] = beta * Y + alpha * sum_j F[e, i, j] X[e, a, j, b].
 * X and Y are contiguous [n, pre, d, post]; F[e] is read at e*fn + i*fi + j*fj (a transposed
 * factor is the same memory with fi and fj swapped); `threads` OpenMP threads share the work.
 * Returns 0, or -1 where a buffer could not be allocated. */
int camex_mode(int n, long pre, int d, long post, const float *F, long fn, long fi, long fj, const float *X,
               float *Y, float alpha, float beta, int threads) {
    mode_job job = {pre, post, pre * d * post, 0, 1, d, F, X, NULL, fn, fi, fj, Y, alpha, beta};
    if (post == 1) { /* last mode: Y[e] = X[e] (pre x d) @ F[e]^T, with every F^T copied row-major */
        float *ft = malloc(sizeof(float) * n * d * d);
        if (ft == NULL) return -1;
        for (int e = 0; e < n; e++)
            for (int j = 0; j < d; j++)
                for (int i = 0; i < d; i++) ft[((long)e * d + j) * d + i] = F[e * fn + i * fi + j * fj];
        job.ft = ft;
        job.chunks = (pre + ROWS - 1) / ROWS;
        long items = n * job.chunks;
        parallel(split_threads(threads, items), items, mode_last_items, &job);
        free(ft);
        return 0;
    }
    /* few rows (the first mode): columns are cut into chunks too, so that every thread has work */
    job.chunk = pre * n >= 4L * threads || threads == 1 ? post : ((post / (4L * threads) + NC - 1) / NC) * NC;
    if (job.chunk < NC) job.chunk = NC;
    job.chunks = (post + job.chunk - 1) / job.chunk;
    long items = n * pre * job.chunks;
    parallel(split_threads(threads, items), items, mode_items, &job);
    return 0;
}

#define KC 512 /* contraction chunk along the reduced dimension (256 to 1024 measured alike) */

/* dst[c, r] = src[r, c] for r < rows, c < cols, in 8 x 8 blocks on registers where they fit. */
static void transpose(int rows, int cols, const float *src, long lds, float *dst, long ldd) {
    int r8 = rows & ~7, c8 = cols & ~7;
    for (int r = 0; r < r8; r += 8)
        for (int c = 0; c < c8; c += 8) {
            const float *s = src + (long)r * lds + c;
            __m256 t0 = _mm256_loadu_ps(s), t1 = _mm256_loadu_ps(s + lds), t2 = _mm256_loadu_ps(s + 2 * lds);
            __m256 t3 = _mm256_loadu_ps(s + 3 * lds), t4 = _mm256_loadu_ps(s + 4 * lds);
            __m256 t5 = _mm256_loadu_ps(s + 5 * lds), t6 = _mm256_loadu_ps(s + 6 * lds);
            __m256 t7 = _mm256_loadu_ps(s + 7 * lds);
            __m256 u0 = _mm256_unpacklo_ps(t0, t1), u1 = _mm256_unpackhi_ps(t0, t1);
            __m256 u2 = _mm256_unpacklo_ps(t2, t3), u3 = _mm256_unpackhi_ps(t2, t3);
            __m256 u4 = _mm256_unpacklo_ps(t4, t5), u5 = _mm256_unpackhi_ps(t4, t5);
            __m256 u6 = _mm256_unpacklo_ps(t6, t7), u7 = _mm256_unpackhi_ps(t6, t7);
            __m256 v0 = _mm256_shuffle_ps(u0, u2, 0x44), v1 = _mm256_shuffle_ps(u0, u2, 0xEE);
            __m256 v2 = _mm256_shuffle_ps(u1, u3, 0x44), v3 = _mm256_shuffle_ps(u1, u3, 0xEE);
            __m256 v4 = _mm256_shuffle_ps(u4, u6, 0x44), v5 = _mm256_shuffle_ps(u4, u6, 0xEE);
            __m256 v6 = _mm256_shuffle_ps(u5, u7, 0x44), v7 = _mm256_shuffle_ps(u5, u7, 0xEE);
            float *o = dst + (long)c * ldd + r;
            _mm256_storeu_ps(o, _mm256_permute2f128_ps(v0, v4, 0x20));
            _mm256_storeu_ps(o + ldd, _mm256_permute2f128_ps(v1, v5, 0x20));
            _mm256_storeu_ps(o + 2 * ldd, _mm256_permute2f128_ps(v2, v6, 0x20));
            _mm256_storeu_ps(o + 3 * ldd, _mm256_permute2f128_ps(v3, v7, 0x20));
            _mm256_storeu_ps(o + 4 * ldd, _mm256_permute2f128_ps(v0, v4, 0x31));
            _mm256_storeu_ps(o + 5 * ldd, _mm256_permute2f128_ps(v1, v5, 0x31));
            _mm256_storeu_ps(o + 6 * ldd, _mm256_permute2f128_ps(v2, v6, 0x31));
            _mm256_storeu_ps(o + 7 * ldd, _mm256_permute2f128_ps(v3, v7, 0x31));
        }
    for (int r = 0; r < rows; r++) /* the edges past the 8 x 8 blocks */
        for (int c = r < r8 ? c8 : 0; c < cols; c++) dst[(long)c * ldd + r] = src[(long)r * lds + c];
}

typedef struct {
    long pre, post, slab, chunks;
    int n, d;
    const float *Gr, *H;
    float *partial, *scratch; /* per thread: n*d*d partial sums, KC*d scratch */
    float alpha;
} contract_job;

static void contract_items(void *p, int thread, long start, long end) { /* item = (expert, row, chunk) */
    contract_job *j = p;
    int d = j->d;
    float *scratch = j->scratch + (long)thread * KC * d, *partial = j->partial + (long)thread * j->n * d * d;
    for (long it = start; it < end; it++) {
        long k = (it % j->chunks) * KC, rest = it / j->chunks, a = rest % j->pre, e = rest / j->pre;
        int kc = j->post - k < KC ? (int)(j->post - k) : KC;
        const float *ga = j->Gr + e * j->slab + a * d * j->post, *ha = j->H + e * j->slab + a * d * j->post;
        transpose(d, kc, ha + k, j->post, scratch, d); /* scratch[b, j] = H[a, j, k + b] */
        gemm(d, d, kc, ga + k, j->post, 1, scratch, d, partial + e * d * d, d, j->alpha, 1.0f);
    }
}

#define LAST_ROWS 4096 /* rows of the last mode's contraction per work item */
#define LAST_KC 64      /* rows per step: both operands' rows stay in L1 across the tiles */

static void contract_last_items(void *p, int thread, long start, long end) { /* item = (expert, row chunk) */
    contract_job *j = p;
    int d = j->d;
    float *partial = j->partial + (long)thread * j->n * d * d;
    for (long it = start; it < end; it++) {
        long e = it / j->chunks, r0 = (it % j->chunks) * LAST_ROWS;
        long r1 = r0 + LAST_ROWS < j->pre ? r0 + LAST_ROWS : j->pre;
        const float *g = j->Gr + e * j->slab, *h = j->H + e * j->slab;
        for (long r = r0; r < r1; r += LAST_KC) { /* G += g[r:r+kc]^T h[r:r+kc]: g read transposed in place */
            int kc = r1 - r < LAST_KC ? (int)(r1 - r) : LAST_KC;
            gemm(d, d, kc, g + r * d, 1, d, h + r * d, d, partial + e * d * d, d, j->alpha, 1.0f);
        }
    }
}

/* Factor gradient for n experts: G[e, i, j] = alpha * sum_{a, b} Gr[e, a, i, b] H[e, a, j, b]
 * (G contiguous [n, d, d], overwritten; Gr and H contiguous [n, pre, d, post]). The
 * reduced dimension b is cut into chunks (for the last mode, post = 1, the rows a instead: LAST_ROWS,
 * read in place); H's chunk is transposed into a scratch buffer so that its rows run along j, and the
 * chunk's product accumulates on the same register tile into the thread's partial sums (G itself on
 * one thread), added up at the end. Returns 0, or -1 where a
 * buffer could not be allocated. */
int camex_contract(int n, long pre, int d, long post, const float *Gr, const float *H, float *G, float alpha,
                   int threads) {
    int last = post == 1; /* the last mode: rows of [pre, d] contracted, no transposes */
    long chunks = last ? (pre + LAST_ROWS - 1) / LAST_ROWS : (post + KC - 1) / KC;
    long items = last ? n * chunks : n * pre * chunks, size = (long)n * d * d;
    threads = split_threads(threads, items);
    float *scratch = malloc(sizeof(float) * KC * d * threads);
    float *partial = threads == 1 ? G : calloc((size_t)size * threads, sizeof(float));
    if (scratch == NULL || partial == NULL) {
        free(scratch);
        if (partial != G) free(partial);
        return -1;
    }
    if (threads == 1) memset(G, 0, sizeof(float) * size);
    contract_job job = {pre, post, pre * d * post, chunks, n, d, Gr, H, partial, scratch, alpha};
    parallel(threads, items, last ? contract_last_items : contract_items, &job);
    if (threads > 1) {
        for (long i = 0; i < size; i++) {
            float sum = 0.0f;
            for (int t = 0; t < threads; t++) sum += partial[t * size + i];
            G[i] = sum;
        }
        free(partial);
    }
    free(scratch);
    return 0;
}
