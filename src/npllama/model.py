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

This is the fast engine: its passes run the decoder block of layers/block.py on row buffers with
Numba kernels and split matmuls, and it is held equal to npllama/reference.py, the same model in
plain NumPy, to 1e-12 in float64.  Generation (npllama/generate/) runs the prompt through the same
blocks (``last_hidden_state``) and each new token through the same kernels on one row.

What is not here: the block (npllama/layers/block.py); how the flat buffers are sliced into views,
the passes' workspaces and the batch parts' gradient buffers (npllama/buffers.py); the checks of the
inputs and the dropout masks a step draws (npllama/inputs.py); what the LoRA adapters are and where
they sit (npllama/adapters.py; the model keeps them in a second flat buffer that the same passes
read); the checkpoint formats, quantized weights and quantizing (npllama/formats/).
"""
from __future__ import annotations

import numpy as np

from . import formats
from .adapters import adapter_views, init_adapters, layer_adapters, lora_layout, lora_settings
from .buffers import (LOSS_CHUNK_ROWS, PartGradients, Workspaces, backward_ranges, grad_buffers, layer_views,
                      named_views, offsets)
from .config import LORA_TARGETS, LlamaConfig
from .engine.batch import add_into, batch_parts, run_parts
from .engine.matmul import matmuls, split_matmuls
from .errors import ConfigError, InputError
from .formats import gguf, hf, peft
from .generate import decoding
from .inputs import (check_dropout_masks, check_kv_cache, check_lora_masks, check_packing, check_tokens,
                     check_tokens_and_targets, draw_masks)
from .layers.block import decoder_block_backward_rows, decoder_block_forward_rows
from .layers.cross_entropy import IGNORE_INDEX, count_targets, cross_entropy_forward_backward, cross_entropy_kernel
from .layers.embedding import embedding_backward
from .layers.quantized_linear import embedding_rows
from .layers.rmsnorm import rmsnorm_backward_kernel, rmsnorm_forward_kernel
from .layers.rope import rope_frequencies

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


class Llama:
    """The model.  ``init=False`` leaves every parameter at zero instead of drawing the initial
    weights: for a loader that fills them (``from_pretrained``), which then needs no throw-away
    random draw of the size of the model; the zero pages are not even touched until written."""

    def __init__(self, config: LlamaConfig, seed: int = 0, dtype=np.float32, init: bool = True):
        if not isinstance(config, LlamaConfig):
            raise ConfigError(f"Llama needs a LlamaConfig, got {type(config).__name__}")
        dtype = np.dtype(dtype)
        if dtype.type not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype must be float32 or float64, got {dtype}")
        self.config = cfg = config
        self.dtype = dtype
        self.layout = parameter_layout(cfg)
        n = offsets(self.layout)[1]
        self.flat_params = np.zeros(n, dtype=dtype)
        self.flat_grads = np.zeros(n, dtype=dtype)
        self.params = named_views(self.flat_params, self.layout)
        self.layers = layer_views(self.params, self.flat_params, self.layout, cfg)
        # the gradients' views, and where each part of a training batch writes its gradients
        self._part_grads = PartGradients(grad_buffers(self.flat_grads, self.layout, cfg), self.layout, cfg)
        self.grads = self._part_grads.own.named
        self.lora = None  # LoraSettings once add_lora froze the base
        self.lora_base = None  # the base model's path, for a model loaded from an adapter directory
        self.quantized = False  # True once some weights are QuantizedMatrix (from_pretrained(quantized=True))
        self.rope_freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.training = True
        self.tokenizer = None  # set by training / from_pretrained when a tokenizer.json is present
        self.dropout_rng = np.random.default_rng(seed + 1)  # dropout's masks (training/checkpoints keep its state)
        self._workspaces = Workspaces(cfg, dtype, self.rope_freqs)   # the passes' buffers, by (B, T, mode, part)
        self._grad_ranges = backward_ranges(self.layout, cfg)
        if init:
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

    # ---- LoRA (layers/lora.py, docs/12-lora.md) -----------------------------------------------------
    def add_lora(self, rank: int, alpha: float, targets=LORA_TARGETS, dropout: float = 0.0, seed: int = 0):
        """Freeze every base weight and put a LoRA adapter on each ``targets`` projection of every
        layer: y = x W^T + (alpha / rank) dropout(x) A^T B^T, A and B initialised as PEFT does
        (B = 0: the model computes exactly what the base does until a step moves B).

        The adapters are views (``lora_params``, PEFT's names without "base_model.model.") into one
        trainable buffer ``flat_lora``; ``flat_grads`` / ``grads`` become the gradient of that
        buffer only: the base's gradient buffer is dropped, and the backward computes no gradient of
        a frozen weight (``trainable_params`` / ``flat_trainable`` are what an optimizer updates)."""
        if self.lora is not None:
            raise ConfigError("this model has LoRA adapters already")
        self.lora = lora_settings(rank, alpha, targets, dropout)
        self.lora_layout = lora_layout(self.params, self.config.n_layers, self.lora)
        self.flat_lora = np.zeros(offsets(self.lora_layout)[1], dtype=self.dtype)
        self.lora_params = named_views(self.flat_lora, self.lora_layout)
        init_adapters(self.lora_params, self.lora.rank, seed)
        self.flat_grads = np.zeros_like(self.flat_lora)
        self._part_grads = PartGradients(grad_buffers(self.flat_grads, self.lora_layout, self.config, self.lora),
                                         self.lora_layout, self.config, self.lora)
        self.grads = self._part_grads.own.named
        # per layer {target: (A, B)}, as the passes (and a decoding step) take the adapters
        self.lora_layers = adapter_views(self.lora_params, self.config.n_layers, self.lora)
        # the activations are now most of a step's memory: keep fewer (buffers.Workspace)
        self._workspaces.freeze_base()
        return self

    @property
    def trainable_params(self):
        """What training updates: the adapters with LoRA, else every parameter (views of ``flat_trainable``)."""
        return self.params if self.lora is None else self.lora_params

    @property
    def flat_trainable(self):
        return self.flat_params if self.lora is None else self.flat_lora

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

    # ---- forward and backward ------------------------------------------------------------------
    # The passes run the blocks of layers/block.py on the buffers of a workspace (buffers.py), made
    # on the first pass of a (B, T) shape and reused after.
    def _forward_rows(self, tokens, ws, after_block=None, dropout_masks=None, lora_masks=None, packed=None,
                      kv_cache=None):
        """Embedding -> blocks -> final norm; returns ws.final.xn (N, D), the input of the output
        projection.  The per-layer activations stay in ``ws`` for the backward.  ``dropout_masks``:
        None (no dropout) or one (N, D) pair per layer, applied as given; ``lora_masks``: None or the
        LoRA adapters' input masks ({module name: (N, in)}, none for a module not named).  A training
        step draws them first (inputs.draw_masks).  ``after_block(i, qkv)`` is called after block i.
        ``packed``: the rows' position_ids, segment_ids, attention_mask (inputs.PackedRows) or None.
        ``kv_cache``: a continuation's (k_cache_t, v_cache, start) (see ``last_hidden_state``) or None."""
        cfg = self.config
        first = ws.layers[0]
        ws.batch.use_packing(packed, start=0 if kv_cache is None else kv_cache[2])
        embedding_rows(self.params["model.embed_tokens.weight"], tokens.reshape(-1), first.x)
        for i, (acts, w, out) in enumerate(zip(ws.layers, self.layers, ws.outputs)):
            acts.mask_attn, acts.mask_ffn = (None, None) if dropout_masks is None else dropout_masks[i]
            adapters = None if self.lora is None else layer_adapters(self.lora_layers[i], i, self.lora, lora_masks)
            kv = None if kv_cache is None else (kv_cache[0][i], kv_cache[1][i], kv_cache[2])
            decoder_block_forward_rows(acts, w, out, ws.batch, adapters, kv)
            if after_block is not None:
                after_block(i, acts.qkv)
        final = ws.final
        rmsnorm_forward_kernel(final.x, self.params["model.norm.weight"], self.dtype.type(cfg.norm_eps),
                               final.xn, final.r)
        return final.xn

    def forward(self, tokens, *, position_ids=None, segment_ids=None, attention_mask=None) -> np.ndarray:
        """tokens: int (B, T) -> logits (B, T, vocab). Dropout is never applied here.

        Packed rows and padding, as npllama.reference takes them: position_ids (T,) or (B, T) (RoPE
        positions, restarting per document), segment_ids (B, T) (a position attends only to earlier
        positions of its own document), attention_mask (B, T) (0 = padding: attended to by no other
        position; a padding position sees the earlier tokens of its segment and itself)."""
        tokens = check_tokens(tokens, self.config)
        B, T = tokens.shape
        packed = check_packing(self.config, B, T, position_ids, segment_ids, attention_mask)
        logits = np.empty((B * T, self.config.vocab_size), dtype=self.dtype)
        with split_matmuls():
            xn = self._forward_rows(tokens, self._workspaces.get(B, T, False), packed=packed)
            matmuls((xn, self.lm_head.T, logits))
        return logits.reshape(B, T, self.config.vocab_size)

    __call__ = forward

    def last_hidden_state(self, tokens, after_block=None, kv_cache=None) -> np.ndarray:
        """tokens: int (B, T) -> the final RMSNorm's output (B, T, D), the input of the output
        projection; no dropout.  It is a buffer of the model that the next pass overwrites.

        ``after_block(i, qkv)``, when given, is called after block i with its q/k/v projection rows
        qkv: (B*T, (H + 2K) * hd), q and k rotated: how generation fills its key/value cache from
        the prompt (npllama/generate/decoding.py).

        ``kv_cache``: (k_cache_t (L, K, hd, S), v_cache (L, K, S, hd), start), a key/value cache of
        one sequence (B = 1) holding the rotated keys and the values of its positions 0 .. start-1
        (npllama/generate/decoding.py's layout): the tokens continue it, at positions start ..
        start+T-1 (<= S), their keys and values are stored into the cache, and each attends to the
        cache's positions up to its own.  The hidden states are those of a pass over the whole
        sequence at those positions (npllama.reference.forward(..., kv_cache=) is the same)."""
        tokens = check_tokens(tokens, self.config)
        B, T = tokens.shape
        if kv_cache is not None:
            check_kv_cache(kv_cache, self.config, self.dtype, B, T)
        with split_matmuls():
            xn = self._forward_rows(tokens, self._workspaces.get(B, T, False), after_block=after_block,
                                    kv_cache=kv_cache)
        return xn.reshape(B, T, self.config.dim)

    def loss(self, tokens, targets, reduction="mean", *, position_ids=None, segment_ids=None,
             attention_mask=None) -> float:
        """Cross-entropy of ``targets`` (ids or -100 to ignore) without gradients; dropout off.
        reduction="sum" gives the total nats (for bits per byte).  position_ids, segment_ids,
        attention_mask: as ``forward`` takes them.

        The logits are made LOSS_CHUNK_ROWS rows at a time, so evaluation never holds an (N, V)
        array (with a 32000 vocabulary that is the largest buffer of the whole model)."""
        tokens, targets = check_tokens_and_targets(tokens, targets, self.config)
        if reduction not in ("mean", "sum"):
            raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        B, T = tokens.shape
        packed = check_packing(self.config, B, T, position_ids, segment_ids, attention_mask)
        ws = self._workspaces.get(B, T, False)
        rows = min(LOSS_CHUNK_ROWS, B * T)
        logits = np.empty((rows, self.config.vocab_size), dtype=self.dtype)
        losses = np.empty(rows)
        total, targets, zero = 0.0, targets.reshape(-1), self.dtype.type(0.0)   # (scale 0: no gradient)
        with split_matmuls():
            xn = self._forward_rows(tokens, ws, packed=packed)
            for start in range(0, B * T, rows):
                stop = min(start + rows, B * T)
                n = stop - start
                matmuls((xn[start:stop], self.lm_head.T, logits[:n]))
                cross_entropy_kernel(logits[:n], targets[start:stop], IGNORE_INDEX, losses[:n], zero)
                total += float(np.sum(losses[:n]))
        if reduction == "sum":
            return total
        return total / count_targets(targets)

    def loss_and_grad(self, tokens, targets, dropout_masks=None, *, lora_masks=None, copy=True, dloss=1.0,
                      on_grads_ready=None, position_ids=None, segment_ids=None, attention_mask=None):
        """Mean cross-entropy over targets != -100, and its gradient for every trainable parameter.

        Returns (loss, grads), grads mapping each name of ``trainable_params`` to its gradient (with
        LoRA: the adapters' only, as npllama.reference.loss_and_grad(lora=...) returns them).

        copy=True (the default): the gradients are a copy, the caller's to keep.
        copy=False: **grads are views into ``flat_grads``, which the next call to loss_and_grad
        OVERWRITES**; no copy is made (what the training loop wants: it reads ``flat_grads`` before
        the next step).

        dropout_masks: None to draw dropout masks from the model's generator (when training and
        config.dropout > 0), else one (attn_mask, ffn_mask) pair per layer, each (B, T, D) with
        entries 0 or 1/(1-p), applied as given (as npllama.reference.loss_and_grad does).
        lora_masks: with LoRA, the dropout masks of the adapters' inputs ({module name: (B, T, in)},
        none for a module not named), instead of drawing them.
        position_ids, segment_ids, attention_mask: packed rows and padding, as ``forward`` takes them.

        dloss: the gradient is that of ``dloss * loss`` (the loss returned is not scaled); data
        parallel training weighs each micro-batch by its share of the global batch this way.
        on_grads_ready(lo, hi): called during the backward each time ``flat_grads[lo:hi]`` is final
        -- the head, then each block from the last to the first, then the embedding; each range
        ends where the previous one began (with LoRA: the whole buffer once, at the end) -- so that
        their all-reduce can start while the backward goes on (npllama/train/distributed.py)."""
        if self.quantized and self.lora is None:
            raise ConfigError("this model's weights are quantized, which keeps them frozen: train LoRA adapters on "
                              "it (add_lora, --lora-rank) or load it dequantized (quantized=False)")
        tokens, targets = check_tokens_and_targets(tokens, targets, self.config)
        B, T = tokens.shape
        packed = check_packing(self.config, B, T, position_ids, segment_ids, attention_mask)
        masks = None if dropout_masks is None else check_dropout_masks(dropout_masks, self.config, B, T, self.dtype)
        adapter_masks = None if lora_masks is None else check_lora_masks(
            lora_masks, None if self.lora is None else self.lora_params, B, T, self.dtype)
        drawn, drawn_lora = draw_masks(self, B * T, base=masks is None, lora=adapter_masks is None)
        masks = drawn if masks is None else masks
        adapter_masks = drawn_lora if adapter_masks is None else adapter_masks
        with split_matmuls():
            parts = batch_parts(B)
            if len(parts) == 1:
                loss = self._loss_and_grad_rows(tokens, targets, self._workspaces.get(B, T, True), masks, adapter_masks,
                                                dloss, on_grads_ready, packed=packed)
            else:
                loss = self._loss_and_grad_parts(tokens, targets, parts, masks, adapter_masks, dloss, on_grads_ready,
                                                 packed)
        if not copy:
            return loss, self.grads
        return loss, named_views(self.flat_grads.copy(), self.layout if self.lora is None else self.lora_layout)

    # ---- the batch split among threads (engine/batch.py: the batch-parts regime) ---------------------
    def _finished_ranges(self):
        """The ranges of flat_grads in the order the backward finishes them (``on_grads_ready``):
        with LoRA the whole buffer once."""
        return [(0, self.flat_grads.size)] if self.lora is not None else self._grad_ranges

    def _loss_and_grad_parts(self, tokens, targets, parts, dropout_masks, lora_masks, dloss, on_grads_ready, packed):
        """loss_and_grad of the batch as ``parts``, one per thread (engine/batch.py); the gradients
        of the parts after the first are added into flat_grads.  Each part's gradient is weighed by
        its share of the batch's targets (its share of dloss), so that they add up to the batch's."""
        B, T = tokens.shape
        total = count_targets(targets)

        def run_part(k, lo, hi):
            rows = slice(lo * T, hi * T)
            self._loss_and_grad_rows(
                tokens[lo:hi], targets[lo:hi], self._workspaces.get(hi - lo, T, True, k),
                None if dropout_masks is None else [(a[rows], f[rows]) for a, f in dropout_masks],
                None if lora_masks is None else {name: m[rows] for name, m in lora_masks.items()},
                dloss * count_targets(targets[lo:hi]) / total, None, self._part_grads[k],
                None if packed is None else packed.rows(lo, hi))
        run_parts(run_part, parts, compiled=all((hi - lo, T, True, k) in self._workspaces
                                                for k, (lo, hi) in enumerate(parts)))
        add_into(self.flat_grads, [self._part_grads[k].flat for k in range(1, len(parts))])
        if on_grads_ready is not None:
            for lo, hi in self._finished_ranges():
                on_grads_ready(lo, hi)
        # the mean of the rows' losses (each part's CE left them in its workspace), summed as the
        # whole batch's are: the same number as a step on the whole batch
        rows = np.concatenate([self._workspaces.get(hi - lo, T, True, k).losses for k, (lo, hi) in enumerate(parts)])
        return float(np.sum(rows) / total)

    def _loss_and_grad_rows(self, tokens, targets, ws, dropout_masks=None, lora_masks=None, dloss=1.0,
                            on_grads_ready=None, g=None, packed=None):
        """loss_and_grad on the workspace's buffers (checked inputs), the gradients into ``g``
        (default: the model's own); returns the loss.  With LoRA the base is frozen: only input
        gradients flow through it, and the output projection, the norms and the embedding get no
        gradient."""
        cfg = self.config
        B, T = tokens.shape
        frozen = self.lora is not None
        g = self._part_grads.own if g is None else g
        ranges = iter(self._finished_ranges())

        def done():   # the next range of flat_grads is final
            if on_grads_ready is not None:
                on_grads_ready(*next(ranges))
        xn = self._forward_rows(tokens, ws, dropout_masks=dropout_masks, lora_masks=lora_masks, packed=packed)
        # output projection: logits = xn W^T  ->  dW = dlogits^T xn,  dxn = dlogits W
        final, scratch = ws.final, ws.batch.scratch
        if frozen:   # no dW: the rows' logits are made, turned into dlogits and used a chunk at a time
            loss = self._frozen_head_rows(xn, targets.reshape(-1), ws, dloss, scratch.dn)
        else:
            matmuls((xn, self.lm_head.T, ws.logits))
            # loss, and dL/dlogits written over the logits (the only (N, V) buffer)
            loss, dlogits = cross_entropy_forward_backward(ws.logits, targets.reshape(-1), ws.losses, dloss=dloss)
            d_head = g.named["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
            matmuls((dlogits.T, final.xn, d_head), (dlogits, self.lm_head, scratch.dn))
        rmsnorm_backward_kernel(scratch.dn, final.x, self.params["model.norm.weight"], final.r, scratch.dres,
                                scratch.dw_partial, False)
        if not frozen:
            np.sum(scratch.dw_partial, axis=0, out=g.named["model.norm.weight"])
            done()
        adapter_grads = g.adapters if frozen else [None] * cfg.n_layers
        for acts, w, dw, dlora in zip(reversed(ws.layers), reversed(self.layers), reversed(g.layers),
                                      reversed(adapter_grads)):
            decoder_block_backward_rows(acts, w, dw, ws.batch, dlora)
            if not frozen:
                done()
        if frozen:                  # the embedding is frozen: the gradient stops here
            done()
            return loss
        d_embed = g.named["model.embed_tokens.weight"]
        if not cfg.tie_embeddings:
            d_embed[...] = 0.0
        embedding_backward(scratch.dres.reshape(B, T, cfg.dim), tokens, d_embed)
        done()
        return loss

    def _frozen_head_rows(self, xn, targets, ws, dloss, dxn):
        """The loss of a frozen output projection and dxn = dlogits W, ``ws.logits``' rows (at most
        LOSS_CHUNK_ROWS) at a time: the same numbers as the whole (N, V) logits at once, in a
        buffer of a fraction of their size (with SmolLM2's 49,152 words, 200 MB for 1,024 rows)."""
        count = count_targets(targets)
        scale = self.dtype.type(dloss / count)
        rows = ws.logits.shape[0]
        for start in range(0, xn.shape[0], rows):
            stop = min(start + rows, xn.shape[0])
            logits = ws.logits[:stop - start]
            matmuls((xn[start:stop], self.lm_head.T, logits))
            cross_entropy_kernel(logits, targets[start:stop], IGNORE_INDEX, ws.losses[start:stop], scale)
            matmuls((logits, self.lm_head, dxn[start:stop]))
        return float(np.sum(ws.losses) / count)

    # ---- generation (npllama/generate/) --------------------------------------------------------
    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
                 stop_ids=None, slide=False):
        """1-D int array of the new tokens only; see npllama.generate.generate (``slide=True``: go on
        past the context over a sliding window)."""
        return decoding.generate(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed, stop_ids=stop_ids, slide=slide)

    def stream(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
               stop_ids=None, slide=False, cache=None):
        """Yield the same tokens as ``generate``, one at a time (``cache``: see decoding.stream)."""
        return decoding.stream(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop_ids=stop_ids, slide=slide, cache=cache)

    # ---- pretrained checkpoints ----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=np.float32, quantized: bool = False) -> "Llama":
        """A model, with its tokenizer, from a Hugging Face or run directory, a GGUF file, a llama2.c
        .bin or a PEFT adapter directory: npllama.formats.load, which says what each gives.

        ``quantized=True``: the matrices a GGUF file stores as Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K
        or Q6_K stay in their blocks (layers/quantized_linear.py; the model computes with them
        directly, and they are frozen: training needs LoRA adapters); every other tensor, and every
        other format, loads as usual.

        Raises:
            CheckpointError: none of these, or a checkpoint that cannot be read (naming the file).
        """
        return formats.load(path, dtype, quantized=quantized)

    def quantize(self, qtype: str = "Q8_0"):
        """Quantize every matrix in place by the gguf package's quantizer (formats.gguf.quantize_weights):
        what from_pretrained(quantized=True) gives for a file stored so."""
        if self.quantized or self.lora is not None:
            raise ConfigError("quantize() needs a float model without LoRA adapters")
        return gguf.use_quantized(self, *gguf.quantize_weights(self.params, self.layers, qtype))

    def save_pretrained(self, path):
        """A Hugging Face directory of the weights (with LoRA: of the base alone; see save_adapter)."""
        hf.save_pretrained(path, self.config, self.params, self.tokenizer)

    def save_adapter(self, path, base_path):
        """The LoRA adapters as a PEFT adapter directory whose base_model_name_or_path is ``base_path``."""
        if self.lora is None:
            raise ConfigError("this model has no LoRA adapters to save")
        peft.save_adapter(path, self.lora, self.lora_params, base_path)
