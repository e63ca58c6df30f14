/* Winograd F(2x2, 3x3) transforms for 3x3, stride-1 convolution (Lavin & Gray, 2015).
 *
 * A tile is 2x2 outputs computed from a 4x4 input patch. Rows of tiles are numbered across the
 * whole batch (image * tiles_h + tile row), and every function works on a block of `rows`
 * consecutive rows starting at `first_row`, so a thread transforms, multiplies and writes back
 * one cache-sized block at a time. A block has winograd_slots(g, rows) tile slots: tiles_w + 1
 * per row, the last a dummy (see winograd.c).
 *
 * The 16 points of a transformed tile are the rows of the batched product: the input transform
 * writes v[point][channel][slot], the output transform reads m[point][out channel][slot], both
 * with a leading dimension `ld` >= slots between rows.
 */
#ifndef FASTCONV_WINOGRAD_H
#define FASTCONV_WINOGRAD_H

#include <stdint.h>

typedef struct {
    int64_t channels, height, width;   /* of the image being transformed */
    int64_t pad_h, pad_w;
    int64_t out_h, out_w;              /* of the convolution's output */
    int64_t tiles_h, tiles_w;          /* ceil(out / 2) */
} WinogradGeometry;

/* Tile slots of a block of `rows` rows, and the floats of scratch its transforms need. */
int64_t winograd_slots(const WinogradGeometry *g, int64_t rows);
int64_t winograd_stage_size(const WinogradGeometry *g, int64_t rows);

/* v[p][c][t] = (B^T d B)[p] for the input patch d of the block's slot t, channel c. */
void winograd_input_transform(const float *x, const WinogradGeometry *g, int64_t first_row,
                              int64_t rows, float *v, int64_t ld, float *stage);

/* out[n][k] tiles = A^T m A (+ bias[k]), clipped to the output's edge. */
void winograd_output_transform(const float *m, int64_t ld, int64_t out_channels,
                               const WinogradGeometry *g, int64_t first_row, int64_t rows,
                               const float *bias, float *out, float *stage);

/* The output transform fused with max pooling 2x2 / 2 (see winograd.c); indices may be NULL. */
void winograd_output_max_pool(const float *m, int64_t ld, int64_t out_channels,
                              const WinogradGeometry *g, int64_t first_row, int64_t rows,
                              const float *bias, float *pooled, int64_t *indices, float *stage);

/* The adjoint of the output transform: m[p][k][t] = (A dY A^T)[p] for the output gradient dY of
 * slot t (zero past the output's edge). */
void winograd_grad_transform(const float *grad, int64_t out_channels, const WinogradGeometry *g,
                             int64_t first_row, int64_t rows, float *m, int64_t ld,
                             float *stage);

/* Slots rounded up to whole vectors: the columns the products run over (the transforms zero
 * the padding). ld must be at least this. */
int64_t winograd_padded(int64_t slots);

/* The filters' transform u = G w G^T, (16, C_out, C_in); flip: of the flipped, transposed
 * filters (16, C_in, C_out), the input gradient's. And its adjoint, the weight gradient. */
void winograd_weight_transform(const float *w, int64_t out_channels, int64_t channels,
                               int flip, float *u);
void winograd_weight_grad_transform(const float *du, int64_t out_channels, int64_t channels,
                                    float *grad_w);

/* Which compiled variant of the transforms this CPU runs. */
const char *winograd_isa(void);

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "multiversion.h"

/* Load and store masks of the AVX-512 transforms: staged columns [first, first + 16) that lie
 * in [lo, hi), and the first `count` of 8 lanes (none when count <= 0). */
static inline FASTCONV_AVX512 __mmask16 columns_mask(int64_t first, int64_t lo, int64_t hi) {
    int64_t a = lo - first, b = hi - first;
    a = a < 0 ? 0 : (a > 16 ? 16 : a);
    b = b < a ? a : (b > 16 ? 16 : b);
    return (__mmask16)(((1u << b) - 1) & ~((1u << a) - 1));
}

static inline __mmask8 first_lanes8(int64_t count) {
    return (__mmask8)(count >= 8 ? 0xff : (count <= 0 ? 0 : (1u << count) - 1));
}
#endif

/* F(4x4, 3x3) (winograd_f4.c): 4x4 tiles (tiles_h, tiles_w = ceil(out / 4)) from 6x6 patches,
 * 36 points p = 6i + j, tiles_w slots per row of tiles (no dummy). AVX-512 only: where
 * winograd4_available() is 0 the transforms do nothing. */
int winograd4_available(void);
int64_t winograd4_slots(const WinogradGeometry *g, int64_t rows);
void winograd4_input_transform(const float *x, const WinogradGeometry *g, int64_t first_row,
                               int64_t rows, float *v, int64_t ld);
void winograd4_output_transform(const float *m, int64_t ld, int64_t out_channels,
                                const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                const float *bias, float *out);
void winograd4_weight_transform(const float *w, int64_t out_channels, int64_t channels, int flip,
                                float *u);

#endif
