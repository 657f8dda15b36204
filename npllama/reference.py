"""The whole Llama, forward and backward, in plain NumPy: the model to read first.

    x_0    = Embed(tokens)                                             (B, T, D)
    h_l    = x_l + Dropout(W_o Attention(RoPE(W_q n), RoPE(W_k n), W_v n)),   n = RMSNorm(x_l)
    x_l+1  = h_l + Dropout(W_down SwiGLU(W_gate m, W_up m)),                  m = RMSNorm(h_l)
    logits = RMSNorm(x_L) W_out^T                                      (B, T, V)
    loss   = mean over targets != -100 of CrossEntropy(logits, targets)

Read it top to bottom, in this order:
  1. ``block_forward``: one decoder block, every step one call to a layer's function;
  2. ``model_forward`` / ``forward``: embedding -> n_layers blocks -> final RMSNorm -> logits;
  3. ``loss_and_grad``: the loss, then the backward in the reverse order of the forward;
  4. ``block_backward``: ``block_forward`` read from the bottom up.
The layers' own derivations are in the docstrings of npllama/layers/<layer>.py (and at length in
docs/); each ``*_reference`` function used here sits next to the Numba kernel that computes the
same thing fast.

Every layer follows CS231n's pattern: ``out, cache = layer_forward(x, ...)`` keeps what its backward
needs, and ``dx, dw = layer_backward(dout, cache)`` returns the gradient of the loss with respect
to the layer's inputs given the gradient ``dout`` with respect to its output.  Chaining them in
reverse is the whole of backpropagation; a residual add passes its gradient to both summands.

This is the source of truth: ``npllama.model.Llama`` (preallocated buffers, fused Numba kernels,
threads) is tested equal to it to 1e-12 relative in float64 (tests/test_reference.py), and this
file to Hugging Face transformers and to finite differences.

Shapes: B batch, T positions, D model width, H query heads, K key/value heads (H = K: multi-head,
1 < K < H: grouped-query, K = 1: multi-query), hd head width, F SwiGLU width, V vocabulary.
``params`` and the returned ``grads`` are dicts keyed by the Hugging Face names
(``npllama.model.parameter_layout``); ``cfg`` is a ``LlamaConfig``.

LoRA (npllama/layers/lora.py, docs/12-lora.md): ``lora`` maps a projection's module name
("model.layers.0.self_attn.q_proj", ...) to its adapter (A, B, scale); that projection then computes
x W^T + scale dropout(x) A^T B^T, and ``loss_and_grad`` returns the adapters' gradients only, keyed
as PEFT names them without its "base_model.model." prefix ("model.layers.0.self_attn.q_proj.lora_A.weight",
"...lora_B.weight"): every other weight is frozen.
"""
import numpy as np

from .layers.attention import attention_backward_reference, attention_forward_reference
from .layers.cross_entropy import cross_entropy_backward_reference, cross_entropy_forward_reference
from .layers.dropout import dropout_backward
from .layers.embedding import embedding_forward, scatter_add_rows_reference
from .layers.linear import linear_backward, linear_forward
from .layers.lora import lora_backward_reference, lora_forward_reference
from .layers.rmsnorm import rmsnorm_backward_reference, rmsnorm_forward_reference
from .layers.rope import rope_backward_reference, rope_cos_sin, rope_forward_reference, rope_frequencies
from .layers.swiglu import swiglu_backward_reference, swiglu_forward_reference


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


def projection_forward(x, w, name, adapters):
    """x W^T for the layer's projection ``name`` ("self_attn.q_proj", ...), plus its LoRA term
    scale dropout(x) A^T B^T when ``adapters`` has (A, B, scale, mask) for it: (y, cache)."""
    weight = w[name + ".weight"]
    if name not in adapters:
        return linear_forward(x, weight)
    a, b, scale, mask = adapters[name]
    return lora_forward_reference(x, weight, a, b, scale, mask)


def projection_backward(dy, cache, name, grads):
    """dx; into ``grads`` the weight's gradient, or for a LoRA projection (W frozen) dA and dB."""
    if len(cache) == 2:                                                # linear_forward's (x, weight)
        dx, grads[name + ".weight"] = linear_backward(dy, cache)
        return dx
    dx, grads[name + ".lora_A.weight"], grads[name + ".lora_B.weight"] = lora_backward_reference(dy, cache)
    return dx


# ---- one decoder block ---------------------------------------------------------------------------
def block_forward(x, w, cos, sin, cfg, masks=None, adapters=None):
    """x: (B, T, D) -> out: (B, T, D), cache.  w: one layer's weights (``layer_weights``);
    cos, sin: (T, hd/2); masks: None (no dropout) or (attn_mask, ffn_mask), each (B, T, D);
    adapters: LoRA adapters by projection ("self_attn.q_proj": (A, B, scale, mask or None))."""
    H, K = cfg.n_heads, cfg.n_kv_heads
    adapters = adapters or {}
    mask_attn, mask_ffn = (None, None) if masks is None else masks
    # attention branch:  h = x + Dropout(W_o Attention(RoPE(q), RoPE(k), v))
    n1, c_norm1 = rmsnorm_forward_reference(x, w["input_layernorm.weight"], cfg.norm_eps)  # (B, T, D)
    q, c_q = projection_forward(n1, w, "self_attn.q_proj", adapters)           # (B, T, H*hd)
    k, c_k = projection_forward(n1, w, "self_attn.k_proj", adapters)           # (B, T, K*hd)
    v, c_v = projection_forward(n1, w, "self_attn.v_proj", adapters)           # (B, T, K*hd)
    q_rot, c_rope = rope_forward_reference(split_heads(q, H), cos, sin)       # (B, H, T, hd)
    k_rot, _ = rope_forward_reference(split_heads(k, K), cos, sin)            # (B, K, T, hd)
    o, c_attn = attention_forward_reference(q_rot, k_rot, split_heads(v, K))  # (B, H, T, hd)
    a, c_o = projection_forward(merge_heads(o), w, "self_attn.o_proj", adapters)   # (B, T, D)
    if mask_attn is not None:
        a = a * mask_attn             # dropout with a given mask: 0 or 1/(1-p) per entry
    h = x + a                                                                  # (B, T, D)
    # feed-forward branch:  out = h + Dropout(W_down SwiGLU(W_gate n2, W_up n2))
    n2, c_norm2 = rmsnorm_forward_reference(h, w["post_attention_layernorm.weight"], cfg.norm_eps)
    g, c_gate = projection_forward(n2, w, "mlp.gate_proj", adapters)           # (B, T, F)
    u, c_up = projection_forward(n2, w, "mlp.up_proj", adapters)               # (B, T, F)
    s, c_swiglu = swiglu_forward_reference(g, u)                               # (B, T, F)
    f, c_down = projection_forward(s, w, "mlp.down_proj", adapters)            # (B, T, D)
    if mask_ffn is not None:
        f = f * mask_ffn
    out = h + f                                                                # (B, T, D)
    cache = (c_norm1, c_q, c_k, c_v, c_rope, c_attn, c_o, mask_attn,
             c_norm2, c_gate, c_up, c_swiglu, c_down, mask_ffn)
    return out, cache


def block_backward(dout, cache, cfg):
    """dout: (B, T, D) -> dx: (B, T, D), grads: the layer's weight gradients, keyed like ``w``
    (for a LoRA projection its adapter's, "self_attn.q_proj.lora_A.weight", ..., instead)."""
    (c_norm1, c_q, c_k, c_v, c_rope, c_attn, c_o, mask_attn,
     c_norm2, c_gate, c_up, c_swiglu, c_down, mask_ffn) = cache
    grads = {}
    # feed-forward branch.  out = h + f: dout reaches h directly and through f.
    df = dropout_backward(dout, mask_ffn)                                      # (B, T, D)
    ds = projection_backward(df, c_down, "mlp.down_proj", grads)               # (B, T, F)
    dg, du = swiglu_backward_reference(ds, c_swiglu)                           # (B, T, F) each
    dn2_gate = projection_backward(dg, c_gate, "mlp.gate_proj", grads)         # (B, T, D)
    dn2_up = projection_backward(du, c_up, "mlp.up_proj", grads)               # (B, T, D)
    # n2 fed two projections, so its gradient is the sum of both
    dh_ffn, grads["post_attention_layernorm.weight"] = rmsnorm_backward_reference(dn2_gate + dn2_up, c_norm2)
    dh = dout + dh_ffn                                                         # (B, T, D)
    # attention branch.  h = x + a: dh reaches x directly and through a.
    da = dropout_backward(dh, mask_attn)                                       # (B, T, D)
    do = projection_backward(da, c_o, "self_attn.o_proj", grads)               # (B, T, H*hd)
    # dk, dv: (B, K, T, hd), each kv head's gradient summed over the query heads that share it
    dq_rot, dk_rot, dv = attention_backward_reference(split_heads(do, cfg.n_heads), c_attn)
    dq = rope_backward_reference(dq_rot, c_rope)                               # (B, H, T, hd)
    dk = rope_backward_reference(dk_rot, c_rope)                               # (B, K, T, hd)
    dn1_q = projection_backward(merge_heads(dq), c_q, "self_attn.q_proj", grads)
    dn1_k = projection_backward(merge_heads(dk), c_k, "self_attn.k_proj", grads)
    dn1_v = projection_backward(merge_heads(dv), c_v, "self_attn.v_proj", grads)
    dx_attn, grads["input_layernorm.weight"] = rmsnorm_backward_reference(dn1_q + dn1_k + dn1_v, c_norm1)
    dx = dh + dx_attn                                                          # (B, T, D)
    return dx, grads


# ---- the model -----------------------------------------------------------------------------------
def layer_adapters(lora, lora_masks, i):
    """Layer i's LoRA adapters keyed by projection: {"self_attn.q_proj": (A, B, scale, mask or None)}."""
    prefix = f"model.layers.{i}."
    return {name[len(prefix):]: (a, b, scale, lora_masks.get(name))
            for name, (a, b, scale) in lora.items() if name.startswith(prefix)}


def model_forward(params, cfg, tokens, dropout_masks=None, lora=None, lora_masks=None):
    """tokens: int (B, T) -> logits: (B, T, V), cache for ``loss_and_grad``'s backward."""
    lora, lora_masks = lora or {}, lora_masks or {}
    for name in lora:
        if not (name.startswith("model.layers.") and name + ".weight" in params):
            raise ValueError(f"LoRA adapter {name!r} names no projection of the model")
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    embed = params["model.embed_tokens.weight"]                                # (V, D)
    freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)   # (hd/2,)
    cos, sin = rope_cos_sin(np.arange(T), freqs, embed.dtype)                  # (T, hd/2) each
    x, _ = embedding_forward(tokens, embed)                                    # (B, T, D)
    block_caches = []
    for i in range(cfg.n_layers):
        masks = None if dropout_masks is None else dropout_masks[i]
        x, cache = block_forward(x, layer_weights(params, i), cos, sin, cfg, masks,
                                 layer_adapters(lora, lora_masks, i))
        block_caches.append(cache)
    xn, c_norm = rmsnorm_forward_reference(x, params["model.norm.weight"], cfg.norm_eps)  # (B, T, D)
    logits, c_head = linear_forward(xn, output_weight(params, cfg))           # (B, T, V)
    return logits, (tokens, block_caches, c_norm, c_head)


def forward(params, cfg, tokens, lora=None):
    """tokens: int (B, T) -> logits: (B, T, V), without dropout (on the adapters' inputs neither)."""
    logits, _ = model_forward(params, cfg, tokens, lora=lora)
    return logits


def loss_and_grad(params, cfg, tokens, targets, dropout_masks=None, lora=None, lora_masks=None):
    """Mean cross-entropy of ``targets`` (B, T) (ids, or -100 for positions that do not count) and
    its gradient for every parameter: (loss as a float, grads keyed like ``params``).  With ``lora``
    ({module name: (A, B, scale)}) only the adapters train: grads holds "<module>.lora_A.weight" and
    "<module>.lora_B.weight" for each adapted module, and nothing else; lora_masks
    ({module name: (B, T, in) mask}) is the dropout on those adapters' inputs (none when absent).

    dropout_masks: None for no dropout, else one (attn_mask, ffn_mask) pair per layer, each
    (B, T, D) with entries 0 or 1/(1-p) (as ``npllama.layers.dropout.dropout_forward`` draws them),
    multiplied into the attention output projection and the feed-forward output before their
    residual adds."""
    logits, (tokens, block_caches, c_norm, c_head) = model_forward(params, cfg, tokens, dropout_masks, lora,
                                                                   lora_masks)
    B, T, V = logits.shape
    targets = np.asarray(targets).reshape(B * T)
    loss, c_loss = cross_entropy_forward_reference(logits.reshape(B * T, V), targets)

    # backward: the forward's steps in reverse, each layer's backward fed its output's gradient
    grads = {}
    dlogits = cross_entropy_backward_reference(1.0, c_loss).reshape(B, T, V)   # dloss/dloss = 1
    dxn, d_out_weight = linear_backward(dlogits, c_head)                       # (B, T, D), (V, D)
    dx, grads["model.norm.weight"] = rmsnorm_backward_reference(dxn, c_norm)   # (B, T, D)
    for i in reversed(range(cfg.n_layers)):
        dx, layer_grads = block_backward(dx, block_caches[i], cfg)
        grads.update({f"model.layers.{i}.{name}": g for name, g in layer_grads.items()})
    # embedding: row v of the table gets the sum of dx over the positions whose token is v
    embed = params["model.embed_tokens.weight"]
    d_embed = np.zeros_like(embed)                                             # (V, D)
    scatter_add_rows_reference(tokens.reshape(-1), dx.reshape(B * T, -1), d_embed)
    if cfg.tie_embeddings:
        d_embed += d_out_weight      # the table is used twice (lookup and output): the gradients add
    else:
        grads["lm_head.weight"] = d_out_weight
    grads["model.embed_tokens.weight"] = d_embed
    if lora:         # the base is frozen (its gradients above are a reference's convenience, unused)
        return loss, {f"{name}.lora_{m}.weight": grads[f"{name}.lora_{m}.weight"] for name in lora for m in "AB"}
    return loss, {name: grads[name] for name in params}
