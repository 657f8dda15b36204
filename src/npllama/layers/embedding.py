"""Token embedding: a table lookup.

Forward:   out[b, t, :] = W[ids[b, t], :]
Backward:  each row of the table receives the sum of the upstream gradients of the positions
           that looked it up:  dW[v, :] = sum_{(b,t): ids[b,t] = v} dout[b, t, :]
           (a scatter-add; rows never looked up get zero).
"""
import numpy as np

from ..engine.jit import array, jit
from ..errors import InputError


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
def embedding_forward(ids, weight):
    """ids: int (B, T); weight: (V, D) -> out: (B, T, D)."""
    out = weight[ids]  # fancy indexing copies the rows
    cache = ids
    return out, cache


def scatter_add_rows_reference(ids, rows, table):
    np.add.at(table, ids, rows)


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def embedding_backward(dout, cache, dweight):
    """dout: (B, T, D). Adds into dweight (V, D) in place (it may already hold the tied lm_head
    gradient) and returns it.  The ids are checked first: the kernel does not check its indices,
    and an id outside [0, V) would write outside the table."""
    ids = np.asarray(cache)
    V, D = dweight.shape
    if ids.dtype.kind not in "iu":
        raise InputError(f"embedding ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        bad = ids[(ids < 0) | (ids >= V)].flat[0]
        raise InputError(f"embedding id {int(bad)} is outside [0, {V})")
    if dout.shape != ids.shape + (D,):
        raise InputError(f"embedding gradient has shape {dout.shape}, expected {ids.shape + (D,)}")
    _scatter_add_rows(ids.reshape(-1), dout.reshape(-1, D), dweight)
    return dweight


# ---- kernel bodies (private: engine/pool.py runs them on the threads) ----------------------------
@jit
def _scatter_add_rows(ids, rows, table):
    # Serial over positions: two positions may share a token id, so a parallel loop would race.
    for n in range(ids.shape[0]):
        v = ids[n]
        for d in range(rows.shape[1]):
            table[v, d] += rows[n, d]


# ---- the versions a training run calls (npllama/warmup.py compiles them ahead) -------------------
def kernel_versions(dtype):
    return [(_scatter_add_rows, (array(np.int64, 1), array(dtype, 2), array(dtype, 2)))]
