# cython: language_level=3
"""Batch normalisation, forward and backward, one channel per task.

Arguments are trusted (fastconv.functional validated them). x is (N, C, L): every axis after the
channel flattened. Sums accumulate in double; the statistics take two passes over the channel
(mean, then squared deviations) as torch does, and the normalised input is never stored: the
backward pass recomputes it from x, the mean and 1/std.
"""

from cython.parallel cimport prange
from libc.math cimport sqrt

from common cimport real

# Sums use eight partial accumulators: one running double sum is a chain of dependent adds
# (4 cycles each) that the compiler may not reorder; eight independent ones keep the FPU busy.

cdef inline double _sum(const real *a, Py_ssize_t n) noexcept nogil:
    cdef double s[8]
    cdef Py_ssize_t i, k
    for k in range(8):
        s[k] = 0
    for i in range(0, n - 7, 8):
        for k in range(8):
            s[k] += a[i + k]
    for i in range(n - n % 8, n):
        s[0] += a[i]
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


cdef inline double _sum_squared_deviations(const real *a, Py_ssize_t n, double m) noexcept nogil:
    cdef double s[8]
    cdef double d
    cdef Py_ssize_t i, k
    for k in range(8):
        s[k] = 0
    for i in range(0, n - 7, 8):
        for k in range(8):
            d = a[i + k] - m
            s[k] += d * d
    for i in range(n - n % 8, n):
        d = a[i] - m
        s[0] += d * d
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


cdef inline double _dot_deviations(const real *g, const real *a, Py_ssize_t n,
                                   double m) noexcept nogil:
    """sum(g * (a - m))"""
    cdef double s[8]
    cdef Py_ssize_t i, k
    for k in range(8):
        s[k] = 0
    for i in range(0, n - 7, 8):
        for k in range(8):
            s[k] += g[i + k] * (a[i + k] - m)
    for i in range(n - n % 8, n):
        s[0] += g[i] * (a[i] - m)
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


def batch_norm_forward(const real[:, :, ::1] x, real[:, :, ::1] out, const real[::1] weight,
                       const real[::1] bias, double[::1] mean, double[::1] var,
                       double[::1] invstd, bint use_batch_stats, double eps, int num_threads):
    """out = (x - mean) * invstd * weight + bias per channel.

    With use_batch_stats, mean and var (biased) are computed here and written out; otherwise
    they are read (the running statistics). invstd is written either way. weight/bias have
    length C, or 0 for none.
    """
    cdef Py_ssize_t n_count = x.shape[0], channels = x.shape[1], length = x.shape[2]
    cdef Py_ssize_t c, n, i
    cdef double total, scale, shift, m
    for c in prange(channels, nogil=True, schedule="static", num_threads=num_threads):
        if use_batch_stats:
            total = 0
            for n in range(n_count):
                total = total + _sum(&x[n, c, 0], length)
            m = total / (n_count * length)
            total = 0
            for n in range(n_count):
                total = total + _sum_squared_deviations(&x[n, c, 0], length, m)
            mean[c] = m
            var[c] = total / (n_count * length)
        invstd[c] = 1 / sqrt(var[c] + eps)
        scale = invstd[c] * (weight[c] if weight.shape[0] > 0 else 1)
        shift = (bias[c] if bias.shape[0] > 0 else 0) - mean[c] * scale
        for n in range(n_count):
            for i in range(length):
                out[n, c, i] = <real>(x[n, c, i] * scale + shift)


def batch_norm_backward(const real[:, :, ::1] grad, const real[:, :, ::1] x,
                        const real[::1] weight, const double[::1] mean,
                        const double[::1] invstd, real[:, :, ::1] grad_input,
                        double[::1] grad_weight, double[::1] grad_bias, bint use_batch_stats,
                        bint want_input, int num_threads):
    """grad_bias = sum(grad), grad_weight = sum(grad * xhat); grad_input if want_input.

    With batch statistics the mean and variance depend on x, which subtracts their share:
    grad_input = scale * (grad - grad_bias / count - xhat * grad_weight / count).
    """
    cdef Py_ssize_t n_count = x.shape[0], channels = x.shape[1], length = x.shape[2]
    cdef Py_ssize_t c, n, i
    cdef double sum_grad, sum_grad_xhat, m, s, scale, count = n_count * length
    cdef double g_mean, gx_mean
    for c in prange(channels, nogil=True, schedule="static", num_threads=num_threads):
        m = mean[c]
        s = invstd[c]
        sum_grad = 0
        sum_grad_xhat = 0
        for n in range(n_count):
            sum_grad = sum_grad + _sum(&grad[n, c, 0], length)
            sum_grad_xhat = sum_grad_xhat + _dot_deviations(&grad[n, c, 0], &x[n, c, 0], length, m)
        sum_grad_xhat = sum_grad_xhat * s
        grad_bias[c] = sum_grad
        grad_weight[c] = sum_grad_xhat
        if not want_input:
            continue
        scale = s * (weight[c] if weight.shape[0] > 0 else 1)
        if use_batch_stats:
            g_mean = sum_grad / count
            gx_mean = sum_grad_xhat / count
            for n in range(n_count):
                for i in range(length):
                    grad_input[n, c, i] = <real>(
                        scale * (grad[n, c, i] - g_mean - (x[n, c, i] - m) * s * gx_mean))
        else:
            for n in range(n_count):
                for i in range(length):
                    grad_input[n, c, i] = <real>(scale * grad[n, c, i])
