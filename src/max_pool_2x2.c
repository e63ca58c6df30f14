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

MAX_POOL_2X2(max_pool_2x2_float, float)
MAX_POOL_2X2(max_pool_2x2_double, double)
