/* Pooling with 2x2 windows, stride 2, of one plane, every window inside it: the shape every
 * small CNN uses, with torch's rules. Max: the first maximum in scan order, a NaN winning (the
 * last NaN); indices (flat positions in the plane) may be NULL. Average: the window's sum in
 * scan order over 4; its backward writes the whole input plane. */
#ifndef FASTCONV_POOL_2X2_H
#define FASTCONV_POOL_2X2_H

#include <stdint.h>

void max_pool_2x2_float(const float *x, int64_t width, int64_t out_h, int64_t out_w, float *out,
                        int64_t *indices);
void max_pool_2x2_double(const double *x, int64_t width, int64_t out_h, int64_t out_w,
                         double *out, int64_t *indices);

void avg_pool_2x2_float(const float *x, int64_t width, int64_t out_h, int64_t out_w, float *out);
void avg_pool_2x2_double(const double *x, int64_t width, int64_t out_h, int64_t out_w,
                         double *out);
void avg_pool_2x2_backward_float(const float *grad, int64_t height, int64_t width, int64_t out_h,
                                 int64_t out_w, float *grad_input);
void avg_pool_2x2_backward_double(const double *grad, int64_t height, int64_t width,
                                  int64_t out_h, int64_t out_w, double *grad_input);

#endif
