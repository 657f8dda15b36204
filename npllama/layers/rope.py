"""Rotary position embedding (Su et al. 2021) in the Hugging Face layout, with Llama-3 scaling.

Each head vector of width hd is split into halves (x1, x2) = (x[:hd/2], x[hd/2:]); pair i is
(x1_i, x2_i) and rotates by the angle  theta_{t,i} = t * f_i  at position t, with frequencies
f_i = rope_theta^(-2i/hd)   (Llama-3 rescales the low frequencies, see ``rope_frequencies``):

    y1 = x1 cos - x2 sin
    y2 = x2 cos + x1 sin

A rotation is orthogonal, so the backward is the rotation by -theta (its transpose):

    dx1 =  dy1 cos + dy2 sin
    dx2 = -dy1 sin + dy2 cos

Shapes: x, y: (B, heads, T, hd) (any strides); cos, sin: (T, hd/2).
"""
import math

import numpy as np

from ._numba import jit_parallel, prange


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


# ---- readable reference ------------------------------------------------------------------------
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


# ---- kernel ------------------------------------------------------------------------------------
@jit_parallel
def rope_rotate_kernel(x, cos, sin, sign, out):
    """out = rotation of x by sign * theta. sign = +1: forward; sign = -1: backward."""
    B, NH, T, hd = x.shape
    half = hd // 2
    for bh in prange(B * NH):
        b = bh // NH
        h = bh % NH
        for t in range(T):
            for i in range(half):
                c = cos[t, i]
                s = sign * sin[t, i]
                x1 = x[b, h, t, i]
                x2 = x[b, h, t, i + half]
                out[b, h, t, i] = x1 * c - x2 * s
                out[b, h, t, i + half] = x2 * c + x1 * s


@jit_parallel
def rope_rows_inplace_kernel(x, n_heads, head_dim, seq_len, cos, sin, sign):
    """Rotate in place the first ``n_heads`` heads of every row of x: (N, >= n_heads * hd), the
    (batch * position, heads * hd) layout the fused q/k/v projection writes, where row n holds
    position n % seq_len.  q's heads and then k's are the first H + K heads of a q/k/v row, so one
    call rotates both (sign = +1) or, in the backward, both gradients (sign = -1).  Rows are
    contiguous here, so this is one pass over memory without the strided (B, heads, T, hd) walk."""
    N = x.shape[0]
    half = head_dim // 2
    for n in prange(N):
        t = n % seq_len
        for h in range(n_heads):
            base = h * head_dim
            for i in range(half):
                c = cos[t, i]
                s = sign * sin[t, i]
                x1 = x[n, base + i]
                x2 = x[n, base + half + i]
                x[n, base + i] = x1 * c - x2 * s
                x[n, base + half + i] = x2 * c + x1 * s


# ---- what the model calls ----------------------------------------------------------------------
def rope_forward(x, cos, sin, out=None):
    """x: (B, heads, T, hd) -> y (contiguous unless ``out`` is given), cache = (cos, sin)."""
    if out is None:
        out = np.empty(x.shape, dtype=x.dtype)
    rope_rotate_kernel(x, cos, sin, x.dtype.type(1.0), out)
    return out, (cos, sin)


def rope_backward(dy, cache, out=None):
    """dy: (B, heads, T, hd) -> dx; written into ``out`` (any strides) when given."""
    cos, sin = cache
    if out is None:
        out = np.empty(dy.shape, dtype=dy.dtype)
    rope_rotate_kernel(dy, cos, sin, dy.dtype.type(-1.0), out)
    return out
