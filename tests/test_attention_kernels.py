"""The tiled attention kernels across tiles: many query/key blocks, a partial last block, odd rows,
head widths that are not multiples of 4, and the backward's split of the keys among several units.

tests/test_layers.py checks attention at T <= 6, inside one tile of the default size; here the tile
size is made small (monkeypatched ``block_size``) so that short sequences cross many tiles.
"""
from contextlib import contextmanager

import numba
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npllama import reference
from npllama.engine import fastmath, simd
from npllama.layers import attention


@contextmanager
def tiles_of(block):
    """Run the kernels with `block` x `block` tiles instead of the default size."""
    default = attention.block_size
    attention.block_size = lambda hd, T: block
    try:
        yield
    finally:
        attention.block_size = default


def random_qkv(r, b, h, kv, t, hd, dtype):
    shapes = ((b, h, t, hd), (b, kv, t, hd), (b, kv, t, hd), (b, h, t, hd))
    return (r.normal(size=s).astype(dtype) for s in shapes)


def assert_matches_reference(q, k, v, do, tol):
    o, cache = attention.attention_forward(q, k, v)
    o_ref, cache_ref = attention.attention_forward_reference(q, k, v)
    np.testing.assert_allclose(o, o_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(cache[4], cache_ref[4], rtol=tol, atol=tol)          # lse
    got = attention.attention_backward(do, cache)
    want = attention.attention_backward_reference(do, cache_ref)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("dtype, hd, block", [(np.float64, 20, 5), (np.float64, 24, 128), (np.float32, 48, 128)])
def test_heads_padded_to_whole_tiles(dtype, hd, block):
    # Head widths between whole tiles (float64 hd 20 and 24, float32 hd 48, as the llama2.c 15M
    # model's) are padded to whole tiles of two vectors (``_head_width``); the padding is zero and
    # changes nothing.  150 positions: two tiles of 128, several of 5.
    r = np.random.default_rng(hd)
    with tiles_of(block):
        assert_matches_reference(*random_qkv(r, 2, 4, 2, 150, hd, dtype), tol=1e-12 if dtype == np.float64 else 2e-5)


@given(seed=st.integers(0, 2**31 - 1), block=st.integers(1, 9), t=st.integers(1, 40),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), hd=st.sampled_from([1, 3, 4, 5, 8, 9]),
       b=st.integers(1, 2))
def test_tiled_kernels_equal_reference_float64(seed, block, t, heads, hd, b):
    r = np.random.default_rng(seed)
    with tiles_of(block):
        assert_matches_reference(*random_qkv(r, b, heads[0], heads[1], t, hd, np.float64), tol=1e-12)


@pytest.mark.parametrize("block", [4, 7, 128])
def test_tiled_kernels_equal_reference_float32(block):
    r = np.random.default_rng(block)
    with tiles_of(block):
        assert_matches_reference(*random_qkv(r, 2, 4, 2, 45, 8, np.float32), tol=2e-5)


@pytest.mark.parametrize("hd, t, heads", [(8, 300, (4, 2)), (3, 45, (2, 1)), (5, 257, (2, 2))])
def test_heads_of_half_a_vector_take_key_pairs(hd, t, heads):
    # float32 heads of <= 8 numbers (half an AVX-512 vector; <= 4 with AVX2): K and V packed in pairs
    # of keys, P V and dS K by ``tile_update_pairs`` (see attention._add_lower_times); the default
    # tiles (256 wide past 128 positions), an odd number of keys in the last tile.
    r = np.random.default_rng(hd)
    q, k, v, do = random_qkv(r, 2, heads[0], heads[1], t, hd, np.float32)
    lanes = simd.VECTOR_BYTES // 4
    tiles = attention.key_tile_buffers(2, heads[1], t, hd, np.float32)
    block_pad = tiles[0].shape[4]
    assert tiles[2].shape[3:] == ((block_pad // 2, lanes) if hd <= lanes // 2 else (block_pad, tiles[0].shape[3]))
    assert_matches_reference(q, k, v, do, tol=2e-5)


def packed_rows(r, B, T, n_docs, padded):
    """segment_ids of up to n_docs documents per row (in order, or shuffled: segments need not be
    contiguous), and an attention_mask with up to `padded` padding positions per row (at the end, or
    anywhere)."""
    segments = np.sort(r.integers(0, n_docs, size=(B, T)), axis=1)
    if r.random() < 0.3:
        segments = r.permuted(segments, axis=1)
    mask = np.ones((B, T), dtype=np.int64)
    for b in range(B):
        n_pad = r.integers(0, padded + 1)
        if n_pad and r.random() < 0.5:
            mask[b, r.choice(T, size=min(n_pad, T), replace=False)] = 0
        elif n_pad:
            mask[b, T - min(n_pad, T):] = 0
    return segments, mask


def assert_packed_matches_reference(q, k, v, do, segment_ids, attention_mask, tol):
    """The kernels with documents against npllama.reference's attention with causal_visibility."""
    B, H, T, hd = q.shape
    documents = attention.document_ids(segment_ids, attention_mask, B, T)
    o, cache = attention.attention_forward(q, k, v, documents=documents)
    visible = reference.causal_visibility(T, segment_ids, attention_mask)
    o_ref, cache_ref = reference.attention_forward(q, k, v, visible, reference.NO_HOOKS)
    assert np.isfinite(o).all()
    np.testing.assert_allclose(o, o_ref, rtol=tol, atol=tol)
    got = attention.attention_backward(do, cache)
    want = reference.attention_backward(do, cache_ref, reference.NO_HOOKS)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=name)


@given(seed=st.integers(0, 2**31 - 1), block=st.sampled_from([1, 2, 3, 5, 8]), t=st.integers(1, 30),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), hd=st.sampled_from([1, 3, 4, 8]),
       b=st.integers(1, 3), n_docs=st.integers(1, 5), padded=st.integers(0, 4),
       which=st.sampled_from(["both", "segments", "padding"]))
def test_packed_rows_and_padding_equal_reference_float64(seed, block, t, heads, hd, b, n_docs, padded, which):
    # documents of any length crossing tiles, padding at the end or anywhere, whole tiles before a
    # query block's first document (skipped), a padding query (sees only itself)
    r = np.random.default_rng(seed)
    segments, mask = packed_rows(r, b, t, n_docs, padded)
    segments, mask = (None if which == "padding" else segments), (None if which == "segments" else mask)
    with tiles_of(block):
        assert_packed_matches_reference(*random_qkv(r, b, heads[0], heads[1], t, hd, np.float64), segments, mask,
                                        tol=1e-12)


@pytest.mark.parametrize("hd", [8, 32])
def test_packed_rows_float32_default_tiles(hd):
    # the default tiles (256 wide at hd 8, key pairs), documents longer and shorter than a tile
    r = np.random.default_rng(hd)
    t = 300
    segments = np.repeat([[0, 1, 2, 3]], [140, 7, 130, 23], axis=1).repeat(2, axis=0)
    mask = np.ones((2, t), dtype=np.int64)
    mask[1, 290:] = 0
    assert_packed_matches_reference(*random_qkv(r, 2, 4, 2, t, hd, np.float32), segments, mask, tol=2e-5)


def test_document_ids_give_the_reference_visibility():
    r = np.random.default_rng(3)
    for _ in range(300):
        B, T = r.integers(1, 4), r.integers(1, 12)
        segments, mask = packed_rows(r, B, T, 4, 5)
        segments = segments - 2                                    # any integers name segments
        query_docs, key_docs = attention.document_ids(segments, mask, B, T)
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        visible = (j <= i) & ((key_docs[:, None, :] == query_docs[:, :, None]) | (i == j))
        np.testing.assert_array_equal(visible, reference.causal_visibility(T, segments, mask)[:, 0])
        assert (query_docs <= np.arange(T)).all()


@pytest.mark.parametrize("n_splits", [2, 3, 5])
@pytest.mark.parametrize("packed", [False, True])
def test_backward_key_splits_sum_to_the_same_gradients(monkeypatch, n_splits, packed):
    # With few (batch, kv head) pairs the backward cuts the keys into ranges, one unit each, and
    # sums the partial dq of the ranges: the result must not depend on the cut (nor, with
    # documents, on which of a range's tiles are skipped).
    monkeypatch.setattr(attention, "block_size", lambda hd, T: 4)
    r = np.random.default_rng(n_splits)
    q, k, v, do = random_qkv(r, 1, 2, 1, 23, 5, np.float64)
    segments = np.repeat([[0, 1, 2]], [9, 3, 11], axis=1)
    documents = attention.document_ids(segments, (np.arange(23) < 20)[None], 1, 23) if packed else None
    _, cache = attention.attention_forward(q, k, v, documents=documents)
    one = attention.attention_backward(do, cache)
    n_blocks = 6                                          # 23 keys in blocks of 4
    cuts = np.linspace(0, n_blocks, n_splits + 1).round().astype(np.int64)
    monkeypatch.setattr(attention, "key_block_splits", lambda *args: cuts)
    split = attention.attention_backward(do, cache)
    for a, s in zip(one, split):
        np.testing.assert_allclose(s, a, rtol=1e-13, atol=1e-13)


def test_key_block_splits_balance_causal_work():
    assert attention.key_block_splits(8, 4, 4, threads=2).tolist() == [0, 4]     # enough units
    cuts = attention.key_block_splits(1, 1, 16, threads=2)                        # 1 pair, 2 threads
    assert cuts[0] == 0 and cuts[-1] == 16 and len(cuts) == 5                      # 2 units a thread
    # key block kb is read by 16 - kb query blocks: the first ranges have fewer, heavier blocks
    work = np.arange(16, 0, -1)
    shares = [work[a:b].sum() for a, b in zip(cuts[:-1], cuts[1:])]
    # each range is within half a block of the ideal share (the first block, 16, is the largest)
    assert max(abs(share - work.sum() / 4) for share in shares) <= 16 / 2 and cuts[1] < 4
    assert attention.key_block_splits(1, 1, 2, threads=8).tolist() == [0, 1, 2]    # <= one block each


def test_strided_inputs_and_outputs(monkeypatch):
    # The model passes v and do as strided views, asks for o in a (B, H, T, hd) view of its
    # (B, T, H * hd) buffer and for dv in a strided view of dqkv.
    monkeypatch.setattr(attention, "block_size", lambda hd, T: 8)
    r = np.random.default_rng(7)
    B, T, H, K, hd = 2, 19, 4, 2, 6
    qkv = r.normal(size=(B, T, (H + 2 * K) * hd))
    heads = lambda x, n: x.reshape(B, T, n, hd).transpose(0, 2, 1, 3)
    q, k, v = heads(qkv[..., :H * hd], H), heads(qkv[..., H * hd:(H + K) * hd], K), heads(qkv[..., (H + K) * hd:], K)
    do = heads(r.normal(size=(B, T, H * hd)), H)
    dqkv = np.full_like(qkv, np.nan)
    dq, dk, dv = heads(dqkv[..., :H * hd], H), heads(dqkv[..., H * hd:(H + K) * hd], K), heads(dqkv[..., (H + K) * hd:], K)
    o_merged = np.full((B, T, H * hd), np.nan)
    o, cache = attention.attention_forward(q, k, v, o=heads(o_merged, H))
    attention.attention_backward(do, cache, dq=dq, dk=dk, dv=dv)
    o_ref, cache_ref = attention.attention_forward_reference(q, k, v)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(o_merged, o.transpose(0, 2, 1, 3).reshape(B, T, H * hd))
    # without o, the output has that same layout: heads side by side in each row
    o_new, _ = attention.attention_forward(q, k, v)
    assert o_new.transpose(0, 2, 1, 3).flags.c_contiguous
    np.testing.assert_array_equal(o_new, o)
    for g, w in zip((dq, dk, dv), attention.attention_backward_reference(do, cache_ref)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    assert not np.isnan(dqkv).any()


def test_float32_exp_is_accurate():
    # The float32 kernels use engine/fastmath.py's vectorisable exp: relative error < 2 * 2^-23 over the range
    # softmax uses (measured ~0.7 with FMA; Cephes documents 1.7 for its expf; numpy's float32 exp:
    # ~1.7; ~2.5 near -87 if "nsz" lets LLVM merge the two parts of ln2), exactly 1 at 0, 0 below.
    x = np.concatenate([np.linspace(-87, 10, 200_001), [0.0, -1e-7, -200.0, -np.inf]]).astype(np.float32)
    got = fastmath.exp_float32_array(x)
    want = np.exp(x.astype(np.float64))
    normal = want > 1.2e-38
    rel = np.abs(got[normal] - want[normal]) / want[normal]
    assert rel.max() < 2 * 2.0 ** -23
    assert got[x == 0.0][0] == 1.0
    assert got[-2] == 0.0 and got[-1] == 0.0


@numba.njit(cache=True)
def _tile_products(A, B, C, k, accumulate, halves):
    """C[:, :] (+)= A[:, :k] @ B[:k, :] by tile_update calls of `halves` half vectors (4: two
    vectors; C: MR rows a tile); halves=0: ``tile_update_pairs`` (one vector, k pairs of A's columns
    from column 2, B's rows from row 1)."""
    columns = (halves or 2) * simd.VECTOR_BYTES // C.itemsize // 2
    for r in range(0, C.shape[0], simd.MR):
        for j in range(0, C.shape[1], columns):
            if halves == 0:
                simd.tile_update_pairs(A, r, 2, B, 1, j, C, r, j, k, accumulate)
            else:
                simd.tile_update_2(A, r, 1, B, 2, j, C, r, j, k, accumulate)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("halves", [4])
@given(seed=st.integers(0, 2**31 - 1), tiles=st.integers(1, 3), k=st.integers(0, 40),
       accumulate=st.booleans(), transposed=st.booleans())
def test_tile_update_equals_matmul(dtype, halves, seed, tiles, k, accumulate, transposed):
    # C[r, j] (+)= sum_d A[r, 1 + d] B[2 + d, j]: offsets into A and B, A in either layout.
    r = np.random.default_rng(seed)
    m, n = simd.MR * tiles, halves * simd.VECTOR_BYTES // np.dtype(dtype).itemsize // 2 * tiles
    A = r.normal(size=(m, k + 1)).astype(dtype)
    if transposed:
        A = np.ascontiguousarray(A.T).T                   # the same numbers, column-major
    B = r.normal(size=(k + 2, n)).astype(dtype)
    C = r.normal(size=(m, n)).astype(dtype)
    want = (C if accumulate else 0) + A[:, 1:].astype(np.float64) @ B[2:].astype(np.float64)
    _tile_products(A, B, C, k, accumulate, halves)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(C, want, rtol=tol, atol=tol * max(1, k))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(seed=st.integers(0, 2**31 - 1), tiles=st.integers(1, 3), k=st.integers(0, 40), accumulate=st.booleans())
def test_tile_update_pairs_equals_matmul(dtype, seed, tiles, k, accumulate):
    # C[r, l] (+)= sum_d A[r, 2 + 2d + l % 2] B[1 + d, l]: lane l of C sums the even (l even) or the
    # odd columns of A against B's rows, which hold two keys' numbers interleaved
    r = np.random.default_rng(seed)
    lanes = simd.VECTOR_BYTES // np.dtype(dtype).itemsize
    m, n = simd.MR * tiles, lanes * tiles
    A = r.normal(size=(m, 2 * k + 3)).astype(dtype)
    B = r.normal(size=(k + 1, n)).astype(dtype)
    C = r.normal(size=(m, n)).astype(dtype)
    parity = np.arange(n) % 2
    A64 = A.astype(np.float64)
    want = (C if accumulate else 0) + sum(A64[:, 2 + 2 * d + parity] * B[1 + d].astype(np.float64) for d in range(k))
    _tile_products(A, B, C, k, accumulate, 0)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(C, want, rtol=tol, atol=tol * max(1, k))


def test_inputs_and_outputs_whose_last_axis_is_strided():
    # The kernels read and write rows as contiguous vectors (engine/simd.py's contiguous_row); arrays whose
    # last axis is strided go through contiguous copies, in and out.
    r = np.random.default_rng(3)
    B, H, K, T, hd = 2, 4, 2, 11, 6
    q, k, v, do = random_qkv(r, B, H, K, T, hd, np.float64)
    fortran = lambda x: np.asfortranarray(x)              # noqa: E731 (last axis strided)
    outputs = [np.full(s, np.nan, order="F") for s in ((B, H, T, hd), (B, H, T, hd), (B, K, T, hd), (B, K, T, hd))]
    o, cache = attention.attention_forward(fortran(q), fortran(k), fortran(v), o=outputs[0])
    grads = attention.attention_backward(fortran(do), cache, *outputs[1:])
    o_ref, cache_ref = attention.attention_forward_reference(q, k, v)
    assert o is outputs[0] and all(g is want for g, want in zip(grads, outputs[1:]))
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, attention.attention_backward_reference(do, cache_ref)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


PLAIN_ROWS_PROBE = """
import numba
numba.version_info = numba.version_info._replace(short=(0, 1), major=0, minor=1)   # a Numba never tested
import numpy as np
from npllama.engine import simd
from npllama.layers import attention
assert not simd.USE_NUMBA_INTERNALS and simd.contiguous_row is simd._row_slice
r = np.random.default_rng(4)
for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-5)):
    B, H, K, T, hd = 2, 4, 2, 37, 8
    q, k, v, do = (r.standard_normal(s).astype(dtype) for s in ((B, H, T, hd), (B, K, T, hd), (B, K, T, hd), (B, H, T, hd)))
    o, cache = attention.attention_forward(q, k, v)
    o_ref, cache_ref = attention.attention_forward_reference(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    np.testing.assert_allclose(o, o_ref, rtol=tol, atol=tol)
    for g, w in zip(attention.attention_backward(do, cache), attention.attention_backward_reference(do.astype(np.float64), cache_ref)):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
print("plain rows ok")
"""


def test_attention_with_another_numba_takes_plain_row_slices(tmp_path):
    # With a Numba whose internals were not tested (engine/simd.py), attention reads its rows as plain
    # slices: the same values.  (A fresh Numba cache: the kernels compile with the fallback.)
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    proc = subprocess.run([sys.executable, "-c", PLAIN_ROWS_PROBE], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "plain rows ok" in proc.stdout, proc.stderr[-3000:]
