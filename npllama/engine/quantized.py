"""Products with a matrix kept in GGUF's quantized blocks: the kernels (docs/14-quantized.md).

A quantized matrix W (rows, cols) is stored as llama.cpp stores it: each row is cols / 32 blocks of
32 weights, each block a float16 scale (and for Q4_1 a float16 minimum) followed by the weights'
integer codes.  ``blocks`` is that, byte for byte: a uint8 array (rows, cols / 32 * block bytes).

    Q8_0  34 bytes:  d, q[32] int8                    w_j = d q_j
    Q4_0  18 bytes:  d, n[16] two 4-bit codes a byte  w_j = d (lo(n_j) - 8),  w_{j+16} = d (hi(n_j) - 8)
    Q4_1  20 bytes:  d, m, n[16]                      w_j = d lo(n_j) + m,   w_{j+16} = d hi(n_j) + m

The kernels never dequantize the whole matrix:

* matrix-vector (a decoding step, y = W x): each row's blocks are read once, in order, and turned
  into float products on the way: for block b of row i with codes c and the block's slice x_b,
      Q8_0:  d sum_j c_j x_bj
      Q4_0:  d (sum_j c_j x_bj - 8 s_b)          s_b = sum_j x_bj, once per call for all rows
      Q4_1:  d sum_j c_j x_bj + m s_b
  The 32 products of a block are summed in vector lanes (fastmath "reassoc"/"contract": only the
  order of the sum changes), into per-lane accumulators that are reduced once per row.
* matrix-matrix (a prompt, y = x W^T, and a frozen weight's backward, dx = dy W): a panel of
  PANEL_ROWS rows is dequantized into a small float buffer (the caller's dtype: float32 or float64)
  and multiplied by BLAS; the panels are shared among npllama's threads (each panel one
  single-threaded BLAS call).  The panel fits in the core's L2 cache, so the matrix is read from
  memory once per call, in its quantized size.

Float16 scales are widened by the CPU's own conversion (``half_to_float``: LLVM's fpext from half,
vcvtph2ps on x86), exactly as the gguf package and llama.cpp do.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .blas import matmul_one_thread
from .jit import jit_rows_reassoc
from .pool import claim_unit, helper_threads, row_units, run_on_threads
from .threads import get_threads

BLOCK = 32                                        # weights per block, every format here
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
FORMATS = tuple(BLOCK_BYTES)
jit_q = jit_rows_reassoc


@intrinsic
def half_to_float(typingctx, bits):
    """The float32 value of the IEEE half-precision number whose bits are ``bits`` (uint16)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return sig, codegen


# ---- dequantizing rows (the embedding lookup, the matrix-matrix panels) ----------------------------
@jit_q
def dequantize_q8_0_rows(blocks, halves, rows, out):
    """out[k] = row rows[k] of W as floats.  blocks: uint8 (R, nb*34); halves: its uint16 view."""
    nb = out.shape[1] // BLOCK
    codes = blocks.view(np.int8)
    for k in range(rows.shape[0]):
        i = rows[k]
        for b in range(nb):
            d = out.dtype.type(half_to_float(halves[i, b * 17]))
            o = b * 34 + 2
            for j in range(BLOCK):
                out[k, b * BLOCK + j] = d * out.dtype.type(codes[i, o + j])


@jit_q
def dequantize_q4_0_rows(blocks, halves, rows, out):
    nb = out.shape[1] // BLOCK
    for k in range(rows.shape[0]):
        i = rows[k]
        for b in range(nb):
            d = out.dtype.type(half_to_float(halves[i, b * 9]))
            o = b * 18 + 2
            for j in range(16):
                n = blocks[i, o + j]
                out[k, b * BLOCK + j] = d * out.dtype.type(np.int32(n & 15) - 8)
                out[k, b * BLOCK + 16 + j] = d * out.dtype.type(np.int32(n >> 4) - 8)


@jit_q
def dequantize_q4_1_rows(blocks, halves, rows, out):
    nb = out.shape[1] // BLOCK
    for k in range(rows.shape[0]):
        i = rows[k]
        for b in range(nb):
            d = out.dtype.type(half_to_float(halves[i, b * 10]))
            m = out.dtype.type(half_to_float(halves[i, b * 10 + 1]))
            o = b * 20 + 4
            for j in range(16):
                n = blocks[i, o + j]
                out[k, b * BLOCK + j] = d * out.dtype.type(n & 15) + m
                out[k, b * BLOCK + 16 + j] = d * out.dtype.type(n >> 4) + m


DEQUANTIZE_ROWS = {"Q8_0": dequantize_q8_0_rows, "Q4_0": dequantize_q4_0_rows, "Q4_1": dequantize_q4_1_rows}


def dequantize_rows(w, rows, out):
    """out (len(rows), cols) = the rows ``rows`` (int64) of the quantized matrix ``w``, in out's dtype."""
    DEQUANTIZE_ROWS[w.qtype](w.blocks, w.halves, rows, out)
    return out


# ---- matrix-vector: y = W x ----------------------------------------------------------------------
@jit_q
def _block_sums(x, sums):
    """sums[b] = sum of x's block b (the Q4 formats' offset term)."""
    for b in range(sums.shape[0]):
        s = x.dtype.type(0.0)
        for j in range(BLOCK):
            s += x[b * BLOCK + j]
        sums[b] = s


# Each kernel walks ROW_GROUP rows at once (their blocks side by side: x's block is loaded once for
# them, and there are as many streams through memory), summing each block's 32 products into 32
# per-lane accumulators of its row that are added up once at the end of the row.  Codes are widened
# through int32 so that LLVM converts 16 of them to floats in one vector instruction.
ROW_GROUP = 2


@jit_q
def matvec_q8_0_rows(blocks, halves, x, sums, y, rows_per_unit, next_unit):
    """y[i] = sum_b d_ib sum_j c_ibj x_bj for the units of rows this thread claims."""
    R = y.shape[0]
    nb = x.shape[0] // BLOCK
    acc = np.empty((ROW_GROUP, BLOCK), dtype=x.dtype)
    seven, eight = np.int32(7), np.int32(8)
    while True:
        start = claim_unit(next_unit) * rows_per_unit
        if start >= R:
            break
        stop = min(R, start + rows_per_unit)
        for i in range(start, stop, ROW_GROUP):
            nr = min(ROW_GROUP, stop - i)
            acc[:] = 0.0
            for b in range(nb):
                o = b * 34 + 2
                for r in range(nr):
                    d = x.dtype.type(half_to_float(halves[i + r, b * 17]))
                    for j in range(BLOCK):
                        c = np.int32(blocks[i + r, o + j])          # the byte, unsigned
                        c -= (c >> seven) << eight                  # as int8 (a view as int8 did not vectorise)
                        acc[r, j] += d * (x.dtype.type(c) * x[b * BLOCK + j])
            for r in range(nr):
                y[i + r] = acc[r].sum()


@jit_q
def matvec_q4_0_rows(blocks, halves, x, sums, y, rows_per_unit, next_unit):
    """y[i] = sum_b d_ib (sum_j c_ibj x_bj - 8 s_b)."""
    R = y.shape[0]
    nb = x.shape[0] // BLOCK
    acc = np.empty((ROW_GROUP, BLOCK), dtype=x.dtype)
    offset = np.empty(ROW_GROUP, dtype=x.dtype)
    low, shift = np.int32(15), np.int32(4)
    while True:
        start = claim_unit(next_unit) * rows_per_unit
        if start >= R:
            break
        stop = min(R, start + rows_per_unit)
        for i in range(start, stop, ROW_GROUP):
            nr = min(ROW_GROUP, stop - i)
            acc[:] = 0.0
            offset[:] = 0.0
            for b in range(nb):
                o = b * 18 + 2
                for r in range(nr):
                    d = x.dtype.type(half_to_float(halves[i + r, b * 9]))
                    offset[r] += d * sums[b]
                    for j in range(16):
                        n = np.int32(blocks[i + r, o + j])
                        acc[r, j] += d * (x.dtype.type(n & low) * x[b * BLOCK + j])
                        acc[r, j + 16] += d * (x.dtype.type(n >> shift) * x[b * BLOCK + 16 + j])
            for r in range(nr):
                y[i + r] = acc[r].sum() - 8 * offset[r]


@jit_q
def matvec_q4_1_rows(blocks, halves, x, sums, y, rows_per_unit, next_unit):
    """y[i] = sum_b (d_ib sum_j c_ibj x_bj + m_ib s_b)."""
    R = y.shape[0]
    nb = x.shape[0] // BLOCK
    acc = np.empty((ROW_GROUP, BLOCK), dtype=x.dtype)
    offset = np.empty(ROW_GROUP, dtype=x.dtype)
    low, shift = np.int32(15), np.int32(4)
    while True:
        start = claim_unit(next_unit) * rows_per_unit
        if start >= R:
            break
        stop = min(R, start + rows_per_unit)
        for i in range(start, stop, ROW_GROUP):
            nr = min(ROW_GROUP, stop - i)
            acc[:] = 0.0
            offset[:] = 0.0
            for b in range(nb):
                o = b * 20 + 4
                for r in range(nr):
                    d = x.dtype.type(half_to_float(halves[i + r, b * 10]))
                    offset[r] += x.dtype.type(half_to_float(halves[i + r, b * 10 + 1])) * sums[b]
                    for j in range(16):
                        n = np.int32(blocks[i + r, o + j])
                        acc[r, j] += d * (x.dtype.type(n & low) * x[b * BLOCK + j])
                        acc[r, j + 16] += d * (x.dtype.type(n >> shift) * x[b * BLOCK + 16 + j])
            for r in range(nr):
                y[i + r] = acc[r].sum() + offset[r]


MATVEC_ROWS = {"Q8_0": matvec_q8_0_rows, "Q4_0": matvec_q4_0_rows, "Q4_1": matvec_q4_1_rows}
MATVEC_ROWS_PER_UNIT = 64           # rows a thread claims at a time
PARALLEL_MATVEC_MIN_ROWS = 256      # fewer rows: on the calling thread alone (handing out costs more)


def quantized_matvec(w, x, y):
    """y (rows,) = W x for a quantized W (rows, cols) and x (cols,), on npllama's threads when W is big."""
    nb = w.shape[1] // BLOCK
    sums = np.empty(nb, dtype=x.dtype)
    _block_sums(x, sums)
    units = row_units(w.shape[0], MATVEC_ROWS_PER_UNIT)
    kernel = MATVEC_ROWS[w.qtype]
    if w.shape[0] < PARALLEL_MATVEC_MIN_ROWS or get_threads() <= 1:
        kernel(w.blocks, w.halves, x, sums, y, MATVEC_ROWS_PER_UNIT, np.zeros(1, dtype=np.int64))
    else:
        run_on_threads(kernel, w.blocks, w.halves, x, sums, y, MATVEC_ROWS_PER_UNIT, n_units=units)
    return y


# ---- matrix-matrix: y = x W^T and dx = dy W, a dequantized panel at a time -------------------------
PANEL_ELEMENTS = 1 << 16            # floats in a panel: 256 KB in float32


def _panels(w):
    rows = max(16, PANEL_ELEMENTS // w.shape[1] // 16 * 16)
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


def quantized_matmul(x, w, out, threads=1):
    """out (N, rows) = x (N, cols) W^T, W quantized; ``threads`` share the panels."""
    panels = _panels(w)
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
    panels = _panels(w)
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
