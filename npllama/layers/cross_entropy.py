"""Softmax cross-entropy over the vocabulary, with an ignore index.

For row n with logits z (V,) and target y_n, the loss is  l_n = lse(z) - z_{y_n}
where lse(z) = log sum_v exp(z_v).  Rows whose target is ``ignore_index`` (-100) are left out,
and the loss is the mean over the M rows that remain:  L = (1/M) sum_n l_n.

Backward: dl_n/dz_v = softmax(z)_v - [v = y_n], so
    dz[n, v] = dL/M * (exp(z_v - lse_n) - [v = y_n])     for kept rows, 0 for ignored rows.

Shapes: logits, dlogits: (N, V); targets: int (N,); lse: (N,).
"""
import numpy as np

from ._numba import jit_parallel, prange

IGNORE_INDEX = -100


# ---- readable reference ------------------------------------------------------------------------
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


# ---- kernels -----------------------------------------------------------------------------------
@jit_parallel
def cross_entropy_forward_kernel(logits, targets, ignore_index, lse, losses):
    N, V = logits.shape
    for n in prange(N):
        m = -np.inf
        for v in range(V):
            if logits[n, v] > m:
                m = logits[n, v]
        total = 0.0
        for v in range(V):
            total += np.exp(logits[n, v] - m)
        lse[n] = m + np.log(total)
        t = targets[n]
        losses[n] = 0.0 if t == ignore_index else lse[n] - logits[n, t]


@jit_parallel
def cross_entropy_backward_kernel(logits, targets, ignore_index, lse, scale, dlogits):
    # dlogits may be the logits array itself: each element is read before it is written.
    N, V = logits.shape
    for n in prange(N):
        t = targets[n]
        if t == ignore_index:
            for v in range(V):
                dlogits[n, v] = 0.0
        else:
            for v in range(V):
                dlogits[n, v] = np.exp(logits[n, v] - lse[n]) * scale
            dlogits[n, t] -= scale


# ---- what the model calls ----------------------------------------------------------------------
def cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX):
    """logits: (N, V); targets: int (N,) -> (mean loss as a Python float, cache)."""
    N = logits.shape[0]
    lse = np.empty(N, dtype=np.float64)
    losses = np.empty(N, dtype=np.float64)
    cross_entropy_forward_kernel(logits, targets, ignore_index, lse, losses)
    count = max(int(np.count_nonzero(targets != ignore_index)), 1)
    return float(np.sum(losses) / count), (logits, targets, lse, count, ignore_index)


def cross_entropy_backward(dloss, cache, out=None):
    """-> dlogits (N, V); ``out`` may be the logits array to reuse its memory."""
    logits, targets, lse, count, ignore_index = cache
    out = np.empty_like(logits) if out is None else out
    cross_entropy_backward_kernel(logits, targets, ignore_index, lse, dloss / count, out)
    return out
