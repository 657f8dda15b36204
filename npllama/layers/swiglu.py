"""SwiGLU feed-forward (Shazeer 2020):  FFN(x) = W_down (silu(W_gate x) * (W_up x)).

The elementwise part, with sigma the logistic function and silu(g) = g sigma(g):
    s = silu(g) * u                         g = W_gate x (the gate), u = W_up x
    du = ds * silu(g)
    dg = ds * u * silu'(g),   silu'(g) = sigma(g) (1 + g (1 - sigma(g)))
(g, u, s are the names of docs/06-swiglu.md and of npllama/reference.py's block_forward.)

The gate and up weights are stacked into one (2F, D) matrix so a single matmul produces both:
au = x W_gate_up^T holds the gate g = au[:, :F] and u = au[:, F:] side by side in each row.  The
kernels work on that layout, under their own short names (a for the gate, h for s):
``swiglu_forward_kernel(au, h)``, and ``swiglu_backward_kernel(dh, au)``, which writes [dg | du],
the gradient the gate/up matmul's backward wants, over au (the model's training step needs au no
more; gradcheck's ``swiglu_backward`` gives it a copy).  A decoding step calls the same forward on one row.

Shapes: x: (N, D); W_gate, W_up: (F, D) stacked as W_gate_up: (2F, D); W_down: (D, F);
g, u, s: (N, F); au, dau: (N, 2F).
"""
import numpy as np

from ..engine.fastmath import fast_exp
from ..engine.jit import jit_rows
from ..engine.pool import ROWS_PER_UNIT, claim_unit, row_units, run_on_threads


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
def swiglu_forward_reference(g, u):
    sig = 1.0 / (1.0 + np.exp(-g))
    return g * sig * u, (g, u)


def swiglu_backward_reference(ds, cache):
    g, u = cache
    sig = 1.0 / (1.0 + np.exp(-g))
    return ds * u * sig * (1.0 + g * (1.0 - sig)), ds * g * sig


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def swiglu_forward_kernel(au, h):
    """``_swiglu_forward_rows`` on the threads (on one row, as in a decoding step: on this one)."""
    run_on_threads(_swiglu_forward_rows, au, h, n_units=row_units(h.shape[0]))


def swiglu_backward_kernel(dh, au):
    """``_swiglu_backward_rows`` on the threads."""
    run_on_threads(_swiglu_backward_rows, dh, au, n_units=row_units(dh.shape[0]))


# ---- kernel bodies (private: engine/pool.py runs them on the threads) ----------------------------
# All arithmetic in the array's dtype (``one`` is typed like the data: a bare 1.0 would promote
# float32 to float64), and exp is ``fast_exp`` (vectorisable for float32, np.exp for float64).
# The ``_*_rows`` kernels take their rows ROWS_PER_UNIT at a time (``claim_unit``) and run on every
# thread at once through the in-place functions above (engine/pool.py: ``run_on_threads``).
@jit_rows
def _swiglu_forward_rows(au, h, next_unit):
    """h = silu(a) * u,  a = au[:, :F],  u = au[:, F:]."""
    N, F = h.shape
    one = au.dtype.type(1.0)
    while True:
        first = claim_unit(next_unit) * ROWS_PER_UNIT
        if first >= N:
            break
        for n in range(first, min(first + ROWS_PER_UNIT, N)):
            a_row, u_row, h_row = au[n, :F], au[n, F:], h[n]
            for f in range(F):
                a = a_row[f]
                sig = one / (one + fast_exp(-a))
                h_row[f] = a * sig * u_row[f]


@jit_rows
def _swiglu_backward_rows(dh, au, next_unit):
    """au <- [da | du]:  da = dh * u * silu'(a),  du = dh * silu(a), in place (the model's
    training step needs au no more)."""
    N, F = dh.shape
    one = au.dtype.type(1.0)
    while True:
        first = claim_unit(next_unit) * ROWS_PER_UNIT
        if first >= N:
            break
        for n in range(first, min(first + ROWS_PER_UNIT, N)):
            a_row, u_row, dh_row = au[n, :F], au[n, F:], dh[n]
            for f in range(F):
                a = a_row[f]
                u = u_row[f]
                sig = one / (one + fast_exp(-a))
                u_row[f] = dh_row[f] * a * sig
                a_row[f] = dh_row[f] * u * sig * (one + a * (one - sig))
