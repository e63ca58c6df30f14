# cython: language_level=3
"""Convolution as im2col + BLAS, one sample at a time per thread, and unfold/fold.

Every function trusts its arguments (bounds checks are off): fastconv.functional validated the
shapes and computed the geometry. Arrays are indexed with 64-bit Py_ssize_t throughout.

A sample's patch matrix `cols` is (K, P): K = C * kH * kW rows ordered (c, i, j) as torch's
unfold, P = out_h * out_w positions. Each thread owns one (K, P) workspace, small enough to stay
in its cache between im2col and the product, and calls single-threaded GEMM on it: one parallel
region per call, no synchronisation between phases, memory independent of the batch size.

The GEMM is the BLAS NumPy itself loaded (fastconv._blas finds its address): no second BLAS in
the process, and no GIL around the call.
"""

from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

from common cimport real, valid_range
from pooling cimport Pool, make_pool, max_plane_interior, max_plane_values

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



cdef struct Geometry:
    Py_ssize_t channels, height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w


cdef Geometry _geometry(Py_ssize_t channels, Py_ssize_t height, Py_ssize_t width, tuple args):
    cdef Geometry g
    g.channels, g.height, g.width = channels, height, width
    g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.out_h, g.out_w = args
    return g


cdef extern from "im2col.h":
    ctypedef struct Im2colGeometry:
        int64_t channels, height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w
    void im2col_float(const float *x, float *cols, const Im2colGeometry *g) noexcept nogil
    void im2col_double(const double *x, double *cols, const Im2colGeometry *g) noexcept nogil


cdef void _im2col(const real *x, real *cols, Geometry g) noexcept nogil:
    """cols[(c, i, j), (oh, ow)] = x[c, oh*sh - ph + i*dh, ow*sw - pw + j*dw], 0 outside."""
    cdef Im2colGeometry c
    c.channels, c.height, c.width, c.kh, c.kw = g.channels, g.height, g.width, g.kh, g.kw
    c.sh, c.sw, c.ph, c.pw, c.dh, c.dw = g.sh, g.sw, g.ph, g.pw, g.dh, g.dw
    c.out_h, c.out_w = g.out_h, g.out_w
    if real is float:
        im2col_float(x, cols, &c)
    else:
        im2col_double(x, cols, &c)


cdef void _col2im(const real *cols, real *x, Geometry g) noexcept nogil:
    """x = the sum of every patch back at its place (the adjoint of _im2col); overwrites x."""
    cdef Py_ssize_t r, c, i, j, oh, ow, h, w_off, lo = 0, hi = 0
    cdef Py_ssize_t positions = g.out_h * g.out_w
    cdef const real *src
    cdef real *row
    for r in range(g.channels * g.height * g.width):
        x[r] = 0
    for r in range(g.channels * g.kh * g.kw):
        c = r // (g.kh * g.kw)
        i = (r // g.kw) % g.kh
        j = r % g.kw
        w_off = j * g.dw - g.pw
        valid_range(w_off, g.sw, g.width, g.out_w, &lo, &hi)
        for oh in range(g.out_h):
            h = oh * g.sh - g.ph + i * g.dh
            if h < 0 or h >= g.height:
                continue
            src = cols + r * positions + oh * g.out_w
            row = x + (c * g.height + h) * g.width + w_off
            if g.sw == 1:
                for ow in range(lo, hi):
                    row[ow] += src[ow]
            else:
                for ow in range(lo, hi):
                    row[ow * g.sw] += src[ow]


def im2col(const real[:, :, :, ::1] x, real[:, :, ::1] cols, tuple args, int num_threads):
    """unfold: cols[n] = the (K, P) patch matrix of x[n]."""
    cdef Geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], args)
    cdef Py_ssize_t n
    for n in prange(x.shape[0], nogil=True, schedule="static", num_threads=num_threads):
        _im2col(&x[n, 0, 0, 0], &cols[n, 0, 0], g)


def col2im(const real[:, :, ::1] cols, real[:, :, :, ::1] x, tuple args, int num_threads):
    """fold: x[n] = the sum of the (K, P) patches cols[n] at their places."""
    cdef Geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], args)
    cdef Py_ssize_t n
    for n in prange(x.shape[0], nogil=True, schedule="static", num_threads=num_threads):
        _col2im(&cols[n, 0, 0], &x[n, 0, 0, 0], g)


# --- BLAS, found at run time in the library NumPy loaded --------------------------------------

cdef enum:
    ROW_MAJOR = 101
    NO_TRANS = 111
    TRANS = 112

ctypedef void (*sgemm64_t)(int, int, int, int64_t, int64_t, int64_t, float, const float *,
                           int64_t, const float *, int64_t, float, float *, int64_t) noexcept nogil
ctypedef void (*dgemm64_t)(int, int, int, int64_t, int64_t, int64_t, double, const double *,
                           int64_t, const double *, int64_t, double, double *, int64_t) noexcept nogil
ctypedef void (*sgemm32_t)(int, int, int, int, int, int, float, const float *,
                           int, const float *, int, float, float *, int) noexcept nogil
ctypedef void (*dgemm32_t)(int, int, int, int, int, int, double, const double *,
                           int, const double *, int, double, double *, int) noexcept nogil
ctypedef int (*set_threads_t)(int) noexcept nogil

cdef void *_sgemm = NULL
cdef void *_dgemm = NULL
cdef bint _ilp64 = False
cdef set_threads_t _set_threads_local = NULL


def use_blas(size_t sgemm, size_t dgemm, bint ilp64, size_t set_threads_local):
    """Install CBLAS sgemm/dgemm (64-bit integers if ilp64) and OpenBLAS's per-thread setter."""
    global _sgemm, _dgemm, _ilp64, _set_threads_local
    _sgemm = <void *>sgemm
    _dgemm = <void *>dgemm
    _ilp64 = ilp64
    _set_threads_local = <set_threads_t><void *>set_threads_local


cdef void _gemm(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                const real *a, Py_ssize_t lda, const real *b, Py_ssize_t ldb, real beta,
                real *c, Py_ssize_t ldc) noexcept nogil:
    """Row-major c = op(a) @ op(b) + beta * c."""
    cdef int ta = TRANS if trans_a else NO_TRANS
    cdef int tb = TRANS if trans_b else NO_TRANS
    if real is float:
        if _ilp64:
            (<sgemm64_t>_sgemm)(ROW_MAJOR, ta, tb, m, n, k, 1, a, lda, b, ldb, beta, c, ldc)
        else:
            (<sgemm32_t>_sgemm)(ROW_MAJOR, ta, tb, <int>m, <int>n, <int>k, 1, a, <int>lda, b,
                                <int>ldb, beta, c, <int>ldc)
    else:
        if _ilp64:
            (<dgemm64_t>_dgemm)(ROW_MAJOR, ta, tb, m, n, k, 1, a, lda, b, ldb, beta, c, ldc)
        else:
            (<dgemm32_t>_dgemm)(ROW_MAJOR, ta, tb, <int>m, <int>n, <int>k, 1, a, <int>lda, b,
                                <int>ldb, beta, c, <int>ldc)


cdef inline int _single_threaded_blas(int team) noexcept nogil:
    """Inside a team, each thread's GEMM must run alone, not hand work to BLAS's own pool."""
    if team > 1 and _set_threads_local != NULL:
        return _set_threads_local(1)
    return 0


cdef inline void _restore_blas(int team, int previous) noexcept nogil:
    if team > 1 and _set_threads_local != NULL and previous > 0:
        _set_threads_local(previous)


cdef void _conv_sample(const real *x, const real *weight, Py_ssize_t groups, Py_ssize_t rows_g,
                       Py_ssize_t k_g, const real *bias, bint has_bias, real *cols,
                       real *out, Geometry g, const int64_t *shifts) noexcept nogil:
    """One sample: out (C_out, P) = weight @ im2col(x) per group (+ bias).

    With shifts (float32, stride 1, dilation 1, one group: see shifted_workspace), the product
    runs on the micro-kernel against shifted views of a padded copy of x instead.
    """
    cdef Py_ssize_t positions = g.out_h * g.out_w, grp, o, p
    cdef real b
    cdef real *row
    if real is float:
        if shifts != NULL:
            _conv_sample_shifted(x, weight, rows_g, k_g, bias, has_bias, cols, out, g, shifts)
            return
    _im2col(x, cols, g)
    for grp in range(groups):
        _gemm(False, False, rows_g, positions, k_g, weight + grp * rows_g * k_g, k_g,
              cols + grp * k_g * positions, positions, 0, out + grp * rows_g * positions, positions)
    if has_bias:  # the sample's output is still in cache: add the bias now
        for o in range(groups * rows_g):
            row = out + o * positions
            b = bias[o]
            for p in range(positions):
                row[p] += b


# The shifted path (float32, dilation 1, one group): the product of the filters with shifted
# views of a padded copy of the image, no im2col. A stride s splits that copy into s x s phase
# planes per channel (rows and columns a mod s), each out_h + (kh - 1) // s rows of
# wp = out_w + (kw - 1) // s: tap (c, i, j) is phase (i mod s, j mod s) of channel c shifted by
# (i // s, j // s), so a strided convolution is a stride-1 one over the phases (the copy is the
# image once, where im2col writes it kh * kw / s^2 times: measured 30% of the stride-2 conv).
cdef inline Py_ssize_t _phase_width(Geometry g) noexcept nogil:
    return g.out_w + (g.kw - 1) // g.sw


cdef inline Py_ssize_t _phase_plane(Geometry g) noexcept nogil:
    return (g.out_h + (g.kh - 1) // g.sh) * _phase_width(g)


cdef inline Py_ssize_t _padded_plane(Geometry g) noexcept nogil:
    """One channel's phase planes."""
    return g.sh * g.sw * _phase_plane(g)


cdef inline Py_ssize_t _shifted_columns(Geometry g) noexcept nogil:
    """The product's columns: out_h rows of the phase width, rounded to whole vectors."""
    return (g.out_h * _phase_width(g) + 15) // 16 * 16


def shifted_workspace(Py_ssize_t channels, Py_ssize_t out_channels, tuple args):
    """Floats per thread of the shifted path: the phase planes (+ slack the last vector reads
    past them) and the product, out_h rows of the phase width each."""
    cdef Geometry g = _geometry(channels, 0, 0, args)
    return channels * _padded_plane(g) + g.kw + 16 + out_channels * _shifted_columns(g)


def shifts(Py_ssize_t channels, tuple args, int64_t[::1] out):
    """out[(c, i, j)] = where tap (c, i, j) of the filter starts in the phase planes."""
    cdef Geometry g = _geometry(channels, 0, 0, args)
    cdef Py_ssize_t c, i, j, wp = _phase_width(g)
    for c in range(channels):
        for i in range(g.kh):
            for j in range(g.kw):
                out[(c * g.kh + i) * g.kw + j] = (
                    c * _padded_plane(g) + ((i % g.sh) * g.sw + j % g.sw) * _phase_plane(g)
                    + (i // g.sh) * wp + j // g.sw)


cdef void _phase_planes(const float *x, float *padded, Geometry g) noexcept nogil:
    """padded = x's phase planes, zero where they fall outside x, and the slack after them."""
    cdef Py_ssize_t wp = _phase_width(g), hp = g.out_h + (g.kh - 1) // g.sh
    cdef Py_ssize_t plane = _phase_plane(g), c, a, b_, u, v, y, v0, v1
    cdef const float *src
    cdef float *dst
    memset(padded, 0, (g.channels * _padded_plane(g) + g.kw + 16) * sizeof(float))
    for c in range(g.channels):
        for a in range(g.sh):
            for b_ in range(g.sw):
                dst = padded + ((c * g.sh + a) * g.sw + b_) * plane
                # phase column v holds image column s * v + b_ - pw: inside for v in [v0, v1)
                v0 = max(0, (g.pw - b_ + g.sw - 1) // g.sw)
                v1 = min(wp, (g.width + g.pw - b_ + g.sw - 1) // g.sw)
                for u in range(hp):
                    y = g.sh * u + a - g.ph
                    if y < 0 or y >= g.height or v1 <= v0:
                        continue
                    src = x + (c * g.height + y) * g.width + b_ - g.pw
                    if g.sw == 1:
                        memcpy(dst + u * wp + v0, src + v0, (v1 - v0) * sizeof(float))
                    else:
                        for v in range(v0, v1):
                            dst[u * wp + v] = src[g.sw * v]


cdef void _conv_sample_shifted(const float *x, const float *weight, Py_ssize_t c_out,
                               Py_ssize_t taps, const float *bias, bint has_bias, float *work,
                               float *out, Geometry g, const int64_t *shifts) noexcept nogil:
    """Convolution without im2col: out[k][oh * wp + ow] = sum over taps (c, i, j) of
    w[k][c][i][j] * phase(c, i mod s, j mod s)[oh + i // s][ow + j // s], each tap's row a shifted
    view of the phase planes (see above). Columns past out_w (up to wp) are computed, dropped."""
    cdef Py_ssize_t wp = _phase_width(g), size = g.channels * _padded_plane(g) + g.kw + 16
    cdef Py_ssize_t columns = _shifted_columns(g), v, y, o
    cdef float *product = work + size
    cdef const float *src
    cdef float *dst
    cdef float b
    _phase_planes(x, work, g)
    shifted_product(weight, work, shifts, product, c_out, taps, columns, columns)
    for o in range(c_out):
        b = bias[o] if has_bias else 0
        for y in range(g.out_h):
            src = product + o * columns + y * wp
            dst = out + (o * g.out_h + y) * g.out_w
            for v in range(g.out_w):
                dst[v] = src[v] + b


def shifted_weight_grad_workspace(Py_ssize_t channels, Py_ssize_t out_channels, tuple args):
    """Floats per thread of conv2d_weight_grad_shifted: the phase planes (+ slack), the output
    gradient in rows of the phase width, and the transposed views (columns x taps rounded to 16)."""
    cdef Geometry g = _geometry(channels, 0, 0, args)
    cdef Py_ssize_t taps = channels * g.kh * g.kw
    return (channels * _padded_plane(g) + g.kw + 16
            + (out_channels + (taps + 15) // 16 * 16) * _shifted_columns(g))


def conv2d_weight_grad_shifted(const float[:, :, ::1] grad, const float[:, :, :, ::1] x,
                               float[:, :, ::1] grad_weight, float[:, ::1] workspace,
                               tuple args, const int64_t[::1] shifts, int num_threads):
    """grad_weight[t] += sum over thread t's samples of grad[n] @ (shifted views of x[n])^T.

    The weight gradient of the shifted path without im2col (AVX-512 only: see
    has_shifted_weight_grad): per sample, x's phase planes and grad in rows of their width
    (zeros past out_w), then one A B^T on the micro-kernel. grad: (N, C_out, P); grad_weight:
    (threads, C_out, taps rounded to 16), zeroed by the caller and summed after (the columns past
    the taps dropped); workspace: (threads, shifted_weight_grad_workspace(...)).
    """
    cdef Geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], args)
    cdef Py_ssize_t c_out = grad.shape[1], taps = g.channels * g.kh * g.kw
    cdef Py_ssize_t wp = _phase_width(g), columns = _shifted_columns(g)
    cdef Py_ssize_t size = g.channels * _padded_plane(g) + g.kw + 16, n, o, y
    cdef int tid
    cdef float *planes
    cdef float *rows
    with nogil:
        for n in prange(x.shape[0], schedule="static", num_threads=num_threads):
            tid = threadid()
            planes = &workspace[tid, 0]
            rows = planes + size
            _phase_planes(&x[n, 0, 0, 0], planes, g)
            memset(rows, 0, c_out * columns * sizeof(float))
            for o in range(c_out):
                for y in range(g.out_h):
                    memcpy(rows + o * columns + y * wp, &grad[n, o, y * g.out_w],
                           g.out_w * sizeof(float))
            shifted_transposed_product(rows, columns, planes, &shifts[0], &grad_weight[tid, 0, 0],
                                       c_out, taps, g.out_h * wp, rows + c_out * columns)


cdef bint _dense_microkernel = True


def use_dense_microkernel(bint enabled):
    """Run team_gemm on the micro-kernel where it applies (True) or always on BLAS (False)."""
    global _dense_microkernel
    _dense_microkernel = enabled


def dense_workspace(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                    int num_threads):
    """Floats per thread of team_gemm's micro-kernel path (0 where it runs on BLAS)."""
    cdef Py_ssize_t teams = max(1, min(num_threads, n // 16))
    return (m * k if trans_a else 0) + (k * 16 * ((n // 16 + teams - 1) // teams) if trans_b else 0)


def team_gemm(bint trans_a, bint trans_b, const real[:, ::1] a, const real[:, ::1] b,
              real[:, ::1] c, real[:, ::1] workspace, int num_threads):
    """c = op(a) @ op(b), split between the team (fastconv.functional checks the shapes; k > 0).
    Returns the path that ran: "micro-kernel" or "BLAS".

    float32 on AVX-512 with n a multiple of 16: each thread a block of c's columns on the
    micro-kernel (LeNet's x(64,3136) @ W^T: 0.66 -> 0.42 ms against the BLAS path, which packs
    both operands on every call), workspace (threads, dense_workspace(...)) holding its
    transposed operands. Else c's rows split, each thread's GEMM on single-threaded BLAS.

    Why not BLAS's own threads: once woken, its pool spins on the other core for milliseconds
    after every call, and the convolutions around a dense layer then ran on one core (perf: 45%
    of a LeNet inference's cycles in blas_thread_server)."""
    cdef Py_ssize_t m = c.shape[0], n = c.shape[1], k = a.shape[0] if trans_a else a.shape[1]
    cdef Py_ssize_t t, m0, m1, n0, n1, teams = max(1, min(num_threads, m))
    cdef Py_ssize_t blocks = n // 16, column_teams = max(1, min(num_threads, n // 16))
    cdef int previous = 0
    if real is float:
        if _dense_microkernel and n % 16 == 0 and transposed_product_available() and \
                workspace.shape[1] >= dense_workspace(trans_a, trans_b, m, n, k, num_threads):
            with nogil:
                for t in prange(column_teams, schedule="static", num_threads=num_threads):
                    n0 = 16 * (t * blocks // column_teams)
                    n1 = 16 * ((t + 1) * blocks // column_teams)
                    dense_product(trans_a, trans_b, m, n1 - n0, k, &a[0, 0], a.shape[1],
                                  &b[n0, 0] if trans_b else &b[0, n0], b.shape[1], &c[0, n0], n,
                                  &workspace[threadid(), 0])
            return "micro-kernel"
    with nogil:
        previous = _single_threaded_blas(num_threads)
        for t in prange(teams, schedule="static", num_threads=num_threads):
            _single_threaded_blas(num_threads)
            m0 = t * m // teams
            m1 = (t + 1) * m // teams
            if m1 > m0:
                _gemm(trans_a, trans_b, m1 - m0, n, k, &a[0, m0] if trans_a else &a[m0, 0],
                      a.shape[1], &b[0, 0], b.shape[1], 0, &c[m0, 0], n)
        _restore_blas(num_threads, previous)
    return "BLAS"


def conv2d_forward(const real[:, :, :, ::1] x, const real[:, :, ::1] weight,
                   const real[::1] bias, real[:, :, ::1] out, real[:, :, ::1] workspace,
                   tuple args, bint has_bias, const int64_t[::1] shifts, bint shifted,
                   int num_threads):
    """out[n] = weight @ im2col(x[n]) (+ bias), per group; weight (G, C_out/G, K/G).

    workspace: (threads, K, P), or (threads, 1, shifted_workspace(...)) when shifted (then
    shifts holds shifts(...)). out: (N, C_out, P).
    """
    cdef Geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], args)
    cdef Py_ssize_t n
    cdef int previous = 0
    with nogil:
        previous = _single_threaded_blas(num_threads)
        for n in prange(x.shape[0], schedule="static", num_threads=num_threads):
            _single_threaded_blas(num_threads)
            _conv_sample(&x[n, 0, 0, 0], &weight[0, 0, 0], weight.shape[0], weight.shape[1],
                         weight.shape[2], &bias[0], has_bias,
                         &workspace[threadid(), 0, 0], &out[n, 0, 0], g,
                         &shifts[0] if shifted else NULL)
        _restore_blas(num_threads, previous)


def conv2d_backward(const real[:, :, ::1] grad, const real[:, :, :, ::1] x,
                    const real[:, :, ::1] weight, real[:, :, :, ::1] grad_input,
                    real[:, :, :, ::1] grad_weight, real[:, :, ::1] workspace, tuple args,
                    bint want_input, bint want_weight, int num_threads):
    """Per thread t: grad_weight[t] += grad[n] @ im2col(x[n])^T; grad_input[n] = col2im(W^T grad[n]).

    grad: (N, C_out, P); weight (G, C_out/G, K/G); grad_weight: (threads, G, C_out/G, K/G),
    zeroed by the caller and summed over threads afterwards; workspace: (threads, K, P).
    """
    cdef Geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], args)
    cdef Py_ssize_t groups = weight.shape[0], rows_g = weight.shape[1], k_g = weight.shape[2]
    cdef Py_ssize_t positions = g.out_h * g.out_w
    cdef Py_ssize_t n, grp
    cdef int tid, previous = 0
    cdef real *cols
    with nogil:
        previous = _single_threaded_blas(num_threads)
        for n in prange(x.shape[0], schedule="static", num_threads=num_threads):
            tid = threadid()
            _single_threaded_blas(num_threads)
            cols = &workspace[tid, 0, 0]
            if want_weight:
                _im2col(&x[n, 0, 0, 0], cols, g)
                for grp in range(groups):
                    _gemm(False, True, rows_g, k_g, positions, &grad[n, grp * rows_g, 0], positions,
                          cols + grp * k_g * positions, positions, 1, &grad_weight[tid, grp, 0, 0], k_g)
            if want_input:
                for grp in range(groups):
                    _gemm(True, False, k_g, positions, rows_g, &weight[grp, 0, 0], k_g,
                          &grad[n, grp * rows_g, 0], positions, 0, cols + grp * k_g * positions,
                          positions)
                _col2im(cols, &grad_input[n, 0, 0, 0], g)
        _restore_blas(num_threads, previous)


def conv2d_max_pool_forward(const real[:, :, :, ::1] x, const real[:, :, ::1] weight,
                            const real[::1] bias, real[:, :, :, ::1] out,
                            int64_t[:, :, :, ::1] indices, real[:, :, ::1] workspace,
                            real[:, :, ::1] scratch, tuple args, tuple pool_args,
                            bint has_bias, bint with_indices, const int64_t[::1] shifts,
                            bint shifted, int num_threads):
    """max_pool2d(conv2d(x)) without the convolution's output ever leaving the cache.

    As conv2d_forward, but each sample's (C_out, P) product goes to a per-thread `scratch`
    (threads, C_out, P) and is pooled from there into out (N, C_out, PH, PW), with torch's
    indices into the convolution's output planes when with_indices. Only for pooling windows
    that all lie inside the plane (fastconv.functional checks).
    """
    cdef Geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], args)
    cdef Py_ssize_t positions = g.out_h * g.out_w, c_out = scratch.shape[1]
    cdef Pool p = make_pool(g.out_h, g.out_w, out.shape[2], out.shape[3], pool_args)
    cdef Py_ssize_t n, o
    cdef int tid, previous = 0
    cdef real *product
    with nogil:
        previous = _single_threaded_blas(num_threads)
        for n in prange(x.shape[0], schedule="static", num_threads=num_threads):
            tid = threadid()
            _single_threaded_blas(num_threads)
            product = &scratch[tid, 0, 0]
            _conv_sample(&x[n, 0, 0, 0], &weight[0, 0, 0], weight.shape[0], weight.shape[1],
                         weight.shape[2], &bias[0], has_bias, &workspace[tid, 0, 0],
                         product, g, &shifts[0] if shifted else NULL)
            for o in range(c_out):
                if with_indices:
                    max_plane_interior(product + o * positions, &out[n, o, 0, 0],
                                       &indices[n, o, 0, 0], p)
                else:
                    max_plane_values(product + o * positions, &out[n, o, 0, 0], p)
        _restore_blas(num_threads, previous)


# --- Winograd F(2x2, 3x3): 3x3, stride 1, dilation 1, one group, float32 -------------------------

cdef extern from "winograd.h":
    ctypedef struct WinogradGeometry:
        int64_t channels, height, width, pad_h, pad_w, out_h, out_w, tiles_h, tiles_w
    int64_t winograd_slots(const WinogradGeometry *g, int64_t rows) noexcept nogil
    int64_t winograd_stage_size(const WinogradGeometry *g, int64_t rows) noexcept nogil
    void winograd_input_transform(const float *x, const WinogradGeometry *g, int64_t first_row,
                                  int64_t rows, float *v, int64_t ld, float *stage) noexcept nogil
    void winograd_output_transform(const float *m, int64_t ld, int64_t out_channels,
                                   const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                   const float *bias, float *out, float *stage) noexcept nogil
    void winograd_grad_transform(const float *grad, int64_t out_channels,
                                 const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                 float *m, int64_t ld, float *stage) noexcept nogil
    int64_t winograd_padded(int64_t slots) noexcept nogil
    void winograd_output_max_pool(const float *m, int64_t ld, int64_t out_channels,
                                  const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                  const float *bias, float *pooled, int64_t *indices,
                                  float *stage) noexcept nogil
    void winograd_weight_transform(const float *w, int64_t out_channels, int64_t channels,
                                   int flip, float *u) noexcept nogil
    void winograd_weight_grad_transform(const float *du, int64_t out_channels,
                                        int64_t channels, float *grad_w) noexcept nogil
    const char *winograd_isa()
    int winograd4_available()
    int64_t winograd4_slots(const WinogradGeometry *g, int64_t rows) noexcept nogil
    void winograd4_input_transform(const float *x, const WinogradGeometry *g, int64_t first_row,
                                   int64_t rows, float *v, int64_t ld) noexcept nogil
    void winograd4_output_transform(const float *m, int64_t ld, int64_t out_channels,
                                    const WinogradGeometry *g, int64_t first_row, int64_t rows,
                                    const float *bias, float *out) noexcept nogil
    void winograd4_weight_transform(const float *w, int64_t out_channels, int64_t channels,
                                    int flip, float *u) noexcept nogil

cdef extern from "microkernels.h":
    const char *microkernel_isa()
    void rows_product(const float *a, const float *v, float *m, int64_t out_channels,
                      int64_t taps, int64_t columns, int64_t ld) noexcept nogil
    void shifted_product(const float *a, const float *x, const int64_t *offsets, float *m,
                         int64_t out_channels, int64_t taps, int64_t columns,
                         int64_t ld) noexcept nogil
    int transposed_product(const float *m, const float *v, float *du, int64_t out_channels,
                           int64_t channels, int64_t slots, int64_t ld, float *vt) noexcept nogil
    int shifted_transposed_product(const float *g, int64_t ldg, const float *x,
                                   const int64_t *offsets, float *du, int64_t out_channels,
                                   int64_t taps, int64_t slots, float *vt) noexcept nogil
    int transposed_product_available() noexcept nogil
    int dense_product(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, const float *a,
                      int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc,
                      float *work) noexcept nogil

winograd_kernels = winograd_isa().decode()
# F(4x4, 3x3) runs where its AVX-512 transforms do (and the products are on the micro-kernel)
has_winograd4 = bool(winograd4_available())
microkernels = microkernel_isa().decode()  # the products' kernel, chosen by a CPU check
# Whether the A B^T kernel (Winograd's and the shifted path's weight gradients) runs here
has_shifted_weight_grad = bool(transposed_product_available())
# The forward products run on the micro-kernel where the CPU has vector units for it (AVX2 or
# AVX-512 clones), else on BLAS, the portable path. The weight gradient's products (long
# reductions, small outputs) run on the A B^T kernel on AVX-512 only: elsewhere BLAS measured
# as fast.
cdef bint _winograd_microkernels = not winograd_kernels.startswith("x86-64 (SSE2)")


def use_winograd_microkernels(bint enabled):
    """Run Winograd's forward products on the micro-kernel (True) or on BLAS (False)."""
    global _winograd_microkernels
    _winograd_microkernels = enabled


def winograd_products_backend():
    return "micro-kernel" if _winograd_microkernels else "BLAS"


cdef WinogradGeometry _winograd_geometry(Py_ssize_t channels, Py_ssize_t height, Py_ssize_t width,
                                         tuple args):
    """args: (pad_top, pad_left, out_h, out_w); a negative pad crops (the input gradient's)."""
    cdef WinogradGeometry g
    g.channels, g.height, g.width = channels, height, width
    g.pad_h, g.pad_w, g.out_h, g.out_w = args
    g.tiles_h, g.tiles_w = (g.out_h + 1) // 2, (g.out_w + 1) // 2
    return g


def winograd_weight(const float[:, :, :, ::1] weight, float[:, :, ::1] u, bint flip):
    """u = the (16, C_out, C_in) transform of weight (C_out, C_in, 3, 3); flip: (16, C_in, C_out)
    of its flipped transpose (the input gradient's filters)."""
    with nogil:
        winograd_weight_transform(&weight[0, 0, 0, 0], weight.shape[0], weight.shape[1], flip,
                                  &u[0, 0, 0])


def winograd_weight_grad(const float[:, :, ::1] grad_u, float[:, :, :, ::1] grad_weight):
    """grad_weight (C_out, C_in, 3, 3) from the transformed gradient (16, C_out, C_in)."""
    with nogil:
        winograd_weight_grad_transform(&grad_u[0, 0, 0], grad_u.shape[1], grad_u.shape[2],
                                       &grad_weight[0, 0, 0, 0])


def winograd_workspace_size(Py_ssize_t channels, Py_ssize_t out_channels, tuple args,
                            Py_ssize_t rows):
    """Floats of one thread's workspace for blocks of `rows` rows of tiles (the last
    padded(slots) x channel_stride(channels) of it: the weight gradient's transposed operand)."""
    cdef WinogradGeometry g = _winograd_geometry(channels, 0, 0, args)
    return (16 * (channels + out_channels) * _leading_dimension(&g, rows, channels, out_channels)
            + winograd_stage_size(&g, rows)
            + winograd_padded(winograd_slots(&g, rows)) * channel_stride(channels))


def channel_stride(Py_ssize_t channels):
    """The row length of the weight gradient's transformed partial sums (16, C_out, stride):
    channels rounded up to whole vectors, the columns past them unused."""
    return (channels + 15) // 16 * 16


cdef Py_ssize_t _leading_dimension(const WinogradGeometry *g, Py_ssize_t rows, Py_ssize_t c_in,
                                   Py_ssize_t c_out) noexcept nogil:
    """A block's slots rounded to whole vectors, plus the fewest floats that keep the 16 points'
    planes (c_in or c_out rows of ld) from lying a multiple of 2 KiB apart: the transforms write
    (or read) all 16 at once, and planes that far apart fall in the same L1 sets and 4K-alias
    (measured: the input transform of x(64,64,32,32) ran 2x slower at ld = 144)."""
    cdef Py_ssize_t ld = winograd_padded(winograd_slots(g, rows)), extra
    for extra in range(16):
        if (c_in * (ld + extra)) % 512 and (c_out * (ld + extra)) % 512:
            return ld + extra
    return ld


def winograd_conv2d_forward(const float[:, :, :, ::1] x, const float[:, :, ::1] u,
                            const float[::1] bias, float[:, :, :, ::1] out,
                            int64_t[:, :, :, ::1] indices, float[:, ::1] workspace, tuple args,
                            Py_ssize_t rows, bint has_bias, int pool, int num_threads):
    """out = conv2d(x, w) + bias from u, w's transform (16, C_out, C_in); args as the geometry's.

    pool 1: out = max_pool2d(conv2d(...), 2) instead, 2: also its indices (into the convolution's
    output planes). Blocks of `rows` rows of tiles: transform the inputs (v: 16 x C_in x slots),
    16 products with u, transform back. workspace: (threads, winograd_workspace_size(...)).
    """
    cdef WinogradGeometry g = _winograd_geometry(x.shape[1], x.shape[2], x.shape[3], args)
    cdef Py_ssize_t c_in = x.shape[1], c_out = u.shape[1], ld = _leading_dimension(&g, rows, c_in, c_out)
    cdef Py_ssize_t total = x.shape[0] * g.tiles_h
    cdef Py_ssize_t blocks = (total + rows - 1) // rows, b, first, count, slots, p
    cdef int previous = 0
    cdef float *v
    cdef float *m
    cdef float *stage
    with nogil:
        previous = _single_threaded_blas(num_threads)
        for b in prange(blocks, schedule="static", num_threads=num_threads):
            _single_threaded_blas(num_threads)
            v = &workspace[threadid(), 0]
            m = v + 16 * c_in * ld
            stage = m + 16 * c_out * ld
            first = b * rows
            count = min(rows, total - first)
            slots = winograd_slots(&g, count)
            winograd_input_transform(&x[0, 0, 0, 0], &g, first, count, v, ld, stage)
            for p in range(16):
                if _winograd_microkernels:
                    rows_product(&u[p, 0, 0], v + p * c_in * ld, m + p * c_out * ld, c_out,
                                 c_in, winograd_padded(slots), ld)
                else:
                    _gemm(False, False, c_out, slots, c_in, &u[p, 0, 0], c_in,
                          v + p * c_in * ld, ld, 0, m + p * c_out * ld, ld)
            if pool:
                winograd_output_max_pool(m, ld, c_out, &g, first, count,
                                         &bias[0] if has_bias else NULL, &out[0, 0, 0, 0],
                                         &indices[0, 0, 0, 0] if pool == 2 else NULL, stage)
            else:
                winograd_output_transform(m, ld, c_out, &g, first, count,
                                          &bias[0] if has_bias else NULL, &out[0, 0, 0, 0],
                                          stage)
        _restore_blas(num_threads, previous)


def winograd_conv2d_weight_grad(const float[:, :, :, ::1] grad, const float[:, :, :, ::1] x,
                                float[:, :, :, ::1] grad_u, float[:, ::1] workspace,
                                tuple args, Py_ssize_t rows, int num_threads):
    """grad_u[t] += the transformed weight gradient (16, C_out, C_in) of thread t's tile blocks.

    The adjoint of the forward's products: per point, (A dY A^T) @ (B^T d B)^T over the tiles.
    grad_u: (threads, 16, C_out, channel_stride(C_in)), zeroed by the caller, summed and
    transformed after (its columns past C_in dropped).
    """
    cdef WinogradGeometry g = _winograd_geometry(x.shape[1], x.shape[2], x.shape[3], args)
    cdef Py_ssize_t c_in = x.shape[1], c_out = grad.shape[1], ld = _leading_dimension(&g, rows, c_in, c_out)
    cdef Py_ssize_t total = x.shape[0] * g.tiles_h
    cdef Py_ssize_t blocks = (total + rows - 1) // rows, b, first, count, slots, p
    cdef int tid, previous = 0
    cdef float *v
    cdef float *m
    cdef float *stage
    with nogil:
        previous = _single_threaded_blas(num_threads)
        for b in prange(blocks, schedule="static", num_threads=num_threads):
            tid = threadid()
            _single_threaded_blas(num_threads)
            v = &workspace[tid, 0]
            m = v + 16 * c_in * ld
            stage = m + 16 * c_out * ld
            first = b * rows
            count = min(rows, total - first)
            slots = winograd_slots(&g, count)
            winograd_input_transform(&x[0, 0, 0, 0], &g, first, count, v, ld, stage)
            winograd_grad_transform(&grad[0, 0, 0, 0], c_out, &g, first, count, m, ld, stage)
            for p in range(16):
                if not (_winograd_microkernels and transposed_product(
                        m + p * c_out * ld, v + p * c_in * ld, &grad_u[tid, p, 0, 0], c_out,
                        c_in, slots, ld, stage + winograd_stage_size(&g, rows))):
                    _gemm(False, True, c_out, c_in, slots, m + p * c_out * ld, ld,
                          v + p * c_in * ld, ld, 1, &grad_u[tid, p, 0, 0], grad_u.shape[3])
        _restore_blas(num_threads, previous)


# --- Winograd F(4x4, 3x3): 36 points, 4x4 tiles (winograd_f4.c) ------------------------------

cdef WinogradGeometry _winograd4_geometry(Py_ssize_t channels, Py_ssize_t height,
                                          Py_ssize_t width, tuple args):
    cdef WinogradGeometry g = _winograd_geometry(channels, height, width, args)
    g.tiles_h, g.tiles_w = (g.out_h + 3) // 4, (g.out_w + 3) // 4
    return g


cdef Py_ssize_t _leading_dimension4(const WinogradGeometry *g, Py_ssize_t rows, Py_ssize_t c_in,
                                    Py_ssize_t c_out) noexcept nogil:
    """As _leading_dimension, for F(4x4)'s slots (36 point planes written or read at once)."""
    cdef Py_ssize_t ld = winograd_padded(winograd4_slots(g, rows)), extra
    for extra in range(16):
        if (c_in * (ld + extra)) % 512 and (c_out * (ld + extra)) % 512:
            return ld + extra
    return ld


def winograd4_weight(const float[:, :, :, ::1] weight, float[:, :, ::1] u, bint flip):
    """u = F(4x4)'s transform (36, C_out, C_in) of weight (C_out, C_in, 3, 3); flip: (36, C_in,
    C_out) of its flipped transpose."""
    with nogil:
        winograd4_weight_transform(&weight[0, 0, 0, 0], weight.shape[0], weight.shape[1], flip,
                                   &u[0, 0, 0])


def winograd4_workspace_size(Py_ssize_t channels, Py_ssize_t out_channels, tuple args,
                             Py_ssize_t rows):
    """Floats of one thread's workspace for F(4x4) blocks of `rows` rows of tiles."""
    cdef WinogradGeometry g = _winograd4_geometry(channels, 0, 0, args)
    return 36 * (channels + out_channels) * _leading_dimension4(&g, rows, channels, out_channels)


def winograd4_conv2d_forward(const float[:, :, :, ::1] x, const float[:, :, ::1] u,
                             const float[::1] bias, float[:, :, :, ::1] out,
                             float[:, ::1] workspace, tuple args, Py_ssize_t rows,
                             bint has_bias, int num_threads):
    """out = conv2d(x, w) + bias by F(4x4, 3x3) from u = winograd4_weight(w); as
    winograd_conv2d_forward otherwise (no pooling). Needs has_winograd4."""
    if not has_winograd4:
        raise RuntimeError("F(4x4, 3x3) needs the AVX-512 kernels, which this CPU lacks")
    cdef WinogradGeometry g = _winograd4_geometry(x.shape[1], x.shape[2], x.shape[3], args)
    cdef Py_ssize_t c_in = x.shape[1], c_out = u.shape[1]
    cdef Py_ssize_t ld = _leading_dimension4(&g, rows, c_in, c_out)
    cdef Py_ssize_t total = x.shape[0] * g.tiles_h
    cdef Py_ssize_t blocks = (total + rows - 1) // rows, b, first, count, p
    cdef float *v
    cdef float *m
    with nogil:
        for b in prange(blocks, schedule="static", num_threads=num_threads):
            v = &workspace[threadid(), 0]
            m = v + 36 * c_in * ld
            first = b * rows
            count = min(rows, total - first)
            winograd4_input_transform(&x[0, 0, 0, 0], &g, first, count, v, ld)
            for p in range(36):
                rows_product(&u[p, 0, 0], v + p * c_in * ld, m + p * c_out * ld, c_out, c_in,
                             winograd_padded(winograd4_slots(&g, count)), ld)
            winograd4_output_transform(m, ld, c_out, &g, first, count,
                                       &bias[0] if has_bias else NULL, &out[0, 0, 0, 0])
