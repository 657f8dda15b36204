"""The pre-norm decoder block of Llama:

    h   = x + Dropout(W_o Attention(RoPE(W_q n1), RoPE(W_k n1), W_v n1)),   n1 = RMSNorm_1(x)
    out = h + Dropout(FFN(RMSNorm_2(h)))

A residual connection passes its gradient through unchanged, so
    dh = dout + (gradient of the FFN branch w.r.t. h)
    dx = dh   + (gradient of the attention branch w.r.t. x).

The q, k and v projections are stacked into one (H*hd + 2*K*hd, D) matrix W_qkv so one matmul
produces all three.  ``w`` and ``dw`` are dicts of one layer's weights / gradient buffers with
keys attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down.

Shapes: x, h, out: (B, T, D); q: (B, H, T, hd); k, v: (B, K, T, hd); cos, sin: (T, hd/2).
"""
import numpy as np

from .attention import attention_backward, attention_forward
from .dropout import dropout_backward, dropout_forward
from .linear import linear_backward, linear_forward, matmuls
from .rmsnorm import (add_rmsnorm_forward_kernel, rmsnorm_backward, rmsnorm_backward_kernel, rmsnorm_dw_chunks,
                      rmsnorm_forward)
from .rope import rope_backward, rope_forward, rope_rows_inplace_kernel
from .swiglu import (feedforward_backward, feedforward_forward, swiglu_backward_rows_inplace_kernel,
                     swiglu_forward_rows_kernel)


def split_heads(qkv, n_heads, n_kv_heads, head_dim):
    """Views q (B, H, T, hd), k, v (B, K, T, hd) into a (B, T, H*hd + 2*K*hd) array (no copy)."""
    B, T, _ = qkv.shape
    dq, dkv = n_heads * head_dim, n_kv_heads * head_dim
    q = qkv[..., :dq].reshape(B, T, n_heads, head_dim).transpose(0, 2, 1, 3)
    k = qkv[..., dq:dq + dkv].reshape(B, T, n_kv_heads, head_dim).transpose(0, 2, 1, 3)
    v = qkv[..., dq + dkv:].reshape(B, T, n_kv_heads, head_dim).transpose(0, 2, 1, 3)
    return q, k, v


def merge_heads(o):
    """(B, H, T, hd) -> contiguous (B, T, H*hd)."""
    B, H, T, hd = o.shape
    return np.ascontiguousarray(o.transpose(0, 2, 1, 3)).reshape(B, T, H * hd)


def decoder_block_forward(x, w, cos, sin, cfg, rng=None, training=False):
    B, T, D = x.shape
    # attention branch
    n1, cache_norm1 = rmsnorm_forward(x, w["attn_norm"], cfg.norm_eps)
    qkv, cache_qkv = linear_forward(n1, w["wqkv"])
    q, k, v = split_heads(qkv, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    q, cache_rope = rope_forward(q, cos, sin)
    k, _ = rope_forward(k, cos, sin)
    o, cache_attn = attention_forward(q, k, v)
    a, cache_o = linear_forward(merge_heads(o), w["wo"])
    a, mask_attn = dropout_forward(a, cfg.dropout, rng, training)
    h = x + a
    # feed-forward branch
    n2, cache_norm2 = rmsnorm_forward(h, w["ffn_norm"], cfg.norm_eps)
    f, cache_ffn = feedforward_forward(n2.reshape(B * T, D), w["w_gate_up"], w["w_down"])
    f, mask_ffn = dropout_forward(f.reshape(B, T, D), cfg.dropout, rng, training)
    out = h + f
    cache = (cache_norm1, cache_qkv, cache_rope, cache_attn, cache_o, mask_attn,
             cache_norm2, cache_ffn, mask_ffn, qkv.shape)
    return out, cache


def decoder_block_backward(dout, cache, dw, cfg):
    """dout: (B, T, D) -> dx (B, T, D); parameter gradients are written into the buffers of ``dw``."""
    (cache_norm1, cache_qkv, cache_rope, cache_attn, cache_o, mask_attn,
     cache_norm2, cache_ffn, mask_ffn, qkv_shape) = cache
    B, T, D = dout.shape
    # feed-forward branch
    df = dropout_backward(dout, mask_ffn).reshape(B * T, D)
    dn2, _, _ = feedforward_backward(df, cache_ffn, dw["w_gate_up"], dw["w_down"])
    dh_ffn, _ = rmsnorm_backward(dn2.reshape(B, T, D), cache_norm2, dw["ffn_norm"])
    dh = dout + dh_ffn
    # attention branch
    da = dropout_backward(dh, mask_attn)
    do_merged, _ = linear_backward(da, cache_o, dw["wo"])
    do = do_merged.reshape(B, T, cfg.n_heads, cfg.head_dim).transpose(0, 2, 1, 3)
    dqkv = np.empty(qkv_shape, dtype=dout.dtype)
    dq, dk, dv = split_heads(dqkv, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    dq_rot, dk_rot, _ = attention_backward(do, cache_attn, dv=dv)
    rope_backward(dq_rot, cache_rope, out=dq)
    rope_backward(dk_rot, cache_rope, out=dk)
    dn1, _ = linear_backward(dqkv, cache_qkv, dw["wqkv"])
    dx_attn, _ = rmsnorm_backward(dn1, cache_norm1, dw["attn_norm"])
    return dh + dx_attn


# ---- the training path: the same block on preallocated buffers --------------------------------
# ``decoder_block_forward`` / ``decoder_block_backward`` above are the block written as the
# composition of the layer functions.  The model's training step runs the same arithmetic on
# buffers made once per (batch, seq_len) and reused every step (``ActivationBuffers``), with:
#   * rows: every activation is a (N, width) matrix, N = B*T, so each projection is one BLAS call
#     writing straight into its buffer (np.matmul(..., out=)), and weight gradients are written by
#     BLAS into their views of the flat gradient buffer;
#   * RoPE rotating q and k in place in the fused q/k/v output (one kernel), and backward likewise
#     in the gradient of that output;
#   * each residual add fused with the RMSNorm that follows it (``add_rmsnorm_forward_kernel``):
#     the block's second add with the next block's first norm (or the final norm);
#   * backward: one (N, D) buffer ``dres`` holds the residual stream's gradient and each norm's
#     backward adds its branch into it (the identity path costs nothing);
#   * each linear backward's two products, dW = dy^T x and dx = dy W, in one ``matmuls`` call
#     (see layers/linear.py: they may run on two threads), so dx goes to a scratch buffer, not over
#     x; the SwiGLU gradient (da, du) overwrites the gate/up output, dlogits the logits (model).
# The attention itself is ``attention_forward`` / ``attention_backward`` (layers/attention.py) on
# strided (B, heads, T, hd) views of the q/k/v rows; its output is copied back to rows (merge heads).


class LayerBuffers:
    """One block's activations kept for the backward (N = B*T rows).

    x: (N, D) block input;  n1, r1: its RMSNorm (output, 1/rms);  qkv: (N, (H+2K)*hd), q and k
    already rotated;  o: (N, H*hd) attention output, heads merged;  h: (N, D) after the attention
    residual;  n2, r2: its RMSNorm;  au: (N, 2F) gate/up projections;  g: (N, F) SwiGLU output."""

    def __init__(self, cfg, N, dtype, x=None, n1=None, r1=None):
        D, F, hd = cfg.dim, cfg.hidden_dim, cfg.head_dim
        e = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
        self.x = e(N, D) if x is None else x
        self.n1 = e(N, D) if n1 is None else n1
        self.r1 = e(N) if r1 is None else r1
        self.qkv = e(N, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd)
        self.o = e(N, cfg.n_heads * hd)
        self.h = e(N, D)
        self.n2 = e(N, D)
        self.r2 = e(N)
        self.au = e(N, 2 * F)
        self.g = e(N, F)
        self.attn_cache = None
        self.mask_attn = self.mask_ffn = None


class NormedStream:
    """A residual-stream buffer with its RMSNorm: the input of a block or of the final norm."""

    def __init__(self, cfg, N, dtype):
        self.x = np.empty((N, cfg.dim), dtype=dtype)
        self.n1 = np.empty((N, cfg.dim), dtype=dtype)
        self.r1 = np.empty(N, dtype=dtype)


class SharedBuffers:
    """Scratch used by one block at a time: proj (N, D) output of W_o / W_down before its residual
    add; dres (N, D) residual-stream gradient; dn (N, D) gradient of a norm's output; dg (N, F),
    do (N, H*hd), dqkv (N, (H+2K)*hd) gradients of the SwiGLU output, the attention output and the
    q/k/v projection; dw_partial for the norm gains."""

    def __init__(self, cfg, N, dtype):
        hd = cfg.head_dim
        e = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
        self.proj, self.dres, self.dn = e(N, cfg.dim), e(N, cfg.dim), e(N, cfg.dim)
        self.dg = e(N, cfg.hidden_dim)
        self.do = e(N, cfg.n_heads * hd)
        self.dqkv = e(N, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd)
        self.dw_partial = e(rmsnorm_dw_chunks(N), cfg.dim)


def _dropout_rows(a, p, rng, training, mask=None):
    """Dropout of a (N, D) buffer in place; returns the mask (None when inactive).  A given
    ``mask`` (N, D) is applied as it is instead of one drawn from ``rng``."""
    if mask is None:
        y, mask = dropout_forward(a, p, rng, training)
        if mask is not None:
            a[...] = y
        return mask
    a *= mask
    return mask


def decoder_block_forward_rows(buf, out, shared, w, next_norm_w, cos, sin, B, T, cfg, rng=None,
                               training=False, masks=None):
    """Forward of one block on row buffers.  Reads buf.x, buf.n1 (its RMSNorm, already computed);
    fills the rest of ``buf``; writes the block output to out.x and its RMSNorm with gain
    ``next_norm_w`` (the next block's input norm, or the final norm) to out.n1, out.r1.
    ``out`` may be ``buf``'s own stream (inference: one buffer set for every layer).
    ``masks``: None, or the (attention, feed-forward) dropout masks (N, D) to use instead of
    drawing them (tests hold the model to npllama.reference with the same masks)."""
    mask_attn, mask_ffn = (None, None) if masks is None else masks
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    eps = buf.x.dtype.type(cfg.norm_eps)
    # attention branch
    matmuls((buf.n1, w["wqkv"].T, buf.qkv))
    rope_rows_inplace_kernel(buf.qkv, H + K, hd, T, cos, sin, buf.qkv.dtype.type(1.0))
    q, k, v = split_heads(buf.qkv.reshape(B, T, -1), H, K, hd)
    o, buf.attn_cache = attention_forward(q, k, v)
    np.copyto(buf.o.reshape(B, T, H, hd), o.transpose(0, 2, 1, 3))
    matmuls((buf.o, w["wo"].T, shared.proj))
    buf.mask_attn = _dropout_rows(shared.proj, cfg.dropout, rng, training, mask_attn)
    add_rmsnorm_forward_kernel(buf.x, shared.proj, w["ffn_norm"], eps, buf.h, buf.n2, buf.r2)
    # feed-forward branch
    matmuls((buf.n2, w["w_gate_up"].T, buf.au))
    swiglu_forward_rows_kernel(buf.au, buf.g)
    matmuls((buf.g, w["w_down"].T, shared.proj))
    buf.mask_ffn = _dropout_rows(shared.proj, cfg.dropout, rng, training, mask_ffn)
    add_rmsnorm_forward_kernel(buf.h, shared.proj, next_norm_w, eps, out.x, out.n1, out.r1)


def decoder_block_backward_rows(buf, shared, w, dw, cos, sin, B, T, cfg):
    """Backward of one block.  On entry shared.dres holds dL/d(block output); on return dL/d(block
    input).  Weight gradients are written into ``dw``'s buffers.  Each linear backward is one
    ``matmuls`` call with its two products, dW = dy^T x and dx = dy W (independent: they may run
    concurrently).  Overwrites buf.au with its gradient."""
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dres = shared.dres
    # feed-forward branch: out = h + W_down swiglu(W_gate_up n2)
    df = dres if buf.mask_ffn is None else np.multiply(dres, buf.mask_ffn, out=shared.proj)
    matmuls((df.T, buf.g, dw["w_down"]), (df, w["w_down"], shared.dg))
    swiglu_backward_rows_inplace_kernel(shared.dg, buf.au)     # [da | du] over au
    matmuls((buf.au.T, buf.n2, dw["w_gate_up"]), (buf.au, w["w_gate_up"], shared.dn))
    rmsnorm_backward_kernel(shared.dn, buf.h, w["ffn_norm"], buf.r2, dres, shared.dw_partial, True)
    np.sum(shared.dw_partial, axis=0, out=dw["ffn_norm"])
    # attention branch: h = x + W_o attention(rope(q), rope(k), v)
    da = dres if buf.mask_attn is None else np.multiply(dres, buf.mask_attn, out=shared.proj)
    matmuls((da.T, buf.o, dw["wo"]), (da, w["wo"], shared.do))
    do = shared.do.reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    dq, dk, dv = split_heads(shared.dqkv.reshape(B, T, -1), H, K, hd)
    attention_backward(do, buf.attn_cache, dq=dq, dk=dk, dv=dv)
    buf.attn_cache = None
    rope_rows_inplace_kernel(shared.dqkv, H + K, hd, T, cos, sin, shared.dqkv.dtype.type(-1.0))
    matmuls((shared.dqkv.T, buf.n1, dw["wqkv"]), (shared.dqkv, w["wqkv"], shared.dn))
    rmsnorm_backward_kernel(shared.dn, buf.x, w["attn_norm"], buf.r1, dres, shared.dw_partial, True)
    np.sum(shared.dw_partial, axis=0, out=dw["attn_norm"])
