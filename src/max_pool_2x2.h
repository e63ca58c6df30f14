/* Max pooling with 2x2 windows, stride 2, of one plane: the shape every small CNN uses, with
 * torch's rules (the first maximum in scan order, a NaN winning: the last NaN), in loops the
 * compiler vectorises. indices (flat positions in the plane) may be NULL. */
#ifndef FASTCONV_MAX_POOL_2X2_H
#define FASTCONV_MAX_POOL_2X2_H

#include <stdint.h>

void max_pool_2x2_float(const float *x, int64_t width, int64_t out_h, int64_t out_w, float *out,
                        int64_t *indices);
void max_pool_2x2_double(const double *x, int64_t width, int64_t out_h, int64_t out_w,
                         double *out, int64_t *indices);

#endif
