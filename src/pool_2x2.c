/* See pool_2x2.h. Compiled per ISA like winograd.c (AVX-512, AVX2, baseline clones). */
#include "pool_2x2.h"

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

/* Average pooling 2x2/2: torch sums each window in scan order, then divides by 4 (exactly the
 * product with 0.25). The backward spreads a quarter of each gradient over its window and zeroes
 * the rows and columns no window covers (an odd height or width). */
#define AVG_POOL_2X2(NAME, BACKWARD, T)                                                        \
    FASTCONV_MULTIVERSION                                                                      \
    void NAME(const T *x, int64_t width, int64_t out_h, int64_t out_w, T *out) {               \
        for (int64_t oh = 0; oh < out_h; oh++) {                                               \
            const T *top = x + 2 * oh * width, *bottom = top + width;                          \
            T *o = out + oh * out_w;                                                           \
            _Pragma("omp simd") for (int64_t ow = 0; ow < out_w; ow++) o[ow] =                 \
                (top[2 * ow] + top[2 * ow + 1] + bottom[2 * ow] + bottom[2 * ow + 1]) * (T)0.25; \
        }                                                                                      \
    }                                                                                          \
    FASTCONV_MULTIVERSION                                                                      \
    void BACKWARD(const T *grad, int64_t height, int64_t width, int64_t out_h, int64_t out_w,  \
                  T *grad_input) {                                                             \
        for (int64_t oh = 0; oh < out_h; oh++) {                                               \
            T *top = grad_input + 2 * oh * width, *bottom = top + width;                       \
            const T *g = grad + oh * out_w;                                                    \
            _Pragma("omp simd") for (int64_t ow = 0; ow < out_w; ow++) {                       \
                T share = g[ow] * (T)0.25;                                                     \
                top[2 * ow] = top[2 * ow + 1] = bottom[2 * ow] = bottom[2 * ow + 1] = share;   \
            }                                                                                  \
            for (int64_t w = 2 * out_w; w < width; w++) top[w] = bottom[w] = 0;                \
        }                                                                                      \
        for (int64_t i = 2 * out_h * width; i < height * width; i++) grad_input[i] = 0;        \
    }

AVG_POOL_2X2(avg_pool_2x2_generic_float, avg_pool_2x2_backward_generic_float, float)
AVG_POOL_2X2(avg_pool_2x2_double, avg_pool_2x2_backward_double, double)

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
            __m256i at;
            __m256 best = window_max_avx512(v, &at);
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
/* 16 windows at a time: two loads per row, and a two-source permute splits them into the
 * windows' left and right columns. The generic loops above gather with scalar shuffles. */
static FASTCONV_AVX512 void avg_pool_2x2_avx512(const float *x, int64_t width, int64_t out_h,
                                                int64_t out_w, float *out) {
    const __m512i left_columns = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22,
                                                   24, 26, 28, 30);
    const __m512i right_columns = _mm512_add_epi32(left_columns, _mm512_set1_epi32(1));
    const __m512 quarter = _mm512_set1_ps(0.25f);
    for (int64_t oh = 0; oh < out_h; oh++) {
        const float *top = x + 2 * oh * width, *bottom = top + width;
        for (int64_t ow = 0; ow < out_w; ow += 16) {
            const int64_t count = out_w - ow < 16 ? out_w - ow : 16, inputs = 2 * count;
            const __mmask16 first = (__mmask16)(inputs >= 16 ? 0xffff : (1u << inputs) - 1);
            const __mmask16 second = (__mmask16)(inputs > 16 ? (1u << (inputs - 16)) - 1 : 0);
            const __m512 t0 = _mm512_maskz_loadu_ps(first, top + 2 * ow);
            const __m512 t1 = _mm512_maskz_loadu_ps(second, top + 2 * ow + 16);
            const __m512 b0 = _mm512_maskz_loadu_ps(first, bottom + 2 * ow);
            const __m512 b1 = _mm512_maskz_loadu_ps(second, bottom + 2 * ow + 16);
            __m512 sum = _mm512_add_ps(_mm512_permutex2var_ps(t0, left_columns, t1),
                                       _mm512_permutex2var_ps(t0, right_columns, t1));
            sum = _mm512_add_ps(sum, _mm512_permutex2var_ps(b0, left_columns, b1));
            sum = _mm512_add_ps(sum, _mm512_permutex2var_ps(b0, right_columns, b1));
            _mm512_mask_storeu_ps(out + oh * out_w + ow, (__mmask16)((1u << count) - 1),
                                  _mm512_mul_ps(sum, quarter));
        }
    }
}

static FASTCONV_AVX512 void avg_pool_2x2_backward_avx512(const float *grad, int64_t height,
                                                         int64_t width, int64_t out_h,
                                                         int64_t out_w, float *grad_input) {
    const __m512i first_pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i second_pairs = _mm512_add_epi32(first_pairs, _mm512_set1_epi32(8));
    const __m512 quarter = _mm512_set1_ps(0.25f);
    for (int64_t oh = 0; oh < out_h; oh++) {
        float *top = grad_input + 2 * oh * width, *bottom = top + width;
        for (int64_t ow = 0; ow < out_w; ow += 16) {
            const int64_t count = out_w - ow < 16 ? out_w - ow : 16, inputs = 2 * count;
            const __mmask16 first = (__mmask16)(inputs >= 16 ? 0xffff : (1u << inputs) - 1);
            const __mmask16 second = (__mmask16)(inputs > 16 ? (1u << (inputs - 16)) - 1 : 0);
            const __m512 share = _mm512_mul_ps(
                _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), grad + oh * out_w + ow),
                quarter);
            const __m512 lo = _mm512_permutexvar_ps(first_pairs, share);
            const __m512 hi = _mm512_permutexvar_ps(second_pairs, share);
            _mm512_mask_storeu_ps(top + 2 * ow, first, lo);
            _mm512_mask_storeu_ps(top + 2 * ow + 16, second, hi);
            _mm512_mask_storeu_ps(bottom + 2 * ow, first, lo);
            _mm512_mask_storeu_ps(bottom + 2 * ow + 16, second, hi);
        }
        for (int64_t w = 2 * out_w; w < width; w++) top[w] = bottom[w] = 0;
    }
    for (int64_t i = 2 * out_h * width; i < height * width; i++) grad_input[i] = 0;
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

void avg_pool_2x2_float(const float *x, int64_t width, int64_t out_h, int64_t out_w, float *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx512()) {
        avg_pool_2x2_avx512(x, width, out_h, out_w, out);
        return;
    }
#endif
    avg_pool_2x2_generic_float(x, width, out_h, out_w, out);
}

void avg_pool_2x2_backward_float(const float *grad, int64_t height, int64_t width, int64_t out_h,
                                 int64_t out_w, float *grad_input) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx512()) {
        avg_pool_2x2_backward_avx512(grad, height, width, out_h, out_w, grad_input);
        return;
    }
#endif
    avg_pool_2x2_backward_generic_float(grad, height, width, out_h, out_w, grad_input);
}
