"""The whole Llama, forward and backward, in plain NumPy: the model to read first.

    x_0    = Embed(tokens)                                             (B, T, D)
    h_l    = x_l + W_o Attention(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(x_l)
    x_l+1  = h_l + W_down SwiGLU(W_gate m, W_up m),                  m = RMSNorm(h_l)
    logits = RMSNorm(x_L) W_out^T                                      (B, T, V)
    loss   = mean over targets != -100 of CrossEntropy(logits, targets)

Read it top to bottom, in this order:
  1. ``block_forward``: one decoder block, every step one call to a layer's function;
  2. ``model_forward`` / ``forward``: embedding -> n_layers blocks -> final RMSNorm -> logits;
  3. ``loss_and_grad``: the loss, then ``model_backward``: the forward's steps in reverse;
  4. ``block_backward``: ``block_forward`` read from the bottom up.
A continuation over a key/value cache (``KVCache``: a sequence run in pieces, as generation does)
is ``forward(..., kv_cache=)``, after ``loss_and_grad``.
Training's two optional pieces, residual dropout and LoRA, come after the model, apart from it.
The layers' own derivations are in the docstrings of npllama/layers/<layer>.py (and at length in
docs/); each ``*_reference`` function used here sits next to the Numba kernel that computes the
same thing fast.  Attention is written out here step by step (scores, mask, softmax, probs @ v),
so that each of its steps has a name.

Every layer follows CS231n's pattern: ``out, cache = layer_forward(x, ...)`` keeps what its backward
needs, and ``dx, dw = layer_backward(dout, cache)`` returns the gradient of the loss with respect
to the layer's inputs given the gradient ``dout`` with respect to its output.  Chaining them in
reverse is the whole of backpropagation; a residual add passes its gradient to both summands.

Named activations.  Each intermediate result passes through ``hooks("name", x)`` and each gradient
through ``hooks.grad("name", dx)``: by default they return their argument and do nothing else.
``run_with_cache`` (at the end of the file, with the rest of that machinery) records them all under
Hugging Face module paths ("model.layers.0.self_attn.q_proj", docs/check-your-implementation.md
lists every name), their gradients under "grad.<name>", and can add a given delta at any of them
(activation patching).  ``hooks.matmul`` is ``a @ b``, or with bfloat16 emulation the same product
of a and b rounded to bfloat16.

Inputs real training uses: ``position_ids`` (B, T) (RoPE positions, restarting per document of a
packed row), ``segment_ids`` (B, T) (a position attends only to earlier positions of its own
document) and ``attention_mask`` (B, T) (1 = token, 0 = padding: no other position attends to a
padding position, which sees the earlier tokens of its segment and itself; its target should be
-100); ``inputs_embeds`` (B, T, D) instead of tokens.

This is the source of truth: ``npllama.model.Llama`` (preallocated buffers, fused Numba kernels,
threads) is tested equal to it to 1e-12 relative in float64 (tests/test_reference.py), and this
file to Hugging Face transformers and to finite differences.  It computes in the dtype of the
parameters it is given (float32 stays float32).

Shapes: B batch, T positions, D model width, H query heads, K key/value heads (H = K: multi-head,
1 < K < H: grouped-query, K = 1: multi-query), hd head width, F SwiGLU width, V vocabulary.
``params`` and the returned ``grads`` are dicts keyed by the Hugging Face names
(``npllama.model.parameter_layout``); ``cfg`` is a ``LlamaConfig``.

Two optional pieces, for training, sit apart at the end of the file and act at the named points
(the hooks), so the model above carries neither: residual dropout (``ResidualDropout``: each
branch's output times a given mask before its residual add) and LoRA (``LoRA``, npllama/layers/lora.py,
docs/12-lora.md): ``lora`` maps a projection's module name ("model.layers.0.self_attn.q_proj", ...)
to its adapter (A, B, scale); that projection then computes x W^T + scale dropout(x) A^T B^T, and
``loss_and_grad`` returns the adapters' gradients only, keyed as PEFT names them without its
"base_model.model." prefix ("model.layers.0.self_attn.q_proj.lora_A.weight", "...lora_B.weight"):
every other weight is frozen.

QLoRA (npllama/layers/quantized_linear.py, docs/14-quantized.md): a weight in ``params`` may be a
QuantizedMatrix, GGUF's blocks of integer codes and float16 scales.  Its value is the matrix of
numbers the gguf package dequantizes it to, deq(W), and that is what the reference computes with
(``dense_params``): a frozen base of those numbers, so QLoRA's gradients are LoRA's on deq(W).
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from .errors import InputError
from .inputs import check_packing
from .layers.cross_entropy import IGNORE_INDEX, cross_entropy_backward_reference, cross_entropy_forward_reference
from .layers.dropout import dropout_backward
from .layers.embedding import embedding_forward, scatter_add_rows_reference
from .layers.lora import lora_adapter_backward_reference, lora_adapter_forward_reference
from .layers.quantized_linear import dense
from .layers.rmsnorm import rmsnorm_backward_reference, rmsnorm_forward_reference
from .layers.rope import rope_backward_reference, rope_forward_reference, rope_frequencies
from .layers.swiglu import swiglu_backward_reference, swiglu_forward_reference
from .model import parameter_layout


def split_heads(x, n_heads):
    """(B, T, n_heads * hd) -> (B, n_heads, T, hd): each head attends on its own."""
    B, T, _ = x.shape
    return x.reshape(B, T, n_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, n_heads, T, hd) -> (B, T, n_heads * hd): the heads side by side again."""
    B, n_heads, T, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, n_heads * hd)


def layer_weights(params, i):
    """Layer i's weights keyed by their names inside the layer ("self_attn.q_proj.weight", ...)."""
    prefix = f"model.layers.{i}."
    return {name[len(prefix):]: p for name, p in params.items() if name.startswith(prefix)}


def output_weight(params, cfg):
    """W_out (V, D): with tied embeddings the embedding table is also the output projection."""
    return params["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]


# ---- linear layers: y = x W^T (npllama/layers/linear.py has the derivation) ----------------------
def linear_forward(x, weight, hooks):
    """x: (..., in), weight: (out, in) -> y: (..., out)."""
    return hooks.matmul(x, weight.T), (x, weight)


def linear_backward(dy, cache, hooks):
    """dx = dy W,  dW = dy^T x  (the positions' contributions summed)."""
    x, weight = cache
    dx = hooks.matmul(dy, weight)
    dw = hooks.matmul(dy.reshape(-1, weight.shape[0]).T, x.reshape(-1, weight.shape[1]))
    return dx, dw


def projection_forward(x, w, name, hooks):
    """y = x W^T for the layer's projection ``name`` ("self_attn.q_proj", ...): (y, cache).  Its
    output is named after it, as the output of Hugging Face's module of that name."""
    y, cache = linear_forward(x, w[name + ".weight"], hooks)
    return hooks(name, y), cache


def projection_backward(dy, cache, name, grads, hooks):
    """dx; the weight's gradient into ``grads[name + ".weight"]``."""
    dx, grads[name + ".weight"] = linear_backward(hooks.grad(name, dy), cache, hooks)
    return dx


# ---- attention, step by step ---------------------------------------------------------------------
def causal_visibility(T, segment_ids=None, attention_mask=None):
    """visible: bool (T, T) or (B, 1, T, T), True where query i may attend to key j: j <= i, and
    with segment_ids (B, T) j in i's document, and with attention_mask (B, T) (0 = padding) j not
    padding -- except that each position always sees itself, so no softmax row is empty."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = j <= i                                                           # (T, T)
    if segment_ids is not None:
        segment_ids = np.asarray(segment_ids)
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])   # (B, T, T)
    if attention_mask is not None:
        visible = visible & ((np.asarray(attention_mask)[:, None, :] != 0) | (i == j))
    return visible if visible.ndim == 2 else visible[:, None]                  # heads broadcast


def attention_forward(q, k, v, visible, hooks):
    """q: (B, H, T, hd), k, v: (B, K, T, hd) -> o: (B, H, T, hd), cache.

        scores = q k^T / sqrt(hd),  -inf where not visible
        probs  = softmax(scores)       (along the keys)
        o      = probs v
    Query head h reads key/value head h // G, G = H / K (grouped-query attention)."""
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    k_all, v_all = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)            # (B, H, T, hd)
    scale = q.dtype.type(1.0 / np.sqrt(hd))     # in q's dtype: a float64 scale would promote float32
    scores = hooks.matmul(q, k_all.transpose(0, 1, 3, 2)) * scale              # (B, H, T, T)
    scores = hooks("self_attn.scores", np.where(visible, scores, -np.inf))
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))                    # 0 where -inf
    probs = hooks("self_attn.probs", e / e.sum(axis=-1, keepdims=True))        # (B, H, T, T)
    o = hooks.matmul(probs, v_all)                                             # (B, H, T, hd)
    return o, (q, k_all, v_all, probs, scale, G)


def attention_backward(do, cache, hooks):
    """do: (B, H, T, hd) -> dq: (B, H, T, hd), dk, dv: (B, K, T, hd).

        dprobs  = do v^T,   dv = probs^T do
        dscores = probs (dprobs - sum_j probs_ij dprobs_ij)        softmax's backward, row by row
        dq = dscores k / sqrt(hd),   dk = dscores^T q / sqrt(hd)
    A key/value head serves the G query heads of its group, so its gradients are their sum."""
    q, k_all, v_all, probs, scale, G = cache
    B, H, T, hd = q.shape
    dprobs = hooks.grad("self_attn.probs", hooks.matmul(do, v_all.transpose(0, 1, 3, 2)))   # (B, H, T, T)
    dv_all = hooks.matmul(probs.transpose(0, 1, 3, 2), do)                                  # (B, H, T, hd)
    dscores = probs * (dprobs - np.sum(probs * dprobs, axis=-1, keepdims=True))
    dscores = hooks.grad("self_attn.scores", dscores)                                        # (B, H, T, T)
    dq = hooks.matmul(dscores, k_all) * scale                                                # (B, H, T, hd)
    dk_all = hooks.matmul(dscores.transpose(0, 1, 3, 2), q) * scale                          # (B, H, T, hd)
    dk = dk_all.reshape(B, H // G, G, T, hd).sum(axis=2)                                     # (B, K, T, hd)
    dv = dv_all.reshape(B, H // G, G, T, hd).sum(axis=2)
    return dq, dk, dv


# ---- one decoder block ---------------------------------------------------------------------------
def block_forward(x, w, cos, sin, cfg, visible=None, hooks=None, kv=None):
    """x: (B, T, D) -> out: (B, T, D), cache.  w: one layer's weights (``layer_weights``);
    cos, sin: (T, hd/2) or (B, 1, T, hd/2); visible: ``causal_visibility``'s mask (default: causal);
    hooks: the layer's (``Hooks.layer``); kv: a continuation's cache of this layer (``LayerKV``): the
    earlier positions' keys and values come before these, and ``visible`` is (T, S + T)."""
    H, K = cfg.n_heads, cfg.n_kv_heads
    hooks = hooks or NO_HOOKS
    visible = causal_visibility(x.shape[1]) if visible is None else visible
    x = hooks("resid_pre", x)                                                  # (B, T, D)
    # attention branch:  h = x + W_o Attention(RoPE(q), RoPE(k), v)
    n1, c_norm1 = rmsnorm_forward_reference(x, w["input_layernorm.weight"], cfg.norm_eps)
    n1 = hooks("input_layernorm", n1)                                          # (B, T, D)
    q, c_q = projection_forward(n1, w, "self_attn.q_proj", hooks)              # (B, T, H*hd)
    k, c_k = projection_forward(n1, w, "self_attn.k_proj", hooks)              # (B, T, K*hd)
    v, c_v = projection_forward(n1, w, "self_attn.v_proj", hooks)              # (B, T, K*hd)
    q_rot, c_rope = rope_forward_reference(split_heads(q, H), cos, sin)
    q_rot = hooks("self_attn.q_rope", q_rot)                                   # (B, H, T, hd)
    k_rot, _ = rope_forward_reference(split_heads(k, K), cos, sin)
    k_rot = hooks("self_attn.k_rope", k_rot)                                   # (B, K, T, hd)
    v = split_heads(v, K)                                                      # (B, K, T, hd)
    if kv is not None:          # a continuation: the keys and values of positions 0 .. S-1 first
        k_rot, v = kv.extend(k_rot, v)                                         # (B, K, S + T, hd)
    o, c_attn = attention_forward(q_rot, k_rot, v, visible, hooks)             # (B, H, T, hd)
    context = hooks("self_attn.context", merge_heads(o))                       # (B, T, H*hd)
    attn_out, c_o = projection_forward(context, w, "self_attn.o_proj", hooks)  # (B, T, D)
    h = hooks("resid_mid", x + attn_out)                                       # (B, T, D)
    # feed-forward branch:  out = h + W_down SwiGLU(W_gate n2, W_up n2)
    n2, c_norm2 = rmsnorm_forward_reference(h, w["post_attention_layernorm.weight"], cfg.norm_eps)
    n2 = hooks("post_attention_layernorm", n2)                                 # (B, T, D)
    g, c_gate = projection_forward(n2, w, "mlp.gate_proj", hooks)              # (B, T, F)
    u, c_up = projection_forward(n2, w, "mlp.up_proj", hooks)                  # (B, T, F)
    s, c_swiglu = swiglu_forward_reference(g, u)
    s = hooks("mlp.swiglu", s)                                                 # (B, T, F)
    ffn_out, c_down = projection_forward(s, w, "mlp.down_proj", hooks)         # (B, T, D)
    out = hooks("resid_post", h + ffn_out)                                     # (B, T, D)
    cache = (c_norm1, c_q, c_k, c_v, c_rope, c_attn, c_o, c_norm2, c_gate, c_up, c_swiglu, c_down, hooks)
    return out, cache


def block_backward(dout, cache, cfg):
    """dout: (B, T, D) -> dx: (B, T, D), grads: the layer's weight gradients, keyed like ``w``."""
    c_norm1, c_q, c_k, c_v, c_rope, c_attn, c_o, c_norm2, c_gate, c_up, c_swiglu, c_down, hooks = cache
    grads = {}
    dout = hooks.grad("resid_post", dout)                                      # (B, T, D)
    # feed-forward branch.  out = h + ffn_out: dout reaches h directly and through ffn_out.
    ds = projection_backward(dout, c_down, "mlp.down_proj", grads, hooks)      # (B, T, F)
    ds = hooks.grad("mlp.swiglu", ds)
    dg, du = swiglu_backward_reference(ds, c_swiglu)                           # (B, T, F) each
    dn2_up = projection_backward(du, c_up, "mlp.up_proj", grads, hooks)        # (B, T, D)
    dn2_gate = projection_backward(dg, c_gate, "mlp.gate_proj", grads, hooks)  # (B, T, D)
    # n2 fed two projections, so its gradient is the sum of both
    dn2 = hooks.grad("post_attention_layernorm", dn2_gate + dn2_up)
    dh_ffn, grads["post_attention_layernorm.weight"] = rmsnorm_backward_reference(dn2, c_norm2)
    dh = hooks.grad("resid_mid", dout + dh_ffn)                                # (B, T, D)
    # attention branch.  h = x + attn_out: dh reaches x directly and through attn_out.
    dcontext = projection_backward(dh, c_o, "self_attn.o_proj", grads, hooks)  # (B, T, H*hd)
    dcontext = hooks.grad("self_attn.context", dcontext)
    # dk, dv: (B, K, T, hd), each kv head's gradient summed over the query heads that share it
    dq_rot, dk_rot, dv = attention_backward(split_heads(dcontext, cfg.n_heads), c_attn, hooks)
    dk = rope_backward_reference(hooks.grad("self_attn.k_rope", dk_rot), c_rope)   # (B, K, T, hd)
    dq = rope_backward_reference(hooks.grad("self_attn.q_rope", dq_rot), c_rope)   # (B, H, T, hd)
    dn1_v = projection_backward(merge_heads(dv), c_v, "self_attn.v_proj", grads, hooks)
    dn1_k = projection_backward(merge_heads(dk), c_k, "self_attn.k_proj", grads, hooks)
    dn1_q = projection_backward(merge_heads(dq), c_q, "self_attn.q_proj", grads, hooks)
    dn1 = hooks.grad("input_layernorm", dn1_q + dn1_k + dn1_v)                 # (B, T, D)
    dx_attn, grads["input_layernorm.weight"] = rmsnorm_backward_reference(dn1, c_norm1)
    dx = hooks.grad("resid_pre", dh + dx_attn)                                 # (B, T, D)
    return dx, grads


# ---- the model -----------------------------------------------------------------------------------
def dense_params(params):
    """``params`` with every QuantizedMatrix replaced by deq(W) in the dtype of the float parameters."""
    if not isinstance(params, dict) or not any(getattr(p, "quantized", False) for p in params.values()):
        return params                                  # (check_params says what is wrong with a bad one)
    dtype = params["model.norm.weight"].dtype
    return {name: dense(p, dtype) for name, p in params.items()}


def rope_tables(position_ids, cfg, dtype):
    """position_ids: int (T,) or (B, T) -> cos, sin: (T, hd/2) or (B, 1, T, hd/2) (heads broadcast),
    the angles position * f_i computed in float64, then cast to ``dtype``."""
    freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)   # (hd/2,)
    angles = np.asarray(position_ids, dtype=np.float64)[..., None] * freqs
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
    return (cos, sin) if angles.ndim == 2 else (cos[:, None], sin[:, None])


def model_forward(params, cfg, tokens, *, inputs_embeds=None, position_ids=None, segment_ids=None,
                  attention_mask=None, hooks=None, kv_cache=None):
    """tokens: int (B, T) (or None, given ``inputs_embeds`` (B, T, D)) -> logits: (B, T, V), cache
    for ``model_backward``.  ``kv_cache``: a continuation (``KVCache``), forward only."""
    hooks = hooks or NO_HOOKS
    params = dense_params(params)
    tokens, B, T = check_inputs(params, cfg, tokens, inputs_embeds, position_ids, segment_ids, attention_mask)
    S = 0 if kv_cache is None else check_continuation(kv_cache, cfg, B, T, position_ids, segment_ids, attention_mask)
    embed = params["model.embed_tokens.weight"]                                # (V, D)
    if inputs_embeds is None:
        x, _ = embedding_forward(tokens, embed)
        x = hooks("model.embed_tokens", x)                                     # (B, T, D)
    else:
        x = hooks("inputs_embeds", np.asarray(inputs_embeds, dtype=embed.dtype))
    positions = np.arange(S, S + T) if position_ids is None else position_ids
    cos, sin = rope_tables(positions, cfg, embed.dtype)                        # (T, hd/2) or (B, 1, T, hd/2)
    if kv_cache is None:
        visible = causal_visibility(T, segment_ids, attention_mask)            # (T, T) or (B, 1, T, T)
    else:                       # query i (at position S + i) sees keys 0 .. S + i
        visible = np.arange(S + T)[None, :] <= S + np.arange(T)[:, None]       # (T, S + T)
    block_caches = []
    for i in range(cfg.n_layers):
        kv = None if kv_cache is None else kv_cache.layers[i]
        x, cache = block_forward(x, layer_weights(params, i), cos, sin, cfg, visible, hooks.layer(i), kv)
        block_caches.append(cache)
    xn, c_norm = rmsnorm_forward_reference(x, params["model.norm.weight"], cfg.norm_eps)
    xn = hooks("model.norm", xn)                                               # (B, T, D)
    logits, c_head = linear_forward(xn, output_weight(params, cfg), hooks)
    logits = hooks("lm_head", logits)                                          # (B, T, V)
    return logits, (tokens, block_caches, c_norm, c_head, hooks)


def model_backward(dlogits, cache, params, cfg):
    """dlogits: (B, T, V), the loss's gradient with respect to the logits -> grads keyed like ``params``."""
    tokens, block_caches, c_norm, c_head, hooks = cache
    params = dense_params(params)
    grads = {}
    dlogits = hooks.grad("lm_head", dlogits)                                   # (B, T, V)
    dxn, d_out_weight = linear_backward(dlogits, c_head, hooks)                # (B, T, D), (V, D)
    dxn = hooks.grad("model.norm", dxn)
    dx, grads["model.norm.weight"] = rmsnorm_backward_reference(dxn, c_norm)   # (B, T, D)
    for i in reversed(range(cfg.n_layers)):
        dx, layer_grads = block_backward(dx, block_caches[i], cfg)
        grads.update({f"model.layers.{i}.{name}": g for name, g in layer_grads.items()})
    embed = params["model.embed_tokens.weight"]
    d_embed = np.zeros_like(embed)                                             # (V, D)
    if tokens is None:
        hooks.grad("inputs_embeds", dx)               # inputs_embeds given: its gradient is dx itself
    else:
        # row v of the table gets the sum of dx over the positions whose token is v
        dx = hooks.grad("model.embed_tokens", dx)
        scatter_add_rows_reference(tokens.reshape(-1), dx.reshape(-1, embed.shape[1]), d_embed)
    if cfg.tie_embeddings:
        d_embed += d_out_weight      # the table is used twice (lookup and output): the gradients add
    else:
        grads["lm_head.weight"] = d_out_weight
    grads["model.embed_tokens.weight"] = d_embed
    return {name: grads[name] for name in params}


def forward(params, cfg, tokens, lora=None, kv_cache=None, **inputs):
    """tokens: int (B, T) -> logits: (B, T, V), without dropout (on the adapters' inputs neither).
    ``inputs``: inputs_embeds, position_ids, segment_ids, attention_mask (see the module's docstring).
    ``kv_cache``: a ``KVCache`` (empty, or holding positions 0 .. S-1 of these sequences): the tokens
    run at positions S .. S+T-1 over it, and their keys and values are appended to it."""
    logits, _ = model_forward(params, cfg, tokens, hooks=with_options(None, params, lora=lora), kv_cache=kv_cache,
                              **inputs)
    return logits


def loss_and_grad(params, cfg, tokens, targets, dropout_masks=None, lora=None, lora_masks=None, *,
                  reduction="mean", hooks=None, **inputs):
    """Cross-entropy of ``targets`` (B, T) (ids, or -100 for positions that do not count), its mean
    over the counted positions (``reduction="sum"``: their sum), and its gradient for every
    parameter: (loss as a float, grads keyed like ``params``).  ``targets[b, t]`` is the token that
    should follow position t: the next token, already shifted (Hugging Face's ``labels=`` shifts).
    With ``lora`` ({module name: (A, B, scale)}) only the adapters train: grads holds
    "<module>.lora_A.weight" and "<module>.lora_B.weight" for each adapted module, and nothing else;
    lora_masks ({module name: (B, T, in) mask}) is the dropout on those adapters' inputs (none when absent).

    dropout_masks: None for no dropout, else one (attn_mask, ffn_mask) pair per layer, each
    (B, T, D) with entries 0 or 1/(1-p) (as ``npllama.layers.dropout.dropout_forward`` draws them),
    multiplied into the attention output projection and the feed-forward output before their
    residual adds.  Both act through the hooks (``with_options``, at the end of the file).
    ``inputs``: inputs_embeds, position_ids, segment_ids, attention_mask."""
    hooks = with_options(hooks, params, dropout_masks, lora, lora_masks)
    logits, cache = model_forward(params, cfg, tokens, hooks=hooks, **inputs)
    B, T, V = logits.shape
    targets = check_targets(targets, B, T, V)
    loss, c_loss = cross_entropy_forward_reference(logits.reshape(B * T, V), targets.reshape(B * T))
    count = c_loss[3]                                     # the positions that count (at least 1)
    dloss = 1.0 if reduction == "mean" else float(count)  # a sum is count times the mean
    # backward: the forward's steps in reverse, each layer's backward fed its output's gradient
    dlogits = cross_entropy_backward_reference(dloss, c_loss).reshape(B, T, V)
    grads = model_backward(dlogits, cache, params, cfg)
    return loss * dloss, (hooks.lora.gradients() if lora else grads)     # LoRA: only the adapters train


# ---- a continuation over a key/value cache --------------------------------------------------------
# A token's key and value depend only on the tokens up to it, so a sequence can be run in pieces:
# the first S positions once, keeping each layer's rotated keys and values, then the next T tokens
# at positions S .. S+T-1, their queries attending to the kept keys and values and to their own,
# causally.  That gives the logits the whole sequence gives at those positions: what a chat's next
# turn runs (npllama/generate/decoding.py, ``KVCacheDecoder.resume``), as Hugging Face's
# past_key_values does.
class LayerKV:
    """One layer's rotated keys and values of the positions run so far: (B, K, S, hd) each."""

    def __init__(self):
        self.keys = self.values = None

    def extend(self, k, v):
        """Append the next positions' k, v: (B, K, T, hd) -> all of them, (B, K, S + T, hd)."""
        if self.keys is not None:
            k, v = np.concatenate([self.keys, k], axis=2), np.concatenate([self.values, v], axis=2)
        self.keys, self.values = k, v
        return k, v


class KVCache:
    """Every layer's ``LayerKV``; ``length``: the positions they hold (S)."""

    def __init__(self, cfg):
        self.layers = [LayerKV() for _ in range(cfg.n_layers)]

    @property
    def length(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[2]


def check_continuation(kv_cache, cfg, B, T, position_ids, segment_ids, attention_mask) -> int:
    """The positions ``kv_cache`` holds, S, when it holds B sequences and T more positions fit in
    the context; else an InputError."""
    if not isinstance(kv_cache, KVCache) or len(kv_cache.layers) != cfg.n_layers:
        raise InputError(f"kv_cache must be a KVCache of {cfg.n_layers} layers, got {type(kv_cache).__name__}")
    keys = kv_cache.layers[0].keys
    if keys is not None and keys.shape[0] != B:
        raise InputError(f"the key/value cache holds {keys.shape[0]} sequences, the tokens are {B}")
    if any(a is not None for a in (position_ids, segment_ids, attention_mask)):
        raise InputError("a continuation over a key/value cache takes no position_ids, segment_ids or attention_mask")
    S = kv_cache.length
    if S + T > cfg.max_seq_len:
        raise InputError(f"{S} cached positions and {T} more are longer than max_seq_len ({cfg.max_seq_len})")
    return S



# ==== the machinery: names, recording, patching, bfloat16, input checks ===========================
BLOCK_ACTIVATIONS = (   # a block's named activations, in the order the forward computes them
    "resid_pre", "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.q_rope", "self_attn.k_rope", "self_attn.scores", "self_attn.probs", "self_attn.context",
    "self_attn.o_proj", "resid_mid", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.swiglu",
    "mlp.down_proj", "resid_post")


def activation_shapes(cfg, B, T, inputs_embeds=False) -> dict:
    """Every named activation's shape, in the order the forward computes them."""
    D, F, V, H, K, hd = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    inner = {"self_attn.q_proj": (B, T, H * hd), "self_attn.k_proj": (B, T, K * hd),
             "self_attn.v_proj": (B, T, K * hd), "self_attn.q_rope": (B, H, T, hd),
             "self_attn.k_rope": (B, K, T, hd), "self_attn.scores": (B, H, T, T), "self_attn.probs": (B, H, T, T),
             "self_attn.context": (B, T, H * hd), "mlp.gate_proj": (B, T, F), "mlp.up_proj": (B, T, F),
             "mlp.swiglu": (B, T, F)}
    shapes = {"inputs_embeds" if inputs_embeds else "model.embed_tokens": (B, T, D)}
    for i in range(cfg.n_layers):
        shapes.update({f"model.layers.{i}.{name}": inner.get(name, (B, T, D)) for name in BLOCK_ACTIVATIONS})
    shapes.update({"model.norm": (B, T, D), "lm_head": (B, T, V)})
    return shapes


def round_to_bfloat16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept in float32: bfloat16 is
    float32's upper 16 bits, so rounding is integer arithmetic on the bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


class Hooks:
    """What a run does at each named point: ``hooks(name, x)`` in the forward, ``hooks.grad(name, dx)``
    in the backward.  ``record``: keep every activation (``activations``) and gradient (``grads``,
    "grad.<name>"); ``patches``: {name: delta} added to those activations (the rest of the forward
    sees x + delta); ``bfloat16``: round the inputs of every product to bfloat16 (float32 sums);
    ``dropout``, ``lora``: the optional pieces below (``ResidualDropout``, ``LoRA``), None when off.
    ``layer(i)`` gives block i's hooks, whose names are relative to "model.layers.{i}."."""

    def __init__(self, record=False, patches=None, bfloat16=False, dropout=None, lora=None):
        self.record, self.patches, self.bfloat16 = record, dict(patches or {}), bfloat16
        self.dropout, self.lora = dropout, lora
        self.activations, self.grads, self.prefix = {}, {}, ""

    def layer(self, i):
        child = copy.copy(self)            # the same stores and settings, another prefix
        child.prefix = f"model.layers.{i}."
        return child

    def __call__(self, name, x):
        name = self.prefix + name
        if name in self.patches:
            x = x + self.patches[name]
        if self.lora:
            x = self.lora.forward(name, x)         # a LoRA projection's output gains its adapter's term
        if self.record:
            self.activations[name] = x
        if self.dropout:
            x = self.dropout.forward(name, x)      # recorded as the module's output, dropped for the rest
        return x

    def grad(self, name, dx):
        name = self.prefix + name
        if self.dropout:
            dx = self.dropout.backward(name, dx)
        if self.lora:
            dx = self.lora.backward(name, dx)
        if self.record:
            self.grads["grad." + name] = dx
        return dx

    def matmul(self, a, b):
        if self.bfloat16:
            a, b = round_to_bfloat16(a), round_to_bfloat16(b)
        return a @ b


NO_HOOKS = Hooks()


@dataclasses.dataclass
class Run:
    """What ``run_with_cache`` returns.  ``activations``: every named activation (forward order);
    ``grads``: "grad.<activation>" for each of them and "grad.<parameter>" for each parameter
    (empty without targets or dlogits); ``loss``: None without targets."""
    logits: np.ndarray
    loss: float | None
    activations: dict
    grads: dict

    def __getitem__(self, name):
        return self.grads[name] if name.startswith("grad.") else self.activations[name]

    def tensors(self) -> dict:
        """Activations then gradients in one dict (the golden file's tensors, without tokens and targets)."""
        return {**self.activations, **self.grads}


DTYPES = ("float64", "float32", "bfloat16")


def run_with_cache(params, cfg, tokens=None, targets=None, *, dtype=None, reduction="mean", dlogits=None,
                   patches=None, dropout_masks=None, lora=None, lora_masks=None, **inputs) -> Run:
    """One forward (and, given ``targets`` or ``dlogits``, one backward) of the reference model, every
    named activation and gradient kept: a ``Run`` (logits, loss, activations, grads).

    tokens: int (B, T), or None with ``inputs_embeds=`` (B, T, D) (its gradient is "grad.inputs_embeds");
    targets: (B, T), already shifted, -100 where not counted; reduction: "mean" or "sum";
    dlogits: (B, T, V), instead of targets: a backward from this gradient of the logits (what a fused
    or z-loss implementation compares), no loss;
    dtype: "float64", "float32" or "bfloat16" (float32 with every product's inputs rounded to bfloat16);
    default: the parameters' own;
    patches: {activation name: delta} added to those activations (activation patching; the
    gradients are then those of the patched run);
    position_ids, segment_ids, attention_mask: see the module's docstring."""
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if targets is not None and dlogits is not None:
        raise InputError("give targets or dlogits, not both")
    if dtype is not None:
        work = np.float64 if dtype == "float64" else np.float32
        params = {name: np.asarray(p).astype(work, copy=False) for name, p in params.items()}
        if inputs.get("inputs_embeds") is not None:
            inputs["inputs_embeds"] = np.asarray(inputs["inputs_embeds"]).astype(work, copy=False)
    hooks = Hooks(record=True, patches=patches, bfloat16=dtype == "bfloat16")
    if patches:
        check_patches(patches, params, cfg, tokens, inputs.get("inputs_embeds"))
    loss = None
    if targets is not None:
        loss, grads = loss_and_grad(params, cfg, tokens, targets, dropout_masks, lora, lora_masks,
                                    reduction=reduction, hooks=hooks, **inputs)
    else:
        hooks = with_options(hooks, params, dropout_masks, lora, lora_masks)
        logits, cache = model_forward(params, cfg, tokens, hooks=hooks, **inputs)
        grads = {}
        if dlogits is not None:
            dlogits = np.asarray(dlogits)
            if dlogits.shape != logits.shape or dlogits.dtype.kind != "f":
                raise InputError(f"dlogits must be a float array of the logits' shape {logits.shape}, got "
                                 f"{dlogits.dtype} {dlogits.shape}")
            grads = model_backward(dlogits.astype(logits.dtype, copy=False), cache, params, cfg)
            grads = hooks.lora.gradients() if lora else grads
    logits = hooks.activations["lm_head"]
    # activations in forward order; their gradients in backward order (as recorded), then the parameters'
    grads = {**hooks.grads, **{"grad." + name: g for name, g in grads.items()}}
    return Run(logits, loss, hooks.activations, grads)


# ==== optional pieces for training: residual dropout and LoRA, at the named points ================
# Neither appears in the model above: each acts where the forward names an activation
# (``hooks(name, x)``) and where the backward names its gradient (``hooks.grad(name, dx)``).
def with_options(hooks, params, dropout_masks=None, lora=None, lora_masks=None):
    """``hooks`` (None: a new Hooks) with residual dropout and LoRA adapters switched on when given
    (the same stores, so what it records is recorded in ``hooks``)."""
    hooks = hooks or Hooks()
    if dropout_masks is None and not lora:
        return hooks
    hooks = copy.copy(hooks)
    hooks.dropout = None if dropout_masks is None else ResidualDropout(dropout_masks)
    hooks.lora = LoRA(lora, lora_masks, params) if lora else None
    return hooks


class ResidualDropout:
    """Dropout on each branch's output before its residual add, with masks given (drawn by
    ``npllama.layers.dropout.dropout_forward``): block i's attention output ("self_attn.o_proj")
    times masks[i][0], its feed-forward output ("mlp.down_proj") times masks[i][1], each (B, T, D)
    of entries 0 or 1/(1-p).  The backward multiplies those outputs' gradients by the same masks."""

    def __init__(self, masks):
        self.masks = {f"model.layers.{i}.{point}": mask for i, pair in enumerate(masks)
                      for point, mask in zip(("self_attn.o_proj", "mlp.down_proj"), pair)}

    def forward(self, name, x):
        mask = self.masks.get(name)
        return x if mask is None else x * mask

    def backward(self, name, dx):
        return dropout_backward(dx, self.masks.get(name))


PROJECTION_INPUTS = {   # each projection's input: the activation named just before it
    "self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm", "self_attn.o_proj": "self_attn.context",
    "mlp.gate_proj": "post_attention_layernorm", "mlp.up_proj": "post_attention_layernorm",
    "mlp.down_proj": "mlp.swiglu"}


class LoRA:
    """LoRA adapters (npllama/layers/lora.py, docs/12-lora.md): ``lora`` maps a projection's module
    name ("model.layers.0.self_attn.q_proj") to (A, B, scale); ``masks`` maps some of those names to
    a dropout mask on the adapter's input (B, T, in).  The adapted projection computes
    y = x W^T + scale dropout(x) A^T B^T, its base W frozen:

    forward:  x passes by first, under its own name (PROJECTION_INPUTS), and is kept; at the
              projection's output the adapter's term is added;
    backward: at the output, from dy, the adapter's dA and dB and its share of dx, which joins x's
              gradient when the backward reaches x's name (after every projection that reads x)."""

    def __init__(self, lora, masks, params):
        self.adapters, self.masks = dict(lora), dict(masks or {})
        self.input_of = {}                                  # projection -> the name of its input
        for name in self.adapters:
            layer, _, projection = name.removeprefix("model.layers.").partition(".")
            known = name.startswith("model.layers.") and projection in PROJECTION_INPUTS
            if not (known and name + ".weight" in params):
                raise ValueError(f"LoRA adapter {name!r} names no projection of the model")
            self.input_of[name] = f"model.layers.{layer}.{PROJECTION_INPUTS[projection]}"
        self.inputs, self.caches, self.input_grads, self.grads = {}, {}, {}, {}

    def forward(self, name, x):
        for projection, input_name in self.input_of.items():
            if input_name == name:
                self.inputs[projection] = x
        if name not in self.adapters:
            return x
        a, b, scale = self.adapters[name]
        term, self.caches[name] = lora_adapter_forward_reference(self.inputs.pop(name), a, b, scale,
                                                                 self.masks.get(name))
        return x + term

    def backward(self, name, dx):
        if name in self.adapters:                       # dx: the gradient of the projection's output
            dx_input, dA, dB = lora_adapter_backward_reference(dx, self.caches.pop(name))
            self.grads[name + ".lora_A.weight"], self.grads[name + ".lora_B.weight"] = dA, dB
            input_name = self.input_of[name]
            self.input_grads[input_name] = self.input_grads.get(input_name, 0) + dx_input
        if name in self.input_grads:                    # dx: an input's gradient, the base's part
            dx = dx + self.input_grads.pop(name)
        return dx

    def gradients(self):
        """The adapters' gradients, "<module>.lora_A.weight" and "<module>.lora_B.weight" for each."""
        return {f"{name}.lora_{m}.weight": self.grads[f"{name}.lora_{m}.weight"]
                for name in self.adapters for m in "AB"}


# ---- input checks: one clear error each --------------------------------------------------------------
def _integer_array(value, what):
    a = np.asarray(value)
    if a.dtype.kind not in "iu":
        raise InputError(f"{what} must be integers, got dtype {a.dtype}")
    return a


def check_params(params, cfg):
    """Every parameter of ``cfg`` present with its shape, nothing else, one float dtype."""
    if not isinstance(params, dict):
        raise InputError(f"params must be a dict of arrays keyed by Hugging Face names, got {type(params).__name__}")
    layout = dict(parameter_layout(cfg))
    missing = [name for name in layout if name not in params]
    extra = sorted(set(params) - set(layout))
    if missing:
        raise InputError(f"params lack {len(missing)} parameter(s) the config needs: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    if extra:
        raise InputError(f"params hold {len(extra)} name(s) the config has no parameter for: {', '.join(extra[:5])}"
                         + (" ..." if len(extra) > 5 else ""))
    dtypes = set()
    for name, shape in layout.items():
        p = params[name]
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            raise InputError(f"parameter {name} must be a float NumPy array, got "
                             f"{getattr(p, 'dtype', type(p).__name__)}")
        if p.shape != shape:
            raise InputError(f"parameter {name} has shape {p.shape}, the config gives {shape}")
        dtypes.add(p.dtype)
    if len(dtypes) > 1:
        raise InputError(f"parameters must share one dtype, got {', '.join(sorted(map(str, dtypes)))}")


def check_inputs(params, cfg, tokens, inputs_embeds, position_ids, segment_ids, attention_mask):
    """The checked tokens (or None) and B, T; an InputError naming the first problem."""
    check_params(params, cfg)
    if (tokens is None) == (inputs_embeds is None):
        raise InputError("give tokens or inputs_embeds, exactly one of them")
    if tokens is not None:
        tokens = _integer_array(tokens, "tokens")
        if tokens.ndim != 2:
            raise InputError(f"tokens must be 2-D (batch, positions), got shape {tokens.shape}")
        bad = (tokens < 0) | (tokens >= cfg.vocab_size)
        if bad.any():
            raise InputError(f"token id {int(tokens[bad][0])} at {tuple(int(i) for i in np.argwhere(bad)[0])} "
                             f"is outside [0, {cfg.vocab_size})")
        B, T = tokens.shape
    else:
        e = np.asarray(inputs_embeds)
        if e.ndim != 3 or e.shape[2] != cfg.dim or e.dtype.kind != "f":
            raise InputError(f"inputs_embeds must be a float array (batch, positions, {cfg.dim}), got "
                             f"{e.dtype} {e.shape}")
        B, T = e.shape[:2]
    if T == 0 or B == 0:
        raise InputError(f"the batch is empty: (batch, positions) = ({B}, {T})")
    if T > cfg.max_seq_len:
        raise InputError(f"sequence of {T} positions is longer than max_seq_len ({cfg.max_seq_len})")
    check_packing(cfg, B, T, position_ids, segment_ids, attention_mask)
    return tokens, B, T


def check_targets(targets, B, T, V):
    targets = _integer_array(targets, "targets")
    if targets.shape != (B, T):
        raise InputError(f"targets must have the tokens' shape ({B}, {T}), got {targets.shape}")
    bad = ((targets < 0) | (targets >= V)) & (targets != IGNORE_INDEX)
    if bad.any():
        raise InputError(f"target {int(targets[bad][0])} at {tuple(int(i) for i in np.argwhere(bad)[0])} is "
                         f"outside [0, {V}) and not {IGNORE_INDEX} (ignored)")
    return targets


def check_patches(patches, params, cfg, tokens, inputs_embeds):
    B, T = (np.shape(tokens) if tokens is not None else np.shape(inputs_embeds)[:2])
    shapes = activation_shapes(cfg, B, T, inputs_embeds is not None)
    for name, delta in patches.items():
        if name not in shapes:
            raise InputError(f"patch {name!r} names no activation (e.g. {next(iter(shapes))!r}; "
                             "npllama.reference.activation_shapes lists them)")
        try:
            fits = np.broadcast_shapes(np.shape(delta), shapes[name]) == shapes[name]
        except ValueError:
            fits = False
        if not fits:
            raise InputError(f"patch for {name} has shape {np.shape(delta)}, the activation {shapes[name]}")
