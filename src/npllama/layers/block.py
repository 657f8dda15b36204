"""The pre-norm decoder block of Llama on rows of activations: THE block of the fast engine.

    h   = x + Dropout(W_o Attention(RoPE(W_q n1), RoPE(W_k n1), W_v n1)),   n1 = RMSNorm_1(x)
    out = h + Dropout(W_down SwiGLU(W_gate n2, W_up n2)),                    n2 = RMSNorm_2(h)

A residual connection passes its gradient through unchanged, so
    dh = dout + (gradient of the feed-forward branch w.r.t. h)
    dx = dh   + (gradient of the attention branch w.r.t. x).

``npllama.model.Llama`` runs these two functions for training, evaluation and the prompt of a
generation (npllama/reference.py is the same block as a composition of the layers' NumPy
references, and the tests hold the two equal).  What makes this one fast:

* rows: every activation is an (N, width) matrix, N = B*T, held in buffers made once per (B, T)
  shape and reused every step (``BlockActivations``, ``BlockScratch``).  Each projection is one
  BLAS call writing straight into its buffer (``matmuls``), and the weight gradients are written by
  BLAS into the views ``dw`` of the model's flat gradient buffer;
* the q, k and v projections are stacked into one (H*hd + 2*K*hd, D) matrix W_qkv, gate and up
  into one (2F, D) matrix W_gate_up: one matmul each;
* RoPE rotates q and k in place in the q/k/v rows (one ``rope_kernel`` call), and in the backward
  their gradients likewise;
* the residual add after attention is fused with the RMSNorm that follows it (one pass of
  ``rmsnorm_forward_kernel`` writes h, n2 and 1/rms);
* backward: one (N, D) buffer, ``scratch.dres``, holds the residual stream's gradient, and each
  norm's backward adds its branch into it (the identity path costs nothing);
* each linear backward's two products, dW = dy^T x and dx = dy W, are one ``matmuls`` call (they
  may run on two threads), so dx goes to a scratch buffer;
* the SwiGLU backward writes [dg | du] over the gate/up activations, and the attention's cache is
  dropped after its backward: a block's activations serve one backward;
* with a frozen base (LoRA, QLoRA: ``BlockScratch(recompute=True)``) the two norms' outputs and
  the SwiGLU output are not kept per layer: every block writes them into the same two scratch
  buffers (the attention's K/V tiles likewise), and the backward computes them again from what it
  keeps (x and 1/rms, h, [g | u], k and v) right before it needs them -- the same numbers, ~40 %
  less memory a token, for the cost of an elementwise pass over them.
The attention itself is ``attention_forward`` / ``attention_backward`` (layers/attention.py) on
strided (B, heads, T, hd) views of the q/k/v rows; it writes its output straight into the rows of o
(a (B, H, T, hd) view of them), the layout the output projection reads.

``w`` / ``dw``: one layer's weights / gradient buffers by role, keys attn_norm, wqkv, wo, ffn_norm,
w_gate_up, w_down (``npllama.model`` makes them as views of its flat buffers).

Shapes: N = B*T rows; x, h, n1, n2, out: (N, D); qkv: (N, (H + 2K) hd); o: (N, H hd);
gate_up: (N, 2F); swiglu: (N, F); q: (B, H, T, hd); k, v: (B, K, T, hd); cos, sin: (T, hd/2) (with
position_ids (N, hd/2)).
"""
import numpy as np

from ..engine.matmul import matmuls
from .attention import attention_backward, attention_forward, document_ids, key_tile_buffers, repack_key_tiles
from .kv_cache import cached_attention
from .lora import lora_adapter_backward, lora_adapter_forward
from .rmsnorm import rmsnorm_backward_kernel, rmsnorm_dw_chunks, rmsnorm_forward_kernel
from .rope import rope_cos_sin, rope_kernel
from .swiglu import swiglu_backward_kernel, swiglu_forward_kernel


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def split_heads(qkv, n_heads, n_kv_heads, head_dim):
    """Views q (B, H, T, hd), k, v (B, K, T, hd) into a (B, T, H*hd + 2*K*hd) array (no copy)."""
    B, T, _ = qkv.shape
    dq, dkv = n_heads * head_dim, n_kv_heads * head_dim
    q = qkv[..., :dq].reshape(B, T, n_heads, head_dim).transpose(0, 2, 1, 3)
    k = qkv[..., dq:dq + dkv].reshape(B, T, n_kv_heads, head_dim).transpose(0, 2, 1, 3)
    v = qkv[..., dq + dkv:].reshape(B, T, n_kv_heads, head_dim).transpose(0, 2, 1, 3)
    return q, k, v


class BlockActivations:
    """What one block's forward keeps for its backward (N rows).

    x: block input;  n1, r1: its RMSNorm (output, 1/rms);  qkv: q and k rotated, v;  o: attention
    output, heads merged;  h: after the attention residual;  n2, r2: its RMSNorm;  gate_up: [g | u]
    the gate and up projections;  swiglu: the SwiGLU output s;  attn_cache: the attention's cache;  mask_attn, mask_ffn:
    the dropout masks (N, D) the caller sets before the forward, or None for no dropout;
    lora_caches: the LoRA adapters' caches by projection ("q_proj", ...), empty without adapters.

    ``in_place=True`` (inference, no backward): n2, r2 are n1, r1, so that one set serves every
    layer, and the block's output goes back into x (h has a buffer of its own all the same: the
    parallel norm kernel must not write over its input).

    ``shared`` (a BlockScratch made with recompute=True): n1 and n2 are its ``normed`` buffer,
    swiglu its ``swiglu`` and the key tiles its ``key_tiles``, shared by every layer; the backward
    recomputes them (``recomputed``)."""

    def __init__(self, cfg, N, dtype, in_place=False, shared=None):
        D, F, hd = cfg.dim, cfg.hidden_dim, cfg.head_dim
        e = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
        self.x, self.r1 = e(N, D), e(N)
        self.n1 = e(N, D) if shared is None else shared.normed
        self.qkv = e(N, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd)
        self.o = e(N, cfg.n_heads * hd)
        self.h = e(N, D)
        self.n2, self.r2 = (self.n1, self.r1) if in_place else (e(N, D) if shared is None else shared.normed, e(N))
        self.gate_up = e(N, 2 * F)
        self.swiglu = e(N, F) if shared is None else shared.swiglu
        self.recomputed = shared is not None
        self.key_tiles = None                                       # made by the first forward (it knows B, T)
        self.attn_cache = None
        self.mask_attn = self.mask_ffn = None
        self.lora_caches = {}


class BlockScratch:
    """Buffers used by one block at a time: proj (N, D), the output of W_o or W_down before its
    residual add; dres (N, D), the residual stream's gradient; dn (N, D), the gradient of a norm's
    output; dswiglu (N, F), do (N, H*hd), dqkv (N, (H+2K)*hd), the gradients of the SwiGLU output, the
    attention output and the q/k/v projection; dw_partial, partial sums of a norm gain's gradient.
    recompute=True: also normed (N, D) and swiglu (N, F), the norms' and the SwiGLU's outputs of
    whichever block runs, and the attention's K/V tiles (BlockActivations' ``shared``)."""

    def __init__(self, cfg, N, dtype, recompute=False):
        hd = cfg.head_dim
        e = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
        self.proj, self.dres, self.dn = e(N, cfg.dim), e(N, cfg.dim), e(N, cfg.dim)
        self.dswiglu = e(N, cfg.hidden_dim)
        self.do = e(N, cfg.n_heads * hd)
        self.dqkv = e(N, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd)
        self.dw_partial = e(rmsnorm_dw_chunks(N), cfg.dim)
        self.recompute = recompute
        if recompute:
            self.normed, self.swiglu = e(N, cfg.dim), e(N, cfg.hidden_dim)
            self.key_tiles = None   # (made by the first forward)


def projection_columns(cfg):
    """Each projection's columns in the output of the fused product it is part of: q, k, v in qkv,
    gate and up in gate_up; o_proj and down_proj are products of their own (all columns)."""
    q, kv, F = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    return {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv),
            "o_proj": slice(None), "gate_proj": slice(0, F), "up_proj": slice(F, 2 * F), "down_proj": slice(None)}


class RowBatch:
    """What every block of a pass over a (B, T) batch shares: the config, the shape, the RoPE
    tables, the documents attention keeps apart, the projections' columns and the scratch buffers.

    RoPE: row n of the activations is at position n % rope_period of the tables cos, sin, which are
    those of positions 0 .. T-1 (period T) unless the pass has position_ids: then they hold one row
    per row of activations (period B*T).  documents: None (causal attention), or the pass's
    ``document_ids`` for segment_ids and padding.  ``use_packing`` sets both for a pass."""

    def __init__(self, cfg, B, T, dtype, rope_freqs, recompute=False):
        self.cfg, self.B, self.T, self.dtype, self.rope_freqs = cfg, B, T, dtype, rope_freqs
        self.causal_cos, self.causal_sin = rope_cos_sin(np.arange(T), rope_freqs, dtype)
        self.columns = projection_columns(cfg)
        self.scratch = BlockScratch(cfg, B * T, dtype, recompute)
        self.use_packing(None)

    def use_packing(self, packed, start=0):
        """The pass's packed rows and padding (``npllama.inputs.PackedRows`` of these B rows), or None;
        ``start``: without packing, the first row's position (a continuation over a key/value cache)."""
        if (packed is None or packed.position_ids is None) and start > 0:
            self.cos, self.sin = rope_cos_sin(np.arange(start, start + self.T), self.rope_freqs, self.dtype)
            self.rope_period = self.T
        elif packed is None or packed.position_ids is None:
            self.cos, self.sin, self.rope_period = self.causal_cos, self.causal_sin, self.T
        else:
            self.cos, self.sin = rope_cos_sin(packed.position_ids.reshape(-1), self.rope_freqs, self.dtype)
            self.rope_period = self.B * self.T
        self.documents = None
        if packed is not None and (packed.segment_ids is not None or packed.attention_mask is not None):
            self.documents = document_ids(packed.segment_ids, packed.attention_mask, self.B, self.T)


# LoRA (layers/lora.py): a projection y = x W^T with an adapter gets y += s dropout(x) A^T B^T added
# into its columns of the fused product, and in the backward dx += s (dy B A) * m, dA, dB.
def _adapters_forward(acts, adapters, names, x, y, columns):
    for name in names:
        if name in adapters:
            a, b, scale, mask = adapters[name]
            acts.lora_caches[name] = lora_adapter_forward(x, a, b, scale, y[:, columns[name]], mask)


def _adapters_backward(acts, adapter_grads, names, dy, dx, columns):
    for name in names:
        if name in acts.lora_caches:
            da, db = adapter_grads[name]
            lora_adapter_backward(dy[:, columns[name]], acts.lora_caches.pop(name), dx, da, db)


def decoder_block_forward_rows(acts, w, out, batch, adapters=None, kv=None):
    """Forward of one block: reads acts.x (and the dropout masks in ``acts``), fills the rest of
    ``acts`` and writes the block's output to ``out`` (N, D): the next block's input, or acts.x
    itself when ``acts`` is in place.  adapters: None, or LoRA adapters by projection
    ({"q_proj": (A, B, scale, mask or None), ...}; mask (N, in) is the dropout on the adapter's input).
    kv: None, or a continuation's (k_cache_t, v_cache, start) of this layer (B = 1, the rows at
    positions start ..: layers/kv_cache.py's ``cached_attention``, which stores their keys and
    values into the cache; no backward follows)."""
    cfg, B, T, scratch = batch.cfg, batch.B, batch.T, batch.scratch
    adapters, cols = adapters or {}, batch.columns
    acts.lora_caches = {}
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dt = acts.x.dtype.type
    eps = dt(cfg.norm_eps)
    # attention branch:  h = x + Dropout(W_o attention(rope(q), rope(k), v))
    rmsnorm_forward_kernel(acts.x, w["attn_norm"], eps, acts.n1, acts.r1)
    matmuls((acts.n1, w["wqkv"].T, acts.qkv))
    _adapters_forward(acts, adapters, ("q_proj", "k_proj", "v_proj"), acts.n1, acts.qkv, cols)
    rope_kernel(acts.qkv, H + K, hd, batch.cos, batch.sin, dt(1.0), 0, batch.rope_period)
    if kv is not None:          # attention over the cache and these rows
        cached_attention(acts.qkv, H, kv[2], kv[0], kv[1], acts.o)
    else:
        q, k, v = split_heads(acts.qkv.reshape(B, T, -1), H, K, hd)
        if acts.key_tiles is None:
            if acts.recomputed and scratch.key_tiles is None:
                scratch.key_tiles = key_tile_buffers(B, K, T, hd, acts.qkv.dtype)
            acts.key_tiles = scratch.key_tiles if acts.recomputed else key_tile_buffers(B, K, T, hd, acts.qkv.dtype)
        _, acts.attn_cache = attention_forward(q, k, v, o=acts.o.reshape(B, T, H, hd).transpose(0, 2, 1, 3),
                                               tiles=acts.key_tiles, documents=batch.documents)
    matmuls((acts.o, w["wo"].T, scratch.proj))
    _adapters_forward(acts, adapters, ("o_proj",), acts.o, scratch.proj, cols)
    if acts.mask_attn is not None:
        scratch.proj *= acts.mask_attn
    rmsnorm_forward_kernel(acts.x, w["ffn_norm"], eps, acts.n2, acts.r2, scratch.proj, acts.h)
    # feed-forward branch:  out = h + Dropout(W_down swiglu(W_gate_up n2))
    matmuls((acts.n2, w["w_gate_up"].T, acts.gate_up))
    _adapters_forward(acts, adapters, ("gate_proj", "up_proj"), acts.n2, acts.gate_up, cols)
    swiglu_forward_kernel(acts.gate_up, acts.swiglu)
    matmuls((acts.swiglu, w["w_down"].T, scratch.proj))
    _adapters_forward(acts, adapters, ("down_proj",), acts.swiglu, scratch.proj, cols)
    if acts.mask_ffn is not None:
        scratch.proj *= acts.mask_ffn
    np.add(acts.h, scratch.proj, out=out)


def _input_gradient(dy, x, w, dw_name, dx, dw):
    """dx = dy W of a projection y = x W^T, and dW = dy^T x into dw[dw_name] unless dw is None
    (frozen weights: no weight-gradient product)."""
    if dw is None:
        matmuls((dy, w, dx))
    else:
        matmuls((dy.T, x, dw[dw_name]), (dy, w, dx))


def decoder_block_backward_rows(acts, w, dw, batch, adapter_grads=None):
    """Backward of one block.  On entry batch.scratch.dres holds dL/d(block output); on return
    dL/d(block input).  The weight gradients are written into ``dw``'s buffers; dw=None: the
    block's weights are frozen and none is computed.  adapter_grads: the LoRA adapters' (dA, dB)
    buffers by projection, for the adapters of the forward.  Overwrites acts.gate_up with its gradient
    and drops the attention cache (see the module docstring)."""
    cfg, B, T, scratch = batch.cfg, batch.B, batch.T, batch.scratch
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dres, cols = scratch.dres, batch.columns
    eps = acts.x.dtype.type(cfg.norm_eps)
    # feed-forward branch:  out = h + W_down swiglu(W_gate_up n2)
    if acts.recomputed:   # (s, n2, n1 were not kept: each again from what was, before its first use)
        swiglu_forward_kernel(acts.gate_up, acts.swiglu)
    dffn_out = dres if acts.mask_ffn is None else np.multiply(dres, acts.mask_ffn, out=scratch.proj)
    _input_gradient(dffn_out, acts.swiglu, w["w_down"], "w_down", scratch.dswiglu, dw)
    _adapters_backward(acts, adapter_grads, ("down_proj",), dffn_out, scratch.dswiglu, cols)
    swiglu_backward_kernel(scratch.dswiglu, acts.gate_up)           # [dg | du] over gate_up
    if acts.recomputed:
        rmsnorm_forward_kernel(acts.h, w["ffn_norm"], eps, acts.n2, acts.r2)
    _input_gradient(acts.gate_up, acts.n2, w["w_gate_up"], "w_gate_up", scratch.dn, dw)
    _adapters_backward(acts, adapter_grads, ("gate_proj", "up_proj"), acts.gate_up, scratch.dn, cols)
    rmsnorm_backward_kernel(scratch.dn, acts.h, w["ffn_norm"], acts.r2, dres, scratch.dw_partial, True)
    if dw is not None:
        np.sum(scratch.dw_partial, axis=0, out=dw["ffn_norm"])
    # attention branch:  h = x + W_o attention(rope(q), rope(k), v)
    dattn_out = dres if acts.mask_attn is None else np.multiply(dres, acts.mask_attn, out=scratch.proj)
    _input_gradient(dattn_out, acts.o, w["wo"], "wo", scratch.do, dw)
    _adapters_backward(acts, adapter_grads, ("o_proj",), dattn_out, scratch.do, cols)
    do = scratch.do.reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    dq, dk, dv = split_heads(scratch.dqkv.reshape(B, T, -1), H, K, hd)
    if acts.recomputed:    # (the K/V tiles are shared by the layers: this layer's again)
        repack_key_tiles(*split_heads(acts.qkv.reshape(B, T, -1), H, K, hd)[1:], acts.attn_cache)
    attention_backward(do, acts.attn_cache, dq=dq, dk=dk, dv=dv)
    acts.attn_cache = None
    rope_kernel(scratch.dqkv, H + K, hd, batch.cos, batch.sin, scratch.dqkv.dtype.type(-1.0), 0, batch.rope_period)
    if acts.recomputed:
        rmsnorm_forward_kernel(acts.x, w["attn_norm"], eps, acts.n1, acts.r1)
    _input_gradient(scratch.dqkv, acts.n1, w["wqkv"], "wqkv", scratch.dn, dw)
    _adapters_backward(acts, adapter_grads, ("q_proj", "k_proj", "v_proj"), scratch.dqkv, scratch.dn, cols)
    rmsnorm_backward_kernel(scratch.dn, acts.x, w["attn_norm"], acts.r1, dres, scratch.dw_partial, True)
    if dw is not None:
        np.sum(scratch.dw_partial, axis=0, out=dw["attn_norm"])
