# The floating types every kernel is generic over: one definition, so a float64 kernel is never
# a copy of the float32 one.
ctypedef fused real:
    float
    double
