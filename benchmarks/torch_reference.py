"""A hand-written Llama in PyTorch: the reference npllama is benchmarked (and sanity-checked) against.

Benchmark-only code: it lives in benchmarks/ and is never imported by the npllama package.

Architecture (identical to Hugging Face's LlamaForCausalLM, so HF weights load 1:1):

    h = embed[tokens]
    for each layer:
        a = RMSNorm(h);  q, k, v = a·Wqᵀ, a·Wkᵀ, a·Wvᵀ           (q: H heads, k/v: KV heads)
        q, k = RoPE(q), RoPE(k)                                   (HF "rotate_half" layout)
        h = h + softmax(q·kᵀ/sqrt(hd) + causal mask)·v · Woᵀ      (GQA: query head j uses kv head j // (H/KV))
        m = RMSNorm(h);  h = h + (silu(m·Wgᵀ) ⊙ (m·Wuᵀ))·Wdᵀ       (SwiGLU)
    logits = RMSNorm(h)·Eᵀ                                        (E = embed when tied, else lm_head)

    RMSNorm(x) = x / sqrt(mean(x²) + eps) ⊙ g
    RoPE: for pair (x_i, x_{i+hd/2}), angle p·θ^(-2i/hd):  x·cos + rotate_half(x)·sin

Module names mirror HF's (``model.layers.{i}.self_attn.q_proj`` …), so ``state_dict`` keys are the
HF parameter names that ``npllama``'s ``model.params`` uses too.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- rotary embedding ------------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """θ^(-2i/hd) for i < hd/2, with Llama-3.1 frequency scaling when ``rope_scaling`` says so."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_scaling is None:
        return inv_freq
    if rope_scaling.get("rope_type", rope_scaling.get("type")) != "llama3":
        raise NotImplementedError(f"rope_scaling {rope_scaling!r}")
    factor = rope_scaling["factor"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_ctx = rope_scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ---- layers ----------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = shape.n_heads, shape.n_kv_heads, shape.head_dim
        self.q_proj = nn.Linear(shape.dim, shape.n_heads * shape.head_dim, bias=False)
        self.k_proj = nn.Linear(shape.dim, shape.n_kv_heads * shape.head_dim, bias=False)
        self.v_proj = nn.Linear(shape.dim, shape.n_kv_heads * shape.head_dim, bias=False)
        self.o_proj = nn.Linear(shape.n_heads * shape.head_dim, shape.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.n_kv_heads != self.n_heads:
            # query head j reads kv head j // rep, as HF's repeat_kv does
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.gate_proj = nn.Linear(shape.dim, shape.hidden_dim, bias=False)
        self.up_proj = nn.Linear(shape.dim, shape.hidden_dim, bias=False)
        self.down_proj = nn.Linear(shape.hidden_dim, shape.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.dim, shape.norm_eps)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.dim, shape.norm_eps)
        self.mlp = MLP(shape)

    def forward(self, h, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Body(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.dim)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.n_layers))
        self.norm = RMSNorm(shape.dim, shape.norm_eps)


class TorchLlama(nn.Module):
    """Llama decoder; ``forward(tokens) -> logits`` with tokens int64 (B, T)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.model = _Body(shape)
        self.lm_head = nn.Linear(shape.dim, shape.vocab_size, bias=False)
        if shape.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = rope_inv_freq(shape.head_dim, shape.rope_theta, shape.rope_scaling)
        angles = torch.outer(torch.arange(shape.max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)                  # (max_seq_len, hd)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, tokens):
        T = tokens.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h))


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy over targets != -100 (same definition as npllama's loss)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


# ---- loading weights ---------------------------------------------------------------------------------

def load_params(module: nn.Module, params: dict) -> nn.Module:
    """Copy HF-named numpy/torch arrays (e.g. npllama's ``model.params``) into ``module``.

    Works for TorchLlama and HF's LlamaForCausalLM alike. Tied models have no ``lm_head.weight``
    in ``params`` (the shared tensor is reached through ``model.embed_tokens.weight``). Every
    parameter of ``module`` must be given, with the same shape, and nothing extra.
    """
    own = dict(module.named_parameters())          # a tied tensor appears once, under its first name
    given = {k: v for k, v in params.items() if not (k == "lm_head.weight" and k not in own)}
    missing, extra = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or extra:
        raise ValueError(f"parameter names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in own.items():
            src = given[name]
            src = torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32)) if isinstance(src, np.ndarray) \
                else src.detach().to(torch.float32)
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(src.shape)} != {tuple(p.shape)}")
            p.copy_(src)
    return module


def export_params(module: nn.Module) -> dict:
    """HF-named float32 numpy copies of ``module``'s parameters (tied head omitted)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.named_parameters()}


# ---- model factories -----------------------------------------------------------------------------------

def hf_config_dict(shape) -> dict:
    """A transformers LlamaConfig dict for ``shape`` (both rope spellings, for transformers 4 and 5)."""
    rope_parameters = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.rope_scaling:
        rope_parameters = {"rope_theta": shape.rope_theta, **shape.rope_scaling}
    return dict(
        vocab_size=shape.vocab_size, hidden_size=shape.dim, intermediate_size=shape.hidden_dim,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.max_seq_len, rms_norm_eps=shape.norm_eps,
        rope_theta=shape.rope_theta, rope_scaling=shape.rope_scaling, rope_parameters=rope_parameters,
        tie_word_embeddings=shape.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, bos_token_id=1, eos_token_id=None, pad_token_id=None, use_cache=True,
    )


def build_hf_model(shape, attn_implementation: str = "sdpa"):
    """Hugging Face ``LlamaForCausalLM`` with ``shape`` (random init; load weights with load_params)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**hf_config_dict(shape))
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    if shape.tie_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("transformers did not tie lm_head to embed_tokens")
    return model


def hf_logits(model, tokens):
    return model(input_ids=tokens, use_cache=False).logits


def build(variant: str, shape, params: dict | None = None):
    """Return (module, logits_fn) for variant 'torch' | 'torch-compile' | 'hf'.

    ``logits_fn(tokens) -> logits`` is what a benchmark calls; for 'torch-compile' it is the
    ``torch.compile``d reference model (compiled lazily on the first call).
    """
    if variant in ("torch", "torch-compile"):
        module = TorchLlama(shape)
        if params is not None:
            load_params(module, params)
        fn = module if variant == "torch" else torch.compile(module)
        return module, fn
    if variant == "hf":
        module = build_hf_model(shape)
        if params is not None:
            load_params(module, params)
        return module, lambda tokens: hf_logits(module, tokens)
    raise ValueError(f"unknown torch variant {variant!r}")
