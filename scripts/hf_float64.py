"""Make transformers' Llama compute entirely in float64, for reference values accurate to ~1e-13.

A ``LlamaForCausalLM`` converted to float64 is *not* float64 throughout (transformers 5.24):

* ``LlamaRMSNorm.forward`` casts the activations to float32 before normalising;
* ``LlamaRotaryEmbedding`` builds ``inv_freq`` with ``dtype=torch.float`` (also for llama3 scaling) and
  its forward computes ``position * inv_freq`` and cos/sin in float32, casting to float64 afterwards;
* ``eager_attention_forward`` runs the softmax with ``dtype=torch.float32``;
* the built-in causal-LM loss does ``logits.float()`` (and shifts the labels by one).

Each of these loses ~1e-7 relative.  ``float64_llama()`` swaps in float64 versions of the first three
for the duration of a ``with`` block; ``causal_lm_loss`` replaces the fourth.  Models must be created
with ``attn_implementation="eager"`` so that the patched attention is the one used.

The float64 RoPE tables follow the transformers formulas exactly:

    inv_freq_i = 1 / theta^(2i / head_dim),  i = 0 .. head_dim/2 - 1
    llama3:  wavelen = 2 pi / inv_freq
             wavelen < L/high_freq_factor  -> inv_freq            (high frequencies kept)
             wavelen > L/low_freq_factor   -> inv_freq / factor   (low frequencies slowed down)
             otherwise, s = (L / wavelen - low) / (high - low):
                          (1 - s) inv_freq / factor + s inv_freq
             with L = original_max_position_embeddings
    cos/sin(position * inv_freq), duplicated over the two halves of the head (rotate_half layout).

This module is imported by scripts/make_hf_fixture.py, scripts/make_generate_fixture.py and (via
importlib, by path) by tests/test_hf_fixture.py.  It needs torch and transformers.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama


def rope_inv_freq_float64(config) -> torch.Tensor:
    """RoPE inverse frequencies (head_dim/2,) in float64, for rope_type 'default' or 'llama3'."""
    params = config.rope_parameters
    theta = float(params["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise NotImplementedError(f"float64 RoPE for rope_type {rope_type!r} is not implemented")
    factor = float(params["factor"])
    low = float(params["low_freq_factor"])
    high = float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _rmsnorm_forward(self, hidden_states):
    # Same as LlamaRMSNorm.forward without the float32 round trip: w * x / sqrt(mean(x^2) + eps).
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_forward(self, x, position_ids):
    # inv_freq recomputed in float64 from the config (the buffer holds float32-rounded values).
    inv_freq = rope_inv_freq_float64(self.config).to(x.device)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * self.attention_scaling
    sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # Same as modeling_llama.eager_attention_forward with the softmax in the query's dtype.
    key_states = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value_states = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


@contextlib.contextmanager
def float64_llama():
    """Within the block, transformers' Llama keeps float64 activations float64 everywhere."""
    saved = (modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaRotaryEmbedding.forward,
             modeling_llama.eager_attention_forward)
    modeling_llama.LlamaRMSNorm.forward = _rmsnorm_forward
    modeling_llama.LlamaRotaryEmbedding.forward = _rotary_forward
    modeling_llama.eager_attention_forward = _eager_attention_forward
    try:
        yield
    finally:
        (modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaRotaryEmbedding.forward,
         modeling_llama.eager_attention_forward) = saved


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions with targets != -100, in the logits' dtype.

    ``targets[b, t]`` is the target of ``logits[b, t]`` (no shift, unlike transformers' built-in loss):
        L = -(1/N) sum_{(b,t): y_bt != -100} log softmax(logits_bt)[y_bt]
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="mean")
