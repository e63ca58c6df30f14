/* Winograd F(2x2, 3x3) transforms; see winograd.h for the data layout.
 *
 * The transforms are additions only and memory-bound: each one stages a row of tiles in a
 * small buffer, combines whole rows (contiguous, so the compiler vectorises them), then splits
 * the row into tiles. On x86-64 with GCC or clang every function is compiled three times
 * (AVX-512, AVX2, baseline SSE2) and the loader picks the best one for the CPU, so one build
 * runs everywhere.
 *
 *   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]      A^T = [1 1 1 0; 0 1 -1 -1]
 */
#include <string.h>

#include "winograd.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FASTCONV_MULTIVERSION \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCONV_MULTIVERSION
#endif

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* A run of tiles on one tile row of one image: the unit every transform stages. */
typedef struct {
    int64_t image, tile_row, first_column, tiles, offset; /* offset: of the run in the block */
} TileRun;

static TileRun next_run(const WinogradGeometry *g, int64_t tile, int64_t end, int64_t first) {
    TileRun r;
    int64_t per_image = g->tiles_h * g->tiles_w, within = tile % per_image;
    r.image = tile / per_image;
    r.tile_row = within / g->tiles_w;
    r.first_column = within % g->tiles_w;
    r.tiles = min64(g->tiles_w - r.first_column, end - tile);
    r.offset = tile - first;
    return r;
}

int64_t winograd_stage_size(const WinogradGeometry *g) {
    /* four rows of the widest run (2 * tiles_w + 2 columns), rounded for alignment */
    return 4 * ((2 * g->tiles_w + 2 + 15) / 16 * 16);
}

static int64_t stage_stride(const WinogradGeometry *g) { return winograd_stage_size(g) / 4; }

FASTCONV_MULTIVERSION
void winograd_input_transform(const float *x, const WinogradGeometry *g, int64_t first,
                              int64_t count, float *v, int64_t ld, float *stage) {
    const int64_t span = stage_stride(g), point_stride = g->channels * ld;
    for (int64_t tile = first; tile < first + count;) {
        TileRun r = next_run(g, tile, first + count, first);
        int64_t col0 = 2 * r.first_column - g->pad_w, width = 2 * r.tiles + 2;
        int64_t lo = min64(max64(0, -col0), width);
        int64_t hi = max64(lo, min64(width, g->width - col0));
        for (int64_t c = 0; c < g->channels; c++) {
            const float *plane = x + (r.image * g->channels + c) * g->height * g->width;
            float *row[4];
            for (int i = 0; i < 4; i++) {
                int64_t y = 2 * r.tile_row - g->pad_h + i;
                row[i] = stage + i * span;
                if (y < 0 || y >= g->height) {
                    memset(row[i], 0, width * sizeof(float));
                    continue;
                }
                memset(row[i], 0, lo * sizeof(float));
                memcpy(row[i] + lo, plane + y * g->width + col0 + lo, (hi - lo) * sizeof(float));
                memset(row[i] + hi, 0, (width - hi) * sizeof(float));
            }
            /* B^T d: combine the four rows, column by column */
            for (int64_t j = 0; j < width; j++) {
                float d0 = row[0][j], d1 = row[1][j], d2 = row[2][j], d3 = row[3][j];
                row[0][j] = d0 - d2;
                row[1][j] = d1 + d2;
                row[2][j] = d2 - d1;
                row[3][j] = d1 - d3;
            }
            /* (B^T d) B: each tile's four columns 2m .. 2m+3 */
            float *out = v + c * ld + r.offset;
            for (int i = 0; i < 4; i++) {
                const float *s = row[i];
                float *p0 = out + (4 * i) * point_stride, *p1 = p0 + point_stride;
                float *p2 = p1 + point_stride, *p3 = p2 + point_stride;
                for (int64_t m = 0; m < r.tiles; m++) {
                    float a = s[2 * m], b = s[2 * m + 1], e = s[2 * m + 2], f = s[2 * m + 3];
                    p0[m] = a - e;
                    p1[m] = b + e;
                    p2[m] = e - b;
                    p3[m] = b - f;
                }
            }
        }
        tile += r.tiles;
    }
}

FASTCONV_MULTIVERSION
void winograd_output_transform(const float *m, int64_t ld, int64_t out_channels,
                               const WinogradGeometry *g, int64_t first, int64_t count,
                               const float *bias, float *out, float *stage) {
    const int64_t span = stage_stride(g), ps = out_channels * ld;
    for (int64_t tile = first; tile < first + count;) {
        TileRun r = next_run(g, tile, first + count, first);
        int64_t y = 2 * r.tile_row, x0 = 2 * r.first_column;
        int64_t columns = min64(2 * r.tiles, g->out_w - x0);
        for (int64_t k = 0; k < out_channels; k++) {
            const float *q = m + k * ld + r.offset;
            float b = bias ? bias[k] : 0.0f;
            float *top = stage, *bottom = stage + span;
            for (int64_t t = 0; t < r.tiles; t++) {
                float s0[4], s1[4];
                for (int j = 0; j < 4; j++) { /* A^T m: rows */
                    float m0 = q[j * ps + t], m1 = q[(4 + j) * ps + t];
                    float m2 = q[(8 + j) * ps + t], m3 = q[(12 + j) * ps + t];
                    s0[j] = m0 + m1 + m2;
                    s1[j] = m1 - m2 - m3;
                }
                top[2 * t] = s0[0] + s0[1] + s0[2] + b;
                top[2 * t + 1] = s0[1] - s0[2] - s0[3] + b;
                bottom[2 * t] = s1[0] + s1[1] + s1[2] + b;
                bottom[2 * t + 1] = s1[1] - s1[2] - s1[3] + b;
            }
            float *dst = out + ((r.image * out_channels + k) * g->out_h + y) * g->out_w + x0;
            memcpy(dst, top, columns * sizeof(float));
            if (y + 1 < g->out_h) memcpy(dst + g->out_w, bottom, columns * sizeof(float));
        }
        tile += r.tiles;
    }
}

FASTCONV_MULTIVERSION
void winograd_grad_transform(const float *grad, int64_t out_channels, const WinogradGeometry *g,
                             int64_t first, int64_t count, float *m, int64_t ld, float *stage) {
    const int64_t span = stage_stride(g), ps = out_channels * ld;
    for (int64_t tile = first; tile < first + count;) {
        TileRun r = next_run(g, tile, first + count, first);
        int64_t y = 2 * r.tile_row, x0 = 2 * r.first_column;
        int64_t columns = min64(2 * r.tiles, g->out_w - x0);
        for (int64_t k = 0; k < out_channels; k++) {
            const float *src = grad + ((r.image * out_channels + k) * g->out_h + y) * g->out_w + x0;
            float *top = stage, *bottom = stage + span;
            /* the tile's 2x2 gradient, zero past the output's edge */
            memcpy(top, src, columns * sizeof(float));
            memset(top + columns, 0, (2 * r.tiles - columns) * sizeof(float));
            if (y + 1 < g->out_h) {
                memcpy(bottom, src + g->out_w, columns * sizeof(float));
                memset(bottom + columns, 0, (2 * r.tiles - columns) * sizeof(float));
            } else {
                memset(bottom, 0, 2 * r.tiles * sizeof(float));
            }
            float *q = m + k * ld + r.offset;
            for (int64_t t = 0; t < r.tiles; t++) {
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
        tile += r.tiles;
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
