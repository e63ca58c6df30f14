/* See pointwise.h. Compiled per ISA like winograd.c (AVX-512, AVX2, baseline clones); every
 * load is unconditional and every choice a select, so the loops vectorise. */
#include "pointwise.h"

#include "multiversion.h"

/* x - x is 0 for a finite value and NaN for an inf or a NaN: summed in any order it stays 0
 * exactly when all are finite, so the sum may be reordered into vectors. */
#define POINTWISE(T)                                                                           \
    FASTCONV_MULTIVERSION                                                                      \
    int all_finite_##T(const T *x, int64_t n) {                                                \
        T s = 0;                                                                               \
        _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; i++) s += x[i] - x[i]; \
        return s == 0;                                                                         \
    }                                                                                          \
                                                                                               \
    FASTCONV_MULTIVERSION                                                                      \
    double sum_##T(const T *x, int64_t n) {                                                    \
        double s = 0;                                                                          \
        _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; i++) s += x[i];        \
        return s;                                                                              \
    }                                                                                          \
                                                                                               \
    FASTCONV_MULTIVERSION                                                                      \
    void relu_##T(const T *x, T *out, int64_t n) {                                             \
        _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {                                  \
            T v = x[i];                                                                        \
            out[i] = v <= 0 ? (T)0 : v;                                                        \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    FASTCONV_MULTIVERSION                                                                      \
    void relu_backward_##T(const T *grad, const T *out, T *grad_input, int64_t n) {            \
        _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {                                  \
            T g = grad[i];                                                                     \
            grad_input[i] = out[i] <= 0 ? (T)0 : g;                                            \
        }                                                                                      \
    }

POINTWISE(float)
POINTWISE(double)
