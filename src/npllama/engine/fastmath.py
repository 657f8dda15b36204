"""Fast math inside kernels: a vectorisable exp for float32 and vectorisable maxima.

``fast_exp`` is np.exp in float64 (exact to the last bit) and Cephes' expf in float32, which LLVM
can vectorise (libm's expf is a scalar call that keeps the loop around it scalar).  ``array_max``
and engine/simd.py's ``vector_max`` are the row maxima before a softmax.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .jit import REASSOC, jit, jit_nnan, jit_reassoc

# ---- exp: exact for float64, vectorisable for float32 -----------------------------------------
# libm's expf is a scalar call (~5-10 ns) that keeps LLVM from vectorising the loop around it, and
# softmax cross-entropy and SwiGLU take tens of millions of them per training step.  For float32,
# Cephes' expf instead:  exp(x) = 2^n exp(r),  n = round(x log2 e),  r = x - n ln2 (ln2 split in a
# high part exact in float32 and a low part, so r is exact),  exp(r) by a degree-7 polynomial on
# |r| <= ln2/2, and 2^n built from its exponent bits.  Relative error < 0.71 * 2^-23 (measured,
# with FMA, over [-87, 88]; numpy's float32 exp: 1.7).  fastmath is "reassoc" and "contract" only:
# adding "nsz" lets LLVM fold the two-part ln2 back into one product and the error grows with |x|
# (2.5 * 2^-23 near -87).  x is clamped to [-88, 88], so n stays in [-127, 127]: below x = -87.68
# n = -127 gives exponent bits 0 and the result is exactly 0 (exp(-inf) = 0, as masked scores
# need); from there up to -87.34 it is subnormal.  At the top it saturates at exp(88) = 1.65e38
# (never inf, also for x = +inf); NaN stays NaN.  float64 keeps np.exp, exact to the last bit.
# Used, through ``fast_exp``, by attention (training and decoding), cross-entropy and SwiGLU.
@intrinsic
def _pow2_float32(typingctx, n):
    """2**n as float32 for a float32 n holding an integer in [-127, 127], by building the bits."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())
    return sig, codegen


_F = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _F(1.4426950408889634), _F(0.693359375), _F(-2.12194440e-4)
_P0, _P1, _P2, _P3, _P4, _P5 = (_F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3),
                                _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1))
_XMIN, _XMAX, _HALF, _ONE = _F(-88.0), _F(88.0), _F(0.5), _F(1.0)


@jit_reassoc
def exp_float32(x):
    x = min(max(x, _XMIN), _XMAX)
    n = np.floor(x * _LOG2E + _HALF)
    r = x - n * _LN2_HI - n * _LN2_LO
    exp_r = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r + _ONE
    return exp_r * _pow2_float32(n)


def fast_exp(x):
    """exp(x): np.exp for float64; the vectorisable ``exp_float32`` for float32 (inside kernels)."""
    return np.exp(x)


@overload(fast_exp, jit_options={"fastmath": REASSOC})
def _fast_exp_overload(x):
    if x == types.float32:
        return lambda x: exp_float32(x)
    return lambda x: np.exp(x)


@jit
def exp_float32_array(x):
    """``exp_float32`` over a float32 array (for the tests)."""
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = exp_float32(x[i])
    return out


# ---- max: vectorisable ----------------------------------------------------------------------------
@intrinsic
def _maxnum(typingctx, a, b):
    """LLVM's maxnum: a max that LLVM knows how to vectorise as a reduction (Python's max is a
    compare and branch it leaves scalar: 20x slower in attention's and cross-entropy's row maxima)."""
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        t = args[0].type
        return builder.call(builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t])), args)
    return sig, codegen


@jit_nnan
def array_max(x, n):
    """max(x[:n]), n >= 1.  fastmath "nnan" is what lets LLVM vectorise the reduction (infinities
    are handled exactly).  Callers use it only to shift values before an exp: a NaN in x may be
    skipped here, but the exp of that element is NaN and carries it into their result (a row's
    softmax, a loss)."""
    m = x[0]
    for j in range(1, n):
        m = _maxnum(m, x[j])
    return m
