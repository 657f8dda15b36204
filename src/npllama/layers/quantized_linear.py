"""A linear layer whose weight stays in GGUF's quantized blocks (Q8_0, Q4_0, Q4_1, ...): the maths.

The weight W (out, in) is stored as llama.cpp stores it (docs/14-quantized.md): each row in blocks
of 32 weights, each block one float16 scale d (Q4_1: and a float16 minimum m) and 32 integer codes c:

    Q8_0:  w = d c,          c in [-128, 127]     8.5 bits a weight (34 bytes a block)
    Q4_0:  w = d (c - 8),    c in [0, 15]         4.5 bits a weight (18 bytes)
    Q4_1:  w = d c + m,      c in [0, 15]         5 bits a weight   (20 bytes)
    Q5_0, Q5_1: Q4_0 and Q4_1 with 5-bit codes; the K-quants Q4_K, Q5_K, Q6_K: blocks of 256 weights
    in sub-blocks with integer scales of their own (docs/14-quantized.md)

W itself is a matrix of ordinary numbers, deq(W), so the layer is the linear layer of linear.py on
deq(W), and its reference is exactly that: the gguf package's dequantize, then a matmul.

Forward:   y  = x deq(W)^T          x: (N, in) -> y: (N, out)
Backward:  dx = dy deq(W)           (N, out) @ (out, in) -> (N, in)
           no dW: a quantized weight is frozen (its codes are integers; QLoRA trains float adapters
           beside it, layers/lora.py, and the adapters' gradients are those of LoRA on deq(W)).

The fast path (npllama/engine/quantized.py) never builds deq(W): a matrix-vector product reads
each block once and multiplies its codes by x on the way; a matrix-matrix product dequantizes a
panel of rows at a time (4 MB) into a buffer and hands it to BLAS, or, for a prompt's few rows in
float32, 32 rows at a time transposed into a strip multiplied in register tiles.  Rounding, float32: the
dequantized weights are exact (d c and d c + m are single roundings of the same numbers the
reference computes, held bit-equal in the tests), so the products differ from the reference only
in the order of their sums: |y - y_ref| <= n eps sum_k |x_k| |deq(W)_ik| with n = in and eps =
2^-24 (the standard dot-product bound; the tests check it, not a loose tolerance).
"""
from __future__ import annotations

import gguf
import numpy as np

from ..engine import quantized as engine
from ..errors import InputError


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
Q = gguf.GGMLQuantizationType
QUANTIZED_TYPES = {Q[name]: name for name in engine.FORMATS}     # what the kernels multiply by
QUANTIZERS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")             # what the gguf package quantizes to
WIDENS_TO_Q8_0 = ("Q4_0", "Q5_0")                                  # exactly Q8_0 blocks (as_q8_0)
BLOCK = engine.BLOCK


class QuantizedMatrix:
    """A (rows, cols) matrix in GGUF blocks: ``blocks`` uint8 (rows, cols / 32 * block bytes), the
    bytes of the file, row after row.  ``.T`` stands for its transpose in a product (``matmuls``)."""

    quantized = True

    def __init__(self, qtype: str, blocks: np.ndarray, cols: int):
        if qtype not in engine.BLOCK_BYTES:
            raise InputError(f"quantized type must be one of {', '.join(engine.FORMATS)}, got {qtype!r}")
        per_block = engine.block_weights(qtype)
        if cols % per_block or blocks.ndim != 2 or blocks.dtype != np.uint8 \
                or blocks.shape[1] != cols // per_block * engine.BLOCK_BYTES[qtype]:
            raise InputError(f"{qtype} blocks of shape {blocks.shape} do not hold rows of {cols} weights")
        self.qtype = qtype
        self.blocks = np.ascontiguousarray(blocks)
        self.shape = (blocks.shape[0], cols)

    @classmethod
    def from_float(cls, w, qtype: str) -> "QuantizedMatrix":
        """W quantized by the gguf package's own quantizer (llama.cpp's rounding; it has none for the
        K-quants, which only come from files)."""
        if qtype not in QUANTIZERS:
            raise InputError(f"the gguf package cannot quantize to {qtype}: quantize to one of "
                             f"{', '.join(QUANTIZERS)} (K-quant matrices are read from GGUF files)")
        w = np.asarray(w, dtype=np.float32)
        return cls(qtype, gguf.quants.quantize(w, Q[qtype]), w.shape[1])

    def as_q8_0(self) -> "QuantizedMatrix":
        """The same matrix in Q8_0 blocks: Q4_0's and Q5_0's weights d (c - 8) and d (c - 16) are their
        block's d times an integer in [-16, 15], which is a Q8_0 block with the same d (exactly the
        same numbers, 34 bytes a block instead of 18 or 22).  What a fused matrix whose parts a file
        stores in different ones of these formats is kept as (formats/gguf.py, load_quantized)."""
        if self.qtype == "Q8_0":
            return self
        if self.qtype not in WIDENS_TO_Q8_0:
            raise InputError(f"{self.qtype} blocks are not Q8_0 blocks in other words: only "
                             f"{', '.join(WIDENS_TO_Q8_0)} are")
        rows, cols = self.shape
        b = self.blocks.reshape(rows, cols // BLOCK, -1)
        n = b[:, :, -16:]
        codes = np.concatenate([n & 15, n >> 4], axis=2).astype(np.int8)       # (rows, blocks, 32)
        if self.qtype == "Q4_0":
            codes -= 8
        else:
            qh = b[:, :, 2:6].copy().view("<u4")                                 # bit j: weight j's fifth bit
            codes |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int8)
            codes -= 16
        return QuantizedMatrix("Q8_0", np.concatenate([b[:, :, :2], codes.view(np.uint8)], axis=2).reshape(rows, -1),
                               cols)

    @property
    def T(self):
        return TransposedQuantized(self)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    ndim = 2

    def rows(self, start: int, stop: int) -> "QuantizedMatrix":
        """Rows start .. stop-1, sharing the blocks (no copy)."""
        return QuantizedMatrix(self.qtype, self.blocks[start:stop], self.shape[1])

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """deq(W), the whole matrix, by the gguf package (the reference; the kernels never do this)."""
        return gguf.quants.dequantize(self.blocks, Q[self.qtype]).astype(dtype, copy=False)

    def __repr__(self):
        return f"QuantizedMatrix({self.qtype}, shape={self.shape}, {self.nbytes:,} bytes)"


class TransposedQuantized:
    """W^T as the second operand of ``x @ W^T`` (what block.py's ``w.T`` means for a quantized W)."""

    quantized = True

    def __init__(self, matrix: QuantizedMatrix):
        self.matrix = matrix
        self.shape = matrix.shape[::-1]


def is_quantized(w) -> bool:
    return getattr(w, "quantized", False)


def dense(w, dtype=np.float32):
    """w itself if it is an array, else deq(w) (reference code that wants plain matrices)."""
    return w.dequantize(dtype) if isinstance(w, QuantizedMatrix) else w


def quantized_linear_forward_reference(x, w: QuantizedMatrix):
    """x: (..., in) -> y = x deq(W)^T: (..., out), cache."""
    weight = w.dequantize(x.dtype)
    return x @ weight.T, (x, weight)


def quantized_linear_backward_reference(dy, cache):
    """dx = dy deq(W) (no weight gradient: W is frozen)."""
    x, weight = cache
    return (dy.reshape(-1, weight.shape[0]) @ weight).reshape(x.shape)


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def quantized_matvec(w: QuantizedMatrix, x, y):
    """y = deq(W) x for one vector x (cols,), y (rows,): a decoding step's product."""
    return engine.quantized_matvec(w, x, y)


def quantized_product(a, b, out, threads=1):
    """out = a @ b where b is W^T (a forward: a deq(W)^T) or W (a backward: a deq(W)), W quantized."""
    if isinstance(b, TransposedQuantized):
        return engine.quantized_matmul(a, b.matrix, out, threads)
    return engine.quantized_matmul_backward(a, b, out, threads)


def embedding_rows(w, ids, out):
    """out[n] = row ids[n] of the table w (an array or a QuantizedMatrix), in out's dtype: the
    embedding lookup, which reads only the rows asked for from a quantized table."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if isinstance(w, QuantizedMatrix):
        return engine.dequantize_rows(w, ids, out.reshape(ids.size, w.shape[1]))
    return np.take(w, ids, axis=0, out=out.reshape(ids.size, w.shape[1]), mode="clip")
