# cython: language_level=3
"""im2col / col2im and the output layout moves around the BLAS product of a convolution.

Every function trusts its arguments (bounds checks are off): fastconv.functional validated the
shapes and computed the geometry. Arrays are indexed with 64-bit Py_ssize_t throughout.

`cols` is a (K, Nc, P) view: K = C * kH * kW patch rows ordered (c, i, j) as torch's unfold,
Nc samples of a batch chunk, P = out_h * out_w positions. The convolution workspace is contiguous
(so a chunk is one (K, Nc * P) matrix for one GEMM); unfold passes a transposed (N, K, P) array.
"""

from cython.parallel cimport prange

from fused_types cimport real

cdef extern from *:
    """
    #ifdef _OPENMP
    #define FASTCONV_OPENMP 1
    #else
    #define FASTCONV_OPENMP 0
    #endif
    #ifndef FASTCONV_CFLAGS
    #define FASTCONV_CFLAGS ""
    #endif
    """
    int FASTCONV_OPENMP
    const char *FASTCONV_CFLAGS

openmp = bool(FASTCONV_OPENMP)
cflags = FASTCONV_CFLAGS.decode()


cdef inline void _valid_range(Py_ssize_t offset, Py_ssize_t stride, Py_ssize_t size,
                              Py_ssize_t count, Py_ssize_t *lo, Py_ssize_t *hi) noexcept nogil:
    """Output positions o in [lo, hi) with 0 <= o * stride + offset < size."""
    cdef Py_ssize_t first = 0, last = count
    if offset < 0:
        first = (-offset + stride - 1) // stride
    if (count - 1) * stride + offset >= size:
        last = (size - 1 - offset) // stride + 1 if size - 1 - offset >= 0 else 0
    if last < first:
        last = first
    lo[0] = first
    hi[0] = last


def im2col(const real[:, :, :, ::1] x, real[:, :, ::1] cols, Py_ssize_t n0,
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
           Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t out_h, Py_ssize_t out_w,
           int num_threads):
    """cols[(c, i, j), n, (oh, ow)] = x[n0 + n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw], 0 outside."""
    cdef Py_ssize_t rows = cols.shape[0], chunk = cols.shape[1]
    cdef Py_ssize_t height = x.shape[2], width = x.shape[3]
    cdef Py_ssize_t task, r, n, c, i, j, oh, ow, h, w_off, lo, hi
    for task in prange(rows * chunk, nogil=True, schedule="static", num_threads=num_threads):
        r = task // chunk
        n = task % chunk
        c = r // (kh * kw)
        i = (r // kw) % kh
        j = r % kw
        w_off = j * dw - pw
        lo = 0  # assigned here so that prange makes them thread-private
        hi = 0
        _valid_range(w_off, sw, width, out_w, &lo, &hi)
        for oh in range(out_h):
            h = oh * sh - ph + i * dh
            if h < 0 or h >= height:
                for ow in range(out_w):
                    cols[r, n, oh * out_w + ow] = 0
                continue
            for ow in range(lo):
                cols[r, n, oh * out_w + ow] = 0
            if sw == 1:
                for ow in range(lo, hi):
                    cols[r, n, oh * out_w + ow] = x[n0 + n, c, h, ow + w_off]
            else:
                for ow in range(lo, hi):
                    cols[r, n, oh * out_w + ow] = x[n0 + n, c, h, ow * sw + w_off]
            for ow in range(hi, out_w):
                cols[r, n, oh * out_w + ow] = 0


def col2im(const real[:, :, ::1] cols, real[:, :, :, ::1] x, Py_ssize_t n0,
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
           Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t out_h, Py_ssize_t out_w,
           int num_threads):
    """x[n0 + n] = sum over patches of cols (the adjoint of im2col); overwrites those samples."""
    cdef Py_ssize_t chunk = cols.shape[1], channels = x.shape[1]
    cdef Py_ssize_t height = x.shape[2], width = x.shape[3]
    cdef Py_ssize_t plane, r, n, c, i, j, oh, ow, h, w_off, lo, hi
    # One task per (sample, channel) plane: no two tasks write the same element.
    for plane in prange(chunk * channels, nogil=True, schedule="static", num_threads=num_threads):
        n = plane // channels
        c = plane % channels
        lo = 0  # assigned here so that prange makes them thread-private
        hi = 0
        for h in range(height):
            for ow in range(width):
                x[n0 + n, c, h, ow] = 0
        for i in range(kh):
            for j in range(kw):
                r = (c * kh + i) * kw + j
                w_off = j * dw - pw
                _valid_range(w_off, sw, width, out_w, &lo, &hi)
                for oh in range(out_h):
                    h = oh * sh - ph + i * dh
                    if h < 0 or h >= height:
                        continue
                    for ow in range(lo, hi):
                        x[n0 + n, c, h, ow * sw + w_off] += cols[r, n, oh * out_w + ow]


def scatter_output(const real[:, :, ::1] product, const real[::1] bias, real[:, :, ::1] out,
                   Py_ssize_t n0, bint has_bias, bint relu, int num_threads):
    """out[n0 + n, o, p] = product[o, n, p] (+ bias[o]) (then max(., 0)): GEMM layout to NCHW."""
    cdef Py_ssize_t c_out = product.shape[0], chunk = product.shape[1], size = product.shape[2]
    cdef Py_ssize_t task, n, o, p
    cdef real b, v
    for task in prange(chunk * c_out, nogil=True, schedule="static", num_threads=num_threads):
        n = task // c_out
        o = task % c_out
        b = bias[o] if has_bias else 0
        for p in range(size):
            v = product[o, n, p] + b
            if relu and not (v > 0):
                v = 0 if v == v else v  # NaN passes through as in torch
            out[n0 + n, o, p] = v


def gather_grad(const real[:, :, ::1] grad, real[:, :, ::1] product, Py_ssize_t n0,
                int num_threads):
    """product[o, n, p] = grad[n0 + n, o, p]: NCHW gradient to the GEMM layout."""
    cdef Py_ssize_t c_out = product.shape[0], chunk = product.shape[1], size = product.shape[2]
    cdef Py_ssize_t task, n, o, p
    for task in prange(chunk * c_out, nogil=True, schedule="static", num_threads=num_threads):
        n = task // c_out
        o = task % c_out
        for p in range(size):
            product[o, n, p] = grad[n0 + n, o, p]
