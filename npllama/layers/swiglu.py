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

from ._numba import jit_parallel, prange
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
@jit_parallel
def swiglu_forward_kernel(a, u, h):
    N, F = a.shape
    for n in prange(N):
        for f in range(F):
            sig = 1.0 / (1.0 + np.exp(-a[n, f]))
            h[n, f] = a[n, f] * sig * u[n, f]


@jit_parallel
def swiglu_backward_kernel(dh, a, u, da, du):
    N, F = a.shape
    for n in prange(N):
        for f in range(F):
            sig = 1.0 / (1.0 + np.exp(-a[n, f]))
            silu = a[n, f] * sig
            du[n, f] = dh[n, f] * silu
            da[n, f] = dh[n, f] * u[n, f] * sig * (1.0 + a[n, f] * (1.0 - sig))


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
    au, cache_gate_up = linear_forward(x, w_gate_up)         # (N, 2F)
    h, cache_swiglu = swiglu_forward(au[:, :F], au[:, F:])   # (N, F)
    y, cache_down = linear_forward(h, w_down)                # (N, D)
    return y, (cache_gate_up, cache_swiglu, cache_down)


def feedforward_backward(dy, cache, dw_gate_up=None, dw_down=None):
    """-> (dx, dw_gate_up, dw_down)."""
    cache_gate_up, cache_swiglu, cache_down = cache
    dh, dw_down = linear_backward(dy, cache_down, dw_down)
    F = dh.shape[1]
    dau = np.empty((dh.shape[0], 2 * F), dtype=dh.dtype)
    swiglu_backward(dh, cache_swiglu, dau[:, :F], dau[:, F:])
    dx, dw_gate_up = linear_backward(dau, cache_gate_up, dw_gate_up)
    return dx, dw_gate_up, dw_down
