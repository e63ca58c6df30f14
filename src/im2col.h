/* im2col of one image: cols[(c, i, j)][(oh, ow)] = x[c][oh*sh - ph + i*dh][ow*sw - pw + j*dw],
 * zero outside the image (torch's unfold). Loops the compiler vectorises, per-ISA clones. */
#ifndef FASTCONV_IM2COL_H
#define FASTCONV_IM2COL_H

#include <stdint.h>

typedef struct {
    int64_t channels, height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w;
} Im2colGeometry;

void im2col_float(const float *x, float *cols, const Im2colGeometry *g);
void im2col_double(const double *x, double *cols, const Im2colGeometry *g);

#endif
