/* Register-blocked products for fastconv's own convolution paths (see microkernels.c). */
#ifndef FASTCONV_MICROKERNELS_H
#define FASTCONV_MICROKERNELS_H

#include <stdint.h>

/* m[k][0:columns] = sum_r a[k][r] v[r][0:columns]; a: out_channels x taps row-major, v and m
 * rows ld apart (Winograd's per-point products, ld for both). */
void rows_product(const float *a, const float *v, float *m, int64_t out_channels, int64_t taps,
                  int64_t columns, int64_t ld);

/* m[k][0:columns] = sum_r a[k][r] x[offsets[r] + 0:columns]: a stride-1 convolution as the
 * product of the filters with shifted views of the padded image. */
void shifted_product(const float *a, const float *x, const int64_t *offsets, float *m,
                     int64_t out_channels, int64_t taps, int64_t columns, int64_t ld);

/* du[k][0:c] += sum_t m[k][t] v[c][t] for t < slots (Winograd's weight gradient at one point):
 * m, v rows ld apart and zero in columns [slots, slots rounded up to 16); du rows cpad apart,
 * cpad = channels rounded up to 16 (columns past channels get zeros added); vt scratch of
 * (slots rounded up to 16) x cpad floats. Returns 0, doing nothing, where this CPU has no
 * kernel for it (AVX-512 only: elsewhere BLAS is as fast). */
int transposed_product(const float *m, const float *v, float *du, int64_t out_channels,
                       int64_t channels, int64_t slots, int64_t ld, float *vt);

/* du[k][0:taps] += sum_t g[k][t] x[offsets[tap] + t] for t < slots: the direct convolution's
 * weight gradient against shifted views of the padded image (g: the output gradient, rows ldg
 * apart, zero in the columns a row of the views has past the output's). du and vt as
 * transposed_product's with channels = taps; every view readable to slots rounded up to 16.
 * Returns 0, doing nothing, without AVX-512. */
int shifted_transposed_product(const float *g, int64_t ldg, const float *x,
                               const int64_t *offsets, float *du, int64_t out_channels,
                               int64_t taps, int64_t slots, float *vt);

/* c (m x n, rows ldc) = op(a) @ op(b) (op: the transpose where trans_*), a and b row-major with
 * rows lda and ldb apart (lda == k unless trans_a): the dense layers' GEMMs, no packing but the
 * transposes. work: m * k floats where trans_a, plus k * n where trans_b. Returns 0, doing nothing, without
 * AVX-512 or where n is not a multiple of 16. */
int dense_product(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, const float *a,
                  int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc, float *work);

/* Whether transposed_product and shifted_transposed_product run on this CPU. */
int transposed_product_available(void);

/* Which kernel the products run on this CPU, e.g. "AVX-512, 8x48 blocks". */
const char *microkernel_isa(void);

#endif
