"""Rotary position embedding (Su et al. 2021) in the Hugging Face layout, with Llama-3 scaling.

Each head vector of width hd is split into halves (x1, x2) = (x[:hd/2], x[hd/2:]); pair i is
(x1_i, x2_i) and rotates by the angle  theta_{t,i} = t * f_i  at position t, with frequencies
f_i = rope_theta^(-2i/hd)   (Llama-3 rescales the low frequencies, see ``rope_frequencies``):

    y1 = x1 cos - x2 sin
    y2 = x2 cos + x1 sin

A rotation is orthogonal, so the backward is the rotation by -theta (its transpose):

    dx1 =  dy1 cos + dy2 sin
    dx2 = -dy1 sin + dy2 cos

One kernel, ``rope_kernel``, rotates in place the heads of rows laid out as the fused q/k/v
projection writes them, (N, heads * hd), row n holding position  start + n % seq_len:  training
and prefill (start 0, seq_len T: rows are (batch, position) pairs) and a decoding step (one row at
position start) call it alike, the backward with sign -1.

Shapes: x: rows of heads (N, heads * hd) in the kernel, (B, heads, T, hd) in the reference; cos, sin:
(positions, hd/2).
"""
import math

import numpy as np

from ..engine.jit import INT, array, jit_rows, scalar
from ..engine.pool import ROWS_PER_UNIT, UNIT_COUNTER, claim_unit, row_units, run_on_threads


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
def rope_frequencies(head_dim, theta, scaling=None):
    """The hd/2 angular frequencies f_i, in float64.

    Llama-3 scaling (``scaling["rope_type"] == "llama3"``), as in Hugging Face's
    ``_compute_llama3_parameters``: with wavelength w_i = 2 pi / f_i and the original context L,
    frequencies with w_i > L / low_freq_factor are divided by ``factor``; those with
    w_i < L / high_freq_factor are kept; those between are interpolated linearly in
    s = (L / w_i - low) / (high - low):  f_i <- (1 - s) f_i / factor + s f_i.
    """
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return freqs
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    scaled = np.where(wavelen > old_len / low, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions, freqs, dtype):
    """positions: int (T,); freqs: (hd/2,) -> cos, sin: (T, hd/2) in ``dtype`` (computed in float64)."""
    angles = np.asarray(positions, dtype=np.float64)[:, None] * freqs[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope_forward_reference(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    y = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y, (cos, sin)


def rope_backward_reference(dy, cache):
    cos, sin = cache
    half = dy.shape[-1] // 2
    dy1, dy2 = dy[..., :half], dy[..., half:]
    return np.concatenate([dy1 * cos + dy2 * sin, -dy1 * sin + dy2 * cos], axis=-1)


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def rope_kernel(x, n_heads, head_dim, cos, sin, sign, start, seq_len):
    """``rope_rows`` on the threads (on one row, as in a decoding step: on this one)."""
    run_on_threads(rope_rows, x, n_heads, head_dim, cos, sin, sign, start, seq_len, n_units=row_units(x.shape[0]))


# ---- kernel bodies (engine/pool.py runs them on the threads; layers/decode_step.py on one row) ---
@jit_rows
def rope_rows(x, n_heads, head_dim, cos, sin, sign, start, seq_len, next_unit):
    """Rotate in place by sign * theta (sign = +1 forward, -1 backward) the first ``n_heads`` heads
    of every row of x: (N, >= n_heads * hd), row n at position start + n % seq_len.  q's heads and
    then k's are the first H + K heads of a q/k/v row, so one call rotates both (or, in the
    backward, both gradients).  Rows are contiguous: one pass over memory.  Each head's two halves
    are taken as views indexed from 0: an offset index (base + i) carries Numba's negative-index
    check, which keeps LLVM from vectorising well (measured: 2048 rows x 8 heads of 32, 910 -> 680
    us).  Rows are taken a unit at a time (``claim_unit``)."""
    N = x.shape[0]
    half = head_dim // 2
    while True:
        first = claim_unit(next_unit) * ROWS_PER_UNIT
        if first >= N:
            break
        for n in range(first, min(first + ROWS_PER_UNIT, N)):
            t = start + n % seq_len
            cos_t, sin_t, row = cos[t], sin[t], x[n]
            for head in range(n_heads):
                first_half = row[head * head_dim:head * head_dim + half]
                second_half = row[head * head_dim + half:(head + 1) * head_dim]
                for i in range(half):
                    cos_i = cos_t[i]
                    sin_i = sign * sin_t[i]
                    x1 = first_half[i]
                    x2 = second_half[i]
                    first_half[i] = x1 * cos_i - x2 * sin_i
                    second_half[i] = x2 * cos_i + x1 * sin_i


# ---- the versions a training run calls (npllama/warmup.py compiles them ahead) -------------------
def kernel_versions(dtype):
    rows = array(dtype, 2)
    return [(rope_rows, (rows, INT, INT, rows, rows, scalar(dtype), INT, INT, UNIT_COUNTER))]
