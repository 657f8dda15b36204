"""Decoding over a key/value cache: the kernels that only ``npllama.generate`` uses.

When a model writes text one token at a time, the keys and values of the tokens already seen never
change (a token only attends to the past), so each layer keeps them in a cache and a new token
costs one single-query attention over it instead of a whole forward pass.  At position t, for
query head h reading key/value head g = h // G (G = H / K query heads per kv head, as in training):

    s_j = c q_h . k_{g,j}                     j = 0 .. t,  c = 1/sqrt(hd)
    p_j = exp(s_j - m) / sum_j' exp(s_j' - m),   m = max_j s_j
    o_h = sum_j p_j v_{g,j}

No causal mask is needed: the cache holds only the past and the present.  All heads are done in
one kernel call and K/V are never repeated per query head.

Cache layout, per layer:
    keys   k_cache_t: (K, hd, S)   transposed, so that the scores  s_j += q_d k[d, j]  run over
                                   contiguous j for every d: independent lanes that LLVM
                                   vectorises without reordering any sum (each s_j still adds its
                                   hd products in the order d = 0, 1, ..., as a plain dot would)
    values v_cache:   (K, S, hd)   o_d += p_j v[j, d] runs over contiguous d, for the same reason
S is the cache's capacity; only the first ``length`` positions are read.

The rest of a decoding step (RMSNorm, RoPE, SwiGLU) runs the training kernels on one row.  The
whole step is one kernel on every thread (layers/decode_step.py), which calls these kernels on its
share of the work; called one at a time (``KVCacheDecoder._step_of_kernels``, for weights the one
kernel does not take), they are serial (at batch 1 most calls take a few microseconds, less than
handing work to another thread costs), except the matrix-vector product of large matrices, shared
among the threads when there are several (``matvec_parallel_kernel``).

Matrix-vector products y = W x (W row-major (out, in), as every weight here) are a Numba kernel
rather than BLAS: OpenBLAS's row-major gemv ("T" kernel) streams the 37 MB output projection of a
15M-parameter model at under half the memory bandwidth that a dot-product loop over four rows at
once reaches when LLVM may vectorise it.  That needs ``fastmath={"reassoc", "contract"}`` on this
loop (and on the single-query attention's sums): the products of a row are summed in vector lanes (and with FMA) instead of strictly
left to right.
Every operation stays IEEE (no assumptions about NaN, inf or signed zeros); only the summation
order changes, as it does between BLAS builds, and the result is deterministic on a machine.
"""
import numpy as np

from ..engine.fastmath import array_max, fast_exp
from ..engine.jit import INT, array, jit, jit_reassoc, jit_with
from ..engine.pool import UNIT_COUNTER, claim_unit, row_units, run_on_threads
from ..engine.threads import get_threads


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
def decode_attention_reference(q, k_cache_t, v_cache, length):
    """q: (H, hd); k_cache_t: (K, hd, S); v_cache: (K, S, hd) -> o: (H, hd), attending to
    positions 0 .. length-1. Repeats K/V per query head (the kernel never does)."""
    H, hd = q.shape
    G = H // k_cache_t.shape[0]
    k = np.repeat(k_cache_t[:, :, :length], G, axis=0)   # (H, hd, L)
    v = np.repeat(v_cache[:, :length], G, axis=0)         # (H, L, hd)
    scores = np.einsum("hd,hdj->hj", q, k) / np.sqrt(hd)                 # (H, L)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("hj,hjd->hd", probs, v)


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
@jit_reassoc
def decode_attention_kernel(q, k_cache_t, v_cache, length, scores, out):
    """out[head] = softmax_j(q[head] . k[:, j] / sqrt(hd)) weighted sum of v[j], j < length, for
    every query head, reading key/value head head // G.

    q, out: (H, hd); k_cache_t: (K, hd, S); v_cache: (K, S, hd); scores: scratch (>= length,).
    The scores take four d at a time (one pass over them per four rows of k), the probabilities
    are exponentiated in one vector loop, and the output takes four positions j at a time (one
    pass over it per four rows of v); sums in vector lanes ("reassoc"): 2.5x faster than one d /
    one j a pass at SmolLM2's shape (9 heads of 64, 160 positions; benchmarks/README.md)."""
    H, hd = q.shape
    G = H // k_cache_t.shape[0]
    scale = q.dtype.type(1.0 / np.sqrt(hd))
    d4, j4 = hd - hd % 4, length - length % 4
    for head in range(H):
        kv_head = head // G
        k = k_cache_t[kv_head]                  # (hd, S)
        v = v_cache[kv_head]                    # (S, hd)
        for j in range(length):
            scores[j] = 0.0
        for d in range(0, d4, 4):               # s_j += q_d k[d, j], four d at a time
            q0, q1, q2, q3 = q[head, d], q[head, d + 1], q[head, d + 2], q[head, d + 3]
            for j in range(length):
                scores[j] += q0 * k[d, j] + q1 * k[d + 1, j] + q2 * k[d + 2, j] + q3 * k[d + 3, j]
        for d in range(d4, hd):
            qd = q[head, d]
            for j in range(length):
                scores[j] += qd * k[d, j]
        for j in range(length):
            scores[j] *= scale
        row_max = array_max(scores, length)
        total = q.dtype.type(0.0)
        for j in range(length):                 # scores become the weights P_j * total
            weight = fast_exp(scores[j] - row_max)
            scores[j] = weight
            total += weight
        for d in range(hd):
            out[head, d] = 0.0
        for j in range(0, j4, 4):               # o_d += weight_j v[j, d], four j at a time
            w0, w1, w2, w3 = scores[j], scores[j + 1], scores[j + 2], scores[j + 3]
            for d in range(hd):
                out[head, d] += w0 * v[j, d] + w1 * v[j + 1, d] + w2 * v[j + 2, d] + w3 * v[j + 3, d]
        for j in range(j4, length):
            weight = scores[j]
            for d in range(hd):
                out[head, d] += weight * v[j, d]
        for d in range(hd):
            out[head, d] = out[head, d] / total


def cached_attention(qkv, n_heads, start, k_cache_t, v_cache, o):
    """A continuation's attention (a chat's next turn run as one batch): the rows qkv: (N, (H + 2K) hd),
    q and k rotated, are positions start .. start+N-1 of one sequence whose first ``start``
    positions the cache holds.  Their keys and values are stored into the cache, then row n's
    queries attend to the cache's positions 0 .. start+n -> o: (N, H * hd).  Row n is what a
    decoding step at position start+n computes (``decode_attention_kernel``); the rows are shared
    among the threads."""
    N = qkv.shape[0]
    hd = k_cache_t.shape[1]
    kv_cache_store_kernel(qkv, start, n_heads, k_cache_t, v_cache)
    q = qkv[:, :n_heads * hd].reshape(N, n_heads, hd)       # (views)
    run_on_threads(_cached_attention_rows, q, k_cache_t, v_cache, start, o.reshape(N, n_heads, hd), n_units=N)


@jit
def kv_cache_store_kernel(qkv, start, n_heads, k_cache_t, v_cache):
    """Write the keys and values of rows qkv: (N, (H + 2K) * hd), the q/k/v projection of positions
    start .. start+N-1 with k already rotated, into the cache at those positions (prefill: all P
    rows at once; a decoding step: one)."""
    K, hd, _ = k_cache_t.shape
    k0 = n_heads * hd
    v0 = k0 + K * hd
    for n in range(qkv.shape[0]):
        for kv_head in range(K):
            for d in range(hd):
                k_cache_t[kv_head, d, start + n] = qkv[n, k0 + kv_head * hd + d]
                v_cache[kv_head, start + n, d] = qkv[n, v0 + kv_head * hd + d]


MATVEC_FASTMATH = {"reassoc", "contract"}


# A matrix with at least this many entries gets the parallel matvec when npllama runs on > 1 thread.
PARALLEL_MATVEC_MIN_SIZE = 1 << 18


MATVEC_ROWS_PER_TASK = 1024


def matvec_for(w):
    """The matvec kernel to use for weight w: on every thread for big matrices, else this one; for
    a quantized W, the kernels of engine/quantized.py (layers/quantized_linear.py)."""
    if getattr(w, "quantized", False):
        from .quantized_linear import quantized_matvec   # (only a quantized W needs it: it imports the gguf package)
        return quantized_matvec
    if get_threads() > 1 and w.size >= PARALLEL_MATVEC_MIN_SIZE:
        return matvec_parallel_kernel
    return matvec_kernel


@jit_with(fastmath=MATVEC_FASTMATH)
def matvec_kernel(w, x, y):
    """y = w x.  w: (N, D) C-contiguous; x: (D,); y: (N,). Sums in w's dtype, in vector lanes."""
    matvec_rows(w, x, y, 0, w.shape[0])


def matvec_parallel_kernel(w, x, y):
    """``_matvec_units`` on the threads (engine/pool.py: ``run_on_threads``)."""
    run_on_threads(_matvec_units, w, x, y, n_units=row_units(w.shape[0], MATVEC_ROWS_PER_TASK))


# ---- kernel bodies (engine/pool.py runs them on the threads; layers/decode_step.py too) ---------
@jit_with(fastmath=MATVEC_FASTMATH)
def matvec_rows(w, x, y, start, stop):
    """y[i] = w[i] . x for start <= i < stop, walking four rows a quarter of the range apart at once.

    Four independent streams through memory keep more cache-line fetches in flight than one, so
    a single core pulls a large matrix from DRAM ~1.5x faster (measured on the 32000 x 288
    output head: 2.2 ms vs 3.5 ms).  Each row is still its own dot product over d."""
    quarter = (stop - start) // 4
    D = w.shape[1]
    for i in range(start, start + quarter):
        x0 = x[0]
        dot0 = w[i, 0] * x0
        dot1 = w[i + quarter, 0] * x0
        dot2 = w[i + 2 * quarter, 0] * x0
        dot3 = w[i + 3 * quarter, 0] * x0
        for d in range(1, D):
            xd = x[d]
            dot0 += w[i, d] * xd
            dot1 += w[i + quarter, d] * xd
            dot2 += w[i + 2 * quarter, d] * xd
            dot3 += w[i + 3 * quarter, d] * xd
        y[i] = dot0
        y[i + quarter] = dot1
        y[i + 2 * quarter] = dot2
        y[i + 3 * quarter] = dot3
    for i in range(start + 4 * quarter, stop):
        dot = w[i, 0] * x[0]        # (accumulates in w's dtype)
        for d in range(1, D):
            dot += w[i, d] * x[d]
        y[i] = dot


@jit_with(fastmath=MATVEC_FASTMATH, nogil=True)
def _matvec_units(w, x, y, next_unit):
    """matvec_kernel over blocks of MATVEC_ROWS_PER_TASK rows, one block per ``claim_unit`` (the same
    sums per row)."""
    N = w.shape[0]
    while True:
        t = claim_unit(next_unit)
        if t * MATVEC_ROWS_PER_TASK >= N:
            break
        matvec_rows(w, x, y, t * MATVEC_ROWS_PER_TASK, min(N, (t + 1) * MATVEC_ROWS_PER_TASK))


@jit_with(fastmath=MATVEC_FASTMATH, nogil=True)
def _cached_attention_rows(q, k_cache_t, v_cache, start, o, next_unit):
    """o[n] = decode_attention_kernel(q[n]) over positions 0 .. start+n, one row per ``claim_unit``.
    q, o: (N, H, hd)."""
    scores = np.empty(start + q.shape[0], dtype=q.dtype)     # this thread's
    while True:
        n = claim_unit(next_unit)
        if n >= q.shape[0]:
            break
        decode_attention_kernel(q[n], k_cache_t, v_cache, start + n + 1, scores, o[n])


# ---- the versions a training run calls (npllama/warmup.py compiles them ahead) -------------------
def kernel_versions(dtype):
    """A decoding step's (a training run's samples)."""
    rows, row, cache = array(dtype, 2), array(dtype, 1), array(dtype, 3)
    return [(decode_attention_kernel, (rows, cache, cache, INT, row, rows)),
            (kv_cache_store_kernel, (rows, INT, INT, cache, cache)),
            (matvec_kernel, (rows, row, row)),
            (_matvec_units, (rows, row, row, UNIT_COUNTER))]
