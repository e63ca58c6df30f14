# Declarations shared by every kernel module.

# The floating types every kernel is generic over: one definition, so a float64 kernel is never
# a copy of the float32 one.
ctypedef fused real:
    float
    double


cdef inline void valid_range(Py_ssize_t offset, Py_ssize_t stride, Py_ssize_t size,
                              Py_ssize_t count, Py_ssize_t *lo, Py_ssize_t *hi) noexcept nogil:
    """Output positions o in [lo, hi) with 0 <= o * stride + offset < size."""
    cdef Py_ssize_t first = 0, last = count
    if offset < 0:
        first = (-offset + stride - 1) // stride
    if (count - 1) * stride + offset >= size:
        last = (size - 1 - offset) // stride + 1 if size - 1 - offset >= 0 else 0
    if first > count:
        first = count
    if last < first:
        last = first
    lo[0] = first
    hi[0] = last


cdef inline double sum_double(const real *a, Py_ssize_t n) noexcept nogil:
    """a[0] + ... + a[n - 1] in double, in eight partial sums: one running sum is a chain of
    dependent adds (4 cycles each) that the compiler may not reorder; eight keep the FPU busy."""
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
