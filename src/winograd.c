/* Winograd F(2x2, 3x3) transforms; see winograd.h for the data layout.
 *
 * The transforms are additions only and memory-bound: each stages the block's rows of tiles in
 * flat buffers and combines them in long contiguous loops the compiler vectorises. On x86-64
 * Linux with GCC or clang every function is compiled three times (AVX-512, AVX2, baseline
 * SSE2; see multiversion.h).
 *
 *   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]      A^T = [1 1 1 0; 0 1 -1 -1]
 */
#include "winograd.h"

#include "multiversion.h"
#include "pool_2x2.h"

/* The inner loops are short (a row of tiles) and write through several pointers: without the
 * promise that they do not overlap, GCC keeps them scalar. */
#define VECTORIZE _Pragma("omp simd")

/* Columns [slots, padded) of every row of a product operand, so the products can run whole
 * vectors past the block's last slot (zeros, never uninitialised memory: a NaN there would
 * reach the weight gradient through 0 * NaN). */
int64_t winograd_padded(int64_t slots);

static void zero_tail(float *rows, int64_t count, int64_t ld, int64_t slots) {
    int64_t padded = winograd_padded(slots);
    for (int64_t r = 0; r < count; r++)
        for (int64_t j = slots; j < padded; j++) rows[r * ld + j] = 0;
}

static inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* A row of tiles has tiles_w + 1 slots: the last, a dummy, lets each transform run as one long
 * loop over the whole block (slot q reads staged columns 2q .. 2q + 3 of a flat array whose rows
 * are 2 * (tiles_w + 1) wide) instead of many short loops over one tile row each. The products
 * compute the dummy too (1 / (tiles_w + 1) extra work); the output transform never writes it, and
 * the gradient transform makes it zero, so it adds nothing to the weight gradient (for finite
 * inputs: an inf or NaN spreads over its tiles, as in every Winograd transform). */
static int64_t row_span(const WinogradGeometry *g) { return 2 * (g->tiles_w + 1); }

int64_t winograd_slots(const WinogradGeometry *g, int64_t rows) { return rows * (g->tiles_w + 1); }

int64_t winograd_padded(int64_t slots) { return (slots + 15) / 16 * 16; }

int64_t winograd_stage_size(const WinogradGeometry *g, int64_t rows) {
    return 4 * (rows * row_span(g) + 4);
}

/* Image and tile row of a row of tiles, walked in order (no division per row). */
typedef struct {
    int64_t image, tile_row;
} RowCursor;

static RowCursor cursor_at(const WinogradGeometry *g, int64_t row) {
    RowCursor r = {row / g->tiles_h, row % g->tiles_h};
    return r;
}

static void advance(const WinogradGeometry *g, RowCursor *r) {
    if (++r->tile_row == g->tiles_h) {
        r->tile_row = 0;
        r->image++;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* The input transform with both passes in registers, 8 slots at a time: per tile row and
 * channel, masked loads of the four image rows (zeros outside the image, no staging copy),
 * B^T d down the columns, then two permutes give each slot's columns 2q .. 2q + 3 and (B^T d) B
 * is four adds. The portable version below stages every pass through memory, which made the
 * transform cost as much as the products. Same values, slot for slot. */
static FASTCONV_AVX512 void input_transform_avx512(const float *x, const WinogradGeometry *g,
                                                   int64_t first_row, int64_t rows, float *v,
                                                   int64_t ld) {
    const int64_t span = row_span(g), per_row = g->tiles_w + 1;
    const int64_t point_stride = g->channels * ld, plane_size = g->height * g->width;
    const int64_t lo = clamp64(g->pad_w, 0, span), hi = clamp64(g->width + g->pad_w, lo, span);
    /* lanes 0-7: columns 2q, lanes 8-15: 2q + 2 (of the 32 in A, B); odd: 2q + 1, 2q + 3 */
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 2, 4, 6, 8, 10, 12, 14, 16);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 3, 5, 7, 9, 11, 13, 15, 17);
    for (int64_t c = 0; c < g->channels; c++) { /* a channel's 16 rows of v stream out */
        RowCursor r = cursor_at(g, first_row);
        for (int64_t lr = 0; lr < rows; lr++, advance(g, &r)) {
            const float *plane = x + (r.image * g->channels + c) * plane_size;
            const float *d[4];
            for (int i = 0; i < 4; i++) {
                int64_t y = 2 * r.tile_row - g->pad_h + i;
                d[i] = y >= 0 && y < g->height ? plane + y * g->width - g->pad_w : NULL;
            }
            float *out = v + c * ld + lr * per_row;
            for (int64_t q0 = 0; q0 < per_row; q0 += 8) {
                const int64_t j0 = 2 * q0; /* staged columns j0 .. j0 + 31 */
                const __mmask16 ma = columns_mask(j0, lo, hi), mb = columns_mask(j0 + 16, lo, hi);
                __m512 a[4], b[4];
                for (int i = 0; i < 4; i++) {
                    a[i] = d[i] ? _mm512_maskz_loadu_ps(ma, d[i] + j0) : _mm512_setzero_ps();
                    b[i] = d[i] ? _mm512_maskz_loadu_ps(mb, d[i] + j0 + 16) : _mm512_setzero_ps();
                }
                __m512 ta[4] = {a[0] - a[2], a[1] + a[2], a[2] - a[1], a[1] - a[3]};
                __m512 tb[4] = {b[0] - b[2], b[1] + b[2], b[2] - b[1], b[1] - b[3]};
                const __mmask8 keep = (__mmask8)(per_row - q0 >= 8 ? 0xff : (1u << (per_row - q0)) - 1);
                for (int i = 0; i < 4; i++) {
                    __m512 ae = _mm512_permutex2var_ps(ta[i], even, tb[i]);
                    __m512 bf = _mm512_permutex2var_ps(ta[i], odd, tb[i]);
                    __m256 s0 = _mm512_castps512_ps256(ae), s2 = _mm512_extractf32x8_ps(ae, 1);
                    __m256 s1 = _mm512_castps512_ps256(bf), s3 = _mm512_extractf32x8_ps(bf, 1);
                    float *p = out + (4 * i) * point_stride + q0;
                    _mm256_mask_storeu_ps(p, keep, _mm256_sub_ps(s0, s2));
                    _mm256_mask_storeu_ps(p + point_stride, keep, _mm256_add_ps(s1, s2));
                    _mm256_mask_storeu_ps(p + 2 * point_stride, keep, _mm256_sub_ps(s2, s1));
                    _mm256_mask_storeu_ps(p + 3 * point_stride, keep, _mm256_sub_ps(s1, s3));
                }
            }
        }
    }
    zero_tail(v, 16 * g->channels, ld, winograd_slots(g, rows));
}
#endif

FASTCONV_MULTIVERSION
static void input_transform_generic(const float *x, const WinogradGeometry *g, int64_t first_row,
                              int64_t rows, float *v, int64_t ld, float *stage) {
    const int64_t span = row_span(g), slots = winograd_slots(g, rows);
    const int64_t point_stride = g->channels * ld, plane_size = g->height * g->width;
    /* staged input column j is image column j - pad_w: inside the image for j in [lo, hi) */
    const int64_t lo = clamp64(g->pad_w, 0, span), hi = clamp64(g->width + g->pad_w, lo, span);
    float *vertical[4];
    for (int i = 0; i < 4; i++) {
        vertical[i] = stage + i * (rows * span + 4);
        for (int j = 0; j < 4; j++) vertical[i][rows * span + j] = 0; /* the dummy's overread */
    }
    static const float zeros[1] = {0}; /* stands for a row above or below the image */
    for (int64_t c = 0; c < g->channels; c++) {
        RowCursor r = cursor_at(g, first_row);
        for (int64_t lr = 0; lr < rows; lr++, advance(g, &r)) {
            const float *plane = x + (r.image * g->channels + c) * plane_size;
            const float *d[4]; /* d[i][j]: row i of the patches, staged column j */
            int64_t step[4];
            for (int i = 0; i < 4; i++) {
                int64_t y = 2 * r.tile_row - g->pad_h + i;
                int inside = y >= 0 && y < g->height;
                d[i] = inside ? plane + y * g->width - g->pad_w : zeros;
                step[i] = inside;
            }
            float *v0 = vertical[0] + lr * span, *v1 = vertical[1] + lr * span;
            float *v2 = vertical[2] + lr * span, *v3 = vertical[3] + lr * span;
            for (int64_t j = 0; j < lo; j++) v0[j] = v1[j] = v2[j] = v3[j] = 0;
            /* B^T d, column by column, straight from the image (zero rows read one zero) */
            const float *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
            const int64_t s0 = step[0], s1 = step[1], s2 = step[2], s3 = step[3];
            if (s0 & s1 & s2 & s3) {
                VECTORIZE
                for (int64_t j = lo; j < hi; j++) {
                    v0[j] = d0[j] - d2[j];
                    v1[j] = d1[j] + d2[j];
                    v2[j] = d2[j] - d1[j];
                    v3[j] = d1[j] - d3[j];
                }
            } else {
                for (int64_t j = lo; j < hi; j++) {
                    float e0 = d0[j * s0], e1 = d1[j * s1], e2 = d2[j * s2], e3 = d3[j * s3];
                    v0[j] = e0 - e2;
                    v1[j] = e1 + e2;
                    v2[j] = e2 - e1;
                    v3[j] = e1 - e3;
                }
            }
            for (int64_t j = hi; j < span; j++) v0[j] = v1[j] = v2[j] = v3[j] = 0;
        }
        float *out = v + c * ld;
        for (int i = 0; i < 4; i++) { /* (B^T d) B: slot q's columns 2q .. 2q + 3 */
            const float *s = vertical[i];
            float *p0 = out + (4 * i) * point_stride, *p1 = p0 + point_stride;
            float *p2 = p1 + point_stride, *p3 = p2 + point_stride;
            VECTORIZE
            for (int64_t q = 0; q < slots; q++) {
                float a = s[2 * q], b = s[2 * q + 1], e = s[2 * q + 2], f = s[2 * q + 3];
                p0[q] = a - e;
                p1[q] = b + e;
                p2[q] = e - b;
                p3[q] = b - f;
            }
        }
    }
    zero_tail(v, 16 * g->channels, ld, slots);
}

void winograd_input_transform(const float *x, const WinogradGeometry *g, int64_t first_row,
                              int64_t rows, float *v, int64_t ld, float *stage) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx512()) {
        input_transform_avx512(x, g, first_row, rows, v, ld);
        return;
    }
#endif
    input_transform_generic(x, g, first_row, rows, v, ld, stage);
}

FASTCONV_MULTIVERSION
static void output_transform_generic(const float *m, int64_t ld, int64_t out_channels,
                                     const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                     const float *bias, float *out, float *stage) {
    const int64_t span = row_span(g), slots = winograd_slots(g, rows), ps = out_channels * ld;
    float *top = stage, *bottom = stage + rows * span;
    for (int64_t k = 0; k < out_channels; k++) {
        const float *q = m + k * ld;
        const float b = bias ? bias[k] : 0.0f;
        VECTORIZE
        for (int64_t t = 0; t < slots; t++) {
            float s0[4], s1[4];
            for (int j = 0; j < 4; j++) { /* A^T m: rows */
                float m0 = q[j * ps + t], m1 = q[(4 + j) * ps + t];
                float m2 = q[(8 + j) * ps + t], m3 = q[(12 + j) * ps + t];
                s0[j] = m0 + m1 + m2;
                s1[j] = m1 - m2 - m3;
            }
            top[2 * t] = s0[0] + s0[1] + s0[2] + b; /* (A^T m) A: columns */
            top[2 * t + 1] = s0[1] - s0[2] - s0[3] + b;
            bottom[2 * t] = s1[0] + s1[1] + s1[2] + b;
            bottom[2 * t + 1] = s1[1] - s1[2] - s1[3] + b;
        }
        RowCursor r = cursor_at(g, first_row);
        for (int64_t lr = 0; lr < rows; lr++, advance(g, &r)) {
            int64_t y = 2 * r.tile_row;
            float *dst = out + ((r.image * out_channels + k) * g->out_h + y) * g->out_w;
            const float *upper = top + lr * span, *lower = bottom + lr * span;
            VECTORIZE
            for (int64_t j = 0; j < g->out_w; j++) dst[j] = upper[j];
            if (y + 1 < g->out_h)
                VECTORIZE
                for (int64_t j = 0; j < g->out_w; j++) dst[g->out_w + j] = lower[j];
        }
    }
}

/* Max pooling 2x2, stride 2, of the output, while it is in registers: a tile is exactly one
 * pooling window. pooled (N, K, out_h / 2, out_w / 2) gets the window's max (+ bias) and,
 * unless indices is NULL, torch's index of it in the output plane: the first maximum in scan
 * order, a NaN winning (the last NaN). */
FASTCONV_MULTIVERSION
static void output_max_pool_generic(const float *m, int64_t ld, int64_t out_channels,
                                    const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                    const float *bias, float *pooled, int64_t *indices,
                                    float *stage) {
    const int64_t span = row_span(g), slots = winograd_slots(g, rows), ps = out_channels * ld;
    const int64_t pooled_h = g->out_h / 2, pooled_w = g->out_w / 2;
    float *best = stage;
    int32_t *where = (int32_t *)(stage + rows * span); /* 0..3: which of the window's four */
    for (int64_t k = 0; k < out_channels; k++) {
        const float *q = m + k * ld;
        const float b = bias ? bias[k] : 0.0f;
        VECTORIZE
        for (int64_t t = 0; t < slots; t++) {
            float s0[4], s1[4];
            for (int j = 0; j < 4; j++) {
                float m0 = q[j * ps + t], m1 = q[(4 + j) * ps + t];
                float m2 = q[(8 + j) * ps + t], m3 = q[(12 + j) * ps + t];
                s0[j] = m0 + m1 + m2;
                s1[j] = m1 - m2 - m3;
            }
            float y[4] = {s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3], s1[0] + s1[1] + s1[2],
                          s1[1] - s1[2] - s1[3]};
            float top = y[0];
            int32_t at = 0;
            for (int i = 1; i < 4; i++) {
                int take = y[i] > top || y[i] != y[i];
                top = take ? y[i] : top;
                at = take ? i : at;
            }
            best[t] = top + b;
            where[t] = at;
        }
        RowCursor r = cursor_at(g, first_row);
        for (int64_t lr = 0; lr < rows; lr++, advance(g, &r)) {
            if (r.tile_row >= pooled_h) continue; /* the odd last output row: no full window */
            int64_t plane = (r.image * out_channels + k) * pooled_h * pooled_w;
            float *dst = pooled + plane + r.tile_row * pooled_w;
            const float *row_best = best + lr * (g->tiles_w + 1);
            VECTORIZE
            for (int64_t j = 0; j < pooled_w; j++) dst[j] = row_best[j];
            if (!indices) continue;
            int64_t *idx = indices + plane + r.tile_row * pooled_w;
            const int32_t *row_where = where + lr * (g->tiles_w + 1);
            for (int64_t j = 0; j < pooled_w; j++) {
                int64_t a = row_where[j] >> 1, c = row_where[j] & 1;
                idx[j] = (2 * r.tile_row + a) * g->out_w + 2 * j + c;
            }
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* A^T m A of 8 slots from slot t on (masked: lanes past `live` read nothing), in the portable
 * kernels' order of additions, so the values are the same bit for bit: y[0..3] are the tiles'
 * outputs (0, 0), (0, 1), (1, 0), (1, 1). */
static inline FASTCONV_AVX512 void output_tiles_avx512(const float *q, int64_t ps, int64_t t,
                                                       __mmask8 live, __m256 y[4]) {
    __m256 s0[4], s1[4];
    for (int j = 0; j < 4; j++) {
        __m256 m0 = _mm256_maskz_loadu_ps(live, q + j * ps + t);
        __m256 m1 = _mm256_maskz_loadu_ps(live, q + (4 + j) * ps + t);
        __m256 m2 = _mm256_maskz_loadu_ps(live, q + (8 + j) * ps + t);
        __m256 m3 = _mm256_maskz_loadu_ps(live, q + (12 + j) * ps + t);
        s0[j] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
        s1[j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
    }
    y[0] = _mm256_add_ps(_mm256_add_ps(s0[0], s0[1]), s0[2]);
    y[1] = _mm256_sub_ps(_mm256_sub_ps(s0[1], s0[2]), s0[3]);
    y[2] = _mm256_add_ps(_mm256_add_ps(s1[0], s1[1]), s1[2]);
    y[3] = _mm256_sub_ps(_mm256_sub_ps(s1[1], s1[2]), s1[3]);
}

/* The output transform straight from the products to the output rows, 8 tiles at a time: one
 * permute interleaves a row's left and right outputs into 16 columns. The portable version
 * stages the rows through memory and copies them out (perf: 16% of a forward's time). */
static FASTCONV_AVX512 void output_transform_avx512(const float *m, int64_t ld,
                                                    int64_t out_channels,
                                                    const WinogradGeometry *g, int64_t first_row,
                                                    int64_t rows, const float *bias, float *out) {
    const int64_t ps = out_channels * ld, per_row = g->tiles_w + 1;
    const __m512i interleave =
        _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    for (int64_t k = 0; k < out_channels; k++) {
        const float *q = m + k * ld;
        const __m256 b = _mm256_set1_ps(bias ? bias[k] : 0.0f);
        RowCursor r = cursor_at(g, first_row);
        for (int64_t lr = 0; lr < rows; lr++, advance(g, &r)) {
            const int64_t y = 2 * r.tile_row;
            float *dst = out + ((r.image * out_channels + k) * g->out_h + y) * g->out_w;
            for (int64_t q0 = 0; q0 < g->tiles_w; q0 += 8) {
                __m256 t[4];
                output_tiles_avx512(q, ps, lr * per_row + q0, first_lanes8(g->tiles_w - q0), t);
                const int64_t columns = g->out_w - 2 * q0;
                const __mmask16 keep = (__mmask16)(columns >= 16 ? 0xffff : (1u << columns) - 1);
                __m512 upper = _mm512_permutex2var_ps(
                    _mm512_castps256_ps512(_mm256_add_ps(t[0], b)), interleave,
                    _mm512_castps256_ps512(_mm256_add_ps(t[1], b)));
                _mm512_mask_storeu_ps(dst + 2 * q0, keep, upper);
                if (y + 1 < g->out_h) {
                    __m512 lower = _mm512_permutex2var_ps(
                        _mm512_castps256_ps512(_mm256_add_ps(t[2], b)), interleave,
                        _mm512_castps256_ps512(_mm256_add_ps(t[3], b)));
                    _mm512_mask_storeu_ps(dst + g->out_w + 2 * q0, keep, lower);
                }
            }
        }
    }
}

/* The fused output transform and max pooling, 8 windows at a time: a tile row is a pooled
 * row, so the maxima are stored as they are, no interleaving. Same rules and values as the
 * portable version. */
static FASTCONV_AVX512 void output_max_pool_avx512(const float *m, int64_t ld,
                                                   int64_t out_channels,
                                                   const WinogradGeometry *g, int64_t first_row,
                                                   int64_t rows, const float *bias,
                                                   float *pooled, int64_t *indices) {
    const int64_t ps = out_channels * ld, per_row = g->tiles_w + 1;
    const int64_t pooled_h = g->out_h / 2, pooled_w = g->out_w / 2;
    const __m512i evens = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    for (int64_t k = 0; k < out_channels; k++) {
        const float *q = m + k * ld;
        const __m256 b = _mm256_set1_ps(bias ? bias[k] : 0.0f);
        RowCursor r = cursor_at(g, first_row);
        for (int64_t lr = 0; lr < rows; lr++, advance(g, &r)) {
            if (r.tile_row >= pooled_h) continue; /* the odd last output row: no full window */
            const int64_t at_row = (r.image * out_channels + k) * pooled_h * pooled_w +
                                   r.tile_row * pooled_w;
            for (int64_t q0 = 0; q0 < pooled_w; q0 += 8) {
                const __mmask8 keep = first_lanes8(pooled_w - q0);
                __m256 y[4];
                output_tiles_avx512(q, ps, lr * per_row + q0, keep, y);
                __m256i at;
                __m256 top = window_max_avx512(y, &at);
                _mm256_mask_storeu_ps(pooled + at_row + q0, keep, _mm256_add_ps(top, b));
                if (!indices) continue;
                __m512i a = _mm512_cvtepi32_epi64(at);
                __m512i where = _mm512_add_epi64(
                    _mm512_add_epi64(_mm512_set1_epi64(2 * r.tile_row * g->out_w + 2 * q0), evens),
                    _mm512_add_epi64(_mm512_and_si512(a, _mm512_set1_epi64(1)),
                                     _mm512_mullo_epi64(_mm512_srli_epi64(a, 1),
                                                        _mm512_set1_epi64(g->out_w))));
                _mm512_mask_storeu_epi64(indices + at_row + q0, keep, where);
            }
        }
    }
}
#endif

void winograd_output_transform(const float *m, int64_t ld, int64_t out_channels,
                               const WinogradGeometry *g, int64_t first_row, int64_t rows,
                               const float *bias, float *out, float *stage) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx512()) {
        output_transform_avx512(m, ld, out_channels, g, first_row, rows, bias, out);
        return;
    }
#endif
    output_transform_generic(m, ld, out_channels, g, first_row, rows, bias, out, stage);
}

void winograd_output_max_pool(const float *m, int64_t ld, int64_t out_channels,
                              const WinogradGeometry *g, int64_t first_row, int64_t rows,
                              const float *bias, float *pooled, int64_t *indices,
                              float *stage) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx512()) {
        output_max_pool_avx512(m, ld, out_channels, g, first_row, rows, bias, pooled, indices);
        return;
    }
#endif
    output_max_pool_generic(m, ld, out_channels, g, first_row, rows, bias, pooled, indices,
                            stage);
}

#if defined(__x86_64__) && defined(__GNUC__)
/* The gradient transform in registers, 8 slots at a time: masked loads of a tile row's two
 * gradient rows (zeros past the output's edge, so the dummy slot is zero), one permute splits
 * each into its tiles' left and right columns, and A (.) A^T is adds. The portable version
 * stages the rows through memory (perf: 18% of a weight gradient's time). Same values. */
static FASTCONV_AVX512 void grad_transform_avx512(const float *grad, int64_t out_channels,
                                                  const WinogradGeometry *g, int64_t first_row,
                                                  int64_t rows, float *m, int64_t ld) {
    const int64_t per_row = g->tiles_w + 1, ps = out_channels * ld;
    /* lanes 0-7: the tiles' left columns 2q, lanes 8-15: their right columns 2q + 1 */
    const __m512i split = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t k = 0; k < out_channels; k++) {
        RowCursor r = cursor_at(g, first_row);
        for (int64_t lr = 0; lr < rows; lr++, advance(g, &r)) {
            const int64_t y = 2 * r.tile_row;
            const float *top = grad + ((r.image * out_channels + k) * g->out_h + y) * g->out_w;
            const float *bottom = y + 1 < g->out_h ? top + g->out_w : NULL;
            float *q = m + k * ld + lr * per_row;
            for (int64_t q0 = 0; q0 < per_row; q0 += 8) {
                const __mmask16 inside = columns_mask(2 * q0, 0, g->out_w);
                __m512 t = _mm512_permutexvar_ps(split, _mm512_maskz_loadu_ps(inside, top + 2 * q0));
                __m512 b = bottom ? _mm512_permutexvar_ps(
                                        split, _mm512_maskz_loadu_ps(inside, bottom + 2 * q0))
                                  : _mm512_setzero_ps();
                __m256 t0 = _mm512_castps512_ps256(t), t1 = _mm512_extractf32x8_ps(t, 1);
                __m256 b0 = _mm512_castps512_ps256(b), b1 = _mm512_extractf32x8_ps(b, 1);
                __m256 a[4] = {t0, t0 + t1, t0 - t1, -t1};
                __m256 c[4] = {b0, b0 + b1, b0 - b1, -b1};
                const __mmask8 keep = (__mmask8)(per_row - q0 >= 8 ? 0xff : (1u << (per_row - q0)) - 1);
                for (int j = 0; j < 4; j++) {
                    _mm256_mask_storeu_ps(q + j * ps + q0, keep, a[j]);
                    _mm256_mask_storeu_ps(q + (4 + j) * ps + q0, keep, a[j] + c[j]);
                    _mm256_mask_storeu_ps(q + (8 + j) * ps + q0, keep, a[j] - c[j]);
                    _mm256_mask_storeu_ps(q + (12 + j) * ps + q0, keep, -c[j]);
                }
            }
        }
    }
    zero_tail(m, 16 * out_channels, ld, winograd_slots(g, rows));
}
#endif

FASTCONV_MULTIVERSION
static void grad_transform_generic(const float *grad, int64_t out_channels,
                                   const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                   float *m, int64_t ld, float *stage) {
    const int64_t span = row_span(g), slots = winograd_slots(g, rows), ps = out_channels * ld;
    float *top = stage, *bottom = stage + rows * span;
    for (int64_t k = 0; k < out_channels; k++) {
        RowCursor r = cursor_at(g, first_row); /* the gradient, zero past the output's edge */
        for (int64_t lr = 0; lr < rows; lr++, advance(g, &r)) {
            int64_t y = 2 * r.tile_row;
            const float *src = grad + ((r.image * out_channels + k) * g->out_h + y) * g->out_w;
            float *upper = top + lr * span, *lower = bottom + lr * span;
            VECTORIZE
            for (int64_t j = 0; j < g->out_w; j++) upper[j] = src[j];
            VECTORIZE
            for (int64_t j = g->out_w; j < span; j++) upper[j] = 0;
            if (y + 1 < g->out_h) {
                VECTORIZE
                for (int64_t j = 0; j < g->out_w; j++) lower[j] = src[g->out_w + j];
                VECTORIZE
                for (int64_t j = g->out_w; j < span; j++) lower[j] = 0;
            } else {
                VECTORIZE
                for (int64_t j = 0; j < span; j++) lower[j] = 0;
            }
        }
        float *q = m + k * ld;
        VECTORIZE
        for (int64_t t = 0; t < slots; t++) {
            float g00 = top[2 * t], g01 = top[2 * t + 1];
            float g10 = bottom[2 * t], g11 = bottom[2 * t + 1];
            /* dY A^T per row, then A (.) down the columns */
            float a[4] = {g00, g00 + g01, g00 - g01, -g01};
            float c[4] = {g10, g10 + g11, g10 - g11, -g11};
            for (int j = 0; j < 4; j++) {
                q[j * ps + t] = a[j];
                q[(4 + j) * ps + t] = a[j] + c[j];
                q[(8 + j) * ps + t] = a[j] - c[j];
                q[(12 + j) * ps + t] = -c[j];
            }
        }
    }
    zero_tail(m, 16 * out_channels, ld, slots);
}

void winograd_grad_transform(const float *grad, int64_t out_channels, const WinogradGeometry *g,
                             int64_t first_row, int64_t rows, float *m, int64_t ld,
                             float *stage) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx512()) {
        grad_transform_avx512(grad, out_channels, g, first_row, rows, m, ld);
        return;
    }
#endif
    grad_transform_generic(grad, out_channels, g, first_row, rows, m, ld, stage);
}

/* u[p][k][c] = (G w[k][c] G^T)[p]; with flip, of w's flipped transpose w[c][k][2-i][2-j]
 * instead (the input gradient's filters), u then being (16, C, K).
 *   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1] */
void winograd_weight_transform(const float *w, int64_t out_channels, int64_t channels,
                               int flip, float *u) {
    const int64_t rows = flip ? channels : out_channels, cols = flip ? out_channels : channels;
    for (int64_t k = 0; k < out_channels; k++)
        for (int64_t c = 0; c < channels; c++) {
            const float *f = w + (k * channels + c) * 9;
            float g[3][3], t[4][3];
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 3; j++) g[i][j] = flip ? f[(2 - i) * 3 + 2 - j] : f[i * 3 + j];
            for (int j = 0; j < 3; j++) { /* G g */
                t[0][j] = g[0][j];
                t[1][j] = 0.5f * (g[0][j] + g[1][j] + g[2][j]);
                t[2][j] = 0.5f * (g[0][j] - g[1][j] + g[2][j]);
                t[3][j] = g[2][j];
            }
            float *out = u + (flip ? c * cols + k : k * cols + c);
            const int64_t ps = rows * cols;
            for (int i = 0; i < 4; i++) { /* (G g) G^T */
                out[(4 * i) * ps] = t[i][0];
                out[(4 * i + 1) * ps] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
                out[(4 * i + 2) * ps] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
                out[(4 * i + 3) * ps] = t[i][2];
            }
        }
}

/* The adjoint of winograd_weight_transform (no flip): grad_w[k][c] = G^T du[k][c] G. */
void winograd_weight_grad_transform(const float *du, int64_t out_channels, int64_t channels,
                                    float *grad_w) {
    const int64_t ps = out_channels * channels;
    for (int64_t k = 0; k < out_channels; k++)
        for (int64_t c = 0; c < channels; c++) {
            const float *d = du + k * channels + c;
            float t[4][3];
            for (int i = 0; i < 4; i++) { /* du G */
                float d0 = d[(4 * i) * ps], d1 = d[(4 * i + 1) * ps];
                float d2 = d[(4 * i + 2) * ps], d3 = d[(4 * i + 3) * ps];
                t[i][0] = d0 + 0.5f * (d1 + d2);
                t[i][1] = 0.5f * (d1 - d2);
                t[i][2] = 0.5f * (d1 + d2) + d3;
            }
            float *out = grad_w + (k * channels + c) * 9;
            for (int j = 0; j < 3; j++) { /* G^T (du G) */
                out[j] = t[0][j] + 0.5f * (t[1][j] + t[2][j]);
                out[3 + j] = 0.5f * (t[1][j] - t[2][j]);
                out[6 + j] = 0.5f * (t[1][j] + t[2][j]) + t[3][j];
            }
        }
}

const char *winograd_isa(void) {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
    if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA)";
    return "x86-64 (SSE2)";
#else
    return "portable C";
#endif
}
