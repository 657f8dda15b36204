"""RMSNorm (Zhang & Sennrich 2019), as in Llama.

Forward, per row x of width D:
    r    = (mean(x^2) + eps)^(-1/2)          the reciprocal root mean square, a scalar per row
    xhat = x * r
    y    = w * xhat                          w: (D,) learned gain

Backward, with dxhat = dy * w (the gradient reaching xhat):
    dw   = sum over rows of dy * xhat
    dr/dx_i = -r^3 x_i / D, so
    dx_i = r dxhat_i + sum_j dxhat_j x_j dr/dx_i = r (dxhat_i - xhat_i * mean_j(dxhat_j xhat_j))

One kernel does the forward everywhere (training, prefill and a decoding step, which is N = 1 row):
``rmsnorm_forward_kernel``, optionally fused with the residual add that precedes the norm inside a
block,  h = x + a,  y = RMSNorm(h)  (one pass writes h, y and r; in a decoding step h is x itself, updating the
residual stream in place).  In the backward the residual's gradient passes through the add
unchanged, so the model *adds* the norm's dx to the residual stream's gradient in place
(``rmsnorm_backward_kernel(..., accumulate=True)``).

Shapes: x, y, dx: (N, D) (any leading dims are flattened); w, dw: (D,); r: (N,).
"""
import numpy as np

from ..engine.jit import BOOL, NONE, array, jit_rows_reassoc, scalar
from ..engine.pool import ROWS_PER_UNIT, UNIT_COUNTER, claim_unit, row_units, run_on_threads


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
def rmsnorm_forward_reference(x, w, eps):
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return w * (x * r), (x, w, r[..., 0])


def rmsnorm_backward_reference(dy, cache):
    x, w, r = cache
    r = r[..., None]
    xhat = x * r
    dxhat = dy * w
    dx = r * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    dw = np.sum((dy * xhat).reshape(-1, x.shape[-1]), axis=0)
    return dx, dw


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def rmsnorm_forward_kernel(x, w, eps, y, r, residual=None, h=None):
    """``rmsnorm_forward_rows`` on the threads (on one row, as in a decoding step: on this one)."""
    run_on_threads(rmsnorm_forward_rows, x, w, eps, y, r, residual, h, n_units=row_units(x.shape[0]))


def rmsnorm_backward_kernel(dy, x, w, r, dx, dw_partial, accumulate):
    """``_rmsnorm_backward_rows`` on the threads."""
    run_on_threads(_rmsnorm_backward_rows, dy, x, w, r, dx, dw_partial, accumulate, n_units=dw_partial.shape[0])


def rmsnorm_dw_chunks(n_rows):
    """Rows are split into this many chunks for the partial sums of dw."""
    return max(1, min(8, n_rows))


# ---- kernel bodies (engine/pool.py runs them on the threads; layers/decode_step.py on one row) ---
# Sums of squares and dot products accumulate in float64; "reassoc" (jit_rows_reassoc) lets
# LLVM split those sums into vector lanes -- without it each row's sum is one scalar chain, and the
# kernels took ~1.6x as long (2048 x 128 float32: forward 322 -> 190 us, backward 311 -> 201 us);
# float64 results move at the 1e-16 level.  The elementwise loops stay in the array's dtype (r is
# cast back), so they vectorise for float32.  The ``_*_rows`` kernels take their rows a unit at a
# time (``claim_unit``) and run on every thread at once through the in-place functions above.
@jit_rows_reassoc
def rmsnorm_forward_rows(x, w, eps, y, r, residual, h, next_unit):
    """y = w * x * r,  r = 1/sqrt(mean(x^2) + eps) per row (into r).

    With ``residual`` (and then ``h``): first h = x + residual, written to h, then y = RMSNorm(h)
    (h may be x itself: an in-place residual stream, as in a decoding step).  Whether residual is
    None is decided when Numba compiles, not per element; so a run compiles two versions, with and
    without it."""
    N, D = x.shape
    while True:
        first = claim_unit(next_unit) * ROWS_PER_UNIT
        if first >= N:
            break
        for n in range(first, min(first + ROWS_PER_UNIT, N)):
            x_row, y_row = x[n], y[n]
            v_row = x_row
            if residual is not None:
                res_row, v_row = residual[n], h[n]
                for d in range(D):
                    v_row[d] = x_row[d] + res_row[d]
            ss = 0.0                     # (a loop of its own: the same sum whether h is x or not)
            for d in range(D):
                ss += v_row[d] * v_row[d]
            rn = x.dtype.type(1.0 / np.sqrt(ss / D + eps))
            r[n] = rn
            for d in range(D):
                y_row[d] = w[d] * (v_row[d] * rn)


@jit_rows_reassoc
def _rmsnorm_backward_rows(dy, x, w, r, dx, dw_partial, accumulate, next_unit):
    """dx = RMSNorm backward of dy, or dx += it when ``accumulate`` (dx is then the residual
    stream's gradient, which passes through the skip connection unchanged).  dx shares no memory
    with the inputs.

    dw is a sum over rows; the rows are cut into dw_partial.shape[0] chunks (the units of work),
    each chunk accumulates its own partial row (no races), and the caller sums the partials."""
    N, D = x.shape
    n_chunks = dw_partial.shape[0]
    while True:
        c = claim_unit(next_unit)
        if c >= n_chunks:
            break
        dw_c = dw_partial[c]
        for d in range(D):
            dw_c[d] = 0.0
        for n in range(c * N // n_chunks, (c + 1) * N // n_chunks):
            rn = r[n]
            dy_row, x_row, dx_row = dy[n], x[n], dx[n]
            dot = 0.0
            for d in range(D):
                dot += dy_row[d] * w[d] * x_row[d]
            mean_term = x.dtype.type(dot * rn * rn / D)  # mean(dxhat * xhat) * r, dxhat = dy * w
            for d in range(D):
                xhat = x_row[d] * rn
                dw_c[d] += dy_row[d] * xhat
                dx_d = rn * (dy_row[d] * w[d] - x_row[d] * mean_term)
                if accumulate:
                    dx_row[d] += dx_d
                else:
                    dx_row[d] = dx_d


# ---- the versions a training run calls (npllama/warmup.py compiles them ahead) -------------------
def kernel_versions(dtype):
    rows, row, f = array(dtype, 2), array(dtype, 1), scalar(dtype)
    return [(rmsnorm_forward_rows, (rows, row, f, rows, row, NONE, NONE, UNIT_COUNTER)),   # the final norm
            (rmsnorm_forward_rows, (rows, row, f, rows, row, rows, rows, UNIT_COUNTER)),   # after a residual add
            (_rmsnorm_backward_rows, (rows, rows, row, row, rows, rows, BOOL, UNIT_COUNTER))]
