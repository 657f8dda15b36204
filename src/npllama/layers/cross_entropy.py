"""Softmax cross-entropy over the vocabulary, with an ignore index.

For row n with logits z (V,) and target y_n, the loss is  l_n = lse(z) - z_{y_n}
where lse(z) = log sum_v exp(z_v).  Rows whose target is ``ignore_index`` (-100) are left out,
and the loss is the mean over the M rows that remain:  L = (1/M) sum_n l_n.

Backward: dl_n/dz_v = softmax(z)_v - [v = y_n], so
    dz[n, v] = dL/M * (exp(z_v - lse_n) - [v = y_n])     for kept rows, 0 for ignored rows.

One kernel, ``cross_entropy_kernel``, gives the per-row losses and, when asked, the gradient,
written over the logits in training (the (N, V) logits buffer is then the only one) or into a new
array; evaluation asks for the losses alone.

Shapes: logits, dlogits: (N, V); targets: int (N,); losses: float64 (N,).
"""
import numpy as np

from ..engine.fastmath import array_max, fast_exp
from ..engine.jit import INT, array, jit_rows_reassoc, scalar
from ..engine.pool import ROWS_PER_UNIT, UNIT_COUNTER, claim_unit, row_units, run_on_threads


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
IGNORE_INDEX = -100


def cross_entropy_forward_reference(logits, targets, ignore_index=IGNORE_INDEX):
    keep = targets != ignore_index
    m = logits.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
    safe_targets = np.where(keep, targets, 0)
    losses = lse - logits[np.arange(len(targets)), safe_targets]
    count = max(int(keep.sum()), 1)
    return float(np.sum(losses[keep]) / count), (logits, targets, lse, count, ignore_index)


def cross_entropy_backward_reference(dloss, cache):
    logits, targets, lse, count, ignore_index = cache
    keep = targets != ignore_index
    dlogits = np.exp(logits - lse[:, None])
    dlogits[np.arange(len(targets))[keep], targets[keep]] -= 1.0
    dlogits[~keep] = 0.0
    return dlogits * (dloss / count)


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def cross_entropy_kernel(logits, targets, ignore_index, losses, scale):
    """``_cross_entropy_rows`` on the threads, ROWS_PER_UNIT rows at a time."""
    run_on_threads(_cross_entropy_rows, logits, targets, ignore_index, losses, scale,
                   n_units=row_units(logits.shape[0]))


def count_targets(targets, ignore_index=IGNORE_INDEX):
    """M, the number of rows that count (at least 1, so that a batch of ignored rows gives 0)."""
    return max(int(np.count_nonzero(targets != ignore_index)), 1)


def cross_entropy_forward_backward(logits, targets, losses=None, ignore_index=IGNORE_INDEX, dloss=1.0):
    """Mean loss over targets != ignore_index, and dlogits written over ``logits`` (N, V).

    Returns (loss as a Python float, logits, which now hold dL/dlogits * dloss).  ``losses`` is an
    optional float64 (N,) work buffer."""
    losses = np.empty(logits.shape[0], dtype=np.float64) if losses is None else losses
    count = count_targets(targets, ignore_index)
    cross_entropy_kernel(logits, targets, ignore_index, losses, logits.dtype.type(dloss / count))
    return float(np.sum(losses) / count), logits


# ---- kernel bodies (private: engine/pool.py runs them on the threads) ----------------------------
@jit_rows_reassoc
def _cross_entropy_rows(logits, targets, ignore_index, losses, scale, next_unit):
    """losses[n] = lse_n - z[n, t_n]  (0 for ignored rows), and, when ``scale`` is not 0, the
    gradient written over the logits:

        z[n, :]  <-  scale * (softmax(z[n, :]) - onehot(t_n))      (0 for ignored rows)

    with scale = dL/M; scale = 0 gives the losses alone and leaves the logits as they are (a
    runtime choice, so that evaluation and training share one compilation).  exp(z_v - m) (m the
    row max) is computed once, stored in place, summed, and the stored values rescaled by
    scale / sum.  The sum accumulates in float64, with "reassoc" so it runs in vector lanes (float64
    results move by ~1e-16); exp is ``fast_exp``.  The gradient goes over the logits: a training
    step needs no second (N, V) array."""
    N, V = logits.shape
    gradient = scale != 0.0
    while True:
        first = claim_unit(next_unit) * ROWS_PER_UNIT
        if first >= N:
            break
        for n in range(first, min(first + ROWS_PER_UNIT, N)):
            t = targets[n]
            z = logits[n]
            if t == ignore_index:
                losses[n] = 0.0
                if gradient:
                    for v in range(V):
                        z[v] = 0.0
                continue
            z_target = z[t]
            m = array_max(z, V)
            total = 0.0
            if gradient:
                for v in range(V):
                    e = fast_exp(z[v] - m)
                    z[v] = e
                    total += e
            else:
                for v in range(V):
                    total += fast_exp(z[v] - m)
            losses[n] = m + np.log(total) - z_target
            if gradient:
                scale_over_total = logits.dtype.type(scale / total)
                for v in range(V):
                    z[v] *= scale_over_total
                z[t] -= scale


# ---- the versions a training run calls (npllama/warmup.py compiles them ahead) -------------------
def kernel_versions(dtype):
    # (the losses are float64 whatever the dtype)
    return [(_cross_entropy_rows, (array(dtype, 2), array(np.int64, 1), INT, array(np.float64, 1), scalar(dtype),
                                   UNIT_COUNTER))]
