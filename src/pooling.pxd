# Max pooling of one plane, shared by the pooling kernels and the fused convolution + pooling
# kernel (fastconv._conv), which pools each sample's output while it is still in cache.

from libc.math cimport INFINITY, NAN
from libc.stdint cimport int64_t

from common cimport real, valid_range

cdef extern from "pool_2x2.h":
    void max_pool_2x2_float(const float *x, int64_t width, int64_t out_h, int64_t out_w,
                            float *out, int64_t *indices) noexcept nogil
    void max_pool_2x2_double(const double *x, int64_t width, int64_t out_h, int64_t out_w,
                             double *out, int64_t *indices) noexcept nogil
    void avg_pool_2x2_float(const float *x, int64_t width, int64_t out_h, int64_t out_w,
                            float *out) noexcept nogil
    void avg_pool_2x2_double(const double *x, int64_t width, int64_t out_h, int64_t out_w,
                             double *out) noexcept nogil
    void avg_pool_2x2_backward_float(const float *grad, int64_t height, int64_t width,
                                     int64_t out_h, int64_t out_w, float *grad_input) noexcept nogil
    void avg_pool_2x2_backward_double(const double *grad, int64_t height, int64_t width,
                                      int64_t out_h, int64_t out_w, double *grad_input) noexcept nogil


cdef struct Pool:
    Py_ssize_t height, width, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw
    bint count_include_pad


cdef inline Pool make_pool(Py_ssize_t height, Py_ssize_t width, Py_ssize_t out_h, Py_ssize_t out_w,
                tuple args, bint count_include_pad=True):
    cdef Pool g
    g.height, g.width, g.out_h, g.out_w = height, width, out_h, out_w
    g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw = args
    g.count_include_pad = count_include_pad
    return g


cdef inline void max_plane(const real *x, real *out, int64_t *indices, Pool g) noexcept nogil:
    cdef Py_ssize_t oh, ow, i, j, h, w, best_index, i0 = 0, i1 = 0, j0 = 0, j1 = 0
    cdef real best, value
    cdef bint take
    for oh in range(g.out_h):
        # only the taps that land inside the plane: kernels may be far larger than the input
        valid_range(oh * g.sh - g.ph, g.dh, g.height, g.kh, &i0, &i1)
        for ow in range(g.out_w):
            valid_range(ow * g.sw - g.pw, g.dw, g.width, g.kw, &j0, &j1)
            best = -INFINITY
            best_index = -1
            for i in range(i0, i1):
                h = oh * g.sh - g.ph + i * g.dh
                for j in range(j0, j1):
                    w = ow * g.sw - g.pw + j * g.dw
                    value = x[h * g.width + w]
                    # torch: the first in-bounds element starts the window, then NaN or
                    # greater wins. Selects, not branches: random data mispredicts.
                    take = (value > best) | (value != value) | (best_index < 0)
                    best = value if take else best
                    best_index = h * g.width + w if take else best_index
            out[oh * g.out_w + ow] = best
            indices[oh * g.out_w + ow] = best_index


cdef inline bint is_2x2(Pool g) noexcept nogil:
    return g.kh == 2 and g.kw == 2 and g.sh == 2 and g.sw == 2 and g.dh == 1 and g.dw == 1


cdef inline void max_plane_2x2(const real *x, real *out, int64_t *indices, Pool g) noexcept nogil:
    if real is float:
        max_pool_2x2_float(x, g.width, g.out_h, g.out_w, out, indices)
    else:
        max_pool_2x2_double(x, g.width, g.out_h, g.out_w, out, indices)


cdef inline void max_plane_interior(const real *x, real *out, int64_t *indices, Pool g) noexcept nogil:
    """_max_plane when every window lies inside the plane: no bounds tests, so the compiler can
    turn the comparisons into selects."""
    cdef Py_ssize_t oh, ow, i, j, start, at, best_index
    cdef int64_t mask
    cdef real best, value
    if is_2x2(g):
        max_plane_2x2(x, out, indices, g)
        return
    for oh in range(g.out_h):
        for ow in range(g.out_w):
            start = oh * g.sh * g.width + ow * g.sw
            best = x[start]
            best_index = start
            for i in range(g.kh):
                for j in range(g.kw):
                    at = start + i * g.dh * g.width + j * g.dw
                    value = x[at]
                    # integer masks: compilers keep "if greater" as a branch, and random data
                    # mispredicts it half the time
                    mask = -<int64_t>((value > best) | (value != value))
                    best_index = (at & mask) | (best_index & ~mask)
                    best = x[best_index]
            out[oh * g.out_w + ow] = best
            indices[oh * g.out_w + ow] = best_index


cdef inline void max_plane_values(const real *x, real *out, Pool g) noexcept nogil:
    """Interior windows, values only (inference): max then NaN, both branch-free."""
    cdef Py_ssize_t oh, ow, i, j, start
    cdef real best, value
    cdef bint nan
    if is_2x2(g):
        max_plane_2x2(x, out, NULL, g)
        return
    for oh in range(g.out_h):
        for ow in range(g.out_w):
            start = oh * g.sh * g.width + ow * g.sw
            best = x[start]
            nan = False
            for i in range(g.kh):
                for j in range(g.kw):
                    value = x[start + i * g.dh * g.width + j * g.dw]
                    nan = nan | (value != value)
                    best = value if value > best else best
            out[oh * g.out_w + ow] = NAN if nan else best  # NaN wins, as in torch


cdef inline bint interior_windows(Pool g) noexcept nogil:
    """Every window lies inside the plane (no padding reached, none clipped)."""
    return (g.ph == 0 and g.pw == 0
            and (g.out_h - 1) * g.sh + (g.kh - 1) * g.dh < g.height
            and (g.out_w - 1) * g.sw + (g.kw - 1) * g.dw < g.width)
