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
import numba
import numpy as np

from ._numba import array_max, claim_unit, fast_exp, run_on_threads


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
# Tiles.  Queries are taken in blocks of `block` rows, keys in blocks of `block` columns; a unit of
# work pairs one query block with every key block at or left of the diagonal (tiles above it are
# never visited, and in the diagonal tile P is zeroed for j > i).  Per tile the work is five small
# matrix products and one elementwise pass:
#     S  = qc kT                 (block x hd) (hd x block)       qc = c q: 1/sqrt(hd) folded in
#     P  = exp(S - lse)          elementwise (forward: online softmax, below)
#     dP = do vT,  dS = P (dP - D)
#     dvT += doT P,  dkT += qcT dS,  dq += dS kT^T              (backward)
#     acc += P vT^T                                             (forward)
# K and V are packed once per call as transposed tiles, kT[d, j] = k[j0 + j, d], so that every
# product runs its innermost loop over keys j, contiguous in memory: that is the direction LLVM
# vectorises, for any hd (a loop over hd = 8 would be one AVX register, left scalar by LLVM).
#
# fastmath (FASTMATH): "reassoc" lets LLVM split the sums into vector lanes, "contract" fuses
# a*b + c into one FMA, "nsz" lets it ignore the sign of zero (0.0 * x may become 0.0), "arcp" lets
# it compute a division as a multiplication by the reciprocal (o = acc / l).  All four change
# rounding only at the 1e-16 level in float64 (tests hold the kernels to the reference at 1e-12).
# No "nnan"/"ninf": the running max starts at -inf (_numba's ``array_max`` alone has "nnan", see
# there).  exp is _numba's ``fast_exp`` (np.exp in float64; in float32 a vectorisable Cephes expf,
# exactly 0 at -inf), the one every kernel uses.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
jit_shared_kernel = numba.njit(cache=True, nogil=True, fastmath=FASTMATH)   # run with run_on_threads
jit_helper = numba.njit(cache=True, fastmath=FASTMATH)


def block_size(hd):
    """Query rows / keys per tile.  128: long rows keep the vector loops efficient and the tiles of
    one unit (q, k, v, scores, ~100-200 KB) in L2 for the head widths of small Llamas; the loops stop
    at the diagonal, so large tiles waste nothing there (measured: 128 beats 64 by ~5-15%)."""
    return 128


# Tile products.  Two rows of the output at a time and four terms of the sum per sweep: each load of
# B serves two rows and each load/store of C four multiply-adds (~55 GFLOP/s on one AVX2 core at
# these sizes, against ~40 for one row).  In the diagonal tile half the products are known zeros
# or unused, so the loops stop at the diagonal: `triangle` says which operand is triangular.
# They stop at the next multiple of LANES past it, not at the diagonal itself: a row of any length
# then runs as whole vectors (16 float32 per AVX-512 register), with no scalar remainder loop, which
# costs more than the few extra products (measured on an AVX-512 Xeon: forward + backward 7-8%
# faster at head_dim 32-48, 1% at 8).
# The extra products are exact no-ops or overwritten: past the diagonal the triangular operand
# (P, dS) holds zeros, and the scores computed there are set to 0 by the softmax pass.
FULL, C_LOWER, B_LOWER = 0, 1, 2
LANES = 16


@jit_helper
def _lanes_up(i):
    """i rounded up to a multiple of LANES."""
    return (i + LANES - 1) // LANES * LANES


@jit_helper
def _padding_end(r, block):
    """In a diagonal tile, where the columns of row r that the products read end: P and dS rows are
    read as whole vectors (above) up to _lanes_up(r + 4) at most, so only the zeros from the
    diagonal to there need writing, not the rest of the row (which cost ~25% of the softmax pass)."""
    return min(block, _lanes_up(r + 4))


@jit_helper
def _matmul(A, B, C, m, k, n, accumulate, triangle):
    """C[:m, :n] (+)= A[:m, :k] @ B[:k, :n], all C-contiguous; innermost loop along rows of B and C."""
    k4 = k - k % 4
    m2 = m - m % 2
    for r in range(0, m2, 2):                     # two rows of C per pass over B
        c, e = C[r], C[r + 1]
        n_r = min(n, _lanes_up(r + 2)) if triangle == C_LOWER else n
        if not accumulate:
            for j in range(n_r):
                c[j] = 0.0
                e[j] = 0.0
        for d in range(0, k4, 4):                 # four terms of the sum per sweep
            n_d = min(n_r, _lanes_up(d + 4)) if triangle == B_LOWER else n_r
            b0, b1, b2, b3 = B[d], B[d + 1], B[d + 2], B[d + 3]
            a0, a1, a2, a3 = A[r, d], A[r, d + 1], A[r, d + 2], A[r, d + 3]
            f0, f1, f2, f3 = A[r + 1, d], A[r + 1, d + 1], A[r + 1, d + 2], A[r + 1, d + 3]
            for j in range(n_d):
                x0, x1, x2, x3 = b0[j], b1[j], b2[j], b3[j]
                c[j] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                e[j] += f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3
        for d in range(k4, k):
            n_d = min(n_r, _lanes_up(d + 1)) if triangle == B_LOWER else n_r
            b, a, f = B[d], A[r, d], A[r + 1, d]
            for j in range(n_d):
                c[j] += a * b[j]
                e[j] += f * b[j]
    for r in range(m2, m):                        # a last odd row
        c = C[r]
        n_r = min(n, _lanes_up(r + 1)) if triangle == C_LOWER else n
        if not accumulate:
            for j in range(n_r):
                c[j] = 0.0
        for d in range(k):
            n_d = min(n_r, _lanes_up(d + 1)) if triangle == B_LOWER else n_r
            b, a = B[d], A[r, d]
            for j in range(n_d):
                c[j] += a * b[j]


@jit_helper
def _matmul_bt_add(A, B, C, m, k, n, a_lower):
    """C[:m, :n] += A[:m, :k] @ B[:n, :k].T: dot products along rows of A and B, a 2 x 4 block of C
    at a time.  a_lower: A[r, j] = 0 for j > r, so the sums stop there."""
    n4 = n - n % 4
    m2 = m - m % 2
    zero = C.dtype.type(0.0)
    for r in range(0, m2, 2):
        a, e = A[r], A[r + 1]
        k_r = min(k, _lanes_up(r + 2)) if a_lower else k
        for d in range(0, n4, 4):
            b0, b1, b2, b3 = B[d], B[d + 1], B[d + 2], B[d + 3]
            s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = zero
            for j in range(k_r):
                x, y = a[j], e[j]
                s0 += x * b0[j]
                s1 += x * b1[j]
                s2 += x * b2[j]
                s3 += x * b3[j]
                t0 += y * b0[j]
                t1 += y * b1[j]
                t2 += y * b2[j]
                t3 += y * b3[j]
            C[r, d] += s0
            C[r, d + 1] += s1
            C[r, d + 2] += s2
            C[r, d + 3] += s3
            C[r + 1, d] += t0
            C[r + 1, d + 1] += t1
            C[r + 1, d + 2] += t2
            C[r + 1, d + 3] += t3
    for r in range(m):                            # what is left: columns past n4, a last odd row
        k_r = min(k, _lanes_up(r + 1)) if a_lower else k
        for d in range(n4 if r < m2 else 0, n):
            b, a = B[d], A[r]
            s0 = zero
            for j in range(k_r):
                s0 += a[j] * b[j]
            C[r, d] += s0


@jit_helper
def _pack_tile(keys, tile):
    """tile[d, j] = keys[j, d], zero past the keys: one transposed tile, written row by row
    (contiguous stores).  Both are indexed from 0: an offset index j0 + j would carry Numba's
    negative-index wraparound check, which stops LLVM from vectorising."""
    for d in range(tile.shape[0]):
        row = tile[d]
        for j in range(keys.shape[0]):
            row[j] = keys[j, d]
        for j in range(keys.shape[0], tile.shape[1]):
            row[j] = 0.0


@jit_shared_kernel
def pack_key_tiles(k, v, k_tiles, v_tiles, next_unit):
    """k_tiles[b, h, kb, d, j] = k[b, h, kb * block + j, d], zero past T, and v_tiles alike:
    (B, K, T, hd) in any strides -> contiguous (B, K, n_blocks, hd, block), one transposed tile per
    key block.  A unit of work is one key block of one (b, kv head)."""
    B, K, T, hd = k.shape
    n_blocks, block = k_tiles.shape[2], k_tiles.shape[4]
    while True:
        unit = claim_unit(next_unit)
        if unit >= B * K * n_blocks:
            break
        b, kh, kb = unit // (K * n_blocks), unit // n_blocks % K, unit % n_blocks
        rows = slice(kb * block, min(T, (kb + 1) * block))
        _pack_tile(k[b, kh, rows], k_tiles[b, kh, kb])
        _pack_tile(v[b, kh, rows], v_tiles[b, kh, kb])


@jit_shared_kernel
def attention_forward_kernel(q, k_tiles, v_tiles, scale, o, lse, next_unit):
    """One unit of parallel work = (batch b, query head h, query block).  Online softmax over its
    key tiles (FlashAttention): per query row the running max m, the running sum
    l = sum_j exp(S_ij - m) and the unnormalised output acc = sum_j exp(S_ij - m) v_j; when a tile
    raises the max to m', the old l and acc are first scaled by alpha = exp(m - m')."""
    B, H, T, hd = q.shape
    G = H // k_tiles.shape[1]
    n_blocks, block = k_tiles.shape[2], k_tiles.shape[4]
    qc = np.empty((block, hd), dtype=q.dtype)                # this thread's buffers
    acc = np.empty((block, hd), dtype=q.dtype)
    m = np.empty(block, dtype=q.dtype)
    l = np.empty(block, dtype=q.dtype)
    P = np.empty((block, block), dtype=q.dtype)              # scores, then probabilities
    n_units = B * H * n_blocks
    while True:
        unit = claim_unit(next_unit)
        if unit >= n_units:
            break
        qb, bh = n_blocks - 1 - unit // (B * H), unit % (B * H)     # the longest rows of keys first
        b, h = bh // H, bh % H
        i0 = qb * block
        rows = min(block, T - i0)
        for r in range(rows):
            m[r], l[r] = -np.inf, 0.0
            q_r, qc_r, acc_r = q[b, h, i0 + r], qc[r], acc[r]
            for d in range(hd):
                qc_r[d] = scale * q_r[d]
                acc_r[d] = 0.0
        for kb in range(qb + 1):
            kT, vT = k_tiles[b, h // G, kb], v_tiles[b, h // G, kb]
            diagonal = kb == qb                                  # then P[r, j] = 0 for j > r
            _matmul(qc, kT, P, rows, hd, block, False, C_LOWER if diagonal else FULL)  # S = qc kT
            for r in range(rows):
                p = P[r]
                n_keys = min(block, i0 + r + 1 - kb * block)     # causal: keys up to i
                m_new = max(m[r], array_max(p, n_keys))
                alpha = fast_exp(m[r] - m_new)
                row_sum = p.dtype.type(0.0)
                for j in range(n_keys):
                    p[j] = fast_exp(p[j] - m_new)
                    row_sum += p[j]
                for j in range(n_keys, _padding_end(r, block)):
                    p[j] = 0.0
                l[r] = alpha * l[r] + row_sum
                m[r] = m_new
                for d in range(hd):
                    acc[r, d] *= alpha
            _matmul_bt_add(P, vT, acc, rows, block, hd, diagonal)                   # acc += P vT^T
        for r in range(rows):
            o_r, acc_r, inv_l = o[b, h, i0 + r], acc[r], 1.0 / l[r]
            for d in range(hd):
                o_r[d] = acc_r[d] * inv_l
            lse[b, h, i0 + r] = m[r] + np.log(l[r])


@jit_shared_kernel
def attention_backward_kernel(q, k_tiles, v_tiles, o, lse, do, scale, split_starts, dq_parts, dk, dv, next_unit):
    """One unit of parallel work = (batch b, kv head kh, range of key blocks): it owns the dk, dv
    rows of its keys, so no two units write the same dk/dv.  It walks the G query heads of the group
    and every query block at or below its keys, rebuilds P from lse, and accumulates dkT, dvT in
    transposed tiles, and dq for the query block in hand.  With one key range per (b, kh) (the usual
    case) that dq is complete and goes straight to dq_parts[0] = dq; with several, each range's
    share goes to its own dq_parts[split] and the caller sums them."""
    B, H, T, hd = q.shape
    K = k_tiles.shape[1]
    G = H // K
    n_blocks, block = k_tiles.shape[2], k_tiles.shape[4]
    n_splits = split_starts.shape[0] - 1
    most_blocks = 0
    for split in range(n_splits):
        most_blocks = max(most_blocks, split_starts[split + 1] - split_starts[split])
    dk_all = np.empty((most_blocks, hd, block), dtype=q.dtype)   # this thread's buffers
    dv_all = np.empty((most_blocks, hd, block), dtype=q.dtype)
    qc = np.empty((block, hd), dtype=q.dtype)                # c q block
    do_b = np.empty((block, hd), dtype=q.dtype)              # do block
    qcT, doT = qc.T, do_b.T                                  # (views: _matmul reads A as scalars)
    dq_b = np.empty((block, hd), dtype=q.dtype)
    D = np.empty(block, dtype=q.dtype)                       # D_i = do_i . o_i
    P = np.empty((block, block), dtype=q.dtype)
    dS = np.empty((block, block), dtype=q.dtype)             # dP, then dS
    n_units = B * K * n_splits
    while True:
        unit = claim_unit(next_unit)
        if unit >= n_units:
            break
        bk, split = unit // n_splits, unit % n_splits
        b, kh = bk // K, bk % K
        kb_lo, kb_hi = split_starts[split], split_starts[split + 1]
        key_lo, key_hi = kb_lo * block, min(kb_hi * block, T)
        dk_tiles = dk_all[:kb_hi - kb_lo]                    # transposed, like k_tiles
        dv_tiles = dv_all[:kb_hi - kb_lo]
        dk_tiles[...] = 0.0
        dv_tiles[...] = 0.0
        for h in range(kh * G, (kh + 1) * G):
            for i in range(key_lo):                          # queries before our keys get nothing
                for d in range(hd):
                    dq_parts[split, b, h, i, d] = 0.0
            for qb in range(kb_lo, n_blocks):
                i0 = qb * block
                rows = min(block, T - i0)
                for r in range(rows):
                    q_r, do_r, o_r = q[b, h, i0 + r], do[b, h, i0 + r], o[b, h, i0 + r]
                    qc_r, do_b_r, dq_b_r = qc[r], do_b[r], dq_b[r]
                    Dr = q.dtype.type(0.0)
                    for d in range(hd):
                        qc_r[d] = scale * q_r[d]
                        do_b_r[d] = do_r[d]
                        dq_b_r[d] = 0.0
                        Dr += do_r[d] * o_r[d]
                    D[r] = Dr
                for kb in range(kb_lo, min(qb + 1, kb_hi)):
                    kT, vT = k_tiles[b, kh, kb], v_tiles[b, kh, kb]
                    diagonal = kb == qb                              # then P, dS lower triangular
                    lower = C_LOWER if diagonal else FULL
                    _matmul(qc, kT, P, rows, hd, block, False, lower)     # S = qc kT
                    _matmul(do_b, vT, dS, rows, hd, block, False, lower)  # dP = do vT
                    for r in range(rows):
                        p, ds = P[r], dS[r]
                        lse_i, D_i = lse[b, h, i0 + r], D[r]
                        n_keys = min(block, i0 + r + 1 - kb * block)
                        for j in range(n_keys):
                            p[j] = fast_exp(p[j] - lse_i)
                            ds[j] = p[j] * (ds[j] - D_i)
                        for j in range(n_keys, _padding_end(r, block)):
                            p[j] = 0.0
                            ds[j] = 0.0
                    lower = B_LOWER if diagonal else FULL
                    _matmul(doT, P, dv_tiles[kb - kb_lo], hd, rows, block, True, lower)  # dvT += doT P
                    _matmul(qcT, dS, dk_tiles[kb - kb_lo], hd, rows, block, True, lower)  # dkT += qcT dS
                    _matmul_bt_add(dS, kT, dq_b, rows, block, hd, diagonal)              # dq += dS kT^T
                for r in range(rows):
                    for d in range(hd):
                        dq_parts[split, b, h, i0 + r, d] = scale * dq_b[r, d]
        for j in range(key_lo, key_hi):
            kb, jj = j // block - kb_lo, j % block
            for d in range(hd):
                dk[b, kh, j, d] = dk_tiles[kb, d, jj]
                dv[b, kh, j, d] = dv_tiles[kb, d, jj]


def key_block_splits(B, K, n_blocks, threads):
    """Start key block of each of the ranges the backward gives one (b, kh) unit each.

    One range (all keys) when there are enough (batch, kv head) pairs to keep every thread busy;
    otherwise the key blocks are cut into ranges of about equal work.  Key block kb is read by the
    n_blocks - kb query blocks at or below it, so the cuts fall at equal shares of that sum."""
    n_splits = min(n_blocks, -(-2 * threads // (B * K)))  # aim for >= 2 units per thread
    if n_splits <= 1:
        return np.array([0, n_blocks], dtype=np.int64)
    work = np.cumsum(np.arange(n_blocks, 0, -1))          # work of key blocks 0..kb
    targets = work[-1] * np.arange(1, n_splits) / n_splits
    cuts = np.abs(work[None, :] - targets[:, None]).argmin(axis=1) + 1   # nearest block boundary
    return np.unique(np.concatenate([[0], cuts, [n_blocks]])).astype(np.int64)


def _key_tiles(k, v, block):
    """K and V as the kernels' transposed tiles (see ``pack_key_tiles``)."""
    B, K, T, hd = k.shape
    shape = (B, K, -(-T // block), hd, block)
    k_tiles, v_tiles = np.empty(shape, dtype=k.dtype), np.empty(shape, dtype=k.dtype)
    run_on_threads(pack_key_tiles, k, v, k_tiles, v_tiles, n_units=B * K * shape[2])
    return k_tiles, v_tiles


# ---- what the model calls ----------------------------------------------------------------------
def attention_forward(q, k, v, o=None):
    """q: (B, H, T, hd), k, v: (B, K, T, hd), any strides -> o: (B, H, T, hd), cache.

    o is written into the given array (any strides; the model passes a (B, H, T, hd) view of its
    (B, T, H * hd) buffer, the layout the output projection reads), else into a new array of that
    layout.  The cache keeps K and V as the kernels' packed tiles (the backward reads the same
    tiles: no second packing)."""
    B, H, T, hd = q.shape
    block = block_size(hd)
    scale = q.dtype.type(1.0 / np.sqrt(hd))
    if o is None:
        o = np.empty((B, T, H, hd), dtype=q.dtype).transpose(0, 2, 1, 3)
    lse = np.empty((B, H, T), dtype=q.dtype)
    k_tiles, v_tiles = _key_tiles(k, v, block)
    run_on_threads(attention_forward_kernel, q, k_tiles, v_tiles, scale, o, lse)
    return o, (q, k_tiles, v_tiles, o, lse)


def attention_backward(do, cache, dq=None, dk=None, dv=None):
    """do: (B, H, T, hd) -> (dq, dk, dv); written into the given arrays (any strides) when given."""
    q, k_tiles, v_tiles, o, lse = cache
    B, H, T, hd = q.shape
    kv_shape = (B, k_tiles.shape[1], T, hd)
    dq = np.empty(q.shape, dtype=q.dtype) if dq is None else dq
    dk = np.empty(kv_shape, dtype=q.dtype) if dk is None else dk
    dv = np.empty(kv_shape, dtype=q.dtype) if dv is None else dv
    scale = q.dtype.type(1.0 / np.sqrt(hd))
    splits = key_block_splits(B, k_tiles.shape[1], k_tiles.shape[2], numba.get_num_threads())
    n_splits = len(splits) - 1
    dq_parts = dq[None] if n_splits == 1 else np.empty((n_splits,) + q.shape, dtype=q.dtype)
    run_on_threads(attention_backward_kernel, q, k_tiles, v_tiles, o, lse, do, scale, splits, dq_parts, dk, dv)
    if n_splits > 1:
        np.sum(dq_parts, axis=0, out=dq)
    return dq, dk, dv
