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
from .linear import linear_backward, linear_forward
from .rmsnorm import rmsnorm_backward, rmsnorm_forward
from .rope import rope_backward, rope_forward
from .swiglu import feedforward_backward, feedforward_forward


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
