"""Tolerances of the equivalence tests, each with the reason for its size.

The tiny test models have logits of order 1-10. Two float32 computations of the same function that differ only in the
order of floating-point operations (batched vs one row, cached vs uncached, chunked vs whole, a physically pruned
sequence vs masked attention, SDPA vs eager, a subprocess vs this one) then differ by about 1e-6; any real difference
(a wrong mask, position, kept token or weight) moves them by 1e-2 or more.
"""

# Same math, different operation order, float32.
FP32_SAME_MATH = 1e-5
# The same, through a few more reductions of a different shape (e.g. a predictor's attention vs a hand-written one).
FP32_SAME_OP = 1e-6
# Against the official implementation's recorded outputs: float32 too, but another code path,
# other library versions and another machine; its own reruns differ by a few 1e-5.
CONVERTED_LOGITS = 1e-4
