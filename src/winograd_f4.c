/* Winograd F(4x4, 3x3) transforms, AVX-512 only; see winograd.h for the data layout.
 *
 * A tile is 4x4 outputs from a 6x6 input patch: 36 products per tile instead of F(2x2, 3x3)'s
 * 16 per 2x2, 1.78x fewer multiplies, and a quarter fewer floats through the transforms per
 * output. The interpolation points are 0, 1, -1, 2, -1/2 (and infinity): against float64 their
 * float32 error measured 1.2-2.1e-6 x max|y| (8 to 256 channels), 2.5x below the usual
 * 0, +-1, +-2 (3.4-4.7e-6), the points of Barabasz et al.'s error analysis of Winograd.
 *
 *   B^T = [1  3/2  -2  -3/2    1  0]    A^T = [1  1   1  1     1    0]
 *         [0   -1 -5/2  -1/2   1  0]          [0  1  -1  2  -1/2    0]
 *         [0    1  1/2  -5/2   1  0]          [0  1   1  4   1/4    0]
 *         [0 -1/2   -1   1/2   1  0]          [0  1  -1  8  -1/8    1]
 *         [0    2   -1    -2   1  0]
 *         [0    1  3/2    -2 -3/2 1]    G: rows w0, -(w0+w1+w2)/3, (w0-w1+w2)/3,
 *                                          (w0+2w1+4w2)/15, (-16w0+8w1-4w2)/15, w2
 *
 * Rows of tiles have tiles_w slots (no dummy slot: the transforms work a tile row at a time,
 * 8 tiles per step, in registers). Without AVX-512 the F(2x2, 3x3) path runs instead.
 */
#include "winograd.h"

#include "multiversion.h"

int64_t winograd4_slots(const WinogradGeometry *g, int64_t rows) { return rows * g->tiles_w; }

/* u[p][k][c] = (G w[k][c] G^T)[p], p = 6i + j; flip: of w[c][k][2-i][2-j], u (36, C, K). In
 * double, rounded once: 1/3 and 1/15 are not exact in float. */
static void filter_transform(const float *w, double u[36]) {
    const double third = 1.0 / 3, fifteenth = 1.0 / 15; /* products: a division is 4x slower */
    double t[6][3];
    for (int j = 0; j < 3; j++) {
        double w0 = w[j], w1 = w[3 + j], w2 = w[6 + j];
        t[0][j] = w0;
        t[1][j] = -(w0 + w1 + w2) * third;
        t[2][j] = (w0 - w1 + w2) * third;
        t[3][j] = (w0 + 2 * w1 + 4 * w2) * fifteenth;
        t[4][j] = (-16 * w0 + 8 * w1 - 4 * w2) * fifteenth;
        t[5][j] = w2;
    }
    for (int i = 0; i < 6; i++) {
        double w0 = t[i][0], w1 = t[i][1], w2 = t[i][2];
        double *row = u + 6 * i;
        row[0] = w0;
        row[1] = -(w0 + w1 + w2) * third;
        row[2] = (w0 - w1 + w2) * third;
        row[3] = (w0 + 2 * w1 + 4 * w2) * fifteenth;
        row[4] = (-16 * w0 + 8 * w1 - 4 * w2) * fifteenth;
        row[5] = w2;
    }
}

void winograd4_weight_transform(const float *w, int64_t out_channels, int64_t channels, int flip,
                                float *u) {
    const int64_t plane = out_channels * channels;
    for (int64_t k = 0; k < out_channels; k++)
        for (int64_t c = 0; c < channels; c++) {
            const float *f = w + (k * channels + c) * 9;
            float filter[9];
            for (int i = 0; i < 9; i++) filter[i] = flip ? f[8 - i] : f[i];
            double t[36];
            filter_transform(filter, t);
            const int64_t at = flip ? c * out_channels + k : k * channels + c;
            for (int p = 0; p < 36; p++) u[p * plane + at] = (float)t[p];
        }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

int winograd4_available(void) { return cpu_has_avx512(); }

/* B^T over six rows (or columns) of vectors; GCC's vector operators, so one macro serves the
 * 16-float rows and the 8-tile columns, contracted into multiply-adds. */
#define INPUT_POINTS(d, t)                                                                    \
    do {                                                                                      \
        t[0] = d[0] + d[4] - 2.0f * d[2] + 1.5f * (d[1] - d[3]);                            \
        t[1] = d[4] - d[1] - 2.5f * d[2] - 0.5f * d[3];                                      \
        t[2] = d[4] + d[1] + 0.5f * d[2] - 2.5f * d[3];                                      \
        t[3] = d[4] - d[2] + 0.5f * (d[3] - d[1]);                                           \
        t[4] = d[4] - d[2] + 2.0f * (d[1] - d[3]);                                           \
        t[5] = d[5] + d[1] - 2.0f * d[3] + 1.5f * (d[2] - d[4]);                             \
    } while (0)

#define OUTPUT_POINTS(m, o)                                                                   \
    do {                                                                                      \
        o[0] = m[0] + m[1] + m[2] + m[3] + m[4];                                             \
        o[1] = (m[1] - m[2]) + 2.0f * m[3] - 0.5f * m[4];                                    \
        o[2] = (m[1] + m[2]) + 4.0f * m[3] + 0.25f * m[4];                                   \
        o[3] = (m[1] - m[2]) + 8.0f * m[3] - 0.125f * m[4] + m[5];                           \
    } while (0)

/* The six image rows of a tile row at staged columns j0 .. j0 + 16 * loads (masked: zeros
 * outside the image, so padding needs no copy), B^T down the columns: t[s][i], point row i. */
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));

static inline FASTCONV_AVX512 void input_rows4(const float *const d[6], int64_t j0, int64_t lo,
                                               int64_t hi, int loads, v16 t[3][6]) {
    for (int s = 0; s < loads; s++) {
        const __mmask16 mask = columns_mask(j0 + 16 * s, lo, hi);
        v16 rows[6];
        for (int i = 0; i < 6; i++)
            rows[i] = d[i] ? (v16)_mm512_maskz_loadu_ps(mask, d[i] + j0 + 16 * s)
                           : (v16)_mm512_setzero_ps();
        INPUT_POINTS(rows, t[s]);
    }
}

static inline void image_rows4(const float *x, const WinogradGeometry *g, int64_t image,
                               int64_t tile_row, int64_t c, const float *d[6]) {
    const float *plane = x + (image * g->channels + c) * g->height * g->width;
    for (int i = 0; i < 6; i++) {
        int64_t y = 4 * tile_row - g->pad_h + i;
        d[i] = y >= 0 && y < g->height ? plane + y * g->width - g->pad_w : NULL;
    }
}

/* B^T across a point row's 8 tile columns (lanes), stored to the 6 points of row i. */
static inline FASTCONV_AVX512 void store_points4(v8 col[6], float *out, int64_t point_stride,
                                                 int i, __mmask8 keep, __mmask8 keep_next,
                                                 int64_t next_offset) {
    v8 t[6];
    INPUT_POINTS(col, t);
    for (int j = 0; j < 6; j++) {
        float *dst = out + (6 * i + j) * point_stride;
        /* rows of exactly 4 tiles: the paired row's slots follow on, one store */
        _mm256_mask_storeu_ps(dst, next_offset ? keep : keep | keep_next, (__m256)t[j]);
        if (keep_next && next_offset)
            _mm256_mask_storeu_ps(dst + next_offset, keep_next, (__m256)t[j]);
    }
}

/* v[p][c][slot] for the block's tiles, 8 at a time: B^T down the columns of the image rows in
 * 16-wide vectors, then two-source permutes pick each tile's columns 4q + j into 8 lanes, and
 * B^T across them. Rows of 4 tiles or fewer (outputs up to 16 wide) go two to a step, lanes
 * 0-3 and 4-7, or half of every vector would idle. */
static FASTCONV_AVX512 void input_transform4(const float *x, const WinogradGeometry *g,
                                             int64_t first_row, int64_t rows, float *v,
                                             int64_t ld) {
    const int64_t point_stride = g->channels * ld, tw = g->tiles_w;
    const int64_t lo = g->pad_w, hi = g->width + g->pad_w; /* image columns, staged */
    const int paired = tw <= 4;
    __m512i pick[6], pick_second[6];
    for (int j = 0; j < 6; j++) {
        int idx[16] = {0}, second[16] = {0};
        for (int q = 0; q < 8; q++) {
            idx[q] = (4 * q + j) & 31; /* 32, 33: tile 7's, from the third load */
            second[q] = 4 * (q & 3) + j; /* the second row's tiles 0-3 in lanes 4-7 */
        }
        pick[j] = _mm512_loadu_si512(idx);
        pick_second[j] = _mm512_loadu_si512(second);
    }
    for (int64_t c = 0; c < g->channels; c++) {
        int64_t image = first_row / g->tiles_h, tile_row = first_row % g->tiles_h;
        for (int64_t lr = 0; lr < rows; lr += paired ? 2 : 1) {
            const float *d[6];
            image_rows4(x, g, image, tile_row, c, d);
            if (++tile_row == g->tiles_h) tile_row = 0, image++;
            float *out = v + c * ld + lr * tw;
            if (paired) {
                const int has_next = lr + 1 < rows;
                v16 t[3][6], u[3][6];
                input_rows4(d, 0, lo, hi, 2, t);
                if (has_next) {
                    image_rows4(x, g, image, tile_row, c, d);
                    if (++tile_row == g->tiles_h) tile_row = 0, image++;
                    input_rows4(d, 0, lo, hi, 2, u);
                }
                const __mmask8 keep = first_lanes8(tw);
                const __mmask8 keep_next = has_next ? (__mmask8)(keep << 4) : 0;
                for (int i = 0; i < 6; i++) {
                    v8 col[6];
                    for (int j = 0; j < 6; j++) {
                        __m512 r = _mm512_permutex2var_ps((__m512)t[0][i], pick[j], (__m512)t[1][i]);
                        if (has_next)
                            r = _mm512_mask_blend_ps(0xf0, r, _mm512_permutex2var_ps(
                                (__m512)u[0][i], pick_second[j], (__m512)u[1][i]));
                        col[j] = (v8)_mm512_castps512_ps256(r);
                    }
                    store_points4(col, out, point_stride, i, keep, keep_next, tw - 4);
                }
                continue;
            }
            for (int64_t q0 = 0; q0 < tw; q0 += 8) {
                v16 t[3][6];
                input_rows4(d, 4 * q0, lo, hi, 3, t);
                for (int i = 0; i < 6; i++) {
                    v8 col[6];
                    for (int j = 0; j < 6; j++) {
                        __m512 r = _mm512_permutex2var_ps((__m512)t[0][i], pick[j], (__m512)t[1][i]);
                        if (j >= 4) /* tile 7's columns 32, 33 */
                            r = _mm512_mask_permutexvar_ps(r, 0x80, pick[j], (__m512)t[2][i]);
                        col[j] = (v8)_mm512_castps512_ps256(r);
                    }
                    store_points4(col, out + q0, point_stride, i, first_lanes8(tw - q0), 0, 0);
                }
            }
        }
    }
    /* the products run whole vectors past the last slot: zeros there, never garbage */
    const int64_t slots = winograd4_slots(g, rows), padded = winograd_padded(slots);
    for (int64_t r = 0; r < 36 * g->channels; r++)
        for (int64_t j = slots; j < padded; j++) v[r * ld + j] = 0;
}

/* A^T down each of the six columns of points of 8 slots (lanes `live` from at, lanes
 * `live_next` from at + next_offset: the paired rows), s[r][j]: output row r, point column j. */
static inline FASTCONV_AVX512 void output_rows4(const float *at, int64_t ps, __mmask8 live,
                                                __mmask8 live_next, int64_t next_offset,
                                                v8 s[4][6]) {
#pragma GCC unroll 6
    for (int j = 0; j < 6; j++) {
        v8 col[6], o[4];
#pragma GCC unroll 6
        for (int i = 0; i < 6; i++) {
            const float *p = at + (6 * i + j) * ps;
            __m256 value = _mm256_maskz_loadu_ps(next_offset ? live : live | live_next, p);
            if (live_next && next_offset)
                value = _mm256_mask_loadu_ps(value, live_next, p + next_offset);
            col[i] = (v8)value;
        }
        OUTPUT_POINTS(col, o);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) s[r][j] = o[r];
    }
}

/* out[n][k] = A^T m A (+ bias[k]), 8 tiles at a time (or two rows of up to 4): A^T down, then
 * across, and two permutes interleave each output row's 4 x 8 values into 2 x 16 columns: the
 * first 16 for tiles 0-3, the rest for tiles 4-7 (or the paired row's 0-3). */
static FASTCONV_AVX512 void output_transform4(const float *m, int64_t ld, int64_t out_channels,
                                              const WinogradGeometry *g, int64_t first_row,
                                              int64_t rows, const float *bias, float *out) {
    const int64_t ps = out_channels * ld, tw = g->tiles_w, plane_size = g->out_h * g->out_w;
    const int paired = tw <= 4;
    const __m512i first16 = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11,
                                              19, 27);
    const __m512i second16 = _mm512_add_epi32(first16, _mm512_set1_epi32(4));
    for (int64_t k = 0; k < out_channels; k++) {
        const float *q = m + k * ld;
        const v8 b = (v8)_mm256_set1_ps(bias ? bias[k] : 0.0f);
        int64_t image = first_row / g->tiles_h, tile_row = first_row % g->tiles_h;
        for (int64_t lr = 0; lr < rows; lr += paired ? 2 : 1) {
            float *plane = out + (image * out_channels + k) * plane_size;
            const int64_t y0 = 4 * tile_row;
            if (++tile_row == g->tiles_h) tile_row = 0, image++;
            float *next_plane = NULL;
            int64_t next_y0 = 0;
            if (paired && lr + 1 < rows) {
                next_plane = out + (image * out_channels + k) * plane_size;
                next_y0 = 4 * tile_row;
                if (++tile_row == g->tiles_h) tile_row = 0, image++;
            }
            for (int64_t q0 = 0; q0 < tw; q0 += 8) {
                const __mmask8 live = first_lanes8(tw - q0);
                const __mmask8 live_next = next_plane ? (__mmask8)(live << 4) : 0;
                v8 s[4][6];
                output_rows4(q + lr * tw + q0, ps, live, live_next, tw - 4, s);
                const int64_t columns = g->out_w - 4 * q0;
                const __mmask16 left = columns_mask(0, 0, columns);
                const __mmask16 right = paired ? left : columns_mask(16, 0, columns);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    v8 o[4];
                    OUTPUT_POINTS(s[r], o);
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) o[j] += b;
                    __m512 lo01 = _mm512_insertf32x8(_mm512_castps256_ps512((__m256)o[0]),
                                                     (__m256)o[1], 1);
                    __m512 hi23 = _mm512_insertf32x8(_mm512_castps256_ps512((__m256)o[2]),
                                                     (__m256)o[3], 1);
                    __m512 first = _mm512_permutex2var_ps(lo01, first16, hi23);
                    __m512 second = _mm512_permutex2var_ps(lo01, second16, hi23);
                    if (y0 + r < g->out_h)
                        _mm512_mask_storeu_ps(plane + (y0 + r) * g->out_w + 4 * q0, left, first);
                    if (!paired) {
                        if (y0 + r < g->out_h)
                            _mm512_mask_storeu_ps(plane + (y0 + r) * g->out_w + 4 * q0 + 16,
                                                  right, second);
                    } else if (next_plane && next_y0 + r < g->out_h) {
                        _mm512_mask_storeu_ps(next_plane + (next_y0 + r) * g->out_w, right, second);
                    }
                }
            }
        }
    }
}

void winograd4_input_transform(const float *x, const WinogradGeometry *g, int64_t first_row,
                               int64_t rows, float *v, int64_t ld) {
    input_transform4(x, g, first_row, rows, v, ld);
}

void winograd4_output_transform(const float *m, int64_t ld, int64_t out_channels,
                                const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                const float *bias, float *out) {
    output_transform4(m, ld, out_channels, g, first_row, rows, bias, out);
}

#else /* no AVX-512 kernels in this build: callers check winograd4_available() */
int winograd4_available(void) { return 0; }

void winograd4_input_transform(const float *x, const WinogradGeometry *g, int64_t first_row,
                               int64_t rows, float *v, int64_t ld) {
    (void)x, (void)g, (void)first_row, (void)rows, (void)v, (void)ld;
}

void winograd4_output_transform(const float *m, int64_t ld, int64_t out_channels,
                                const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                const float *bias, float *out) {
    (void)m, (void)ld, (void)out_channels, (void)g, (void)first_row, (void)rows, (void)bias,
        (void)out;
}
#endif
