"""Causal scaled dot-product attention with grouped-query attention (GQA).

H query heads share K key/value heads in groups of G = H / K: query head h reads kv head h // G
(K = H is plain multi-head attention, K = 1 multi-query).  For one query head, with c = 1/sqrt(hd):

    S_ij = c q_i . k_j                 for j <= i   (causal: later keys are never looked at)
    P_ij = exp(S_ij - lse_i),  lse_i = log sum_{j<=i} exp(S_ij)
    o_i  = sum_{j<=i} P_ij v_j

Backward, given do_i:
    dv_j  = sum_{i>=j} P_ij do_i
    dP_ij = do_i . v_j
    dS_ij = P_ij (dP_ij - D_i),  D_i = sum_j P_ij dP_ij = do_i . o_i      (softmax backward)
    dq_i  = c sum_{j<=i} dS_ij k_j
    dk_j  = c sum_{i>=j} dS_ij q_i
Under GQA a key/value head is used by the G query heads of its group, so its gradients are the
sums over those heads.

The causal mask is never stored: the loops simply stop at j = i.  The forward keeps only the
per-row log-sum-exp (B, H, T) so the backward can rebuild P without storing it.

Shapes: q, o: (B, H, T, hd); k, v: (B, K, T, hd) (any strides); lse: (B, H, T).
"""
import numpy as np

from ._numba import jit_parallel, prange


# ---- readable reference ------------------------------------------------------------------------
def attention_forward_reference(q, k, v):
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    k = np.repeat(k, G, axis=1)  # the reference may repeat K/V; the kernel never does
    v = np.repeat(v, G, axis=1)
    s = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(hd)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    s = np.where(future, -np.inf, s)
    m = s.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True))
    p = np.exp(s - lse)
    o = p @ v
    return o, (q, k, v, o, lse[..., 0], G)


def attention_backward_reference(do, cache):
    q, k, v, o, lse, G = cache
    B, H, T, hd = q.shape
    c = 1.0 / np.sqrt(hd)
    s = (q @ k.transpose(0, 1, 3, 2)) * c
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    p = np.where(future, 0.0, np.exp(s - lse[..., None]))
    dv = p.transpose(0, 1, 3, 2) @ do
    dp = do @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - np.sum(do * o, axis=-1, keepdims=True))
    dq = c * ds @ k
    dk = c * ds.transpose(0, 1, 3, 2) @ q
    # sum the gradients of the G query heads that share each kv head
    dk = dk.reshape(B, H // G, G, T, hd).sum(axis=2)
    dv = dv.reshape(B, H // G, G, T, hd).sum(axis=2)
    return dq, dk, dv


# ---- kernels -----------------------------------------------------------------------------------
@jit_parallel
def attention_forward_kernel(q, k, v, o, lse):
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    c = 1.0 / np.sqrt(hd)
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        kh = h // G
        s = np.empty(T, dtype=q.dtype)
        acc = np.empty(hd, dtype=q.dtype)
        for i in range(T):
            m = -np.inf
            for j in range(i + 1):
                dot = 0.0
                for d in range(hd):
                    dot += q[b, h, i, d] * k[b, kh, j, d]
                s[j] = dot * c
                if s[j] > m:
                    m = s[j]
            total = 0.0
            acc[:] = 0.0
            for j in range(i + 1):
                p = np.exp(s[j] - m)
                total += p
                for d in range(hd):
                    acc[d] += p * v[b, kh, j, d]
            for d in range(hd):
                o[b, h, i, d] = acc[d] / total
            lse[b, h, i] = m + np.log(total)


@jit_parallel
def attention_backward_kernel(q, k, v, o, lse, do, dq, dk, dv):
    # Parallel over (batch, kv head): the G query heads of a group all write the same dk, dv rows,
    # so they run in the same iteration and never race.
    B, H, T, hd = q.shape
    K = k.shape[1]
    G = H // K
    c = 1.0 / np.sqrt(hd)
    for bk in prange(B * K):
        b = bk // K
        kh = bk % K
        for j in range(T):
            for d in range(hd):
                dk[b, kh, j, d] = 0.0
                dv[b, kh, j, d] = 0.0
        for h in range(kh * G, (kh + 1) * G):
            for i in range(T):
                Di = 0.0
                for d in range(hd):
                    Di += do[b, h, i, d] * o[b, h, i, d]
                    dq[b, h, i, d] = 0.0
                for j in range(i + 1):
                    sij = 0.0
                    dpij = 0.0
                    for d in range(hd):
                        sij += q[b, h, i, d] * k[b, kh, j, d]
                        dpij += do[b, h, i, d] * v[b, kh, j, d]
                    pij = np.exp(sij * c - lse[b, h, i])
                    dsij = pij * (dpij - Di) * c
                    for d in range(hd):
                        dv[b, kh, j, d] += pij * do[b, h, i, d]
                        dq[b, h, i, d] += dsij * k[b, kh, j, d]
                        dk[b, kh, j, d] += dsij * q[b, h, i, d]


# ---- what the model calls ----------------------------------------------------------------------
def attention_forward(q, k, v):
    """q: (B, H, T, hd), k, v: (B, K, T, hd) -> o: (B, H, T, hd), cache."""
    B, H, T, hd = q.shape
    o = np.empty((B, H, T, hd), dtype=q.dtype)
    lse = np.empty((B, H, T), dtype=q.dtype)
    attention_forward_kernel(q, k, v, o, lse)
    return o, (q, k, v, o, lse)


def attention_backward(do, cache, dq=None, dk=None, dv=None):
    """do: (B, H, T, hd) -> (dq, dk, dv); written into the given arrays (any strides) when given."""
    q, k, v, o, lse = cache
    dq = np.empty(q.shape, dtype=q.dtype) if dq is None else dq
    dk = np.empty(k.shape, dtype=k.dtype) if dk is None else dk
    dv = np.empty(v.shape, dtype=v.dtype) if dv is None else dv
    attention_backward_kernel(q, k, v, o, lse, do, dq, dk, dv)
    return dq, dk, dv
