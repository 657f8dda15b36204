"""The Llama model: embedding -> n_layers decoder blocks -> RMSNorm -> output projection.

    x_0    = Embed(tokens)                                   (B, T, D)
    x_l+1  = DecoderBlock_l(x_l)                             l = 0 .. n_layers-1
    logits = RMSNorm(x_L) W_out^T                            (B, T, V)
    loss   = CrossEntropy(logits, targets)                   mean over targets != -100

With tied embeddings W_out is the embedding table itself, so its gradient is the sum of the
output projection's and the embedding lookup's.

All parameters live in one contiguous buffer ``flat_params`` and all gradients in
``flat_grads``; ``params`` and ``grads`` map the Hugging Face names onto views of them.  One
buffer lets the optimizer update everything in a single pass, and keeping the q/k/v (and
gate/up) rows next to each other lets one matmul compute all three projections.
"""
from __future__ import annotations

import numpy as np

from .config import LlamaConfig
from .errors import ConfigError, InputError
from .layers.block import decoder_block_backward, decoder_block_forward
from .layers.cross_entropy import IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward
from .layers.embedding import embedding_backward, embedding_forward
from .layers.linear import linear_backward, linear_forward
from .layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
from .layers.rope import rope_cos_sin, rope_frequencies

SUPPORTED_DTYPES = (np.float32, np.float64)


def parameter_layout(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, shape) of every parameter, in the order they sit in ``flat_params``."""
    D, F, hd = cfg.dim, cfg.hidden_dim, cfg.head_dim
    layout = [("model.embed_tokens.weight", (cfg.vocab_size, D))]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        layout += [
            (p + "input_layernorm.weight", (D,)),
            (p + "self_attn.q_proj.weight", (cfg.n_heads * hd, D)),   # q, k, v adjacent: W_qkv
            (p + "self_attn.k_proj.weight", (cfg.n_kv_heads * hd, D)),
            (p + "self_attn.v_proj.weight", (cfg.n_kv_heads * hd, D)),
            (p + "self_attn.o_proj.weight", (D, cfg.n_heads * hd)),
            (p + "post_attention_layernorm.weight", (D,)),
            (p + "mlp.gate_proj.weight", (F, D)),                     # gate, up adjacent: W_gate_up
            (p + "mlp.up_proj.weight", (F, D)),
            (p + "mlp.down_proj.weight", (D, F)),
        ]
    layout.append(("model.norm.weight", (D,)))
    if not cfg.tie_embeddings:
        layout.append(("lm_head.weight", (cfg.vocab_size, D)))
    return layout


def _views(flat, layout):
    views, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        views[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return views


def _layer_views(views, flat, layout, cfg):
    """Per layer, the block's weights by role, with W_qkv and W_gate_up as single views."""
    offsets, offset = {}, 0
    for name, shape in layout:
        offsets[name] = offset
        offset += int(np.prod(shape))
    D, hd = cfg.dim, cfg.head_dim
    layers = []
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        qkv_rows = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
        q0 = offsets[p + "self_attn.q_proj.weight"]
        g0 = offsets[p + "mlp.gate_proj.weight"]
        layers.append({
            "attn_norm": views[p + "input_layernorm.weight"],
            "wqkv": flat[q0:q0 + qkv_rows * D].reshape(qkv_rows, D),
            "wo": views[p + "self_attn.o_proj.weight"],
            "ffn_norm": views[p + "post_attention_layernorm.weight"],
            "w_gate_up": flat[g0:g0 + 2 * cfg.hidden_dim * D].reshape(2 * cfg.hidden_dim, D),
            "w_down": views[p + "mlp.down_proj.weight"],
        })
    return layers


class Llama:
    def __init__(self, config: LlamaConfig, seed: int = 0, dtype=np.float32):
        if not isinstance(config, LlamaConfig):
            raise ConfigError(f"Llama needs a LlamaConfig, got {type(config).__name__}")
        dtype = np.dtype(dtype)
        if dtype.type not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype must be float32 or float64, got {dtype}")
        self.config = cfg = config
        self.dtype = dtype
        self.layout = parameter_layout(cfg)
        n = sum(int(np.prod(s)) for _, s in self.layout)
        self.flat_params = np.zeros(n, dtype=dtype)
        self.flat_grads = np.zeros(n, dtype=dtype)
        self.params = _views(self.flat_params, self.layout)
        self.grads = _views(self.flat_grads, self.layout)
        self._layers = _layer_views(self.params, self.flat_params, self.layout, cfg)
        self._layer_grads = _layer_views(self.grads, self.flat_grads, self.layout, cfg)
        self.rope_freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.training = True
        self.tokenizer = None  # set by training / from_pretrained when a tokenizer.json is present
        self._dropout_rng = np.random.default_rng(seed + 1)
        self.init_weights(seed)

    # ---- parameters ----------------------------------------------------------------------------
    def init_weights(self, seed: int = 0):
        """Normal(0, 0.02) for matrices, as Hugging Face does; the projections that write into the
        residual stream (o_proj, down_proj) get std 0.02 / sqrt(2 n_layers) (GPT-2's scheme) so the
        residual's variance does not grow with depth; norm gains start at 1."""
        rng = np.random.default_rng(seed)
        residual_std = 0.02 / np.sqrt(2 * self.config.n_layers)
        for name, shape in self.layout:
            p = self.params[name]
            if len(shape) == 1:
                p[...] = 1.0
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p[...] = rng.normal(0.0, std, size=shape)

    @property
    def lm_head(self):
        return self.params["model.embed_tokens.weight" if self.config.tie_embeddings else "lm_head.weight"]

    def num_parameters(self) -> int:
        return self.flat_params.size

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    # ---- input checks --------------------------------------------------------------------------
    def _check_tokens(self, tokens, name="tokens", allow_ignore=False):
        try:
            arr = np.asarray(tokens)
        except (ValueError, TypeError) as e:  # ragged nested lists, objects NumPy cannot convert
            raise InputError(f"{name} must be an integer array of token ids ({e})") from None
        if arr.dtype.kind not in "iu":
            raise InputError(f"{name} must be an integer array of token ids, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise InputError(f"{name} must have shape (batch, seq_len), got shape {arr.shape}")
        B, T = arr.shape
        if B == 0 or T == 0:
            raise InputError(f"{name} is empty (shape {arr.shape})")
        if T > self.config.max_seq_len:
            raise InputError(f"{name} has length {T}, past max_seq_len={self.config.max_seq_len}")
        V = self.config.vocab_size
        bad = (arr < 0) | (arr >= V)
        if allow_ignore:
            bad &= arr != IGNORE_INDEX
        if bad.any():
            extra = f" (or {IGNORE_INDEX} to ignore)" if allow_ignore else ""
            raise InputError(f"{name} has id {int(arr[bad].flat[0])} outside [0, {V}){extra}")
        return np.ascontiguousarray(arr, dtype=np.int64)

    # ---- forward and backward ------------------------------------------------------------------
    def _forward(self, tokens, training, positions_start=0):
        cfg = self.config
        B, T = tokens.shape
        cos, sin = rope_cos_sin(np.arange(positions_start, positions_start + T), self.rope_freqs, self.dtype)
        x, cache_embed = embedding_forward(tokens, self.params["model.embed_tokens.weight"])
        caches = []
        for w in self._layers:
            x, cache = decoder_block_forward(x, w, cos, sin, cfg, self._dropout_rng, training)
            caches.append(cache)
        xn, cache_norm = rmsnorm_forward(x, self.params["model.norm.weight"], cfg.norm_eps)
        logits, cache_head = linear_forward(xn.reshape(B * T, cfg.dim), self.lm_head)
        return logits, (cache_embed, caches, cache_norm, cache_head)

    def forward(self, tokens) -> np.ndarray:
        """tokens: int (B, T) -> logits (B, T, vocab). Dropout is never applied here."""
        tokens = self._check_tokens(tokens)
        logits, _ = self._forward(tokens, training=False)
        return logits.reshape(*tokens.shape, self.config.vocab_size)

    __call__ = forward

    def loss(self, tokens, targets, reduction="mean") -> float:
        """Cross-entropy of ``targets`` (ids or -100 to ignore) without gradients; dropout off.
        reduction="sum" gives the total nats (for bits per byte)."""
        tokens, targets = self._check_pair(tokens, targets)
        logits, _ = self._forward(tokens, training=False)
        loss, cache = cross_entropy_forward(logits, targets.reshape(-1))
        if reduction == "sum":
            return loss * cache[3] if np.any(targets != IGNORE_INDEX) else 0.0
        if reduction != "mean":
            raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return loss

    def _check_pair(self, tokens, targets):
        tokens = self._check_tokens(tokens)
        targets = self._check_tokens(targets, "targets", allow_ignore=True)
        if targets.shape != tokens.shape:
            raise InputError(f"targets shape {targets.shape} does not match tokens shape {tokens.shape}")
        return tokens, targets

    def loss_and_grad(self, tokens, targets):
        """Mean cross-entropy over targets != -100, and its gradient for every parameter.

        Returns (loss, grads) where grads maps each name of ``params`` to a view of
        ``flat_grads``; the next call overwrites them (copy them to keep them)."""
        cfg = self.config
        tokens, targets = self._check_pair(tokens, targets)
        B, T = tokens.shape
        logits, (cache_embed, caches, cache_norm, cache_head) = self._forward(tokens, self.training)
        loss, cache_ce = cross_entropy_forward(logits, targets.reshape(-1))

        dlogits = cross_entropy_backward(1.0, cache_ce, out=logits)  # reuse the logits' memory
        dxn, _ = linear_backward(dlogits, cache_head, self.grads[
            "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"])
        dx, _ = rmsnorm_backward(dxn.reshape(B, T, cfg.dim), cache_norm, self.grads["model.norm.weight"])
        for cache, dw in zip(reversed(caches), reversed(self._layer_grads)):
            dx = decoder_block_backward(dx, cache, dw, cfg)
        d_embed = self.grads["model.embed_tokens.weight"]
        if not cfg.tie_embeddings:
            d_embed[...] = 0.0
        embedding_backward(dx, cache_embed, d_embed)
        return loss, self.grads

    # ---- generation (npllama/generate.py) ------------------------------------------------------
    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
                 stop_ids=None):
        """1-D int array of the new tokens only; see npllama.generate.generate."""
        from .generate import generate
        return generate(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop_ids=stop_ids)

    def stream(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
               stop_ids=None):
        """Yield the same tokens as ``generate``, one at a time."""
        from .generate import stream
        return stream(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed, stop_ids=stop_ids)

    # ---- Hugging Face format -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=np.float32) -> "Llama":
        from .io import load_pretrained
        return load_pretrained(path, dtype=dtype)

    def save_pretrained(self, path):
        from .io import save_pretrained
        save_pretrained(self, path)
