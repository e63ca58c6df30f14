/* See max_pool_2x2.h. Compiled per ISA like winograd.c (AVX-512, AVX2, baseline clones). */
#include "max_pool_2x2.h"

#include "multiversion.h"

/* Selects, not branches: on random data "if greater" mispredicts half the time. */
#define MAX_POOL_2X2(NAME, T)                                                                  \
    FASTCONV_MULTIVERSION                                                                      \
    void NAME(const T *x, int64_t width, int64_t out_h, int64_t out_w, T *out,                 \
              int64_t *indices) {                                                              \
        for (int64_t oh = 0; oh < out_h; oh++) {                                               \
            const T *top = x + 2 * oh * width, *bottom = top + width;                          \
            T *o = out + oh * out_w;                                                           \
            if (indices) {                                                                     \
                int64_t *where = indices + oh * out_w, first = 2 * oh * width;                 \
                _Pragma("omp simd") for (int64_t ow = 0; ow < out_w; ow++) {                   \
                    T v[4] = {top[2 * ow], top[2 * ow + 1], bottom[2 * ow], bottom[2 * ow + 1]}; \
                    T best = v[0];                                                             \
                    int64_t at = 0;                                                            \
                    for (int i = 1; i < 4; i++) {                                              \
                        int take = (v[i] > best) | (v[i] != v[i]);                             \
                        best = take ? v[i] : best;                                             \
                        at = take ? i : at;                                                    \
                    }                                                                          \
                    o[ow] = best;                                                              \
                    where[ow] = first + (at >> 1) * width + 2 * ow + (at & 1);                 \
                }                                                                              \
            } else {                                                                           \
                _Pragma("omp simd") for (int64_t ow = 0; ow < out_w; ow++) {                   \
                    T a = top[2 * ow], b = top[2 * ow + 1];                                    \
                    T c = bottom[2 * ow], d = bottom[2 * ow + 1];                              \
                    T ab = b > a ? b : a, cd = d > c ? d : c, best = cd > ab ? cd : ab;        \
                    int nan = (a != a) | (b != b) | (c != c) | (d != d);                       \
                    o[ow] = nan ? (T)(0.0 / 0.0) : best;                                       \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

MAX_POOL_2X2(max_pool_2x2_generic_float, float)
MAX_POOL_2X2(max_pool_2x2_double, double)

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* 8 windows at a time in registers: a masked load of 16 columns per row, one permute splits
 * them into the windows' left and right columns, and the scan-order rule is three compares and
 * blends; the index is built in 64-bit lanes. The vectorised C above ran at ~4 cycles per input
 * (perf: 9% of a LeNet training step). Same values and indices. */
static FASTCONV_AVX512 void max_pool_2x2_avx512(const float *x, int64_t width, int64_t out_h,
                                                int64_t out_w, float *out, int64_t *indices) {
    const __m512i split = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m512i evens = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    for (int64_t oh = 0; oh < out_h; oh++) {
        const float *top = x + 2 * oh * width, *bottom = top + width;
        for (int64_t ow = 0; ow < out_w; ow += 8) {
            const int64_t left = out_w - ow < 8 ? out_w - ow : 8;
            const __mmask16 load = (__mmask16)((1u << (2 * left)) - 1);
            const __mmask8 keep = (__mmask8)((1u << left) - 1);
            __m512 t = _mm512_permutexvar_ps(split, _mm512_maskz_loadu_ps(load, top + 2 * ow));
            __m512 b = _mm512_permutexvar_ps(split, _mm512_maskz_loadu_ps(load, bottom + 2 * ow));
            __m256 v[4] = {_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1),
                           _mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1)};
            __m256 best = v[0];
            __m256i at = _mm256_setzero_si256();
            for (int i = 1; i < 4; i++) { /* greater, or NaN: the first maximum, the last NaN */
                __mmask8 take = _mm256_cmp_ps_mask(v[i], best, _CMP_GT_OQ) |
                                _mm256_cmp_ps_mask(v[i], v[i], _CMP_UNORD_Q);
                best = _mm256_mask_blend_ps(take, best, v[i]);
                at = _mm256_mask_blend_epi32(take, at, _mm256_set1_epi32(i));
            }
            _mm256_mask_storeu_ps(out + oh * out_w + ow, keep, best);
            if (!indices) continue;
            __m512i a = _mm512_cvtepi32_epi64(at);
            __m512i where = _mm512_add_epi64(
                _mm512_add_epi64(_mm512_set1_epi64(2 * oh * width + 2 * ow), evens),
                _mm512_add_epi64(_mm512_and_si512(a, _mm512_set1_epi64(1)),
                                 _mm512_mullo_epi64(_mm512_srli_epi64(a, 1),
                                                    _mm512_set1_epi64(width))));
            _mm512_mask_storeu_epi64(indices + oh * out_w + ow, keep, where);
        }
    }
}
#endif

void max_pool_2x2_float(const float *x, int64_t width, int64_t out_h, int64_t out_w, float *out,
                        int64_t *indices) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx512()) {
        max_pool_2x2_avx512(x, width, out_h, out_w, out, indices);
        return;
    }
#endif
    max_pool_2x2_generic_float(x, width, out_h, out_w, out, indices);
}
