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
