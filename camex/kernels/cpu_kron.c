/* CPU kernel for the curvature's mode products (issue 20).
 *
 * A mode product multiplies a small square factor (d = 16..128) into one mode of a large tensor.
 * As a GEMM one of its dimensions is d, so BLAS libraries spend a large share of the time packing
 * the large operand into their panel layout: on the project's AVX2 VM those products ran at
 * 24-58 GFLOP/s against 82 for a square GEMM. Here the large operand is read in place: the
 * factor (at most 64 KiB) sits in L1/L2, the large operand streams through a 6 x 16 register tile
 * of broadcast-FMA updates, and nothing is packed. The factor gradients (contractions) stay with
 * PyTorch: kernels written like this one were no faster than its GEMMs there (measured 0.83-1.1x).
 *
 * Built at first use by camex/kernels/cpu_kron.py (gcc -O3 -mavx2 -mfma); fp32, single-threaded,
 * row-major, every leading dimension in elements.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define MR 6 /* a 6 x 16 tile: 12 accumulators hide the FMA latency, 15 of AVX2's 16 registers */
#define NR 16
#define NC 64 /* columns of B per panel: K x NC floats stay in L1 while the rows of A sweep it */

static inline void store_row(float *c, __m256 v, __m256 al, __m256 be, int accumulate) {
    v = _mm256_mul_ps(al, v);
    if (accumulate) v = _mm256_fmadd_ps(be, _mm256_loadu_ps(c), v);
    _mm256_storeu_ps(c, v);
}

/* C[i, j] = beta * C[i, j] + alpha * sum_k A[i*rsa + k*csa] * B[k*ldb + j] on an mr x 16 tile
 * (mr <= 6). Named accumulators: GCC keeps an array of them in memory. Rows past mr repeat row 0
 * (valid memory) and are not stored. */
static void tile16(int mr, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C, long ldc,
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
        a = _mm256_broadcast_ss(a4 + o); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(a5 + o); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    }
    __m256 al = _mm256_set1_ps(alpha), be = _mm256_set1_ps(beta);
    int acc = beta != 0.0f;
    store_row(C, c00, al, be, acc); store_row(C + 8, c01, al, be, acc);
    if (mr > 1) { store_row(C + ldc, c10, al, be, acc); store_row(C + ldc + 8, c11, al, be, acc); }
    if (mr > 2) { store_row(C + 2 * ldc, c20, al, be, acc); store_row(C + 2 * ldc + 8, c21, al, be, acc); }
    if (mr > 3) { store_row(C + 3 * ldc, c30, al, be, acc); store_row(C + 3 * ldc + 8, c31, al, be, acc); }
    if (mr > 4) { store_row(C + 4 * ldc, c40, al, be, acc); store_row(C + 4 * ldc + 8, c41, al, be, acc); }
    if (mr > 5) { store_row(C + 5 * ldc, c50, al, be, acc); store_row(C + 5 * ldc + 8, c51, al, be, acc); }
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

/* C[M x N] = beta * C + alpha * A[M x K] B[K x N]; A read at i*rsa + k*csa, B rows contiguous. */
static void gemm(int M, int N, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C,
                 long ldc, float alpha, float beta) {
    for (int jp = 0; jp < N; jp += NC) {
        int jn = N - jp < NC ? N - jp : NC;
        if (jp + NC < N) /* the next panel's K rows are far apart: too many streams for the prefetcher */
            for (int k = 0; k < K; k++)
                for (int l = 0; l < NC && jp + NC + l < N; l += 16)
                    _mm_prefetch((const char *)(B + (long)k * ldb + jp + NC + l), _MM_HINT_T0);
        for (int i = 0; i < M; i += MR) {
            int mr = M - i < MR ? M - i : MR;
            for (int j = jp; j < jp + jn; j += NR) {
                int nr = jp + jn - j < NR ? jp + jn - j : NR;
                tile(mr, nr, K, A + (long)i * rsa, rsa, csa, B + j, ldb, C + (long)i * ldc + j, ldc, alpha, beta);
            }
        }
    }
}

/* Mode product for n experts: Y[e, a, i, b] = beta * Y + alpha * sum_j F[e, i, j] X[e, a, j, b].
 * X and Y are contiguous [n, pre, d, post]; F[e] is read at e*fn + i*fi + j*fj (a transposed
 * factor is the same memory with fi and fj swapped). */
void camex_mode(int n, long pre, int d, long post, const float *F, long fn, long fi, long fj, const float *X,
                float *Y, float alpha, float beta) {
    long slab = pre * d * post;
    if (post == 1) { /* last mode: Y[e] = X[e] (pre x d) @ F[e]^T, with F^T copied row-major */
        float *ft = malloc(sizeof(float) * d * d);
        for (int e = 0; e < n; e++) {
            const float *f = F + e * fn;
            for (int j = 0; j < d; j++)
                for (int i = 0; i < d; i++) ft[j * d + i] = f[i * fi + j * fj];
            gemm((int)pre, d, d, X + e * slab, d, 1, ft, d, Y + e * slab, d, alpha, beta);
        }
        free(ft);
        return;
    }
    for (int e = 0; e < n; e++)
        for (long a = 0; a < pre; a++) {
            long off = e * slab + a * d * post;
            gemm(d, (int)post, d, F + e * fn, fi, fj, X + off, post, Y + off, post, alpha, beta);
        }
}
