/* Element-wise loops over one thread's share of a flat array (see _pointwise.pyx). */
#ifndef FASTCONV_POINTWISE_H
#define FASTCONV_POINTWISE_H

#include <stdint.h>

/* Whether x[0:n] holds no inf and no NaN. */
int all_finite_float(const float *x, int64_t n);
int all_finite_double(const double *x, int64_t n);

/* x[0] + ... + x[n - 1] in double (in vector-wide partial sums). */
double sum_float(const float *x, int64_t n);
double sum_double(const double *x, int64_t n);

/* out = max(x, 0), a NaN staying NaN. */
void relu_float(const float *x, float *out, int64_t n);
void relu_double(const double *x, double *out, int64_t n);

/* grad_input = 0 where out <= 0, else grad (a NaN output passes its gradient, as torch's). */
void relu_backward_float(const float *grad, const float *out, float *grad_input, int64_t n);
void relu_backward_double(const double *grad, const double *out, double *grad_input, int64_t n);

#endif
