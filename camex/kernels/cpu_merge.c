/* CPU kernels for the merged linear's merge and its backward reductions (issue 20).
 *
 * On a tile of output rows the merged linear builds every unit's weights from the base and the n
 * experts' rows, W_u = c_u base + sum_i a_ui D_i, and in the backward pass reduces the tile's weight
 * gradient G_u onto the parameters: dD_i = sum_u at_iu G_u, dbase = sum_u c_u G_u and the scores'
 * dot products <G_u, D_i>, <G_u, base>. As PyTorch ops the merge was a copy of the base, a GEMM with
 * an inner dimension of n and a rank-one update (three passes over the units' weights), and the
 * reductions four GEMM-shaped passes over G. Here each is one pass over a column chunk that stays
 * in L1. fp32, AVX2/FMA, threaded by column chunks in OpenMP regions (the runtime PyTorch loaded).
 *
 * Built at first use by camex/kernels/cpu_merge.py; every matrix row-major, strides in elements.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_parallel.h"

#define CHUNK 256 /* columns per chunk: 16 units' and 8 experts' chunks take 24 KiB, in L1 */

#define MAX_EXPERTS 256 /* the reductions keep one row pointer per expert (cpu_merge.MAX_EXPERTS) */

/* Threads that get work: at most one per chunk, at least one. */
static int chunk_threads(int threads, long len) { return split_threads(threads, (len + CHUNK - 1) / CHUNK); }

typedef struct {
    work_fn fn;
    void *ctx;
    long len;
} chunk_job;

static void chunk_range(void *p, int thread, long c0, long c1) { /* chunks [c0, c1) as columns */
    chunk_job *j = p;
    j->fn(j->ctx, thread, c0 * CHUNK, c1 * CHUNK < j->len ? c1 * CHUNK : j->len);
}

/* fn(ctx, t, k0, k1) over column ranges of [0, len) cut at chunk boundaries, one per thread t. */
static void parallel_chunks(int threads, long len, work_fn fn, void *ctx) {
    chunk_job job = {fn, ctx, len};
    parallel(chunk_threads(threads, len), (len + CHUNK - 1) / CHUNK, chunk_range, &job);
}

/* Rows combined with coefficients: out_r[k] = init_r[k] + sum_j coef[r * rs + j * cs] * src_j[k] for
 * k < len (a multiple of 8), r < 2 (a second row repeats the first where there is none, unstored),
 * j < m; src_j = src + j * lds, plus the base scaled by bcoef[r] where `base` is given. */
static void combine2(int rows, int m, long len, const float *coef, long rs, long cs, const float *src, long lds,
                     const float *base, const float *bcoef, float *out0, float *out1) {
    const float *c1 = rows > 1 ? coef + rs : coef;
    for (long k = 0; k < len; k += 32) {
        __m256 a0, a1, a2, a3, b0, b1, b2, b3;
        if (base) {
            __m256 s0 = _mm256_set1_ps(bcoef[0]), s1 = _mm256_set1_ps(bcoef[rows > 1]);
            __m256 v0 = _mm256_loadu_ps(base + k), v1 = _mm256_loadu_ps(base + k + 8);
            __m256 v2 = _mm256_loadu_ps(base + k + 16), v3 = _mm256_loadu_ps(base + k + 24);
            a0 = _mm256_mul_ps(s0, v0), a1 = _mm256_mul_ps(s0, v1), a2 = _mm256_mul_ps(s0, v2);
            a3 = _mm256_mul_ps(s0, v3), b0 = _mm256_mul_ps(s1, v0), b1 = _mm256_mul_ps(s1, v1);
            b2 = _mm256_mul_ps(s1, v2), b3 = _mm256_mul_ps(s1, v3);
        } else {
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = _mm256_setzero_ps();
        }
        for (int j = 0; j < m; j++) {
            const float *s = src + j * lds + k;
            __m256 x0 = _mm256_set1_ps(coef[j * cs]), x1 = _mm256_set1_ps(c1[j * cs]), v;
            v = _mm256_loadu_ps(s), a0 = _mm256_fmadd_ps(x0, v, a0), b0 = _mm256_fmadd_ps(x1, v, b0);
            v = _mm256_loadu_ps(s + 8), a1 = _mm256_fmadd_ps(x0, v, a1), b1 = _mm256_fmadd_ps(x1, v, b1);
            v = _mm256_loadu_ps(s + 16), a2 = _mm256_fmadd_ps(x0, v, a2), b2 = _mm256_fmadd_ps(x1, v, b2);
            v = _mm256_loadu_ps(s + 24), a3 = _mm256_fmadd_ps(x0, v, a3), b3 = _mm256_fmadd_ps(x1, v, b3);
        }
        _mm256_storeu_ps(out0 + k, a0), _mm256_storeu_ps(out0 + k + 8, a1);
        _mm256_storeu_ps(out0 + k + 16, a2), _mm256_storeu_ps(out0 + k + 24, a3);
        if (rows > 1) {
            _mm256_storeu_ps(out1 + k, b0), _mm256_storeu_ps(out1 + k + 8, b1);
            _mm256_storeu_ps(out1 + k + 16, b2), _mm256_storeu_ps(out1 + k + 24, b3);
        }
    }
}

/* The same one column at a time, for the last len % 32 columns. */
static void combine_tail(int m, long k0, long k1, const float *coef, long cs, const float *src, long lds,
                         const float *base, float bcoef, float *out) {
    for (long k = k0; k < k1; k++) {
        float s = base ? bcoef * base[k] : 0.0f;
        for (int j = 0; j < m; j++) s += coef[j * cs] * src[j * lds + k];
        out[k] = s;
    }
}

/* out_r = [bcoef_r base +] sum_j coef[r, j] src_j over columns [k0, k1), for rows r < rows. */
static void combine(int rows, int m, long k0, long k1, const float *coef, long rs, long cs, const float *src,
                    long lds, const float *base, const float *bcoef, float *out, long ldo) {
    long body = k0 + ((k1 - k0) & ~31L);
    for (int r = 0; r < rows; r += 2) {
        int pair = rows - r > 1 ? 2 : 1;
        const float *b = base ? base + k0 : NULL, *bc = bcoef ? bcoef + r : NULL;
        combine2(pair, m, body - k0, coef + r * rs, rs, cs, src + k0, lds, b, bc, out + r * ldo + k0,
                 out + (r + 1) * ldo + k0);
        for (int q = r; q < r + pair; q++)
            combine_tail(m, body, k1, coef + q * rs, cs, src, lds, base, bcoef ? bcoef[q] : 0.0f, out + q * ldo);
    }
}

/* P[r, u, :] += lane-wise sums of S_r[k] G_u[k] over columns [k0, k1) (a multiple of 8 wide), on a
 * 4 x 3 block of accumulators: row r of S at S[r], row u of G at G + u * ldg; P is [R, U, 8]. */
static void dots(int R, int U, long k0, long k1, const float *const *S, const float *G, long ldg, float *P) {
    for (int r = 0; r < R; r += 4)
        for (int u = 0; u < U; u += 3) {
            int rb = R - r < 4 ? R - r : 4, ub = U - u < 3 ? U - u : 3;
            const float *s0 = S[r], *s1 = S[r + (rb > 1)], *s2 = S[r + 2 * (rb > 2)], *s3 = S[r + 3 * (rb > 3)];
            const float *g0 = G + u * ldg, *g1 = g0 + (ub > 1) * ldg, *g2 = g0 + 2 * (ub > 2) * ldg;
            __m256 p00 = _mm256_setzero_ps(), p01 = p00, p02 = p00, p10 = p00, p11 = p00, p12 = p00;
            __m256 p20 = p00, p21 = p00, p22 = p00, p30 = p00, p31 = p00, p32 = p00;
            for (long k = k0; k < k1; k += 8) {
                __m256 x0 = _mm256_loadu_ps(g0 + k), x1 = _mm256_loadu_ps(g1 + k), x2 = _mm256_loadu_ps(g2 + k), v;
                v = _mm256_loadu_ps(s0 + k);
                p00 = _mm256_fmadd_ps(v, x0, p00), p01 = _mm256_fmadd_ps(v, x1, p01), p02 = _mm256_fmadd_ps(v, x2, p02);
                v = _mm256_loadu_ps(s1 + k);
                p10 = _mm256_fmadd_ps(v, x0, p10), p11 = _mm256_fmadd_ps(v, x1, p11), p12 = _mm256_fmadd_ps(v, x2, p12);
                v = _mm256_loadu_ps(s2 + k);
                p20 = _mm256_fmadd_ps(v, x0, p20), p21 = _mm256_fmadd_ps(v, x1, p21), p22 = _mm256_fmadd_ps(v, x2, p22);
                v = _mm256_loadu_ps(s3 + k);
                p30 = _mm256_fmadd_ps(v, x0, p30), p31 = _mm256_fmadd_ps(v, x1, p31), p32 = _mm256_fmadd_ps(v, x2, p32);
            }
            __m256 acc[4][3] = {{p00, p01, p02}, {p10, p11, p12}, {p20, p21, p22}, {p30, p31, p32}};
            for (int i = 0; i < rb; i++)
                for (int q = 0; q < ub; q++) {
                    float *dst = P + ((long)(r + i) * U + u + q) * 8;
                    _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), acc[i][q]));
                }
        }
}

typedef struct {
    int units, n;
    long len, ldd, ldgd;
    const float *base, *D, *a, *c, *G;
    float *W, *gbase, *GD, *P;
    int dot_rows;
    const float *rows[MAX_EXPERTS + 1];
} merge_job;

static void merge_range(void *p, int thread, long k0, long k1) {
    merge_job *j = p;
    (void)thread;
    for (long k = k0; k < k1; k += CHUNK) {
        long end = k + CHUNK < k1 ? k + CHUNK : k1;
        combine(j->units, j->n, k, end, j->a, j->n, 1, j->D, j->ldd, j->base, j->c, j->W, j->len);
    }
}

/* W[u, k] = c[u] base[k] + sum_i a[u, i] D[i, k] for u < units, k < len: a tile of every unit's merged
 * weights (W contiguous [units, len]; D's rows ldd apart; a [units, n]; c [units]). */
void camex_merge(int units, int n, long len, const float *base, const float *D, long ldd, const float *a,
                 const float *c, float *W, int threads) {
    merge_job job = {units, n, len, ldd, 0, base, D, a, c, NULL, W, NULL, NULL, NULL, 0, {0}};
    parallel_chunks(threads, len, merge_range, &job);
}

static void grad_range(void *p, int thread, long k0, long k1) {
    merge_job *j = p;
    float *P = j->P + (long)thread * j->dot_rows * j->units * 8;
    for (long k = k0; k < k1; k += CHUNK) {
        long end = k + CHUNK < k1 ? k + CHUNK : k1, body = k + ((end - k) & ~7L);
        if (j->dot_rows) { /* first: gD may overwrite this chunk of D */
            dots(j->dot_rows, j->units, k, body, j->rows, j->G, j->len, P);
            for (long q = body; q < end; q++)
                for (int r = 0; r < j->dot_rows; r++)
                    for (int u = 0; u < j->units; u++) P[((long)r * j->units + u) * 8] += j->rows[r][q] * j->G[u * j->len + q];
        }
        if (j->GD) combine(j->n, j->units, k, end, j->a, j->units, 1, j->G, j->len, NULL, NULL, j->GD, j->ldgd);
        if (j->gbase) combine(1, j->units, k, end, j->c, 0, 1, j->G, j->len, NULL, NULL, j->gbase, 0);
    }
}

/* The reductions of a tile's weight gradient G (contiguous [units, len]) onto the parameters, each
 * output optional (NULL): gD[i, k] = sum_u at[i, u] G[u, k] (rows ldgd apart; it may be D itself:
 * each chunk of D is read before it is overwritten); gbase[k] = sum_u c[u] G[u, k]; and
 * S[i, u] += <D_i, G_u> for i < n, then S[n, u] += <base, G_u> where base is given (S [n(+1), units]).
 * Returns 0, or -1 where the threads' partial sums could not be allocated. */
int camex_merge_grad(int units, int n, long len, const float *G, const float *D, long ldd, const float *base,
                     const float *at, const float *c, float *gbase, float *GD, long ldgd, float *S, int threads) {
    if (n > MAX_EXPERTS) return -2;
    threads = chunk_threads(threads, len); /* as parallel_chunks will: one partial-sum block each */
    merge_job job = {units, n, len, ldd, ldgd, base, D, at, c, G, NULL, gbase, GD, NULL, 0, {0}};
    if (S) {
        job.dot_rows = n + (base != NULL);
        for (int i = 0; i < n; i++) job.rows[i] = D + i * ldd;
        if (base) job.rows[n] = base;
        job.P = calloc((size_t)threads * job.dot_rows * units * 8, sizeof(float));
        if (job.P == NULL) return -1;
    }
    parallel_chunks(threads, len, grad_range, &job);
    if (S) {
        long size = (long)job.dot_rows * units;
        for (long i = 0; i < size; i++) {
            float sum = 0.0f;
            for (int t = 0; t < threads; t++)
                for (int l = 0; l < 8; l++) sum += job.P[(t * size + i) * 8 + l];
            S[i] += sum;
        }
        free(job.P);
    }
    return 0;
}
