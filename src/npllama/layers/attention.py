"""Causal scaled dot-product attention with grouped-query attention (GQA).

H query heads share K key/value heads in groups of G = H / K: query head h reads kv head h // G
(K = H is plain multi-head attention, K = 1 multi-query).  For one query head, with c = 1/sqrt(hd):

    S_ij = c q_i . k_j                 for j <= i   (causal: later keys are never looked at)
    P_ij = exp(S_ij - lse_i),  lse_i = log sum_{j<=i} exp(S_ij)
    o_i  = sum_{j<=i} P_ij v_j

Backward, given do_i:
    dv_j  = sum_{i>=j} P_ij do_i
    dP_ij = do_i . v_j
    dS_ij = P_ij (dP_ij - psi_i),  psi_i = sum_j P_ij dP_ij = do_i . o_i      (softmax backward)
    dq_i  = c sum_{j<=i} dS_ij k_j
    dk_j  = c sum_{i>=j} dS_ij q_i
Under GQA a key/value head is used by the G query heads of its group, so its gradients are the
sums over those heads.

The causal mask is never stored: the loops simply stop at j = i.  The forward keeps only the
per-row log-sum-exp (B, H, T) so the backward can rebuild P without storing it.

Packed rows and padding (``documents``, from ``document_ids``): key j is then visible to query i
when j <= i and j is in i's document, or j = i -- the visibility of npllama.reference's
``causal_visibility`` for segment_ids and an attention_mask.  Neither is a T x T mask either: each
position carries one number, and the kernels compare key j's with query i's as they make P (an
invisible key gets P_ij = 0, so dS_ij = 0 too); the tiles left of a query block's first document
are never visited.  Each query sees at least itself, so no softmax row is empty.

Shapes: q, o: (B, H, T, hd); k, v: (B, K, T, hd) (any strides); lse: (B, H, T).
"""
import numpy as np

from ..engine.fastmath import fast_exp
from ..engine.jit import INT, array, jit_with, scalar
from ..engine.pool import UNIT_COUNTER, claim_unit, run_on_threads
from ..engine.simd import MR, VECTOR_BYTES, contiguous_row, tile_update_2, tile_update_pairs, vector_max
from ..engine.threads import get_threads


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
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


def document_ids(segment_ids, attention_mask, B, T):
    """segment_ids, attention_mask: (B, T) or None -> (query_docs, key_docs), int64 (B, T), what the
    kernels compare: key j is visible to query i when j <= i and (key_docs[j] == query_docs[i] or j == i).

    query_docs[b, i] <= i: the first token (attention_mask 1) of row b in i's segment, or i itself if
    that segment has no token before i; key_docs[b, j]: the same for a token, -1 for padding (no query's).  So a
    query sees the earlier tokens of its own segment and itself, never padding but its own position:
    npllama.reference.causal_visibility, as one number per position."""
    segments = np.zeros((B, T), dtype=np.int64) if segment_ids is None else np.asarray(segment_ids)
    tokens = np.ones((B, T), dtype=bool) if attention_mask is None else np.asarray(attention_mask) != 0
    query_docs = np.tile(np.arange(T, dtype=np.int64), (B, 1))
    for b in range(B):
        at = np.flatnonzero(tokens[b])
        names, first = np.unique(segments[b, at], return_index=True)     # each segment's first token
        if names.size == 0:                                               # (a row of padding only)
            continue
        which = np.minimum(np.searchsorted(names, segments[b]), names.size - 1)
        has_token = names[which] == segments[b]
        query_docs[b, has_token] = at[first[which[has_token]]]
    query_docs = np.minimum(query_docs, np.arange(T))   # (padding before its segment's first token: itself)
    key_docs = np.where(tokens, query_docs, -1)
    return query_docs, key_docs


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def attention_forward(q, k, v, o=None, tiles=None, documents=None):
    """q: (B, H, T, hd), k, v: (B, K, T, hd), any strides -> o: (B, H, T, hd), cache.

    documents: None (causal attention), or ``document_ids``' (query_docs, key_docs) for packed rows
    and padding; the cache keeps them for the backward.

    o is written into the given array (any strides; the model passes a (B, H, T, hd) view of its
    (B, T, H * hd) buffer, the layout the output projection reads), else into a new array of that
    layout.  K and V are packed into the kernels' tiles, in ``tiles`` (from ``key_tile_buffers``)
    when given; the cache keeps them (the backward reads the same tiles: no second packing).
    (Arrays whose last axis is not contiguous go through contiguous copies.)"""
    B, H, T, hd = q.shape
    block = block_size(hd, T)
    scale = q.dtype.type(1.0 / np.sqrt(hd))
    q, k, v = _readable(q), _readable(k), _readable(v)
    if o is None:
        o = np.empty((B, T, H, hd), dtype=q.dtype).transpose(0, 2, 1, 3)
    o_kernel, o_copy = _writable(o, q.shape, q.dtype)
    lse = np.empty((B, H, T), dtype=q.dtype)
    if tiles is None:
        tiles = key_tile_buffers(B, k.shape[1], T, hd, q.dtype)
    k_tiles, v_tiles, k_rows, v_rows = tiles
    pack_key_tiles(k, v, block, tiles)
    query_docs, key_docs = NO_DOCUMENTS if documents is None else documents
    if documents is not None:             # -1 (no query's) past T, so that a tile's row reads whole tiles
        past_t = k_tiles.shape[2] * block + k_tiles.shape[4] - T
        key_docs = np.pad(key_docs, ((0, 0), (0, past_t)), constant_values=-1)
    run_on_threads(_attention_forward_kernel, q, k_tiles, v_rows, block, scale, query_docs, key_docs, o_kernel, lse)
    if o_copy is not None:
        np.copyto(o_copy, o_kernel)
    return o, (q, (k_tiles, v_tiles, k_rows, v_rows), block, o_kernel, lse, (query_docs, key_docs))


def pack_key_tiles(k, v, block, tiles):
    """K and V (B, K, T, hd) into the kernels' tiles ``tiles`` (``key_tile_buffers``)."""
    run_on_threads(_pack_key_tiles, _readable(k), _readable(v), block, *tiles,
                   n_units=k.shape[0] * k.shape[1] * tiles[0].shape[2])


def repack_key_tiles(k, v, cache):
    """Pack K and V into the tiles of a forward's ``cache`` again, for its backward: when the
    tiles are shared by several layers' forwards (a frozen base's training pass, layers/block.py)."""
    pack_key_tiles(k, v, cache[2], cache[1])


def attention_backward(do, cache, dq=None, dk=None, dv=None):
    """do: (B, H, T, hd) -> (dq, dk, dv); written into the given arrays (any strides) when given."""
    q, (k_tiles, v_tiles, k_rows, v_rows), block, o, lse, (query_docs, key_docs) = cache
    B, H, T, hd = q.shape
    kv_shape = (B, k_tiles.shape[1], T, hd)
    do = _readable(do)
    (dq_kernel, dq_copy), (dk_kernel, dk_copy), (dv_kernel, dv_copy) = (
        _writable(dq, q.shape, q.dtype), _writable(dk, kv_shape, q.dtype), _writable(dv, kv_shape, q.dtype))
    scale = q.dtype.type(1.0 / np.sqrt(hd))
    splits = key_block_splits(B, k_tiles.shape[1], k_tiles.shape[2], get_threads())
    n_splits = len(splits) - 1
    dq_parts = dq_kernel[None] if n_splits == 1 else np.empty((n_splits,) + q.shape, dtype=q.dtype)
    run_on_threads(_attention_backward_kernel, q, k_tiles, v_tiles, k_rows, block, o, lse, do, scale, query_docs,
                   key_docs, splits, dq_parts, dk_kernel, dv_kernel)
    if n_splits > 1:
        np.sum(dq_parts, axis=0, out=dq_kernel)
    for kernel_out, copy in ((dq_kernel, dq_copy), (dk_kernel, dk_copy), (dv_kernel, dv_copy)):
        if copy is not None:
            np.copyto(copy, kernel_out)
    return tuple(kernel_out if copy is None else copy
                 for kernel_out, copy in ((dq_kernel, dq_copy), (dk_kernel, dk_copy), (dv_kernel, dv_copy)))


# No documents: what the kernels take for plain causal attention (one compiled kernel for both).
NO_DOCUMENTS = (np.empty((0, 0), dtype=np.int64), np.empty((0, 0), dtype=np.int64))


def key_tile_buffers(B, K, T, hd, dtype):
    """Arrays for the kernels' tiles of K and V (see ``_pack_key_tiles``): [k_tiles, v_tiles,
    k_rows, v_rows].  The model makes them once per layer and shape (layers/block.py) and passes
    them to every forward: a few MB a layer, which fresh from the allocator would cost page faults
    on each step (measured: 0.4 ms of a 0.7 ms packing at the default model's shape)."""
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    block = block_size(hd, T)
    n_blocks, hd_pad = -(-T // block), _head_width(hd, lanes)
    block_pad = _round_up(block, max(2 * lanes, LANES))     # whole tiles, whole LANES
    transposed, as_rows = (B, K, n_blocks, hd_pad, block_pad), (B, K, n_blocks, block_pad, hd_pad)
    if PAIRED_HALF_VECTORS and 2 * hd_pad == lanes:         # heads of half a vector: rows in pairs
        as_rows = (B, K, n_blocks, block_pad // 2, 2 * hd_pad)
    return [np.empty(shape, dtype=dtype) for shape in (transposed, transposed, as_rows, as_rows)]


def _head_width(hd, lanes):
    """head_dim padded for the register tiles (engine/simd.py) of the products whose C has head_dim
    columns: whole tiles of two vectors, or half a vector, in pairs (``PAIRED_HALF_VECTORS``).  At
    least MR (rows of dkT, dvT)."""
    half_vectors = _round_up(hd, max(lanes // 2, MR))
    if PAIRED_HALF_VECTORS and 2 * half_vectors == lanes:
        return half_vectors
    return _round_up(hd, 2 * lanes)


def block_size(hd, T):
    """Query rows / keys per tile.  128: long rows keep the vector loops efficient and the tiles of
    one unit (q, k, v, scores, ~100-200 KB) in L2 for the head widths of small Llamas; the loops stop
    at the diagonal, so large tiles waste nothing there (measured: 128 beats 64 by ~5-15%).  Heads
    of 16 or fewer numbers do little work per tile (a tile of scores sums over only hd products),
    so their tiles are 256 wide when the sequence is longer than 128 (measured, 260K model's shape,
    T = 512, hd = 8, one thread: 24.4 -> 21.9 ms a layer; at hd 48, T = 256 no difference)."""
    return 256 if hd <= 16 and T > 128 else 128


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


def _rows_contiguous(x):
    """Whether the kernels can read or write x's rows as they are (``contiguous_row``)."""
    return x.shape[-1] <= 1 or x.strides[-1] == x.itemsize


def _readable(x):
    return x if _rows_contiguous(x) else np.ascontiguousarray(x)


def _writable(out, shape, dtype):
    """(array the kernel writes, array to copy it into afterwards or None)."""
    if out is None:
        return np.empty(shape, dtype=dtype), None
    return (out, None) if _rows_contiguous(out) else (np.empty(shape, dtype=dtype), out)


# ---- kernel bodies (private: engine/pool.py runs them on the threads) ----------------------------
# Tiles.  Queries are taken in blocks of `block` rows, keys in blocks of `block` columns; a unit of
# work pairs one query block with every key block at or left of the diagonal (tiles above it are
# never visited).  Per tile the work is five small matrix products and one elementwise pass:
#     S  = qc kT                 (block x hd) (hd x block)       qc = c q: 1/sqrt(hd) folded in
#     P  = exp(S - lse)          elementwise (forward: online softmax, below)
#     dP = do vT,  dS = P (dP - psi)
#     dvT += doT P,  dkT += qcT dS,  dq += dS K                  (backward)
#     acc += P V                                                 (forward)
# The products are made of ``tile_update`` calls (engine/simd.py): MR rows of C by two vectors
# of columns, kept in registers over the whole sum.  So every operand's rows are padded: K and V
# are packed once per call, both transposed (kT[d, j] = k[j0 + j, d], for S and dP) and as rows
# (K[j, d], for P V and dS K), with head_dim padded to whole tiles (hd_pad, ``_head_width``) and the
# block to whole tiles (block_pad), the padding zero; the q, do blocks are copied into padded buffers too.
# In the diagonal tile the causal structure is used: a row block's scores stop after the tile that
# holds its diagonal (``_computed_end``), the softmax pass writes zeros from the diagonal to there,
# and the products whose A or B is P or dS sum only over the terms that can be nonzero.
# The backward makes S, dP and then P, dS MR rows at a time, so that the elementwise pass finds its
# rows still in L1, and that pass zeroes what lies past the diagonal in the same vector loop (by a
# select) instead of a scalar tail loop; written inside the kernel, where LLVM knows P and dS do not
# overlap (as a function of its own the pass ran ~15 % slower).  Measured, backward alone, one
# thread, the batch half a step's: 15M-v4k's shape -7 %, the default's -14 %, 260K's -20 %.  (The
# forward's softmax gained nothing from either.)
#
# fastmath (FASTMATH): "reassoc" lets LLVM split the sums into vector lanes, "contract" fuses
# a*b + c into one FMA, "nsz" lets it ignore the sign of zero (0.0 * x may become 0.0), "arcp" lets
# it compute a division as a multiplication by the reciprocal (o = acc / l).  All four change
# rounding only at the 1e-16 level in float64 (tests hold the kernels to the reference at 1e-12).
# No "nnan"/"ninf": the running max starts at -inf (engine/simd.py's ``vector_max``, the row maxima, alone
# has "nnan", see there).  exp is engine/fastmath.py's ``fast_exp`` (np.exp in float64; in float32 a vectorisable Cephes expf,
# exactly 0 at -inf), the one every kernel uses.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


jit_shared_kernel = jit_with(nogil=True, fastmath=FASTMATH)   # run with run_on_threads


jit_helper = jit_with(fastmath=FASTMATH)


# The softmax passes run over whole vectors of LANES numbers (16 float32 per AVX-512 register), the
# numbers past a row's last key set to 0 by a select: no scalar remainder loop, which cost more
# than the rest of the pass (measured: the backward 12% faster at the default model's shape).
LANES = 16


@jit_helper
def _round_up(i, step):
    return (i + step - 1) // step * step


@jit_helper
def _tile_width(C):
    """Columns of one ``tile_update_2``: two vectors of C's dtype."""
    return 2 * VECTOR_BYTES // C.itemsize


@jit_helper
def _computed_end(r, n, width):
    """In a diagonal tile, the columns of row r that the scores are computed for (and then P and dS
    hold, zero past the diagonal): those of the tiles of `width` columns that reach its row block's
    diagonal.  What the later products read of row r lies within."""
    return min(n, _round_up(r - r % MR + MR, width))


# (head_dim 48 in float32, the llama2.c 15M model's, had tiles of three vectors of its own:
# attention alone ~5 % faster, but a whole training step of 15M-v4k no faster than with head_dim
# padded to 64 (benchmarks/README.md), so they went.)


@jit_helper
def _update_columns(A, a_row, a_col, B, b_row, C, c_row, n, k, accumulate):
    """C[c_row:c_row+MR, :n] (+)= A[a_row:a_row+MR, a_col:a_col+k] @ B[b_row:b_row+k, :n] (n: whole
    tiles, ``_head_width``)."""
    width = _tile_width(C)
    for j in range(0, n, width):
        tile_update_2(A, a_row, a_col, B, b_row, j, C, c_row, j, k, accumulate)


@jit_helper
def _scores(A, B, C, rows, k, n, diagonal):
    """C[:rows, :n] = A[:rows, :k] @ B[:k, :n], in the diagonal tile only the columns of
    ``_computed_end`` (rows: a multiple of MR)."""
    for r in range(0, rows, MR):
        _update_columns(A, r, 0, B, 0, C, r, _computed_end(r, n, _tile_width(C)) if diagonal else n, k, False)


# Heads of half a vector (head_dim <= 8 in float32: hd_pad * 2 = LANES, the 260K model's): a product
# whose C is MR rows by half a vector keeps 8 half-width accumulators busy for MR + 1 loads a step
# (P V and dS K: ~85 GFLOP/s, against ~150 for two vectors).  Those two run on pairs of keys
# instead: K and V are packed as rows of two keys interleaved, as_rows[s, 2d + t] = key 2s + t's d;
# a row of C (acc, dq_b) is then one full vector holding each column's sum over even keys and over
# odd keys side by side, and A's two numbers of a pair are one 64-bit broadcast
# (``tile_update_pairs``): ~125 GFLOP/s; the two halves are added as the row is written out.
# Measured at the 260K model's shape (B = 4, one thread): forward -6 %, backward -12 %.
PAIRED_HALF_VECTORS = True
@jit_helper
def _add_lower_times(A, B, C, rows, k, n, diagonal, paired):
    """C[:rows, :n] += A[:rows, :k] @ B[:k, :n], where in the diagonal tile A is lower triangular
    (A[r, j] = 0 for j > r): row block r sums over j < r + MR only.  paired: B's and C's rows in
    pairs (above; k is even: a whole number of MR rows, or block_pad)."""
    for r in range(0, rows, MR):
        kk = min(k, r + MR) if diagonal else k
        if paired:
            tile_update_pairs(A, r, 0, B, 0, 0, C, r, 0, kk // 2, True)
        else:
            _update_columns(A, r, 0, B, 0, C, r, n, kk, True)


@jit_helper
def _add_times_lower(A, B, C, m, rows, n, diagonal):
    """C[:m, :n] += A[:m, :rows] @ B[:rows, :n], where in the diagonal tile B is lower triangular
    (B[i, j] = 0 for j > i): a tile of columns from j sums over i >= j only (m: a multiple of MR)."""
    width = _tile_width(C)
    for j in range(0, n, width):
        first = j if diagonal else 0
        if first >= rows:
            break
        for r in range(0, m, MR):
            tile_update_2(A, r, first, B, first, j, C, r, j, rows - first, True)


@jit_helper
def _load_block(x, b, h, first, rows, scale, buffer):
    """buffer[:rows, :hd] = scale * x[b, h, first:first + rows], zero elsewhere (buffer: padded)."""
    hd = x.shape[3]
    for r in range(rows):
        x_r, out = contiguous_row(x, b, h, first + r), buffer[r]
        for d in range(hd):
            out[d] = scale * x_r[d]
        out[hd:] = 0.0
    buffer[rows:] = 0.0


@jit_helper
def _pack_tiles(keys, b, kh, first, n_keys, transposed, as_rows):
    """transposed[d, j] = as_rows[j, d] = keys[b, kh, first + j, d], or in pairs (as_rows half as
    long and twice as wide) as_rows[s, 2d + t] = keys[b, kh, first + 2s + t, d]; zero past the keys and
    past head_dim."""
    hd = keys.shape[3]
    if as_rows.shape[0] == transposed.shape[1]:                          # rows
        _load_block(keys, b, kh, first, n_keys, keys.dtype.type(1.0), as_rows)
        transposed[hd:] = 0.0
        for d in range(hd):                    # (from as_rows: its rows are padded, so every row of
            row = transposed[d]                # the transposed tile, past the keys too, is written)
            for j in range(row.shape[0]):
                row[j] = as_rows[j, d]
    else:                                                                # pairs
        transposed[...] = 0.0
        for j in range(n_keys):
            k_j = contiguous_row(keys, b, kh, first + j)
            for d in range(hd):
                transposed[d, j] = k_j[d]
        for s in range(as_rows.shape[0]):
            for d in range(transposed.shape[0]):
                as_rows[s, 2 * d] = transposed[d, 2 * s]
                as_rows[s, 2 * d + 1] = transposed[d, 2 * s + 1]


@jit_shared_kernel
def _pack_key_tiles(k, v, block, k_tiles, v_tiles, k_rows, v_rows, next_unit):
    """(B, K, T, hd), the last axis contiguous -> the kernels' tiles, one per key block of `block` keys:
    k_tiles[b, h, kb, d, j] = k_rows[b, h, kb, j, d] = k[b, h, kb * block + j, d], zero past T and
    past hd (k_tiles: (B, K, n_blocks, hd_pad, block_pad), k_rows: (B, K, n_blocks, block_pad,
    hd_pad), or for heads of half a vector (B, K, n_blocks, block_pad / 2, 2 hd_pad) in pairs, see
    _add_lower_times), and v's alike.  A unit of work is one key block of one (b, kv head)."""
    B, K, T, hd = k.shape
    n_blocks = k_tiles.shape[2]
    while True:
        unit = claim_unit(next_unit)
        if unit >= B * K * n_blocks:
            break
        b, kh, kb = unit // (K * n_blocks), unit // n_blocks % K, unit % n_blocks
        first = kb * block
        n_keys = min(T, first + block) - first
        _pack_tiles(k, b, kh, first, n_keys, k_tiles[b, kh, kb], k_rows[b, kh, kb])
        _pack_tiles(v, b, kh, first, n_keys, v_tiles[b, kh, kb], v_rows[b, kh, kb])


@jit_helper
def _softmax_tail(p, n_keys, end):
    """p[n_keys:end] = 0, past a row's last key (whole vectors up to _round_up(n_keys, LANES): see
    LANES): the first part is written by the caller's vector loop."""
    for j in range(_round_up(n_keys, LANES), end):
        p[j] = 0.0


@jit_helper
def _first_key_block(query_docs, b, i0, rows, block):
    """The first key block that can hold a key visible to query rows i0 .. i0 + rows - 1: that of
    the earliest document's first position (query_docs[i] <= i; 0 when there are no documents)."""
    if query_docs.shape[0] == 0:
        return 0
    first = i0
    for i in range(i0, i0 + rows):
        first = min(first, query_docs[b, i])
    return first // block


@jit_helper
def _hide_other_documents(p, doc_i, keys_docs, self_j, n_keys):
    """Scores p[:n_keys] of the keys query i may not see (not of its document doc_i, not itself:
    column self_j) set to -inf; keys_docs: the tile's keys' key_docs.  (A select with & and |,
    not branches: the loop runs in vectors.)"""
    for j in range(n_keys):
        hidden = (keys_docs[j] != doc_i) & (j != self_j)
        p[j] = -np.inf if hidden else p[j]


@jit_shared_kernel
def _attention_forward_kernel(q, k_tiles, v_rows, block, scale, query_docs, key_docs, o, lse, next_unit):
    """One unit of parallel work = (batch b, query head h, query block).  Online softmax over its
    key tiles (FlashAttention): per query row the running max m, the running sum
    l = sum_j exp(S_ij - m) and the unnormalised output acc = sum_j exp(S_ij - m) v_j; when a tile
    raises the max to m', the old l and acc are first scaled by alpha = exp(m - m').  With
    documents (query_docs, key_docs not empty) a key of another document gets the score -inf, so
    P = 0, and a row that has seen no key of its own yet skips the tile.  (q and o, like
    every (B, heads, T, hd) array of both kernels, have their last axis contiguous: their rows are
    read and written as vectors, ``contiguous_row``; attention_forward / _backward see to it.)"""
    B, H, T, hd = q.shape
    G = H // k_tiles.shape[1]
    n_blocks, hd_pad, block_pad = k_tiles.shape[2], k_tiles.shape[3], k_tiles.shape[4]
    qc = np.empty((block_pad, hd_pad), dtype=q.dtype)        # this thread's buffers
    paired = v_rows.shape[3] != block_pad                    # V's rows in pairs (see _add_lower_times)
    acc_width = v_rows.shape[4]                              # hd_pad, or 2 hd_pad in pairs
    acc = np.empty((block_pad, acc_width), dtype=q.dtype)
    m = np.empty(block, dtype=q.dtype)
    l = np.empty(block, dtype=q.dtype)
    P = np.empty((block_pad, block_pad), dtype=q.dtype)      # scores, then probabilities
    zero, one = q.dtype.type(0.0), q.dtype.type(1.0)
    width = _tile_width(P)
    masked = query_docs.shape[0] > 0
    n_units = B * H * n_blocks
    while True:
        unit = claim_unit(next_unit)
        if unit >= n_units:
            break
        qb, bh = n_blocks - 1 - unit // (B * H), unit % (B * H)     # the longest rows of keys first
        b, h = bh // H, bh % H
        i0 = qb * block
        rows = min(block, T - i0)
        rows_pad = _round_up(rows, MR)
        _load_block(q, b, h, i0, rows, scale, qc)
        acc[...] = 0.0
        m[:rows] = -np.inf
        l[:rows] = 0.0
        for kb in range(_first_key_block(query_docs, b, i0, rows, block), qb + 1):
            diagonal = kb == qb
            _scores(qc, k_tiles[b, h // G, kb], P, rows_pad, hd, block_pad, diagonal)   # S = qc kT
            for r in range(rows):
                p = P[r]
                n_keys = min(block, i0 + r + 1 - kb * block)     # causal: keys up to i
                if masked:
                    _hide_other_documents(p, query_docs[b, i0 + r], key_docs[b, kb * block:], i0 + r - kb * block,
                                          n_keys)
                m_new = max(m[r], vector_max(p, n_keys))
                if masked and m_new == -np.inf:                  # nothing of row r's so far: P's row is 0
                    p[:block_pad] = zero
                    continue
                alpha = fast_exp(m[r] - m_new)
                row_sum = zero
                for j in range(_round_up(n_keys, LANES)):
                    e = fast_exp(p[j] - m_new)
                    p[j] = e if j < n_keys else zero
                    row_sum += p[j]
                _softmax_tail(p, n_keys, _computed_end(r, block_pad, width) if diagonal else block_pad)
                l[r] = alpha * l[r] + row_sum
                m[r] = m_new
                acc_r = acc[r]
                for d in range(acc_width):
                    acc_r[d] *= alpha
            _add_lower_times(P, v_rows[b, h // G, kb], acc, rows_pad, block_pad, hd_pad, diagonal, paired)  # acc += P V
        for r in range(rows):
            # (1/l in the data's dtype, like all the kernels' arithmetic: a bare 1.0 made the row's
            # loop convert every number to float64 and back; alone that loop then ran ~4x slower)
            o_r, acc_r, inv_l = contiguous_row(o, b, h, i0 + r), acc[r], one / l[r]
            if paired:
                for d in range(hd):
                    o_r[d] = (acc_r[2 * d] + acc_r[2 * d + 1]) * inv_l
            else:
                for d in range(hd):
                    o_r[d] = acc_r[d] * inv_l
            lse[b, h, i0 + r] = m[r] + np.log(l[r])


@jit_shared_kernel
def _attention_backward_kernel(q, k_tiles, v_tiles, k_rows, block, o, lse, do, scale, query_docs, key_docs,
                               split_starts, dq_parts, dk, dv, next_unit):
    """One unit of parallel work = (batch b, kv head kh, range of key blocks): it owns the dk, dv
    rows of its keys, so no two units write the same dk/dv.  It walks the G query heads of the group
    and every query block at or below its keys, rebuilds P from lse, and accumulates dkT, dvT in
    transposed tiles, and dq for the query block in hand.  With one key range per (b, kh) (the usual
    case) that dq is complete and goes straight to dq_parts[0] = dq; with several, each range's
    share goes to its own dq_parts[split] and the caller sums them.  With documents, P_ij = 0 for a
    key j query i may not see (as in the forward)."""
    B, H, T, hd = q.shape
    K = k_tiles.shape[1]
    G = H // K
    n_blocks, hd_pad, block_pad = k_tiles.shape[2], k_tiles.shape[3], k_tiles.shape[4]
    n_splits = split_starts.shape[0] - 1
    most_blocks = 0
    for split in range(n_splits):
        most_blocks = max(most_blocks, split_starts[split + 1] - split_starts[split])
    dk_all = np.empty((most_blocks, hd_pad, block_pad), dtype=q.dtype)   # this thread's buffers
    dv_all = np.empty((most_blocks, hd_pad, block_pad), dtype=q.dtype)
    qc = np.empty((block_pad, hd_pad), dtype=q.dtype)        # c q block
    do_b = np.empty((block_pad, hd_pad), dtype=q.dtype)      # do block
    qcT, doT = qc.T, do_b.T                                  # (views: ``tile_update`` takes A in any strides)
    paired = k_rows.shape[3] != block_pad                    # K's rows in pairs (see _add_lower_times)
    dq_b = np.empty((block_pad, k_rows.shape[4]), dtype=q.dtype)
    psi = np.empty(block, dtype=q.dtype)                     # psi_i = do_i . o_i (docs' ψ_i)
    P = np.empty((block_pad, block_pad), dtype=q.dtype)
    dS = np.empty((block_pad, block_pad), dtype=q.dtype)     # dP, then dS
    zero, one = q.dtype.type(0.0), q.dtype.type(1.0)
    width = _tile_width(P)
    hd_rows = _round_up(hd, MR)             # the rows of the dkT, dvT tiles worth computing
    masked = query_docs.shape[0] > 0
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
        dq = dq_parts[split]
        for h in range(kh * G, (kh + 1) * G):
            for i in range(key_lo):                          # queries before our keys get nothing
                contiguous_row(dq, b, h, i)[:] = 0.0
            for qb in range(kb_lo, n_blocks):
                i0 = qb * block
                rows = min(block, T - i0)
                rows_pad = _round_up(rows, MR)
                _load_block(q, b, h, i0, rows, scale, qc)
                _load_block(do, b, h, i0, rows, one, do_b)
                dq_b[...] = 0.0
                for r in range(rows):
                    do_r, o_r = do_b[r], contiguous_row(o, b, h, i0 + r)
                    psi_r = zero
                    for d in range(hd):
                        psi_r += do_r[d] * o_r[d]
                    psi[r] = psi_r
                for kb in range(max(kb_lo, _first_key_block(query_docs, b, i0, rows, block)), min(qb + 1, kb_hi)):
                    diagonal = kb == qb                              # then P, dS lower triangular
                    for r0 in range(0, rows_pad, MR):          # MR rows at a time, while they are in L1:
                        n_cols = _computed_end(r0, block_pad, width) if diagonal else block_pad
                        _update_columns(qc, r0, 0, k_tiles[b, kh, kb], 0, P, r0, n_cols, hd, False)     # S = qc kT
                        _update_columns(do_b, r0, 0, v_tiles[b, kh, kb], 0, dS, r0, n_cols, hd, False)  # dP = do vT
                        for r in range(r0, min(r0 + MR, rows)):       # P = exp(S - lse), dS = P (dP - psi)
                            p, ds = P[r], dS[r]
                            lse_i, psi_i = lse[b, h, i0 + r], psi[r]
                            n_keys = min(block, i0 + r + 1 - kb * block)
                            if masked:                        # 0 past the keys and for other documents'
                                doc_i, self_j = query_docs[b, i0 + r], i0 + r - kb * block
                                keys_docs = key_docs[b, kb * block:]       # (padded: n_cols long)
                                for j in range(n_cols):               # (& and |: a select, in vectors)
                                    seen = (j < n_keys) & ((keys_docs[j] == doc_i) | (j == self_j))
                                    e = fast_exp(p[j] - lse_i) if seen else zero
                                    p[j] = e
                                    ds[j] = e * (ds[j] - psi_i)
                            elif n_keys == n_cols:            # (no select: 260K's backward 3 % faster)
                                for j in range(n_cols):
                                    e = fast_exp(p[j] - lse_i)
                                    p[j] = e
                                    ds[j] = e * (ds[j] - psi_i)
                            else:                                     # 0 past the keys, by a select
                                for j in range(n_cols):
                                    e = fast_exp(p[j] - lse_i) if j < n_keys else zero
                                    p[j] = e
                                    ds[j] = e * (ds[j] - psi_i)
                    _add_times_lower(doT, P, dv_tiles[kb - kb_lo], hd_rows, rows, block_pad, diagonal)  # dvT += doT P
                    _add_times_lower(qcT, dS, dk_tiles[kb - kb_lo], hd_rows, rows, block_pad, diagonal)  # dkT += qcT dS
                    _add_lower_times(dS, k_rows[b, kh, kb], dq_b, rows_pad, block_pad, hd_pad, diagonal, paired)  # dq += dS K
                for r in range(rows):
                    dq_r, dq_b_r = contiguous_row(dq, b, h, i0 + r), dq_b[r]
                    if paired:
                        for d in range(hd):
                            dq_r[d] = scale * (dq_b_r[2 * d] + dq_b_r[2 * d + 1])
                    else:
                        for d in range(hd):
                            dq_r[d] = scale * dq_b_r[d]
        for j in range(key_lo, key_hi):
            kb, jj = j // block - kb_lo, j % block
            dk_j, dv_j = contiguous_row(dk, b, kh, j), contiguous_row(dv, b, kh, j)
            for d in range(hd):
                dk_j[d] = dk_tiles[kb, d, jj]
                dv_j[d] = dv_tiles[kb, d, jj]


# ---- the versions a training run calls (npllama/warmup.py compiles them ahead) -------------------
def kernel_versions(dtype):
    """q, k, v, o, do and dq, dk, dv are (B, H, T, hd) views of the model's (B, T, H * hd) rows: any strides."""
    view, tiles, f = array(dtype, 4, contiguous=False), array(dtype, 5), scalar(dtype)
    docs = array(np.int64, 2)   # query_docs, key_docs: document_ids' (B, T), or NO_DOCUMENTS' (0, 0)
    return [(_pack_key_tiles, (view, view, INT, tiles, tiles, tiles, tiles, UNIT_COUNTER)),
            (_attention_forward_kernel, (view, tiles, tiles, INT, f, docs, docs, view, array(dtype, 3), UNIT_COUNTER)),
            (_attention_backward_kernel, (view, tiles, tiles, tiles, INT, view, array(dtype, 3), view, f, docs, docs,
                                          array(np.int64, 1), array(dtype, 5, contiguous=False), view, view,
                                          UNIT_COUNTER)),
            (_round_up, (INT, INT))]
