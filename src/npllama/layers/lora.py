"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, as PEFT does it.

A frozen weight W (out, in) gets two small matrices, A (r, in) and B (out, r) with r << in, out,
a scale s = alpha / r, and an optional inverted-dropout mask m on the adapter's input (entries 0
or 1/(1-p), drawn like npllama/layers/dropout.py's; all ones without dropout):

Forward:   xd = x * m                       (N, in)   the adapter's input (x itself without dropout)
           z  = xd A^T                      (N, in) @ (in, r)  -> (N, r)
           y  = x W^T + s z B^T             (N, out)

Backward, given dy = dL/dy (N, out).  y depends on z through s z B^T, a linear layer with weight
s B, so (linear.py's two rules):
           dz = s dy B                      (N, out) @ (out, r) -> (N, r)
           dB = s dy^T z                    (out, N) @ (N, r)   -> (out, r)
z = xd A^T is a linear layer again:
           dA = dz^T xd                     (r, N) @ (N, in)    -> (r, in)
           dxd = dz A                       (N, r) @ (r, in)    -> (N, in)
x reaches y twice, through W and through the adapter (xd = x * m), so the two gradients add:
           dx = dy W + dxd * m              (N, in)
No dW: W is frozen.  Its gradient dy^T x, an (out, N) @ (N, in) product, is the layer's largest
backward matmul; LoRA skips it, needs no buffer for it and no optimizer state for W.

Merging: without dropout x W^T + s x A^T B^T = x (W + s B A)^T, so after training the adapter
folds into the weight, W' = W + s B A (``merge_lora``), and inference costs nothing extra.

Init (PEFT's ``reset_lora_parameters``, after Microsoft's loralib): B = 0, so y = x W^T exactly at
step 0.  A gets torch's default nn.Linear init, kaiming_uniform_(a=sqrt(5)): bound = gain
sqrt(3 / fan_in) with gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), i.e. A ~ U(-1/sqrt(in), 1/sqrt(in)).
A must not be zero too: with A = B = 0, z = 0 makes dB = 0 and dz = s dy B = 0 makes dA = 0, and
the adapter would never move.  With B = 0 only dA is zero at step 0; dB = s dy^T z is not, and
after one step both move.

The fast path keeps the base product one BLAS matmul and the adapter two thin ones: z = xd A^T is
(N, r), and its backward products dz, dB, dA all have r as one dimension.  The way back up to the
output width, s z B^T (and dz A in the backward), is added in place by ``add_low_rank_kernel``
(MKL's gemm with beta = 1 when a thread works alone, else a Numba loop): NumPy's matmul cannot
accumulate into its output, and a temporary (N, out) would cost a pass over memory as large as the
base product's output.  The thin products are single-threaded BLAS calls (engine/blas.py).  The adapter functions (``lora_adapter_forward`` /
``lora_adapter_backward``) work on an output that already holds x W^T, so a block can run its own
fused base product (q, k, v stacked) and then add each projection's adapter into its columns.

Shapes: x, dx, m, xd: (N, in) (leading dims flattened); W: (out, in); A, dA: (r, in);
B, dB: (out, r); z, dz: (N, r); y, dy: (N, out).
"""
import numpy as np

from ..engine.blas import matmul_add_one_thread, matmul_one_thread
from ..engine.jit import jit_rows
from ..engine.pool import ROWS_PER_UNIT, claim_unit, row_units, run_on_threads
from ..engine.threads import get_threads


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
def lora_init(rng, in_features, out_features, rank, dtype=np.float32):
    """(A, B) as PEFT initialises them: A ~ U(-1/sqrt(in), 1/sqrt(in)) (r, in), B = 0 (out, r)."""
    bound = 1.0 / np.sqrt(in_features)
    a = rng.uniform(-bound, bound, size=(rank, in_features)).astype(dtype)
    b = np.zeros((out_features, rank), dtype=dtype)
    return a, b


def merge_lora(w, a, b, scale):
    """W' = W + s B A (out, in): the one weight that computes the same as the adapter form."""
    return w + scale * (b @ a)


def lora_adapter_forward_reference(x, a, b, scale, mask=None):
    """The adapter's term alone: x: (..., in) -> s dropout(x) A^T B^T: (..., out), cache.
    mask: None (no dropout) or x's shape, entries 0 or 1/(1-p)."""
    xd = x if mask is None else x * mask              # dropout(x)             (..., in)
    z = xd @ a.T                                      # (..., r)
    return scale * (z @ b.T), (a, b, scale, mask, xd, z)


def lora_adapter_backward_reference(dy, cache):
    """-> (dx, dA, dB), dx the adapter's share of x's gradient (the base's dy W is added beside it)."""
    a, b, scale, mask, xd, z = cache
    r = a.shape[0]
    dz = scale * (dy @ b)                             # (..., r)
    db = scale * (dy.reshape(-1, b.shape[0]).T @ z.reshape(-1, r))    # (out, r)
    da = dz.reshape(-1, r).T @ xd.reshape(-1, a.shape[1])             # (r, in)
    dxd = dz @ a                                      # (..., in)
    return (dxd if mask is None else dxd * mask), da, db


def lora_forward_reference(x, w, a, b, scale, mask=None):
    """x: (..., in) -> y = x W^T + s dropout(x) A^T B^T: (..., out).  mask: as the adapter's."""
    adapter_out, adapter_cache = lora_adapter_forward_reference(x, a, b, scale, mask)
    return x @ w.T + adapter_out, (w, adapter_cache)


def lora_backward_reference(dy, cache):
    """-> (dx, dA, dB).  No dW: W is frozen.  x reaches y through W and through the adapter: dx adds both."""
    w, adapter_cache = cache
    dx_adapter, da, db = lora_adapter_backward_reference(dy, adapter_cache)
    return dy @ w + dx_adapter, da, db


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def lora_adapter_forward(x, a, b, scale, y, mask=None, z=None, x_drop=None):
    """y += s dropout(x) A^T B^T in place, where y (N, out) already holds x W^T (it may be a column
    block of a fused product).  x: (N, in).  z (N, r) and, with a mask, x_drop (N, in) are written
    when given.  Returns the adapter's cache (a, b, scale, mask, xd, z)."""
    xd = x if mask is None else np.multiply(x, mask, out=x_drop)   # (N, in)
    z = _thin_product(xd, a.T, z)                                    # (N, r)
    add_low_rank_kernel(y, z, np.ascontiguousarray(b.T), y.dtype.type(scale), None)   # y += s z B^T
    return a, b, scale, mask, xd, z


def lora_adapter_backward(dy, cache, dx, da=None, db=None, dz=None):
    """dx += (s dy B A) * m in place, where dx (N, in) already holds the base's dy W.
    dy: (N, out) (any strides).  Returns (dA, dB), written into ``da``, ``db`` when given; dz (N, r)
    is scratch.  Reads its cache only."""
    a, b, scale, mask, xd, z = cache
    dz = _thin_product(dy, b, dz)                     # (N, r)
    dz *= scale                                       # dz = s dy B
    db = _thin_product(dy.T, z, db)                   # (out, r)
    db *= scale                                       # dB = s dy^T z
    da = _thin_product(dz.T, xd, da)                  # dA = dz^T xd     (r, in)
    add_low_rank_kernel(dx, dz, a, dx.dtype.type(1.0), mask)   # dx += (dz A) * m
    return da, db


def _thin_product(a, b, out=None):
    """a @ b into ``out`` (a new array when None): one BLAS call on this thread (engine/blas.py)."""
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    return matmul_one_thread(a, b, out)


def add_low_rank_kernel(y, z, u, scale, mask):
    """y += scale (z u) (* mask): on a thread working alone (a training step's batch part) and
    without a mask, one gemm adding into y when MKL is there (engine/blas.py; y is often a column
    block of a fused product, whose rows the Numba loop below does not vectorise: 3-4x slower);
    else ``_add_low_rank_rows`` on the threads."""
    if mask is None and get_threads() == 1 and matmul_add_one_thread(z, u, y, scale):
        return
    run_on_threads(_add_low_rank_rows, y, z, u, scale, mask, n_units=row_units(y.shape[0]))


# ---- kernel bodies (private: engine/pool.py runs them on the threads) ----------------------------
# Row n of y gets r scaled rows of u, each a contiguous axpy that vectorises.  ``scale`` must have
# y's dtype (a Python float would promote float32 arithmetic to float64).  y may be a column block
# of a wider array (any strides).  With a mask each term is multiplied by the mask entry, which is
# (z u) * mask up to rounding and needs no temporary row.
@jit_rows
def _add_low_rank_rows(y, z, u, scale, mask, next_unit):
    """y += scale * (z u), elementwise times ``mask`` unless it is None.
    y: (N, J); z: (N, r); u: (r, J) with contiguous rows; mask: None or (N, J).  Rows are taken a
    unit at a time (``claim_unit``)."""
    N, J = y.shape
    R = z.shape[1]
    while True:
        first = claim_unit(next_unit) * ROWS_PER_UNIT
        if first >= N:
            break
        for n in range(first, min(first + ROWS_PER_UNIT, N)):
            y_row = y[n]
            for i in range(R):
                scaled_z = scale * z[n, i]
                u_row = u[i]
                if mask is None:
                    for j in range(J):
                        y_row[j] += scaled_z * u_row[j]
                else:
                    mask_row = mask[n]
                    for j in range(J):
                        y_row[j] += scaled_z * u_row[j] * mask_row[j]
