/* Register-blocked products of a small dense matrix with rows of a larger one, the GEMMs of
 * fastconv's own convolution paths: Winograd's per-point products, and the direct convolution's
 * product with shifted views of the (padded) image, which needs no im2col copy.
 *
 * GCC vector extensions: one 16-float vector is one AVX-512 register in the x86-64-v4 clone,
 * two AVX2 registers in the v3 one, four SSE registers in the baseline. Operands are used in
 * place (no packing); `columns` is a multiple of 16 and every row may be read that far.
 */
#include <string.h>

#include "microkernels.h"

#include "multiversion.h"

#if defined(__GNUC__)
typedef float vfloat __attribute__((vector_size(64)));
#define LANES 16

static inline __attribute__((always_inline)) vfloat load(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void store(float *p, vfloat v) { memcpy(p, &v, sizeof v); }

/* m[k][0:columns] = sum_r a[k][r] * ROW(r)[0:columns], for 4 rows k of a at a time and 2
 * vectors of columns: 8 accumulators, 2 loads and 4 broadcasts per 8 multiply-adds. The sum
 * runs over blocks of TAPS_BLOCK taps, each added to m: one running sum over thousands of taps
 * would round worse than BLAS (and torch) do. */
#define TAPS_BLOCK 128
#define PUT(p, v) store((p), first ? (v) : load(p) + (v))
#define PRODUCTS_BODY(ROW)                                                                     \
    for (int64_t r0 = 0; r0 < taps; r0 += TAPS_BLOCK) {                                        \
    const int first = r0 == 0, r1 = taps - r0 < TAPS_BLOCK ? (int)(taps - r0) : TAPS_BLOCK;     \
    int64_t k = 0;                                                                             \
    for (; k + 4 <= out_channels; k += 4) {                                                    \
        const float *a0 = a + k * taps, *a1 = a0 + taps, *a2 = a1 + taps, *a3 = a2 + taps;    \
        int64_t j = 0;                                                                         \
        for (; j + 2 * LANES <= columns; j += 2 * LANES) {                                     \
            vfloat s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0};                                 \
            vfloat s20 = {0}, s21 = {0}, s30 = {0}, s31 = {0};                                 \
            for (int64_t r = r0; r < r0 + r1; r++) {                                               \
                vfloat y0 = load(ROW(r) + j), y1 = load(ROW(r) + j + LANES);                   \
                s00 += a0[r] * y0, s01 += a0[r] * y1;                                          \
                s10 += a1[r] * y0, s11 += a1[r] * y1;                                          \
                s20 += a2[r] * y0, s21 += a2[r] * y1;                                          \
                s30 += a3[r] * y0, s31 += a3[r] * y1;                                          \
            }                                                                                  \
            PUT(m + k * ld + j, s00), PUT(m + k * ld + j + LANES, s01);                                \
            PUT(m + (k + 1) * ld + j, s10), PUT(m + (k + 1) * ld + j + LANES, s11);        \
            PUT(m + (k + 2) * ld + j, s20), PUT(m + (k + 2) * ld + j + LANES, s21);        \
            PUT(m + (k + 3) * ld + j, s30), PUT(m + (k + 3) * ld + j + LANES, s31);        \
        }                                                                                      \
        for (; j < columns; j += LANES) {                                                      \
            vfloat s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                     \
            for (int64_t r = r0; r < r0 + r1; r++) {                                               \
                vfloat y = load(ROW(r) + j);                                                   \
                s0 += a0[r] * y, s1 += a1[r] * y, s2 += a2[r] * y, s3 += a3[r] * y;            \
            }                                                                                  \
            PUT(m + k * ld + j, s0), PUT(m + (k + 1) * ld + j, s1);                            \
            PUT(m + (k + 2) * ld + j, s2), PUT(m + (k + 3) * ld + j, s3);                      \
        }                                                                                      \
    }                                                                                          \
    for (; k < out_channels; k++) {                                                            \
        const float *ak = a + k * taps;                                                        \
        for (int64_t j = 0; j < columns; j += LANES) {                                         \
            vfloat s = {0};                                                                    \
            for (int64_t r = r0; r < r0 + r1; r++) s += ak[r] * load(ROW(r) + j);                  \
            PUT(m + k * ld + j, s);                                                            \
        }                                                                                      \
    }                                                                                          \
    }

#else /* MSVC: no vector extensions; plain loops the compiler may vectorise, same results */
#define PRODUCTS_BODY(ROW)                                                                     \
    for (int64_t k = 0; k < out_channels; k++)                                                 \
        for (int64_t j = 0; j < columns; j++) {                                                \
            double s = 0; /* one running sum: in double, to round no worse than BLAS */ \
            for (int64_t r = 0; r < taps; r++) s += a[k * taps + r] * ROW(r)[j];               \
            m[k * ld + j] = (float)s;                                                          \
        }
#endif

/* The portable kernels: compiled per ISA (multiversion.h), the loader picking the best. */
FASTCONV_MULTIVERSION
static void rows_product_generic(const float *a, const float *v, float *m, int64_t out_channels,
                                 int64_t taps, int64_t columns, int64_t ld) {
#define STRIDED_ROW(r) (v + (r) * ld)
    PRODUCTS_BODY(STRIDED_ROW)
#undef STRIDED_ROW
}

FASTCONV_MULTIVERSION
static void shifted_product_generic(const float *a, const float *x, const int64_t *offsets,
                                    float *m, int64_t out_channels, int64_t taps,
                                    int64_t columns, int64_t ld) {
#define SHIFTED_ROW(r) (x + offsets[r])
    PRODUCTS_BODY(SHIFTED_ROW)
#undef SHIFTED_ROW
}

#if defined(__x86_64__) && defined(__GNUC__)
/* AVX-512: 32 vector registers hold a block of 8 rows of m by 3 vectors (48 columns) in 24
 * accumulators; per tap, 3 loads and 8 broadcasts (folded into the multiply-adds) feed 24
 * multiply-adds, so the FMA units, not the loads, set the pace (the portable kernel's 4 x 2
 * block is load-bound at ~35% of peak). Columns outermost: the block of v the inner loops
 * sweep (TAPS_BLOCK rows x 48 columns, <= 24 KiB) stays in L1 while every row block of a
 * passes over it. Same sums, in the same order, as the portable kernel. */
#include <immintrin.h>
#define AVX512 FASTCONV_AVX512

static inline __attribute__((always_inline)) AVX512 void block_avx512(
    const float *a, int64_t taps, int64_t r0, int64_t r1, const float *v, int64_t row_stride,
    const int64_t *offsets, float *m, int64_t ld, int first, const int rows, const int vectors) {
    __m512 s[8][3];
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++)
#pragma GCC unroll 3
        for (int n = 0; n < vectors; n++) s[i][n] = _mm512_setzero_ps();
    for (int64_t r = r0; r < r1; r++) {
        const float *row = offsets ? v + offsets[r] : v + r * row_stride;
        __m512 y[3];
#pragma GCC unroll 3
        for (int n = 0; n < vectors; n++) y[n] = _mm512_loadu_ps(row + 16 * n);
#pragma GCC unroll 8
        for (int i = 0; i < rows; i++) {
            __m512 b = _mm512_set1_ps(a[i * taps + r]);
#pragma GCC unroll 3
            for (int n = 0; n < vectors; n++) s[i][n] = _mm512_fmadd_ps(b, y[n], s[i][n]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++)
#pragma GCC unroll 3
        for (int n = 0; n < vectors; n++) {
            float *p = m + i * ld + 16 * n;
            _mm512_storeu_ps(p, first ? s[i][n] : _mm512_add_ps(_mm512_loadu_ps(p), s[i][n]));
        }
}

/* One column block (vectors 1..3) of every row of m, 8 rows at a time, then 4, then 1. */
#define BLOCK_ROWS(VECTORS)                                                                   \
    do {                                                                                      \
        int64_t k = 0;                                                                        \
        for (; k + 8 <= out_channels; k += 8)                                                 \
            block_avx512(a + k * taps, taps, r0, r1, v + j, row_stride, offsets,              \
                         m + k * ld + j, ld, first, 8, VECTORS);                              \
        for (; k + 4 <= out_channels; k += 4)                                                 \
            block_avx512(a + k * taps, taps, r0, r1, v + j, row_stride, offsets,              \
                         m + k * ld + j, ld, first, 4, VECTORS);                              \
        for (; k < out_channels; k++)                                                         \
            block_avx512(a + k * taps, taps, r0, r1, v + j, row_stride, offsets,              \
                         m + k * ld + j, ld, first, 1, VECTORS);                              \
    } while (0)

static AVX512 __attribute__((noinline)) void product_avx512(
    const float *a, const float *v, int64_t row_stride, const int64_t *offsets, float *m,
    int64_t out_channels, int64_t taps, int64_t columns, int64_t ld) {
    for (int64_t r0 = 0; r0 < taps; r0 += TAPS_BLOCK) {
        const int first = r0 == 0;
        const int64_t r1 = taps - r0 < TAPS_BLOCK ? taps : r0 + TAPS_BLOCK;
        int64_t j = 0;
        for (; j + 48 <= columns; j += 48) BLOCK_ROWS(3);
        if (columns - j == 32) BLOCK_ROWS(2);
        else if (columns - j == 16) BLOCK_ROWS(1);
    }
}
#undef BLOCK_ROWS

/* 16 vectors of 16 floats transposed in registers: four rounds of 16 shuffles (pairs of rows,
 * then fours within 128-bit lanes, then the lanes across the four groups). */
static inline __attribute__((always_inline)) AVX512 void transpose16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* lane L of r[4i + s]: column 4L + s of rows 4i .. 4i + 3 */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int s = 0; s < 4; s++) {
        __m512 p0 = _mm512_shuffle_f32x4(r[s], r[4 + s], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 p1 = _mm512_shuffle_f32x4(r[s], r[4 + s], _MM_SHUFFLE(3, 2, 3, 2));
        __m512 p2 = _mm512_shuffle_f32x4(r[8 + s], r[12 + s], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 p3 = _mm512_shuffle_f32x4(r[8 + s], r[12 + s], _MM_SHUFFLE(3, 2, 3, 2));
        t[s] = _mm512_shuffle_f32x4(p0, p2, _MM_SHUFFLE(2, 0, 2, 0));
        t[4 + s] = _mm512_shuffle_f32x4(p0, p2, _MM_SHUFFLE(3, 1, 3, 1));
        t[8 + s] = _mm512_shuffle_f32x4(p1, p3, _MM_SHUFFLE(2, 0, 2, 0));
        t[12 + s] = _mm512_shuffle_f32x4(p1, p3, _MM_SHUFFLE(3, 1, 3, 1));
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* du[k][c] += sum over t < slots of m[k][t] V(c)[t], both operands slot-contiguous (an A B^T;
 * V(c) = v + c * ldv, or v + offsets[c]: the shifted views of the direct path's weight
 * gradient): v is transposed 16x16 at a time into vt, then the products' register block sweeps
 * vt with m's entries broadcast. The transpose is the only copy: BLAS packed both operands on
 * every call, and perf showed the packing taking as long as its kernel. */
static AVX512 __attribute__((noinline)) void transposed_product_avx512(
    const float *m, int64_t ldm, const float *v, int64_t ldv, const int64_t *offsets, float *du,
    int64_t out_channels, int64_t channels, int64_t slots, float *vt) {
    const int64_t cpad = (channels + 15) / 16 * 16, padded = (slots + 15) / 16 * 16;
    for (int64_t c0 = 0; c0 < cpad; c0 += 16)
        for (int64_t t0 = 0; t0 < padded; t0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) {
                const int64_t c = c0 + i;
                r[i] = c < channels ? _mm512_loadu_ps(v + (offsets ? offsets[c] : c * ldv) + t0)
                                    : _mm512_setzero_ps();
            }
            transpose16x16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(vt + (t0 + i) * cpad + c0, r[i]);
        }
#define GRAD_ROWS(VECTORS)                                                                    \
    do {                                                                                      \
        int64_t k = 0;                                                                        \
        for (; k + 8 <= out_channels; k += 8)                                                 \
            block_avx512(m + k * ldm, ldm, 0, slots, vt + j, cpad, NULL, du + k * cpad + j,   \
                         cpad, 0, 8, VECTORS);                                                \
        for (; k + 4 <= out_channels; k += 4)                                                 \
            block_avx512(m + k * ldm, ldm, 0, slots, vt + j, cpad, NULL, du + k * cpad + j,   \
                         cpad, 0, 4, VECTORS);                                                \
        for (; k < out_channels; k++)                                                         \
            block_avx512(m + k * ldm, ldm, 0, slots, vt + j, cpad, NULL, du + k * cpad + j,   \
                         cpad, 0, 1, VECTORS);                                                \
    } while (0)
    int64_t j = 0;
    for (; j + 48 <= cpad; j += 48) GRAD_ROWS(3);
    if (cpad - j == 32) GRAD_ROWS(2);
    else if (cpad - j == 16) GRAD_ROWS(1);
#undef GRAD_ROWS
}

/* dst[j][i] = src[i][j] for i < rows, j < cols: 16x16 blocks in registers, the edges one by one. */
static AVX512 void transpose_avx512(const float *src, int64_t ld_src, int64_t rows, int64_t cols,
                                    float *dst, int64_t ld_dst) {
    int64_t i0 = 0, j0;
    for (; i0 + 16 <= rows; i0 += 16) {
        for (j0 = 0; j0 + 16 <= cols; j0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + (i0 + i) * ld_src + j0);
            transpose16x16(r);
            for (int j = 0; j < 16; j++) _mm512_storeu_ps(dst + (j0 + j) * ld_dst + i0, r[j]);
        }
        for (; j0 < cols; j0++)
            for (int i = 0; i < 16; i++) dst[j0 * ld_dst + i0 + i] = src[(i0 + i) * ld_src + j0];
    }
    for (; i0 < rows; i0++)
        for (j0 = 0; j0 < cols; j0++) dst[j0 * ld_dst + i0] = src[i0 * ld_src + j0];
}

/* c (m x n, rows ldc) = op(a) @ op(b), op(a) m x k, op(b) k x n, n a multiple of 16: the
 * transposed operands copied to work first (as B^T's rows are the product's columns), then
 * the forward's 8x48 register blocks over k in blocks of TAPS_BLOCK. */
static AVX512 __attribute__((noinline)) void dense_avx512(
    int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
    const float *b, int64_t ldb, float *c, int64_t ldc, float *work) {
    const float *rows_a = a, *rows_b = b; /* op(a)'s rows must lie k apart: lda == k unless trans_a */
    int64_t ld_b = ldb;
    if (trans_a) {
        transpose_avx512(a, lda, k, m, work, k);
        rows_a = work;
        work += m * k;
    }
    if (trans_b) {
        transpose_avx512(b, ldb, n, k, work, n);
        rows_b = work, ld_b = n;
    }
    product_avx512(rows_a, rows_b, ld_b, NULL, c, m, k, n, ldc);
}

#else
#define product_avx512(...) ((void)0)
#define transposed_product_avx512(...) ((void)0)
#define dense_avx512(...) ((void)0)
#endif

const char *microkernel_isa(void) {
    return cpu_has_avx512() ? "AVX-512, 8x48 blocks" : "vector extensions, 4x32 blocks";
}

void rows_product(const float *a, const float *v, float *m, int64_t out_channels, int64_t taps,
                  int64_t columns, int64_t ld) {
    if (cpu_has_avx512())
        product_avx512(a, v, ld, NULL, m, out_channels, taps, columns, ld);
    else
        rows_product_generic(a, v, m, out_channels, taps, columns, ld);
}

int transposed_product(const float *m, const float *v, float *du, int64_t out_channels,
                       int64_t channels, int64_t slots, int64_t ld, float *vt) {
    if (!cpu_has_avx512()) return 0;
    transposed_product_avx512(m, ld, v, ld, NULL, du, out_channels, channels, slots, vt);
    return 1;
}

int dense_product(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, const float *a,
                  int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc, float *work) {
    if (!cpu_has_avx512() || n % 16 || k < 1 || (!trans_a && lda != k)) return 0;
    dense_avx512(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, work);
    return 1;
}

int transposed_product_available(void) { return cpu_has_avx512(); }

int shifted_transposed_product(const float *g, int64_t ldg, const float *x,
                               const int64_t *offsets, float *du, int64_t out_channels,
                               int64_t taps, int64_t slots, float *vt) {
    if (!cpu_has_avx512()) return 0;
    transposed_product_avx512(g, ldg, x, 0, offsets, du, out_channels, taps, slots, vt);
    return 1;
}

void shifted_product(const float *a, const float *x, const int64_t *offsets, float *m,
                     int64_t out_channels, int64_t taps, int64_t columns, int64_t ld) {
    if (cpu_has_avx512())
        product_avx512(a, x, 0, offsets, m, out_channels, taps, columns, ld);
    else
        shifted_product_generic(a, x, offsets, m, out_channels, taps, columns, ld);
}
