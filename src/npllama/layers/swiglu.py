"""SwiGLU feed-forward (Shazeer 2020):  FFN(x) = W_down (silu(W_gate x) * (W_up x)).

The elementwise part, with sigma the logistic function and silu(g) = g sigma(g):
    s = silu(g) * u                         g = W_gate x (the gate), u = W_up x
    du = ds * silu(g)
    dg = ds * u * silu'(g),   silu'(g) = sigma(g) (1 + g (1 - sigma(g)))
(g, u, s are the names of docs/06-swiglu.md and of npllama/reference.py's block_forward.)

The gate and up weights are stacked into one (2F, D) matrix so a single matmul produces both:
gate_up = x W_gate_up^T holds the gate g = gate_up[:, :F] and u = gate_up[:, F:] side by side in
each row.  The kernels work on that layout, with the same names g, u, s:
``swiglu_forward_kernel(gate_up, s)``, and ``swiglu_backward_kernel(ds, gate_up)``, which writes
[dg | du], the gradient the gate/up matmul's backward wants, over gate_up (the model's training
step needs it no more; gradcheck's ``swiglu_backward`` gives it a copy).  A decoding step calls the
same forward on one row.

Shapes: x: (N, D); W_gate, W_up: (F, D) stacked as W_gate_up: (2F, D); W_down: (D, F);
g, u, s, ds: (N, F); gate_up, [dg | du]: (N, 2F).
"""
import numpy as np

from ..engine.fastmath import fast_exp
from ..engine.jit import array, jit_rows
from ..engine.pool import ROWS_PER_UNIT, UNIT_COUNTER, claim_unit, row_units, run_on_threads


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
def swiglu_forward_reference(g, u):
    sig = 1.0 / (1.0 + np.exp(-g))
    return g * sig * u, (g, u)


def swiglu_backward_reference(ds, cache):
    g, u = cache
    sig = 1.0 / (1.0 + np.exp(-g))
    return ds * u * sig * (1.0 + g * (1.0 - sig)), ds * g * sig


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def swiglu_forward_kernel(gate_up, s):
    """``swiglu_forward_rows`` on the threads (on one row, as in a decoding step: on this one)."""
    run_on_threads(swiglu_forward_rows, gate_up, s, n_units=row_units(s.shape[0]))


def swiglu_backward_kernel(ds, gate_up):
    """``_swiglu_backward_rows`` on the threads."""
    run_on_threads(_swiglu_backward_rows, ds, gate_up, n_units=row_units(ds.shape[0]))


# ---- kernel bodies (engine/pool.py runs them on the threads; layers/decode_step.py on one row) ---
# All arithmetic in the array's dtype (``one`` is typed like the data: a bare 1.0 would promote
# float32 to float64), and exp is ``fast_exp`` (vectorisable for float32, np.exp for float64).
# The ``_*_rows`` kernels take their rows ROWS_PER_UNIT at a time (``claim_unit``) and run on every
# thread at once through the in-place functions above (engine/pool.py: ``run_on_threads``).
@jit_rows
def swiglu_forward_rows(gate_up, s, next_unit):
    """s = silu(g) * u,  g = gate_up[:, :F],  u = gate_up[:, F:]."""
    N, F = s.shape
    one = gate_up.dtype.type(1.0)
    while True:
        first = claim_unit(next_unit) * ROWS_PER_UNIT
        if first >= N:
            break
        for n in range(first, min(first + ROWS_PER_UNIT, N)):
            g_row, u_row, s_row = gate_up[n, :F], gate_up[n, F:], s[n]
            for f in range(F):
                g = g_row[f]
                sig = one / (one + fast_exp(-g))
                s_row[f] = g * sig * u_row[f]


@jit_rows
def _swiglu_backward_rows(ds, gate_up, next_unit):
    """gate_up <- [dg | du]:  dg = ds * u * silu'(g),  du = ds * silu(g), in place (the model's
    training step needs gate_up no more)."""
    N, F = ds.shape
    one = gate_up.dtype.type(1.0)
    while True:
        first = claim_unit(next_unit) * ROWS_PER_UNIT
        if first >= N:
            break
        for n in range(first, min(first + ROWS_PER_UNIT, N)):
            g_row, u_row, ds_row = gate_up[n, :F], gate_up[n, F:], ds[n]
            for f in range(F):
                g = g_row[f]
                u = u_row[f]
                sig = one / (one + fast_exp(-g))
                u_row[f] = ds_row[f] * g * sig
                g_row[f] = ds_row[f] * u * sig * (one + g * (one - sig))


# ---- the versions a training run calls (npllama/warmup.py compiles them ahead) -------------------
def kernel_versions(dtype):
    rows = array(dtype, 2)
    return [(swiglu_forward_rows, (rows, rows, UNIT_COUNTER)), (_swiglu_backward_rows, (rows, rows, UNIT_COUNTER))]
