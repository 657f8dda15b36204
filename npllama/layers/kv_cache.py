"""One decoding step over a key/value cache: the kernels of ``npllama.generate``.

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

The step kernels work on one token (B = 1) and are serial (at batch 1 most calls take a few
microseconds, less than a parallel region costs to start), except the matrix-vector product of
large matrices when Numba has more than one thread.

Matrix-vector products y = W x (W row-major (out, in), as every weight here) are a Numba kernel
rather than BLAS: OpenBLAS's row-major gemv ("T" kernel) streams the 37 MB output projection of a
15M-parameter model at under half the memory bandwidth that a dot-product loop over four rows at
once reaches when LLVM may vectorise it.  That needs ``fastmath={"reassoc", "contract"}`` on this
one loop: the products of a row are summed in vector lanes (and with FMA) instead of strictly
left to right.
Every operation stays IEEE (no assumptions about NaN, inf or signed zeros); only the summation
order changes, as it does between BLAS builds, and the result is deterministic on a machine.
"""
import numba
import numpy as np

from ._numba import jit


# ---- readable reference ------------------------------------------------------------------------
def decode_attention_reference(q, k_cache_t, v_cache, length):
    """q: (H, hd); k_cache_t: (K, hd, S); v_cache: (K, S, hd) -> o: (H, hd), attending to
    positions 0 .. length-1. Repeats K/V per query head (the kernel never does)."""
    H, hd = q.shape
    G = H // k_cache_t.shape[0]
    k = np.repeat(k_cache_t[:, :, :length], G, axis=0)   # (H, hd, L)
    v = np.repeat(v_cache[:, :length], G, axis=0)         # (H, L, hd)
    s = np.einsum("hd,hdj->hj", q, k) / np.sqrt(hd)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hj,hjd->hd", p, v)


# ---- kernels -----------------------------------------------------------------------------------
@jit
def decode_attention_kernel(q, k_cache_t, v_cache, length, scores, out):
    """out[h] = softmax_j(c q[h] . k[:, j]) weighted sum of v[j], j < length, for every head h.

    q, out: (H, hd); k_cache_t: (K, hd, S); v_cache: (K, S, hd); scores: scratch (>= length,)."""
    H, hd = q.shape
    G = H // k_cache_t.shape[0]
    c = 1.0 / np.sqrt(hd)
    for h in range(H):
        g = h // G
        for j in range(length):
            scores[j] = 0.0
        for d in range(hd):
            qd = q[h, d]
            for j in range(length):
                scores[j] += qd * k_cache_t[g, d, j]
        m = -np.inf
        for j in range(length):
            scores[j] *= c
            if scores[j] > m:
                m = scores[j]
        total = 0.0
        for d in range(hd):
            out[h, d] = 0.0
        for j in range(length):
            p = np.exp(scores[j] - m)
            total += p
            for d in range(hd):
                out[h, d] += p * v_cache[g, j, d]
        for d in range(hd):
            out[h, d] = out[h, d] / total


@jit
def rope_store_kernel(qkv, cos, sin, pos, n_heads, k_cache_t, v_cache):
    """Rotate the new token's q (in place in qkv) and k by the angles of position ``pos`` and write
    k and v into the cache at ``pos``.

    qkv: (H*hd + 2*K*hd,) = [q | k | v] as the W_qkv projection lays them out; cos, sin: tables
    (>= pos+1, hd/2). Same rotation as layers.rope:  y1 = x1 cos - x2 sin,  y2 = x2 cos + x1 sin."""
    K, hd, _ = k_cache_t.shape
    half = hd // 2
    for h in range(n_heads):
        b = h * hd
        for i in range(half):
            cs = cos[pos, i]
            sn = sin[pos, i]
            x1 = qkv[b + i]
            x2 = qkv[b + i + half]
            qkv[b + i] = x1 * cs - x2 * sn
            qkv[b + i + half] = x2 * cs + x1 * sn
    k0 = n_heads * hd
    v0 = k0 + K * hd
    for g in range(K):
        b = k0 + g * hd
        for i in range(half):
            cs = cos[pos, i]
            sn = sin[pos, i]
            x1 = qkv[b + i]
            x2 = qkv[b + i + half]
            k_cache_t[g, i, pos] = x1 * cs - x2 * sn
            k_cache_t[g, i + half, pos] = x2 * cs + x1 * sn
        for d in range(hd):
            v_cache[g, pos, d] = qkv[v0 + g * hd + d]


@jit
def decode_attention_step_kernel(qkv, q, cos, sin, pos, k_cache_t, v_cache, scores, out):
    """rope_store_kernel then decode_attention_kernel over positions 0..pos: one call per layer.
    q: the (H, hd) view of qkv's first H*hd entries; out: (H, hd)."""
    rope_store_kernel(qkv, cos, sin, pos, q.shape[0], k_cache_t, v_cache)
    decode_attention_kernel(q, k_cache_t, v_cache, pos + 1, scores, out)


@jit
def add_rmsnorm_kernel(x, delta, w, eps, out):
    """The residual update and the next RMSNorm in one pass over a single row:
        x <- x + delta;   out = w * x / sqrt(mean(x^2) + eps)
    (the same arithmetic as layers.rmsnorm's kernel: the sum of squares is accumulated in float64)."""
    D = x.shape[0]
    ss = 0.0
    for d in range(D):
        xd = x[d] + delta[d]
        x[d] = xd
        ss += xd * xd
    r = 1.0 / np.sqrt(ss / D + eps)
    for d in range(D):
        out[d] = w[d] * (x[d] * r)


@jit
def swiglu_row_kernel(gate_up, out):
    """out = silu(a) * u for one row, a = gate_up[:F], u = gate_up[F:] (as layers.swiglu)."""
    F = out.shape[0]
    for f in range(F):
        a = gate_up[f]
        sig = 1.0 / (1.0 + np.exp(-a))
        out[f] = a * sig * gate_up[F + f]


# A matrix with at least this many entries gets the parallel matvec when Numba has > 1 thread.
PARALLEL_MATVEC_MIN_SIZE = 1 << 18
MATVEC_ROWS_PER_TASK = 1024


MATVEC_FASTMATH = {"reassoc", "contract"}


@numba.njit(cache=True, fastmath=MATVEC_FASTMATH)
def _matvec_rows(w, x, y, start, stop):
    """y[i] = w[i] . x for start <= i < stop, walking four rows a quarter of the range apart at once.

    Four independent streams through memory keep more cache-line fetches in flight than one, so
    a single core pulls a large matrix from DRAM ~1.5x faster (measured on the 32000 x 288
    output head: 2.2 ms vs 3.5 ms).  Each row is still its own dot product over d."""
    q = (stop - start) // 4
    D = w.shape[1]
    for i in range(start, start + q):
        x0 = x[0]
        a = w[i, 0] * x0
        b = w[i + q, 0] * x0
        c = w[i + 2 * q, 0] * x0
        e = w[i + 3 * q, 0] * x0
        for d in range(1, D):
            xd = x[d]
            a += w[i, d] * xd
            b += w[i + q, d] * xd
            c += w[i + 2 * q, d] * xd
            e += w[i + 3 * q, d] * xd
        y[i] = a
        y[i + q] = b
        y[i + 2 * q] = c
        y[i + 3 * q] = e
    for i in range(start + 4 * q, stop):
        s = w[i, 0] * x[0]          # (accumulates in w's dtype)
        for d in range(1, D):
            s += w[i, d] * x[d]
        y[i] = s


@numba.njit(cache=True, fastmath=MATVEC_FASTMATH)
def matvec_kernel(w, x, y):
    """y = w x.  w: (N, D) C-contiguous; x: (D,); y: (N,). Sums in w's dtype, in vector lanes."""
    _matvec_rows(w, x, y, 0, w.shape[0])


@numba.njit(cache=True, fastmath=MATVEC_FASTMATH, parallel=True)
def matvec_parallel_kernel(w, x, y):
    """matvec_kernel with blocks of rows spread over Numba's threads (the same sums per row)."""
    N = w.shape[0]
    n_tasks = (N + MATVEC_ROWS_PER_TASK - 1) // MATVEC_ROWS_PER_TASK
    for t in numba.prange(n_tasks):
        _matvec_rows(w, x, y, t * MATVEC_ROWS_PER_TASK, min(N, (t + 1) * MATVEC_ROWS_PER_TASK))


def matvec_for(w):
    """The matvec kernel to use for weight w: parallel for big matrices when Numba has threads."""
    if numba.get_num_threads() > 1 and w.size >= PARALLEL_MATVEC_MIN_SIZE:
        return matvec_parallel_kernel
    return matvec_kernel
