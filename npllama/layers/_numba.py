"""Shared Numba settings: every kernel is compiled once per dtype and cached on disk."""
import numba

# cache=True writes the compiled machine code next to the source (__pycache__), so only the very
# first run pays the compile cost.  fastmath stays off: the float64 checks want IEEE results.
jit = numba.njit(cache=True)
jit_parallel = numba.njit(cache=True, parallel=True)
prange = numba.prange
