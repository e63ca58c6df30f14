/* Pooling with 2x2 windows, stride 2, of one plane, every window inside it: the shape every
 * small CNN uses, with torch's rules. Max: the first maximum in scan order, a NaN winning (the
 * last NaN); indices (flat positions in the plane) may be NULL. Average: the window's sum in
 * scan order over 4; its backward writes the whole input plane. */
#ifndef FASTCONV_POOL_2X2_H
#define FASTCONV_POOL_2X2_H

#include <stdint.h>

#include "multiversion.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* Torch's max of a 2x2 window, for 8 windows: the first maximum in scan order, a NaN winning
 * (the last NaN); *at gets which of the four (0..3). Compares and blends, no branches. */
static inline FASTCONV_AVX512 __m256 window_max_avx512(const __m256 v[4], __m256i *at) {
    __m256 best = v[0];
    *at = _mm256_setzero_si256();
    for (int i = 1; i < 4; i++) {
        __mmask8 take = _mm256_cmp_ps_mask(v[i], best, _CMP_GT_OQ) |
                        _mm256_cmp_ps_mask(v[i], v[i], _CMP_UNORD_Q);
        best = _mm256_mask_blend_ps(take, best, v[i]);
        *at = _mm256_mask_blend_epi32(take, *at, _mm256_set1_epi32(i));
    }
    return best;
}
#endif

void max_pool_2x2_float(const float *x, int64_t width, int64_t out_h, int64_t out_w, float *out,
                        int64_t *indices);
void max_pool_2x2_double(const double *x, int64_t width, int64_t out_h, int64_t out_w,
                         double *out, int64_t *indices);

void avg_pool_2x2_float(const float *x, int64_t width, int64_t out_h, int64_t out_w, float *out);
void avg_pool_2x2_double(const double *x, int64_t width, int64_t out_h, int64_t out_w,
                         double *out);
void avg_pool_2x2_backward_float(const float *grad, int64_t height, int64_t width, int64_t out_h,
                                 int64_t out_w, float *grad_input);
void avg_pool_2x2_backward_double(const double *grad, int64_t height, int64_t width,
                                  int64_t out_h, int64_t out_w, double *grad_input);

#endif
