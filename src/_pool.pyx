# cython: language_level=3
"""Max and average pooling, forward and backward, one (sample, channel) plane per task.

Arguments are trusted (fastconv.functional validated them). Arrays are (planes, H, W) views of
contiguous NCHW data. Window rules follow torch's CPU kernels exactly: a max window starts at its
first in-bounds element, NaN wins (the last NaN in scan order), and the average divisor is the
window clipped to the padded input (count_include_pad) or to the real input.

Each plane is handled by a cdef function taking the geometry by value: inside OpenMP's outlined
loop body, shared sizes would be reloaded after every int64 store (they may alias the indices).
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t

from common cimport real, valid_range
from pooling cimport (
    Pool, avg_pool_2x2_backward_double, avg_pool_2x2_backward_float, avg_pool_2x2_double,
    avg_pool_2x2_float, interior_windows, is_2x2, make_pool, max_plane, max_plane_interior,
    max_plane_values,
)


def max_pool2d_values(const real[:, :, ::1] x, real[:, :, ::1] out, tuple args, int num_threads):
    """max_pool2d without indices, for windows that all lie inside the plane (see _interior)."""
    cdef Pool g = make_pool(x.shape[1], x.shape[2], out.shape[1], out.shape[2], args)
    cdef Py_ssize_t plane
    for plane in prange(x.shape[0], nogil=True, schedule="static", num_threads=num_threads):
        max_plane_values(&x[plane, 0, 0], &out[plane, 0, 0], g)


def interior(tuple shape, tuple args):
    """Whether every window of a (H, W) plane with these pool args lies inside it."""
    return interior_windows(make_pool(shape[0], shape[1], shape[2], shape[3], args))


def max_pool2d_forward(const real[:, :, ::1] x, real[:, :, ::1] out, int64_t[:, :, ::1] indices,
                       tuple args, int num_threads):
    """args: (kh, kw, sh, sw, ph, pw, dh, dw)."""
    cdef Pool g = make_pool(x.shape[1], x.shape[2], out.shape[1], out.shape[2], args)
    cdef bint interior = interior_windows(g)
    cdef Py_ssize_t plane
    for plane in prange(x.shape[0], nogil=True, schedule="static", num_threads=num_threads):
        if interior:
            max_plane_interior(&x[plane, 0, 0], &out[plane, 0, 0], &indices[plane, 0, 0], g)
        else:
            max_plane(&x[plane, 0, 0], &out[plane, 0, 0], &indices[plane, 0, 0], g)


def max_pool2d_backward(const real[:, ::1] grad_output, const int64_t[:, ::1] indices,
                        real[:, ::1] grad_input, int num_threads):
    """grad_input[plane, indices[plane, k]] += grad_output[plane, k]; overwrites grad_input.

    Indices may come from the caller, so each is range-checked here, where it is read anyway
    (a separate pass would read them twice): returns how many were out of range and skipped.
    """
    cdef Py_ssize_t planes = grad_input.shape[0], size = grad_input.shape[1]
    cdef Py_ssize_t count = grad_output.shape[1], plane, k, bad = 0
    cdef int64_t at
    cdef real *dst
    cdef const real *src
    cdef const int64_t *where
    for plane in prange(planes, nogil=True, schedule="static", num_threads=num_threads):
        dst = &grad_input[plane, 0]
        src = &grad_output[plane, 0]
        where = &indices[plane, 0]
        for k in range(size):
            dst[k] = 0
        for k in range(count):
            at = where[k]
            if at < 0 or at >= size:
                if at != -1:  # -1: a window that held no input element, nothing to route
                    bad += 1
            else:
                dst[at] += src[k]
    return bad


cdef inline Py_ssize_t _window(Py_ssize_t o, Py_ssize_t stride, Py_ssize_t pad, Py_ssize_t kernel,
                               Py_ssize_t size, bint count_include_pad,
                               Py_ssize_t *start, Py_ssize_t *stop) noexcept nogil:
    """Clip output o's window to the input; return the divisor's factor along this axis."""
    cdef Py_ssize_t s = o * stride - pad
    cdef Py_ssize_t e = s + kernel
    if e > size + pad:
        e = size + pad
    cdef Py_ssize_t padded_extent = e - s
    if s < 0:
        s = 0
    if e > size:
        e = size
    start[0] = s
    stop[0] = e
    return padded_extent if count_include_pad else e - s


cdef void _avg_plane(const real *x, real *out, Pool g) noexcept nogil:
    cdef Py_ssize_t oh, ow, h0 = 0, h1 = 0, w0 = 0, w1 = 0, h, w, rows, columns
    cdef real total  # torch sums in the input's precision too
    for oh in range(g.out_h):
        rows = _window(oh, g.sh, g.ph, g.kh, g.height, g.count_include_pad, &h0, &h1)
        for ow in range(g.out_w):
            columns = _window(ow, g.sw, g.pw, g.kw, g.width, g.count_include_pad, &w0, &w1)
            total = 0
            for h in range(h0, h1):
                for w in range(w0, w1):
                    total = total + x[h * g.width + w]
            out[oh * g.out_w + ow] = total / (rows * columns)


cdef void _avg_plane_backward(const real *grad, real *grad_input, Pool g) noexcept nogil:
    cdef Py_ssize_t oh, ow, h0 = 0, h1 = 0, w0 = 0, w1 = 0, h, w, rows, columns
    cdef real share
    for h in range(g.height * g.width):
        grad_input[h] = 0
    for oh in range(g.out_h):
        rows = _window(oh, g.sh, g.ph, g.kh, g.height, g.count_include_pad, &h0, &h1)
        for ow in range(g.out_w):
            columns = _window(ow, g.sw, g.pw, g.kw, g.width, g.count_include_pad, &w0, &w1)
            share = grad[oh * g.out_w + ow] / (rows * columns)
            for h in range(h0, h1):
                for w in range(w0, w1):
                    grad_input[h * g.width + w] += share


cdef void _avg_plane_interior(const real *x, real *out, Pool g) noexcept nogil:
    """_avg_plane when every window lies inside the plane: a constant divisor, no clipping."""
    cdef Py_ssize_t oh, ow, i, j, start
    cdef real total, scale = 1.0 / (g.kh * g.kw)
    if is_2x2(g):
        if real is float:
            avg_pool_2x2_float(x, g.width, g.out_h, g.out_w, out)
        else:
            avg_pool_2x2_double(x, g.width, g.out_h, g.out_w, out)
        return
    for oh in range(g.out_h):
        for ow in range(g.out_w):
            start = oh * g.sh * g.width + ow * g.sw
            total = 0
            for i in range(g.kh):
                for j in range(g.kw):
                    total = total + x[start + i * g.width + j]
            out[oh * g.out_w + ow] = total * scale


cdef void _avg_plane_backward_interior(const real *grad, real *grad_input, Pool g) noexcept nogil:
    cdef Py_ssize_t oh, ow, i, j, start
    cdef real share, scale = 1.0 / (g.kh * g.kw)
    if is_2x2(g):
        if real is float:
            avg_pool_2x2_backward_float(grad, g.height, g.width, g.out_h, g.out_w, grad_input)
        else:
            avg_pool_2x2_backward_double(grad, g.height, g.width, g.out_h, g.out_w, grad_input)
        return
    for i in range(g.height * g.width):
        grad_input[i] = 0
    for oh in range(g.out_h):
        for ow in range(g.out_w):
            start = oh * g.sh * g.width + ow * g.sw
            share = grad[oh * g.out_w + ow] * scale
            for i in range(g.kh):
                for j in range(g.kw):
                    grad_input[start + i * g.width + j] += share


def avg_pool2d_forward(const real[:, :, ::1] x, real[:, :, ::1] out, tuple args,
                       bint count_include_pad, int num_threads):
    """args: (kh, kw, sh, sw, ph, pw, 1, 1)."""
    cdef Pool g = make_pool(x.shape[1], x.shape[2], out.shape[1], out.shape[2], args, count_include_pad)
    cdef bint interior = interior_windows(g)
    cdef Py_ssize_t plane
    for plane in prange(x.shape[0], nogil=True, schedule="static", num_threads=num_threads):
        if interior:
            _avg_plane_interior(&x[plane, 0, 0], &out[plane, 0, 0], g)
        else:
            _avg_plane(&x[plane, 0, 0], &out[plane, 0, 0], g)


def avg_pool2d_backward(const real[:, :, ::1] grad_output, real[:, :, ::1] grad_input, tuple args,
                        bint count_include_pad, int num_threads):
    """Spread each output's gradient evenly over its window; overwrites grad_input."""
    cdef Pool g = make_pool(grad_input.shape[1], grad_input.shape[2], grad_output.shape[1],
                        grad_output.shape[2], args, count_include_pad)
    cdef bint interior = interior_windows(g)
    cdef Py_ssize_t plane
    for plane in prange(grad_input.shape[0], nogil=True, schedule="static", num_threads=num_threads):
        if interior:
            _avg_plane_backward_interior(&grad_output[plane, 0, 0], &grad_input[plane, 0, 0], g)
        else:
            _avg_plane_backward(&grad_output[plane, 0, 0], &grad_input[plane, 0, 0], g)
