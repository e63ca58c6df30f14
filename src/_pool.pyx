# cython: language_level=3
"""Max and average pooling, forward and backward, one (sample, channel) plane per task.

Arguments are trusted (fastconv.functional validated them). Arrays are (planes, H, W) views of
contiguous NCHW data. Window rules follow torch's CPU kernels exactly: a max window starts at its
first in-bounds element, NaN wins (the last NaN in scan order), and the average divisor is the
window clipped to the padded input (count_include_pad) or to the real input.
"""

from cython.parallel cimport prange
from libc.math cimport isnan, INFINITY

from fused_types cimport real


def max_pool2d_forward(const real[:, :, ::1] x, real[:, :, ::1] out, long long[:, :, ::1] indices,
                       Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                       Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                       int num_threads):
    cdef Py_ssize_t planes = x.shape[0], height = x.shape[1], width = x.shape[2]
    cdef Py_ssize_t out_h = out.shape[1], out_w = out.shape[2]
    cdef Py_ssize_t plane, oh, ow, h0, h1, w0, w1, h, w, best_index
    cdef real best, value
    for plane in prange(planes, nogil=True, schedule="static", num_threads=num_threads):
        for oh in range(out_h):
            h0 = oh * sh - ph
            h1 = h0 + (kh - 1) * dh + 1
            if h1 > height:
                h1 = height
            while h0 < 0:
                h0 = h0 + dh
            for ow in range(out_w):
                w0 = ow * sw - pw
                w1 = w0 + (kw - 1) * dw + 1
                if w1 > width:
                    w1 = width
                while w0 < 0:
                    w0 = w0 + dw
                best = -INFINITY
                best_index = h0 * width + w0
                # while loops: Cython's range() needs a constant step to run without the GIL
                h = h0
                while h < h1:
                    w = w0
                    while w < w1:
                        value = x[plane, h, w]
                        if value > best or isnan(value):
                            best = value
                            best_index = h * width + w
                        w = w + dw
                    h = h + dh
                out[plane, oh, ow] = best
                indices[plane, oh, ow] = best_index


def max_pool2d_backward(const real[:, ::1] grad_output, const long long[:, ::1] indices,
                        real[:, ::1] grad_input, int num_threads):
    """grad_input[plane, indices[plane, k]] += grad_output[plane, k]; overwrites grad_input."""
    cdef Py_ssize_t planes = grad_input.shape[0], size = grad_input.shape[1]
    cdef Py_ssize_t count = grad_output.shape[1], plane, k
    for plane in prange(planes, nogil=True, schedule="static", num_threads=num_threads):
        for k in range(size):
            grad_input[plane, k] = 0
        for k in range(count):
            grad_input[plane, indices[plane, k]] += grad_output[plane, k]


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


def avg_pool2d_forward(const real[:, :, ::1] x, real[:, :, ::1] out,
                       Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                       Py_ssize_t ph, Py_ssize_t pw, bint count_include_pad, int num_threads):
    cdef Py_ssize_t planes = x.shape[0], height = x.shape[1], width = x.shape[2]
    cdef Py_ssize_t out_h = out.shape[1], out_w = out.shape[2]
    cdef Py_ssize_t plane, oh, ow, h0, h1, w0, w1, h, w, rows, columns
    cdef double total
    for plane in prange(planes, nogil=True, schedule="static", num_threads=num_threads):
        h0 = h1 = w0 = w1 = 0  # assigned here so that prange makes them thread-private
        for oh in range(out_h):
            rows = _window(oh, sh, ph, kh, height, count_include_pad, &h0, &h1)
            for ow in range(out_w):
                columns = _window(ow, sw, pw, kw, width, count_include_pad, &w0, &w1)
                total = 0
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        total = total + x[plane, h, w]
                out[plane, oh, ow] = <real>(total / (rows * columns))


def avg_pool2d_backward(const real[:, :, ::1] grad_output, real[:, :, ::1] grad_input,
                        Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t ph, Py_ssize_t pw, bint count_include_pad, int num_threads):
    """Spread each output's gradient evenly over its window; overwrites grad_input."""
    cdef Py_ssize_t planes = grad_input.shape[0], height = grad_input.shape[1]
    cdef Py_ssize_t width = grad_input.shape[2]
    cdef Py_ssize_t out_h = grad_output.shape[1], out_w = grad_output.shape[2]
    cdef Py_ssize_t plane, oh, ow, h0, h1, w0, w1, h, w, rows, columns
    cdef real share
    for plane in prange(planes, nogil=True, schedule="static", num_threads=num_threads):
        h0 = h1 = w0 = w1 = 0  # assigned here so that prange makes them thread-private
        for h in range(height):
            for w in range(width):
                grad_input[plane, h, w] = 0
        for oh in range(out_h):
            rows = _window(oh, sh, ph, kh, height, count_include_pad, &h0, &h1)
            for ow in range(out_w):
                columns = _window(ow, sw, pw, kw, width, count_include_pad, &w0, &w1)
                share = grad_output[plane, oh, ow] / (rows * columns)
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        grad_input[plane, h, w] += share
