/* See im2col.h. The patch rows are short (a 10-wide output row for LeNet-5's second layer):
 * `omp simd` promises the compiler that source and destination never overlap, so each row is
 * a masked vector copy instead of a scalar loop. */
#include "im2col.h"

#include "multiversion.h"

/* Output positions o in [*lo, *hi) with 0 <= o * stride + offset < size. */
static void valid_range(int64_t offset, int64_t stride, int64_t size, int64_t count, int64_t *lo,
                        int64_t *hi) {
    int64_t first = 0, last = count;
    if (offset < 0) first = (-offset + stride - 1) / stride;
    if ((count - 1) * stride + offset >= size)
        last = size - 1 - offset >= 0 ? (size - 1 - offset) / stride + 1 : 0;
    if (first > count) first = count;
    if (last < first) last = first;
    *lo = first;
    *hi = last;
}

#define IM2COL(NAME, T)                                                                        \
    FASTCONV_MULTIVERSION                                                                      \
    void NAME(const T *x, T *cols, const Im2colGeometry *g) {                                  \
        const int64_t positions = g->out_h * g->out_w;                                         \
        for (int64_t c = 0; c < g->channels; c++)                                              \
            for (int64_t i = 0; i < g->kh; i++)                                                \
                for (int64_t j = 0; j < g->kw; j++) {                                          \
                    T *dst = cols + ((c * g->kh + i) * g->kw + j) * positions;                 \
                    int64_t w_off = j * g->dw - g->pw, lo, hi;                                 \
                    valid_range(w_off, g->sw, g->width, g->out_w, &lo, &hi);                   \
                    for (int64_t oh = 0; oh < g->out_h; oh++, dst += g->out_w) {               \
                        int64_t h = oh * g->sh - g->ph + i * g->dh;                            \
                        if (h < 0 || h >= g->height) {                                         \
                            _Pragma("omp simd") for (int64_t ow = 0; ow < g->out_w; ow++)      \
                                dst[ow] = 0;                                                   \
                            continue;                                                          \
                        }                                                                      \
                        const T *row = x + (c * g->height + h) * g->width + w_off;             \
                        for (int64_t ow = 0; ow < lo; ow++) dst[ow] = 0;                       \
                        if (g->sw == 1) {                                                      \
                            _Pragma("omp simd") for (int64_t ow = lo; ow < hi; ow++)           \
                                dst[ow] = row[ow];                                             \
                        } else {                                                               \
                            _Pragma("omp simd") for (int64_t ow = lo; ow < hi; ow++)           \
                                dst[ow] = row[ow * g->sw];                                     \
                        }                                                                      \
                        for (int64_t ow = hi; ow < g->out_w; ow++) dst[ow] = 0;                \
                    }                                                                          \
                }                                                                              \
    }

IM2COL(im2col_float, float)
IM2COL(im2col_double, double)
