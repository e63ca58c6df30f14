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

FASTCONV_MULTIVERSION
void rows_product(const float *a, const float *v, float *m, int64_t out_channels, int64_t taps,
                  int64_t columns, int64_t ld) {
#define STRIDED_ROW(r) (v + (r) * ld)
    PRODUCTS_BODY(STRIDED_ROW)
#undef STRIDED_ROW
}

FASTCONV_MULTIVERSION
void shifted_product(const float *a, const float *x, const int64_t *offsets, float *m,
                     int64_t out_channels, int64_t taps, int64_t columns, int64_t ld) {
#define SHIFTED_ROW(r) (x + offsets[r])
    PRODUCTS_BODY(SHIFTED_ROW)
#undef SHIFTED_ROW
}
