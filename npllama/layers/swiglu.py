"""SwiGLU feed-forward (Shazeer 2020):  FFN(x) = W_down (silu(W_gate x) * (W_up x)).

The elementwise part, with sigma the logistic function and silu(a) = a sigma(a):
    h = silu(a) * u                         a = W_gate x, u = W_up x
    du = dh * silu(a)
    da = dh * u * silu'(a),   silu'(a) = sigma(a) (1 + a (1 - sigma(a)))

The gate and up weights are stacked into one (2F, D) matrix so a single matmul produces both
(a = first F columns, u = last F columns); the two linear backward passes are the usual ones.

Shapes: x: (N, D); W_gate, W_up: (F, D) stacked as W_gate_up: (2F, D); W_down: (D, F);
a, u, h: (N, F).
"""
import numpy as np

from ._numba import fast_exp, jit_parallel, prange
from .linear import linear_backward, linear_forward


# ---- readable reference (elementwise part) -----------------------------------------------------
def swiglu_forward_reference(a, u):
    sig = 1.0 / (1.0 + np.exp(-a))
    return a * sig * u, (a, u)


def swiglu_backward_reference(dh, cache):
    a, u = cache
    sig = 1.0 / (1.0 + np.exp(-a))
    return dh * u * sig * (1.0 + a * (1.0 - sig)), dh * a * sig


# ---- kernels -----------------------------------------------------------------------------------
# All arithmetic in the array's dtype (``one`` is typed like the data: a bare 1.0 would promote
# float32 to float64), and exp is ``fast_exp`` (vectorisable for float32, np.exp for float64).
@jit_parallel
def swiglu_forward_kernel(a, u, h):
    N, F = a.shape
    one = a.dtype.type(1.0)
    for n in prange(N):
        for f in range(F):
            sig = one / (one + fast_exp(-a[n, f]))
            h[n, f] = a[n, f] * sig * u[n, f]


@jit_parallel
def swiglu_backward_kernel(dh, a, u, da, du):
    N, F = a.shape
    one = a.dtype.type(1.0)
    for n in prange(N):
        for f in range(F):
            sig = one / (one + fast_exp(-a[n, f]))
            silu = a[n, f] * sig
            du[n, f] = dh[n, f] * silu
            da[n, f] = dh[n, f] * u[n, f] * sig * (one + a[n, f] * (one - sig))


# The same two kernels on the (N, 2F) output of the fused gate/up matmul, a = au[:, :F] and
# u = au[:, F:], contiguous rows.  The backward overwrites au with (da, du): that is where the
# gate/up matmul's backward wants them, and a and u are not needed afterwards.
@jit_parallel
def swiglu_forward_rows_kernel(au, h):
    N, F = h.shape
    one = au.dtype.type(1.0)
    for n in prange(N):
        for f in range(F):
            a = au[n, f]
            sig = one / (one + fast_exp(-a))
            h[n, f] = a * sig * au[n, F + f]


@jit_parallel
def swiglu_backward_rows_inplace_kernel(dh, au):
    N, F = dh.shape
    one = au.dtype.type(1.0)
    for n in prange(N):
        for f in range(F):
            a = au[n, f]
            u = au[n, F + f]
            sig = one / (one + fast_exp(-a))
            au[n, F + f] = dh[n, f] * a * sig
            au[n, f] = dh[n, f] * u * sig * (one + a * (one - sig))


def swiglu_forward(a, u):
    """a, u: (N, F) (any strides) -> h: (N, F), cache = (a, u)."""
    h = np.empty(a.shape, dtype=a.dtype)
    swiglu_forward_kernel(a, u, h)
    return h, (a, u)


def swiglu_backward(dh, cache, da=None, du=None):
    """-> (da, du), written into the given arrays (any strides) when given."""
    a, u = cache
    da = np.empty(a.shape, dtype=a.dtype) if da is None else da
    du = np.empty(u.shape, dtype=u.dtype) if du is None else du
    swiglu_backward_kernel(dh, a, u, da, du)
    return da, du


# ---- the whole feed-forward block --------------------------------------------------------------
def feedforward_forward(x, w_gate_up, w_down):
    """x: (N, D); w_gate_up: (2F, D); w_down: (D, F) -> y: (N, D)."""
    F = w_down.shape[1]
    au, cache_gate_up = linear_forward(x, w_gate_up)         # (N, 2F) = [a | u]
    h = np.empty((au.shape[0], F), dtype=au.dtype)
    swiglu_forward_rows_kernel(au, h)                        # (N, F)
    y, cache_down = linear_forward(h, w_down)                # (N, D)
    return y, (cache_gate_up, au, cache_down)


def feedforward_backward(dy, cache, dw_gate_up=None, dw_down=None):
    """-> (dx, dw_gate_up, dw_down).  Overwrites the cached gate/up activations (use a cache once)."""
    cache_gate_up, au, cache_down = cache
    dh, dw_down = linear_backward(dy, cache_down, dw_down)
    swiglu_backward_rows_inplace_kernel(dh, au)              # au <- [da | du]
    dx, dw_gate_up = linear_backward(au, cache_gate_up, dw_gate_up)
    return dx, dw_gate_up, dw_down
