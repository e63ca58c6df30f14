# cython: language_level=3
"""Element-wise passes of a training step, each one pass over memory on the thread team.

Arguments are trusted (fastconv.functional validated them): flat C-contiguous arrays of equal
length. NumPy took two passes and a temporary for each (x * (x > 0), np.isfinite(np.sum(x))) on
one core: together ~10% of a LeNet training step by cProfile.
"""

from cython.parallel cimport prange

from common cimport real, sum_double

cdef enum:
    BLOCK = 64  # a thread's share is whole blocks of this many elements (cache lines, vectors)


cdef inline Py_ssize_t _share(Py_ssize_t n, Py_ssize_t part, Py_ssize_t parts) noexcept nogil:
    """The start of part `part` of [0, n) cut into `parts` block-aligned shares."""
    cdef Py_ssize_t blocks = (n + BLOCK - 1) // BLOCK
    return min(n, (blocks * part // parts) * BLOCK)


cdef inline bint _finite_run(const real *x, Py_ssize_t n) noexcept nogil:
    """x - x is 0 for a finite value and NaN for an inf or a NaN; sixteen partial sums of it
    let the compiler vectorise without reordering anything that matters."""
    cdef real s[16]
    cdef Py_ssize_t i, k
    for k in range(16):
        s[k] = 0
    for i in range(0, n - 15, 16):
        for k in range(16):
            s[k] += x[i + k] - x[i + k]
    for i in range(n - n % 16, n):
        s[0] += x[i] - x[i]
    for k in range(1, 16):
        s[0] += s[k]
    return s[0] == 0


def all_finite(const real[::1] x, int num_threads):
    """Whether every element of x is finite (no inf, no NaN)."""
    cdef Py_ssize_t n = x.shape[0], t, parts = max(1, num_threads)
    cdef int bad = 0
    if n == 0:
        return True
    for t in prange(parts, nogil=True, schedule="static", num_threads=num_threads):
        if not _finite_run(&x[0] + _share(n, t, parts), _share(n, t + 1, parts) - _share(n, t, parts)):
            bad += 1
    return bad == 0


def relu(const real[::1] x, real[::1] out, int num_threads):
    """out = max(x, 0), a NaN staying NaN (as torch's relu)."""
    cdef Py_ssize_t n = x.shape[0], t, i, parts = max(1, num_threads)
    for t in prange(parts, nogil=True, schedule="static", num_threads=num_threads):
        for i in range(_share(n, t, parts), _share(n, t + 1, parts)):
            out[i] = 0 if x[i] <= 0 else x[i]


def relu_backward(const real[::1] grad, const real[::1] out, real[::1] grad_input,
                  int num_threads):
    """grad_input = 0 where relu's output <= 0, else grad (torch's threshold_backward: a NaN
    output passes its gradient): from the output, so the forward keeps no mask."""
    cdef Py_ssize_t n = grad.shape[0], t, i, parts = max(1, num_threads)
    for t in prange(parts, nogil=True, schedule="static", num_threads=num_threads):
        for i in range(_share(n, t, parts), _share(n, t + 1, parts)):
            grad_input[i] = 0 if out[i] <= 0 else grad[i]


def channel_sums(const real[:, :, ::1] grad, real[::1] out, int num_threads):
    """out[c] = sum of grad[:, c, :] (a bias's gradient), in double, one channel per task."""
    cdef Py_ssize_t c, n
    cdef double total
    for c in prange(grad.shape[1], nogil=True, schedule="static", num_threads=num_threads):
        total = 0
        for n in range(grad.shape[0]):
            total = total + sum_double(&grad[n, c, 0], grad.shape[2])
        out[c] = <real>total
