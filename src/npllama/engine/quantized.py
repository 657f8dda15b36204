"""Products with a matrix kept in GGUF's quantized blocks: the kernels (docs/14-quantized.md).

A quantized matrix W (rows, cols) is stored as llama.cpp stores it: each row is cols / 32 blocks of
32 weights, each block a float16 scale (and for Q4_1 a float16 minimum) followed by the weights'
integer codes.  ``blocks`` is that, byte for byte: a uint8 array (rows, cols / 32 * block bytes).

    Q8_0  34 bytes:  d, q[32] int8                    w_j = d q_j
    Q4_0  18 bytes:  d, n[16] two 4-bit codes a byte  w_j = d (lo(n_j) - 8),  w_{j+16} = d (hi(n_j) - 8)
    Q4_1  20 bytes:  d, m, n[16]                      w_j = d lo(n_j) + m,   w_{j+16} = d hi(n_j) + m

Q5_0 and Q5_1 (a fifth bit per weight) and the K-quants Q4_K, Q5_K, Q6_K (super-blocks of 256
weights, in sub-blocks with integer scales of their own) are read as groups of 32 weights
w = a c + o (``_group_codes``, below, lists their layouts).

The kernels never dequantize the whole matrix:

* matrix-vector (a decoding step, y = W x): each row's blocks are read once, in order, and turned
  into float products on the way: for block b of row i with codes c and the block's slice x_b,
      Q8_0:  d sum_j c_j x_bj
      Q4_0:  d sum_j (c_j - 8) x_bj
      Q4_1:  d sum_j c_j x_bj + m s_b             s_b = sum_j x_bj, once per call for all rows
  The 32 products of a block are summed in vector lanes, into a vector accumulator per row that
  is summed across its lanes once, at the end of the row (only the order of the sum changes).
  The block loop is LLVM IR (``_block_dots``), STREAMS rows far apart at a time.
* matrix-matrix (a prompt, y = x W^T, and a frozen weight's backward, dx = dy W): a panel of rows
  (PANEL_ELEMENTS floats, 4 MB in float32) is dequantized into a float buffer (the caller's dtype:
  float32 or float64; ``dequantize_row``, LLVM IR too, 32 weights a block in vector registers) and
  multiplied by BLAS; the panels are shared among npllama's threads (each panel one
  single-threaded BLAS call), so the matrix is read from memory once per call, in its quantized size.
  A prompt's forward (float32, at most STRIP_MAX_ROWS rows, FIRST_FORMATS, AVX-512) decodes 32 rows of W
  at a time transposed into a strip that stays in cache (``dequantize_transposed``) and multiplies
  x by it in register tiles (engine/simd.py), writing the output in place (``forward_strips``).

Float16 scales are widened by the CPU's own conversion (``_half_at``: LLVM's fpext from half,
vcvtph2ps on x86), exactly as the gguf package and llama.cpp do.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .blas import matmul_one_thread
from .jit import jit_rows_reassoc
from .simd import MR, VECTOR_BYTES, splat, tile_update_1, tile_update_2, tile_update_12
from .pool import claim_unit, helper_threads, row_units, run_on_threads
from .threads import get_threads

BLOCK = 32                                        # weights per block (K-quants: per sub-block)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20,
               "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
BLOCK_WEIGHTS = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256}   # K-quants' super-blocks; every other format 32
FORMATS = tuple(BLOCK_BYTES)
FIRST_FORMATS = ("Q8_0", "Q4_0", "Q4_1")          # the kernels' first cases (_block_codes)
GROUP_FORMATS = FORMATS[len(FIRST_FORMATS):]      # 5-bit blocks and K-quants (_group_codes)
OFFSET_FORMATS = ("Q4_1", "Q5_1", "Q4_K", "Q5_K")  # w = a c + o: the products need x's block sums


def block_weights(qtype: str) -> int:
    """Weights a block of ``qtype`` holds: 256 for the K-quants' super-blocks, else 32."""
    return BLOCK_WEIGHTS.get(qtype, BLOCK)
jit_q = jit_rows_reassoc


# ---- matrix-vector: y = W x ----------------------------------------------------------------------
# The block loop is LLVM IR (``block_dots``), written as llm.c's or llama.cpp's inner loops are, so
# that nothing of it is left to the vectoriser: per block of a row, the 32 codes are widened to
# floats in vector registers (Q4: the two halves of the bytes), multiplied by x's 32 numbers (loaded
# once for all the rows in flight) into a vector t, and t d is added to the row's vector
# accumulator; the accumulator stays in a register and is summed across its lanes once, at the end
# of the row.  (The loop of Numba code before it kept its per-lane sums in memory: 3-5 billion
# weights a second per core, from the cache; this one ~12-17.)
#
# A thread walks STREAMS rows at once that lie far apart in the matrix (row i, i + q, i + 2q, ...
# of its unit of rows), so that as many independent streams of cache lines are in flight: one core
# then reads the blocks from memory ~1.5-2x faster than from one or from adjacent rows (measured on
# SmolLM2's matrices), and each row also asks for its block PREFETCH_BYTES ahead.
STREAMS = 8
PREFETCH_BYTES = 256
FORMAT_CODE = {name: code for code, name in enumerate(FORMATS)}   # the kernels' format argument


def _half_at(builder, base, offset, elt):
    """The float16 at byte ``base + offset`` widened to ``elt`` (float or double), exactly."""
    pointer = builder.bitcast(builder.gep(base, [ir.Constant(ir.IntType(64), offset)]), ir.IntType(16).as_pointer())
    value = builder.fpext(builder.bitcast(builder.load(pointer, align=1), ir.HalfType()), ir.FloatType())
    return value if elt == ir.FloatType() else builder.fpext(value, elt)


def _block_codes(builder, qtype, base, elt, lanes):
    """The block at byte ``base``'s 32 codes as floats, in vectors of ``lanes`` (Q4_0: c - 8, so
    that d times them is the weight; Q4_1: c, whose weight is d c + m)."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    v16 = ir.VectorType(i8, 16)

    def load16(offset):
        pointer = builder.gep(base, [ir.Constant(ir.IntType(64), offset)])
        return builder.load(builder.bitcast(pointer, v16.as_pointer()), align=1)

    v16_i32 = ir.VectorType(i32, 16)
    if qtype == "Q8_0":
        halves = [builder.sext(load16(2), v16_i32), builder.sext(load16(18), v16_i32)]
    else:   # (the bytes widened once, then split: one widening a block instead of two)
        n = builder.zext(load16(4 if qtype == "Q4_1" else 2), v16_i32)
        halves = [builder.and_(n, ir.Constant(v16_i32, [15] * 16)), builder.lshr(n, ir.Constant(v16_i32, [4] * 16))]
        if qtype == "Q4_0":
            halves = [builder.sub(h, ir.Constant(v16_i32, [8] * 16)) for h in halves]
    vectors = []
    for h in halves:
        for k in range(16 // lanes):
            part = h if lanes == 16 else builder.shuffle_vector(
                h, h, ir.Constant(ir.VectorType(i32, lanes), list(range(k * lanes, (k + 1) * lanes))))
            vectors.append(builder.sitofp(part, ir.VectorType(elt, lanes)))
    return vectors


# ---- 5-bit blocks and K-quants: a block (super-block) as groups of 32 weights ---------------------
# Every format after the first three is read as G groups of 32 weights a block (G = 1 for Q5_0 and
# Q5_1, 8 for the K-quants' 256-weight super-blocks), group g's weights being
#     w = a_h c + o        c integer codes, a_h the scale of the group's half h (16 weights), o an offset
# (Q6_K: a scale per 16 weights, so a_0 and a_1 differ; every other format one a per group):
#     Q5_0   22 bytes: d, qh[4], n[16]                c = lo(n_j) | bit j of qh << 4, minus 16;  a = d
#     Q5_1   24 bytes: d, m, qh[4], n[16]             c as Q5_0 without the 16;  a = d, o = m
#     Q4_K  144 bytes: d, dmin, s[12], n[128]         group g = 2k + h: c = nibble h of n[32k + j]
#                                                      a = d sc_g, o = -dmin mn_g (6-bit sc, mn from s)
#     Q5_K  176 bytes: d, dmin, s[12], qh[32], n[128] c = Q4_K's | bit g of qh[j] << 4;  a, o as Q4_K
#     Q6_K  210 bytes: ql[128], qh[64], sc[16] int8, d   g = 4u + 2v + t: c = nibble v of ql[64u + 32t + j]
#                                                      | bits 2(2v + t) of qh[32u + j] << 4, minus 32;
#                                                      a_h = d sc[2g + h]
# The products d sc c are exact in float32 (at most 11 + 7 + 5 significant bits), so a group
# decodes with at most one rounding (+ o), as the gguf package computes it.
def _group_codes(builder, qtype, base, g, elt):
    """Group g of the block at byte ``base``: (two 16-lane i32 vectors of codes, one per half; the
    halves' scales a_0, a_1 as ``elt``; the offset o as ``elt``, or None)."""
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    v16 = ir.VectorType(i32, 16)

    def at(offset):
        return builder.gep(base, [ir.Constant(i64, offset)])

    def bytes16(offset):        # 16 bytes from ``offset``, widened to i32 lanes
        return builder.zext(builder.load(builder.bitcast(at(offset), ir.VectorType(i8, 16).as_pointer()),
                                         align=1), v16)

    def byte(offset):
        return builder.zext(builder.load(at(offset)), i32)

    def lanes(*values):
        return ir.Constant(v16, list(values) if len(values) == 16 else [values[0]] * 16)

    def to_elt(integer):
        return builder.sitofp(integer, elt)

    if qtype in ("Q5_0", "Q5_1"):
        # the 32 codes as bytes: the nibbles, and qh's 32 bits as a vector of 32 booleans (an AVX-512
        # mask register, widened to bytes in one instruction) shifted to bit 4
        qh_at, n_at = (2, 6) if qtype == "Q5_0" else (4, 8)
        qh = builder.load(builder.bitcast(at(qh_at), i32.as_pointer()), align=1)
        fifth = builder.zext(builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32)), ir.VectorType(i8, 32))
        v16_8 = ir.VectorType(i8, 16)
        n = builder.load(builder.bitcast(at(n_at), v16_8.as_pointer()), align=1)
        nibbles = builder.shuffle_vector(builder.and_(n, ir.Constant(v16_8, [15] * 16)),
                                         builder.lshr(n, ir.Constant(v16_8, [4] * 16)),
                                         ir.Constant(ir.VectorType(i32, 32), list(range(32))))
        c = builder.or_(nibbles, builder.shl(fifth, ir.Constant(ir.VectorType(i8, 32), [4] * 32)))
        if qtype == "Q5_0":
            c = builder.sub(c, ir.Constant(ir.VectorType(i8, 32), [16] * 32))
        widen = builder.sext if qtype == "Q5_0" else builder.zext
        half_lanes = [ir.Constant(ir.VectorType(i32, 16), [16 * h + j for j in range(16)]) for h in range(2)]
        halves = [widen(builder.shuffle_vector(c, c, lanes_h), v16) for lanes_h in half_lanes]
        d = _half_at(builder, base, 0, elt)
        return halves, (d, d), (_half_at(builder, base, 2, elt) if qtype == "Q5_1" else None)
    if qtype in ("Q4_K", "Q5_K"):
        k, h = divmod(g, 2)
        n_at = 16 if qtype == "Q4_K" else 48
        halves = []
        for half in range(2):
            n = bytes16(n_at + 32 * k + 16 * half)
            c = builder.and_(builder.lshr(n, lanes(4)) if h else n, lanes(15))
            if qtype == "Q5_K":
                high = builder.and_(builder.lshr(bytes16(16 + 16 * half), lanes(g)), lanes(1))
                c = builder.or_(c, builder.shl(high, lanes(4)))
            halves.append(c)
        s = lambda j: byte(4 + j)  # noqa: E731  (the 12 bytes of 6-bit scales and minima)
        if g < 4:
            sc, mn = builder.and_(s(g), ir.Constant(i32, 63)), builder.and_(s(g + 4), ir.Constant(i32, 63))
        else:
            top = lambda j: builder.shl(builder.lshr(s(j), ir.Constant(i32, 6)), ir.Constant(i32, 4))  # noqa: E731
            sc = builder.or_(builder.and_(s(g + 4), ir.Constant(i32, 15)), top(g - 4))
            mn = builder.or_(builder.lshr(s(g + 4), ir.Constant(i32, 4)), top(g))
        a = builder.fmul(_half_at(builder, base, 0, elt), to_elt(sc))
        o = builder.fneg(builder.fmul(_half_at(builder, base, 2, elt), to_elt(mn)))
        return halves, (a, a), o
    assert qtype == "Q6_K", qtype
    u, rest = divmod(g, 4)
    v, t = divmod(rest, 2)
    halves = []
    for half in range(2):
        low = builder.and_(builder.lshr(bytes16(64 * u + 32 * t + 16 * half), lanes(4 * v)), lanes(15))
        high = builder.and_(builder.lshr(bytes16(128 + 32 * u + 16 * half), lanes(2 * rest)), lanes(3))
        halves.append(builder.sub(builder.or_(low, builder.shl(high, lanes(4))), lanes(32)))
    d = _half_at(builder, base, 208, elt)
    scales = tuple(builder.fmul(d, to_elt(builder.sext(builder.load(at(192 + 2 * g + h)), i32))) for h in range(2))
    return halves, scales, None


def _group_weights(builder, qtype, base, g, elt, lanes):
    """Group g's 32 weights a_h c + o as vectors of ``lanes`` ``elt``: the gguf package's float32
    numbers (a format with an offset is decoded in float32, its one rounding there, then widened)."""
    decode = ir.FloatType() if qtype in OFFSET_FORMATS else elt
    halves, scales, o = _group_codes(builder, qtype, base, g, decode)
    vec = ir.VectorType(decode, lanes)
    weights = []
    for codes, h in _to_vectors(builder, halves, decode, lanes):
        w = builder.fmul(codes, splat(builder, scales[h], vec))
        if o is not None:
            w = builder.fadd(w, splat(builder, o, vec))
        weights.append(w if decode == elt else builder.fpext(w, ir.VectorType(elt, lanes)))
    return weights


# A decoding step reads the K-quants a super-block at a time (``_superblock_codes``): its 256 codes
# are unpacked with byte-wide vector operations (64 weights an instruction: the shifts, masks and
# ors that put Q5_K's fifth and Q6_K's two high bits in place) into a buffer of 256 signed bytes in
# weight order, the sub-blocks' scales a_s (and Q4_K/Q5_K's offsets o_s) into small float buffers,
# and the products then read the buffer 16 codes at a time (one widening load, one conversion, one
# fused multiply-add with x).  Unpacking group by group in 32-bit lanes instead took ~3x the
# instructions, and a K-quant row was slower to multiply than a float32 one read from memory.
def _superblock_codes(builder, qtype, base, codes, scales, offsets):
    """Unpack the K-quant super-block at byte ``base``: codes (i8*) [256] = its codes in weight order
    (Q6_K's minus 32), scales (float*) = a_s per sub-block (8 for Q4_K/Q5_K, 16 for Q6_K), and for
    Q4_K/Q5_K offsets (float*) [8] = o_s = -dmin mn_s.  Every number in float32: the products d sc
    and dmin mn are exact there."""
    i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()

    def at(pointer, offset):
        return builder.gep(pointer, [ir.Constant(i64, offset)])

    def load(offset, n):
        return builder.load(builder.bitcast(at(base, offset), ir.VectorType(i8, n).as_pointer()), align=1)

    def store(vector, pointer, offset):
        builder.store(vector, builder.bitcast(at(pointer, offset), vector.type.as_pointer()), align=1)

    def const(n, *values):
        return ir.Constant(ir.VectorType(i8, n), list(values) if len(values) == n else [values[0]] * n)

    def concat(a, b):
        n = a.type.count
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 2 * n), list(range(2 * n))))

    def part(a, start, n):
        return builder.shuffle_vector(a, a, ir.Constant(ir.VectorType(i32, n), list(range(start, start + n))))

    if qtype == "Q6_K":
        qh = load(128, 64)
        for u in range(2):                                   # the two halves of 128 weights
            ql = load(64 * u, 64)
            q = part(qh, 32 * u, 32)
            pair = concat(q, builder.lshr(q, const(32, 2)))  # t = 0: bits 4v, 4v + 1; t = 1: bits 4v + 2, 4v + 3
            for v in range(2):
                low = builder.and_(builder.lshr(ql, const(64, 4)) if v else ql, const(64, 15))
                high = builder.and_(builder.lshr(pair, const(64, 4 * v)) if v else pair, const(64, 3))
                c = builder.sub(builder.or_(low, builder.shl(high, const(64, 4))), const(64, 32))
                store(c, codes, 128 * u + 64 * v)
        sc = builder.sitofp(builder.sext(load(192, 16), ir.VectorType(i32, 16)), ir.VectorType(f32, 16))
        store(builder.fmul(sc, splat(builder, _half_at(builder, base, 208, f32), sc.type)),
              builder.bitcast(scales, i8.as_pointer()), 0)
        return
    n_at = 16 if qtype == "Q4_K" else 48
    if qtype == "Q5_K":
        qh = load(16, 32)
        pairs = concat(qh, builder.lshr(qh, const(32, 1)))   # bits 2k and 2k + 1 of qh: sub-blocks 2k, 2k + 1
    for half in range(2):                                     # sub-blocks 4 half .. 4 half + 3
        n = load(n_at + 64 * half, 64)
        low, high = builder.and_(n, const(64, 15)), builder.lshr(n, const(64, 4))
        for kk in range(2):
            k = 2 * half + kk
            c = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(i32, 64), list(range(32 * kk, 32 * kk + 32))
                                                              + list(range(64 + 32 * kk, 96 + 32 * kk))))
            if qtype == "Q5_K":
                fifth = builder.and_(builder.lshr(pairs, const(64, 2 * k)) if k else pairs, const(64, 1))
                c = builder.or_(c, builder.shl(fifth, const(64, 4)))
            store(c, codes, 64 * k)
    # the 6-bit scales and minima of the 8 sub-blocks, from s = bytes 4..15 (docs/14-quantized.md)
    v8 = ir.VectorType(i32, 8)
    s = builder.zext(load(4, 16), ir.VectorType(i32, 16))   # (bytes 16..19 are codes, unused)

    def lanes(*js):
        return builder.shuffle_vector(s, s, ir.Constant(v8, list(js)))

    def mask(lo, hi):
        return ir.Constant(v8, [lo] * 4 + [hi] * 4)

    a, b, c = lanes(0, 1, 2, 3, 0, 1, 2, 3), lanes(4, 5, 6, 7, 4, 5, 6, 7), lanes(8, 9, 10, 11, 8, 9, 10, 11)
    top = lambda x: builder.and_(builder.lshr(x, mask(2, 2)), mask(0, 48))  # noqa: E731  (bits 6-7 -> 4-5, s >= 4)
    sc = builder.or_(builder.or_(builder.and_(a, mask(63, 0)), builder.and_(c, mask(0, 15))), top(a))
    mn = builder.or_(builder.or_(builder.and_(b, mask(63, 0)), builder.and_(builder.lshr(c, mask(0, 4)), mask(0, 15))),
                     top(b))
    f8 = ir.VectorType(f32, 8)
    d, dmin = (splat(builder, _half_at(builder, base, k, f32), f8) for k in (0, 2))
    store(builder.fmul(builder.sitofp(sc, f8), d), builder.bitcast(scales, i8.as_pointer()), 0)
    store(builder.fneg(builder.fmul(builder.sitofp(mn, f8), dmin)), builder.bitcast(offsets, i8.as_pointer()), 0)


K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def _to_vectors(builder, halves, elt, lanes):
    """The two halves' codes as float vectors of ``lanes``: [(vector, half), ...] in weight order."""
    i32 = ir.IntType(32)
    vectors = []
    for h, codes in enumerate(halves):
        for k in range(16 // lanes):
            part = codes if lanes == 16 else builder.shuffle_vector(
                codes, codes, ir.Constant(ir.VectorType(i32, lanes), list(range(k * lanes, (k + 1) * lanes))))
            vectors.append((builder.sitofp(part, ir.VectorType(elt, lanes)), h))
    return vectors


# ---- dequantizing rows (the embedding lookup, the matrix-matrix panels) ----------------------------
@intrinsic
def dequantize_row(typingctx, blocks, out, fmt, i, k):
    """out[k] = row i of W as numbers of out's dtype, W the blocks of format FORMATS[fmt]: per block,
    its 32 codes widened to floats in vector registers (``_block_codes``, as the matrix-vector
    kernel reads them), times d (Q4_1: plus m), stored 32 at a time.  The same numbers as the gguf
    package's dequantize: d c is exact (11 + 8 significant bits), so only ``+ m`` rounds, once."""
    if not (isinstance(out, types.Array) and out.layout == "C" and out.dtype in (types.float32, types.float64)):
        return None
    sig = types.void(blocks, out, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        blocks_, out_, fmt, i, k = args
        i64 = ir.IntType(64)
        const = lambda v: ir.Constant(i64, v)  # noqa: E731
        w_arr = context.make_array(signature.args[0])(context, builder, blocks_)
        o_arr = context.make_array(signature.args[1])(context, builder, out_)
        elt = context.get_value_type(signature.args[1].dtype)
        itemsize = context.get_abi_sizeof(elt)
        lanes = min(16, VECTOR_BYTES // itemsize)
        vec = ir.VectorType(elt, lanes)
        byte_ptr = ir.IntType(8).as_pointer()
        row_start = builder.gep(builder.bitcast(w_arr.data, byte_ptr),
                                [builder.mul(i, cgutils.unpack_tuple(builder, w_arr.strides, 2)[0])])
        out_row = builder.bitcast(builder.gep(builder.bitcast(o_arr.data, byte_ptr),
                                              [builder.mul(k, cgutils.unpack_tuple(builder, o_arr.strides, 2)[0])]),
                                  vec.as_pointer())
        cols = cgutils.unpack_tuple(builder, o_arr.shape, 2)[1]
        n_blocks = builder.sdiv(cols, const(BLOCK))
        for qtype in FIRST_FORMATS:
            with builder.if_then(builder.icmp_signed("==", fmt, const(FORMAT_CODE[qtype]))):
                with cgutils.for_range(builder, n_blocks) as loop:
                    b = loop.index
                    base = builder.gep(row_start, [builder.mul(b, const(BLOCK_BYTES[qtype]))])
                    d = splat(builder, _half_at(builder, base, 0, elt), vec)
                    m = splat(builder, _half_at(builder, base, 2, elt), vec) if qtype == "Q4_1" else None
                    for v, codes in enumerate(_block_codes(builder, qtype, base, elt, lanes)):
                        w = builder.fmul(codes, d)
                        if m is not None:
                            w = builder.fadd(w, m)
                        target = builder.gep(out_row, [builder.add(builder.mul(b, const(BLOCK // lanes)), const(v))])
                        builder.store(w, target, align=itemsize)
        for qtype in GROUP_FORMATS:   # per group of 32: w = a_h c (+ o), 32 // lanes vectors stored
            groups = block_weights(qtype) // BLOCK
            with builder.if_then(builder.icmp_signed("==", fmt, const(FORMAT_CODE[qtype]))):
                with cgutils.for_range(builder, builder.sdiv(cols, const(block_weights(qtype)))) as loop:
                    b = loop.index
                    base = builder.gep(row_start, [builder.mul(b, const(BLOCK_BYTES[qtype]))])
                    for g in range(groups):
                        first = builder.mul(builder.add(builder.mul(b, const(groups)), const(g)), const(BLOCK // lanes))
                        for v, w in enumerate(_group_weights(builder, qtype, base, g, elt, lanes)):
                            builder.store(w, builder.gep(out_row, [builder.add(first, const(v))]), align=itemsize)
        return context.get_dummy_value()
    return sig, codegen


@jit_q
def dequantize_rows_kernel(blocks, rows, out, fmt):
    """out[k] = row rows[k] of W, for every k (``dequantize_row``)."""
    for k in range(rows.shape[0]):
        dequantize_row(blocks, out, fmt, rows[k], k)


def dequantize_rows(w, rows, out):
    """out (len(rows), cols) = the rows ``rows`` (int64) of the quantized matrix ``w``, in out's dtype."""
    dequantize_rows_kernel(w.blocks, rows, out, FORMAT_CODE[w.qtype])
    return out


def _block_dots(rows):
    """An intrinsic block_dots(blocks, x, sums, y, fmt, i, q): y[i + r q] = row i + r q of W times x,
    for r < ``rows``, W the blocks of format FORMATS[fmt]; ``sums`` holds x's block sums (Q4_1)."""
    @intrinsic
    def block_dots(typingctx, blocks, x, sums, y, fmt, i, q):
        if not (isinstance(x, types.Array) and x.layout == "C" and x.dtype in (types.float32, types.float64)):
            return None
        sig = types.void(blocks, x, sums, y, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            blocks_, x_, sums_, y_, fmt, i, q = args
            i64 = ir.IntType(64)
            const = lambda v: ir.Constant(i64, v)  # noqa: E731
            arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:4], args[:4])]
            w_arr, x_arr, sums_arr, y_arr = arrays
            elt = context.get_value_type(signature.args[1].dtype)
            itemsize = context.get_abi_sizeof(elt)
            lanes = min(16, VECTOR_BYTES // itemsize)
            vec = ir.VectorType(elt, lanes)
            fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                                     f"llvm.fmuladd.v{lanes}f{itemsize * 8}")
            fmuladd1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(elt, [elt] * 3),
                                                      f"llvm.fmuladd.f{itemsize * 8}")
            reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(elt, [elt, vec]),
                                                    f"llvm.vector.reduce.fadd.v{lanes}f{itemsize * 8}")
            f8 = ir.VectorType(ir.FloatType(), 8)     # (Q4_K/Q5_K's offsets: float32, 8 sub-blocks)
            fmuladd8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f8, [f8] * 3),
                                                      "llvm.fmuladd.v8f32")
            reduce8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(elt, [elt, f8]),
                                                     "llvm.vector.reduce.fadd.v8f32") if elt == ir.FloatType() else None
            byte_ptr = ir.IntType(8).as_pointer()
            prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                ir.VoidType(), [byte_ptr, ir.IntType(32), ir.IntType(32), ir.IntType(32)]), "llvm.prefetch.p0i8")
            row_stride = cgutils.unpack_tuple(builder, w_arr.strides, 2)[0]
            y_stride = cgutils.unpack_tuple(builder, y_arr.strides, 1)[0]
            n_blocks = builder.sdiv(cgutils.unpack_tuple(builder, x_arr.shape, 1)[0], const(BLOCK))
            x_vectors = builder.bitcast(x_arr.data, vec.as_pointer())
            block_sums = builder.bitcast(sums_arr.data, elt.as_pointer())
            row = [builder.add(i, builder.mul(q, const(r))) for r in range(rows)]
            row_start = [builder.gep(builder.bitcast(w_arr.data, byte_ptr), [builder.mul(n, row_stride)]) for n in row]
            acc = [cgutils.alloca_once(builder, vec) for _ in range(rows)]          # sum of t d, per lane
            offset = [cgutils.alloca_once(builder, elt) for _ in range(rows)]       # Q4_1: sum of m s_b
            for r in range(rows):
                builder.store(ir.Constant(vec, None), acc[r])
                builder.store(ir.Constant(elt, 0.0), offset[r])
            for qtype in FIRST_FORMATS:
                with builder.if_then(builder.icmp_signed("==", fmt, const(FORMAT_CODE[qtype]))):
                    with cgutils.for_range(builder, n_blocks) as loop:
                        b = loop.index
                        xb = [builder.load(builder.gep(x_vectors, [builder.add(builder.mul(b, const(BLOCK // lanes)),
                                                                               const(v))]), align=itemsize)
                              for v in range(BLOCK // lanes)]
                        s_b = builder.load(builder.gep(block_sums, [b])) if qtype == "Q4_1" else None
                        block_offset = builder.mul(b, const(BLOCK_BYTES[qtype]))
                        for r in range(rows):
                            base = builder.gep(row_start[r], [block_offset])
                            builder.call(prefetch, [builder.gep(base, [const(PREFETCH_BYTES)]),
                                                    ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 3),
                                                    ir.Constant(ir.IntType(32), 1)])
                            codes = _block_codes(builder, qtype, base, elt, lanes)
                            t = builder.fmul(codes[0], xb[0])                     # t = sum of c x, per lane
                            for c, xv in zip(codes[1:], xb[1:]):
                                t = builder.call(fmuladd, [c, xv, t])
                            d = splat(builder, _half_at(builder, base, 0, elt), vec)
                            builder.store(builder.call(fmuladd, [t, d, builder.load(acc[r])]), acc[r])
                            if s_b is not None:
                                m = _half_at(builder, base, 2, elt)
                                builder.store(builder.call(fmuladd1, [m, s_b, builder.load(offset[r])]), offset[r])
            def prefetch_block(base, nbytes):     # (every cache line of the block PREFETCH_BYTES ahead)
                for line in range(0, nbytes, 64):
                    builder.call(prefetch, [builder.gep(base, [const(PREFETCH_BYTES + line)]),
                                            *(ir.Constant(ir.IntType(32), v) for v in (0, 3, 1))])

            f32 = ir.FloatType()
            codes = builder.bitcast(cgutils.alloca_once(builder, ir.ArrayType(ir.IntType(8), 256)), byte_ptr)
            scales = builder.bitcast(cgutils.alloca_once(builder, ir.ArrayType(f32, 16)), f32.as_pointer())
            offsets = builder.bitcast(cgutils.alloca_once(builder, ir.ArrayType(f32, 8)), f32.as_pointer())
            f8 = ir.VectorType(f32, 8)

            def codes_at(j):        # codes j lanes .. (j + 1) lanes - 1 of the buffer, as bytes
                pointer = builder.bitcast(builder.gep(codes, [const(j * lanes)]),
                                          ir.VectorType(ir.IntType(8), lanes).as_pointer())
                return builder.load(pointer, align=1)

            def splat_at(buffer, k, vector_type):
                return splat(builder, builder.load(builder.gep(buffer, [const(k)])), vector_type)

            offset8 = [cgutils.alloca_once(builder, f8) for _ in range(rows)]       # Q4_K/Q5_K: o_s s_s
            for qtype in K_QUANTS:   # a super-block a row at a time: unpacked (_superblock_codes), then summed
                nbytes, per_scale = BLOCK_BYTES[qtype], 16 if qtype == "Q6_K" else 32
                with builder.if_then(builder.icmp_signed("==", fmt, const(FORMAT_CODE[qtype]))):
                    for r in range(rows):
                        builder.store(ir.Constant(f8, None), offset8[r])
                    with cgutils.for_range(builder, builder.sdiv(n_blocks, const(8))) as loop:
                        b = loop.index
                        block_offset = builder.mul(b, const(nbytes))
                        x_first = builder.mul(b, const(256 // lanes))            # x's vector at the super-block
                        for r in range(rows):
                            base = builder.gep(row_start[r], [block_offset])
                            prefetch_block(base, nbytes)
                            _superblock_codes(builder, qtype, base, codes, scales, offsets)
                            a_t = builder.load(acc[r])
                            if elt == f32:       # per sub-block: t = sum of c x in lanes, then acc += a_s t
                                for sub in range(256 // per_scale):
                                    t = None
                                    for k in range(per_scale // lanes):
                                        j = sub * per_scale // lanes + k
                                        c = codes_at(j)
                                        c = builder.sitofp(c, vec)
                                        xv = builder.load(builder.gep(x_vectors, [builder.add(x_first, const(j))]),
                                                          align=itemsize)
                                        t = builder.fmul(c, xv) if t is None else builder.call(fmuladd, [c, xv, t])
                                    a_t = builder.call(fmuladd, [t, splat_at(scales, sub, vec), a_t])
                            else:                # float64: the float32 weights a_s c + o_s, then w x
                                v32 = ir.VectorType(f32, lanes)
                                for j in range(256 // lanes):
                                    sub = j * lanes // per_scale
                                    c = codes_at(j)
                                    w = builder.fmul(builder.sitofp(c, v32), splat_at(scales, sub, v32))
                                    if qtype != "Q6_K":
                                        w = builder.fadd(w, splat_at(offsets, sub, v32))
                                    xv = builder.load(builder.gep(x_vectors, [builder.add(x_first, const(j))]),
                                                      align=itemsize)
                                    a_t = builder.call(fmuladd, [builder.fpext(w, vec), xv, a_t])
                            builder.store(a_t, acc[r])
                            if qtype != "Q6_K" and elt == f32:
                                s8 = builder.load(builder.bitcast(builder.gep(block_sums, [builder.mul(b, const(8))]),
                                                                  f8.as_pointer()), align=itemsize)
                                o8 = builder.load(builder.bitcast(offsets, f8.as_pointer()), align=4)
                                builder.store(builder.call(fmuladd8, [o8, s8, builder.load(offset8[r])]), offset8[r])
                    if qtype != "Q6_K" and elt == f32:
                        for r in range(rows):
                            builder.store(builder.call(reduce8, [builder.load(offset[r]), builder.load(offset8[r])],
                                                       fastmath=("reassoc",)), offset[r])
            for qtype in GROUP_FORMATS:   # per group of 32: sum_h a_h t_h (+ o s_g), t_h = sum of c x per lane
                if qtype in K_QUANTS:
                    continue
                groups, nbytes = block_weights(qtype) // BLOCK, BLOCK_BYTES[qtype]
                with builder.if_then(builder.icmp_signed("==", fmt, const(FORMAT_CODE[qtype]))):
                    n_super = builder.sdiv(n_blocks, const(groups))
                    with cgutils.for_range(builder, n_super) as loop:
                        b = loop.index
                        block_offset = builder.mul(b, const(nbytes))
                        for r in range(rows):
                            base = builder.gep(row_start[r], [block_offset])
                            prefetch_block(base, nbytes)
                        for g in range(groups):
                            block = builder.add(builder.mul(b, const(groups)), const(g))   # x's block of 32
                            x_block = builder.mul(block, const(BLOCK // lanes))
                            xb = [builder.load(builder.gep(x_vectors, [builder.add(x_block, const(v))]), align=itemsize)
                                  for v in range(BLOCK // lanes)]
                            s_b = builder.load(builder.gep(block_sums, [block])) if qtype in OFFSET_FORMATS else None
                            for r in range(rows):
                                base = builder.gep(row_start[r], [block_offset])
                                if s_b is not None and elt != ir.FloatType():
                                    # float64: the float32 weights themselves (the reference's numbers:
                                    # a c + o rounds once in float32), then sum_j w_j x_j
                                    t = builder.load(acc[r])
                                    for w, xv in zip(_group_weights(builder, qtype, base, g, elt, lanes), xb):
                                        t = builder.call(fmuladd, [w, xv, t])
                                    builder.store(t, acc[r])
                                    continue
                                halves, scales, o = _group_codes(builder, qtype, base, g, elt)
                                if scales[0] is scales[1]:
                                    scales = scales[:1]       # (one scale: one t for the whole group)
                                t = [None] * len(scales)
                                for (c, h), xv in zip(_to_vectors(builder, halves, elt, lanes), xb):
                                    h = min(h, len(t) - 1)
                                    t[h] = builder.fmul(c, xv) if t[h] is None else builder.call(fmuladd, [c, xv, t[h]])
                                a_t = builder.load(acc[r])
                                for th, a in zip(t, scales):
                                    a_t = builder.call(fmuladd, [th, splat(builder, a, vec), a_t])
                                builder.store(a_t, acc[r])
                                if o is not None:
                                    builder.store(builder.call(fmuladd1, [o, s_b, builder.load(offset[r])]), offset[r])
            y_bytes = builder.bitcast(y_arr.data, byte_ptr)
            for r in range(rows):
                total = builder.call(reduce, [builder.load(offset[r]), builder.load(acc[r])], fastmath=("reassoc",))
                builder.store(total, builder.bitcast(builder.gep(y_bytes, [builder.mul(row[r], y_stride)]),
                                                     elt.as_pointer()))
            return context.get_dummy_value()
        return sig, codegen
    return block_dots


block_dots_streams = _block_dots(STREAMS)
block_dots_one = _block_dots(1)


@jit_q
def block_sums(x, sums):
    """sums[b] = sum of x's block b (Q4_1's offset term: sum_j (d c_j + m) x_j = d sum_j c_j x_j + m s_b)."""
    for b in range(sums.shape[0]):
        s = x.dtype.type(0.0)
        for j in range(BLOCK):
            s += x[b * BLOCK + j]
        sums[b] = s


@jit_q
def quantized_rows(blocks, x, sums, y, fmt, start, stop):
    """y[i] = sum_b d_ib sum_j c_ibj x_bj (+ m_ib s_b) for start <= i < stop: STREAMS rows
    (stop - start) / STREAMS apart at a time, then the last few one by one."""
    q = (stop - start) // STREAMS
    for i in range(start, start + q):
        block_dots_streams(blocks, x, sums, y, fmt, i, q)
    for i in range(start + STREAMS * q, stop):
        block_dots_one(blocks, x, sums, y, fmt, i, 0)


@jit_q
def matvec_rows(blocks, x, sums, y, fmt, rows_per_unit, next_unit):
    """``quantized_rows`` over the units of rows this thread claims."""
    R = y.shape[0]
    while True:
        start = claim_unit(next_unit) * rows_per_unit
        if start >= R:
            break
        quantized_rows(blocks, x, sums, y, fmt, start, min(R, start + rows_per_unit))


UNITS_PER_THREAD = 4                # a product's rows are cut into about this many units per thread
PARALLEL_MATVEC_MIN_ROWS = 256      # fewer rows: on the calling thread alone (handing out costs more)


def quantized_matvec(w, x, y):
    """y (rows,) = W x for a quantized W (rows, cols) and x (cols,), on npllama's threads when W is big."""
    if x.shape != (w.shape[1],) or y.shape != (w.shape[0],):
        raise ValueError(f"W {w.shape} x {x.shape} -> y {y.shape}: the shapes do not match")
    x = np.ascontiguousarray(x)
    sums = np.empty(w.shape[1] // BLOCK, dtype=x.dtype)
    if w.qtype in OFFSET_FORMATS:
        block_sums(x, sums)
    rows, threads, fmt = w.shape[0], get_threads(), FORMAT_CODE[w.qtype]
    if rows < PARALLEL_MATVEC_MIN_ROWS or threads <= 1:
        matvec_rows(w.blocks, x, sums, y, fmt, rows, np.zeros(1, dtype=np.int64))
    else:
        per_unit = -(-rows // (UNITS_PER_THREAD * threads))
        run_on_threads(matvec_rows, w.blocks, x, sums, y, fmt, per_unit, n_units=row_units(rows, per_unit))
    return y


# ---- matrix-matrix: y = x W^T and dx = dy W, a dequantized panel at a time -------------------------
# Floats in a panel: 4 MB in float32.  The backward sums a product per panel into dx (N, cols), so
# small panels mean many thin products and as many passes over dx: with 256 KB panels QLoRA's
# dx = dy W for SmolLM2's W_down (576 x 1536, 1,024 rows of dy) took 1.8x a float32 matmul's time,
# with 4 MB ones the same as it (benchmarks/README.md, 2026-12-07).
PANEL_ELEMENTS = 1 << 20


def _panels(w, threads=1):
    """Row ranges of ``w`` dequantized at a time: PANEL_ELEMENTS floats, at least one per thread."""
    rows = max(16, min(PANEL_ELEMENTS // w.shape[1], -(-w.shape[0] // threads)) // 16 * 16)
    return [(r0, min(r0 + rows, w.shape[0])) for r0 in range(0, w.shape[0], rows)]


def _forward_panels(x, w, out, panels, dtype):
    """out[:, r0:r1] = x W[r0:r1]^T for each panel (on this thread, single-threaded BLAS)."""
    buf = np.empty((max(r1 - r0 for r0, r1 in panels), w.shape[1]), dtype=dtype)
    for r0, r1 in panels:
        panel = dequantize_rows(w, np.arange(r0, r1, dtype=np.int64), buf[:r1 - r0])
        matmul_one_thread(x, panel.T, out[:, r0:r1])


def _backward_panels(dy, w, dx, panels, dtype):
    """dx = sum over panels of dy[:, r0:r1] W[r0:r1] (on this thread)."""
    buf = np.empty((max(r1 - r0 for r0, r1 in panels), w.shape[1]), dtype=dtype)
    part = np.empty_like(dx)
    for k, (r0, r1) in enumerate(panels):
        panel = dequantize_rows(w, np.arange(r0, r1, dtype=np.int64), buf[:r1 - r0])
        if k == 0:
            matmul_one_thread(dy[:, r0:r1], panel, dx)
        else:
            matmul_one_thread(dy[:, r0:r1], panel, part)
            dx += part


# ---- a prompt's product, float32 on AVX-512: W decoded 32 rows at a time, transposed, in register tiles
# With a prompt's few rows (128), BLAS on a decoded 4 MB panel ran at ~120 GFLOP/s a core (MKL packs
# the panel again, and the panel is written out and read back from beyond L2), and decoding into it
# took ~10 % of a prefill (~4 billion weights a second).  Instead each thread claims STRIP rows of W
# at a time, decodes them transposed straight into a strip wt (cols, STRIP) that stays in L2
# (``dequantize_transposed``: 16 rows' blocks decoded in registers, each 16 x 16 square transposed
# in registers), and multiplies x by the strip in register tiles (engine/simd.py ``tile_update_12``:
# 12 rows of x by the strip's two vectors, the sum in 24 registers; then 8 rows, then one), KC
# columns of x at a time so that the strip's part stays in L1, writing out[:, i0:i0 + STRIP] in
# place.  A 128-token prefill of SmolLM2 on one thread: ~8 % less CPU time, Q4_1 and Q8_0
# (benchmarks/README.md, 2026-12-08); the tiles alone run at ~160 GFLOP/s there.
STRIP = 32                 # rows of W a thread takes at a time: two float32 vectors
KC = 256                   # the sum over cols runs KC at a time (32 KB of the strip: L1)
STRIP_MAX_ROWS = 256       # x with more rows (QLoRA's larger batches): BLAS on panels (~140 GFLOP/s there)


def _transposed(builder, v):
    """The 16 x 16 square of 16 vectors of 16 lanes transposed (lane j of vector i -> lane i of
    vector j): four rounds of lane swaps, round s swapping lane bit s with vector bit s."""
    i32 = ir.IntType(32)
    for s in (1, 2, 4, 8):
        low = ir.Constant(ir.VectorType(i32, 16), [j if not j & s else 16 + j - s for j in range(16)])
        high = ir.Constant(ir.VectorType(i32, 16), [j + s if not j & s else 16 + j for j in range(16)])
        new = list(v)
        for i in range(16):
            if not i & s:
                new[i] = builder.shuffle_vector(v[i], v[i + s], low)
                new[i + s] = builder.shuffle_vector(v[i], v[i + s], high)
        v = new
    return v


@intrinsic
def dequantize_transposed(typingctx, blocks, wt, fmt, i0, last_row, col):
    """wt[c, col + r] = deq(W)[min(i0 + r, last_row), c] for r < 16 and every c (float32, wt's rows
    contiguous), W the blocks of format FORMATS[fmt], one of FIRST_FORMATS: per block of the 16 rows, each row's 32 weights
    decoded in vector registers as ``dequantize_row`` does (the same numbers), then each half of
    them (16 rows x 16 weights) transposed in registers (``_transposed``) and stored as 16 rows of wt."""
    if not (isinstance(wt, types.Array) and wt.dtype == types.float32 and wt.layout == "C"):
        return None
    sig = types.void(blocks, wt, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        blocks_, wt_, fmt, i0, last_row, col = args
        i64 = ir.IntType(64)
        const = lambda v: ir.Constant(i64, v)  # noqa: E731
        elt = ir.FloatType()
        vec = ir.VectorType(elt, 16)
        byte_ptr = ir.IntType(8).as_pointer()
        w_arr = context.make_array(signature.args[0])(context, builder, blocks_)
        t_arr = context.make_array(signature.args[1])(context, builder, wt_)
        w_stride = cgutils.unpack_tuple(builder, w_arr.strides, 2)[0]
        t_stride = cgutils.unpack_tuple(builder, t_arr.strides, 2)[0]
        n_blocks = builder.sdiv(cgutils.unpack_tuple(builder, t_arr.shape, 2)[0], const(BLOCK))
        row_start = []
        for r in range(16):
            row = builder.add(i0, const(r))
            row = builder.select(builder.icmp_signed(">", row, last_row), last_row, row)
            row_start.append(builder.gep(builder.bitcast(w_arr.data, byte_ptr), [builder.mul(row, w_stride)]))
        wt_origin = builder.gep(builder.bitcast(t_arr.data, byte_ptr), [builder.mul(col, const(4))])
        for qtype in FIRST_FORMATS:
            with builder.if_then(builder.icmp_signed("==", fmt, const(FORMAT_CODE[qtype]))):
                with cgutils.for_range(builder, n_blocks) as loop:
                    b = loop.index
                    offset = builder.mul(b, const(BLOCK_BYTES[qtype]))
                    for half in range(2):
                        rows = []
                        for r in range(16):
                            base = builder.gep(row_start[r], [offset])
                            w = builder.fmul(_block_codes(builder, qtype, base, elt, 16)[half],
                                             splat(builder, _half_at(builder, base, 0, elt), vec))
                            if qtype == "Q4_1":
                                w = builder.fadd(w, splat(builder, _half_at(builder, base, 2, elt), vec))
                            rows.append(w)
                        first = builder.add(builder.mul(b, const(BLOCK)), const(16 * half))
                        for j, v in enumerate(_transposed(builder, rows)):
                            target = builder.gep(wt_origin, [builder.mul(builder.add(first, const(j)), t_stride)])
                            builder.store(v, builder.bitcast(target, vec.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


@jit_q
def forward_strips(blocks, fmt, x, out, next_unit):
    """out[n, i] = sum_c x[n, c] deq(W)[i, c] for the STRIP-row strips of W this thread claims."""
    n_rows, cols = x.shape
    rows = out.shape[1]
    wt = np.empty((cols, STRIP), dtype=np.float32)
    tail = np.empty((n_rows, STRIP), dtype=np.float32)   # (a last strip of fewer rows: its columns)
    while True:
        i0 = claim_unit(next_unit) * STRIP
        if i0 >= rows:
            break
        k = min(STRIP, rows - i0)
        for r0 in range(0, STRIP, 16):   # (past W's last row: that row again, its products not written)
            dequantize_transposed(blocks, wt, fmt, i0 + r0, rows - 1, r0)
        target, col = (out, i0) if k == STRIP else (tail, 0)
        for k0 in range(0, cols, KC):
            kk, more = min(KC, cols - k0), k0 > 0
            n0 = 0
            while n0 + 12 <= n_rows:
                tile_update_12(x, n0, k0, wt, k0, 0, target, n0, col, kk, more)
                n0 += 12
            while n0 + MR <= n_rows:          # (MR = 8 on AVX-512)
                tile_update_2(x, n0, k0, wt, k0, 0, target, n0, col, kk, more)
                n0 += MR
            while n0 < n_rows:
                tile_update_1(x, n0, k0, wt, k0, 0, target, n0, col, kk, more)
                n0 += 1
        if k < STRIP:
            for n in range(n_rows):
                for r in range(k):
                    out[n, i0 + r] = tail[n, r]


def _strips_apply(x, w, out):
    """Whether ``forward_strips`` multiplies x into out: float32, few rows, AVX-512 (its tiles of
    two vectors are 32 numbers: one strip), out's rows contiguous, W in one of FIRST_FORMATS (the
    5-bit formats and K-quants take the panels)."""
    return (VECTOR_BYTES == 64 and w.qtype in FIRST_FORMATS and x.dtype == np.float32 and out.dtype == np.float32
            and x.ndim == 2 and 0 < x.shape[0] <= STRIP_MAX_ROWS and out.strides[1] == 4 and x.strides[1] == 4)


def quantized_matmul(x, w, out, threads=1):
    """out (N, rows) = x (N, cols) W^T, W quantized; ``threads`` share the strips or the panels."""
    if _strips_apply(x, w, out):
        units = -(-w.shape[0] // STRIP)
        # (run_on_threads: on min(threads, units) threads, each claiming strips)
        run_on_threads(forward_strips, w.blocks, FORMAT_CODE[w.qtype], x, out, n_units=min(threads, units))
        return out
    panels = _panels(w, threads)
    n = max(1, min(threads, len(panels)))
    shares = [panels[k::n] for k in range(n)]
    if n == 1:
        _forward_panels(x, w, out, panels, x.dtype)
    else:
        helper_threads(n - 1).run([(_forward_panels, (x, w, out, s, x.dtype)) for s in shares])
    return out


def quantized_matmul_backward(dy, w, dx, threads=1):
    """dx (N, cols) = dy (N, rows) W, W quantized (a frozen weight's input gradient).  With several
    threads each sums its panels' products into a buffer of its own, and these are added in order."""
    panels = _panels(w, threads)
    n = max(1, min(threads, len(panels)))
    if n == 1:
        _backward_panels(dy, w, dx, panels, dy.dtype)
        return dx
    per = -(-len(panels) // n)
    shares = [panels[k * per:(k + 1) * per] for k in range(n)]
    shares = [s for s in shares if s]
    outs = [dx] + [np.empty_like(dx) for _ in shares[1:]]
    helper_threads(len(shares) - 1).run([(_backward_panels, (dy, w, o, s, dy.dtype)) for o, s in zip(outs, shares)])
    for o in outs[1:]:
        dx += o
    return dx
