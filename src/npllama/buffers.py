"""The buffers behind the model's passes (npllama/model.py): views of the flat buffers, and the
workspaces the passes run on.

Views.  Every parameter sits in one flat buffer, in ``model.parameter_layout``'s order (the LoRA
adapters in a second one, ``adapters.lora_layout``'s), and so does every gradient: ``named_views``
gives each name its view, ``layer_views`` each layer's weights by the role the block gives them
(W_qkv and W_gate_up single views over adjacent rows, so one matmul computes q, k and v), and
``backward_ranges`` the ranges of the gradient buffer in the order the backward finishes them.

Workspaces.  Every activation of a (B, T) batch lives in a buffer made on the first pass of that
shape and reused after (the attention kernels' K/V tiles too; their small outputs are allocated per
call).  Training keeps one set per layer for the backward, one workspace per part of the batch (the
engine runs a step's parts on their own threads), each part after the first with gradient buffers
of its own; forward(), loss() and last_hidden_state() use one set for all layers.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .adapters import adapter_views
from .layers.block import BlockActivations, RowBatch

LOSS_CHUNK_ROWS = 256   # rows of logits at a time: Llama.loss, and a frozen head's backward


def offsets(layout) -> tuple[dict[str, int], int]:
    """Where each name's values start in the flat buffer, and the buffer's size."""
    starts, offset = {}, 0
    for name, shape in layout:
        starts[name] = offset
        offset += int(np.prod(shape))
    return starts, offset


def named_views(flat, layout) -> dict[str, np.ndarray]:
    """{name: its view of ``flat``, of its shape}."""
    starts, _ = offsets(layout)
    return {name: flat[starts[name]:starts[name] + int(np.prod(shape))].reshape(shape) for name, shape in layout}


def backward_ranges(layout, cfg) -> list[tuple[int, int]]:
    """[lo, hi) ranges of the gradient buffer in the order the backward finishes them: the head
    (final norm, and the output matrix unless tied), blocks n_layers-1 .. 0, the embedding (last: a
    tied output matrix shares it).  Each range ends where the one before it begins."""
    starts, size = offsets(layout)
    blocks = [starts[f"model.layers.{i}.input_layernorm.weight"] for i in range(cfg.n_layers)]
    bounds = [starts["model.embed_tokens.weight"], *blocks, starts["model.norm.weight"], size]
    return [(bounds[j], bounds[j + 1]) for j in reversed(range(len(bounds) - 1))]


def layer_views(views, flat, layout, cfg) -> list[dict[str, np.ndarray]]:
    """Per layer, the block's weights by role, with W_qkv and W_gate_up as single views."""
    starts, _ = offsets(layout)
    D, hd = cfg.dim, cfg.head_dim
    qkv_rows = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    layers = []
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        q0, g0 = starts[p + "self_attn.q_proj.weight"], starts[p + "mlp.gate_proj.weight"]
        layers.append({
            "attn_norm": views[p + "input_layernorm.weight"],
            "wqkv": flat[q0:q0 + qkv_rows * D].reshape(qkv_rows, D),
            "wo": views[p + "self_attn.o_proj.weight"],
            "ffn_norm": views[p + "post_attention_layernorm.weight"],
            "w_gate_up": flat[g0:g0 + 2 * cfg.hidden_dim * D].reshape(2 * cfg.hidden_dim, D),
            "w_down": views[p + "mlp.down_proj.weight"],
        })
    return layers


class FinalStream:
    """The last block's output x (N, D), its final RMSNorm xn (N, D) and 1/rms r (N,)."""

    def __init__(self, x, xn, r):
        self.x, self.xn, self.r = x, xn, r


class Workspace:
    """Every buffer of a forward (and, with ``keep_activations``, backward) pass over (B, T) tokens.

    Training: one BlockActivations per layer (what its backward needs), block i's output written
    into block i+1's input x (``final.x`` after the last block);  inference: one in-place
    BlockActivations for all layers, the residual stream updated in place and the final norm
    written over the first norm's buffers.  logits (N, V) is overwritten by dlogits in training.
    ``frozen_base`` (training LoRA adapters): the blocks keep no norm or SwiGLU outputs, their
    backward recomputes them (layers/block.py), and logits holds LOSS_CHUNK_ROWS rows (the head's
    backward goes a chunk at a time: ``Llama._frozen_head_rows``)."""

    def __init__(self, cfg, B, T, dtype, rope_freqs, keep_activations, frozen_base=False):
        N = B * T
        recompute = frozen_base and keep_activations
        self.batch = RowBatch(cfg, B, T, dtype, rope_freqs, recompute)
        if keep_activations:
            shared = self.batch.scratch if recompute else None
            self.layers = [BlockActivations(cfg, N, dtype, shared=shared) for _ in range(cfg.n_layers)]
            e = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
            self.final = FinalStream(e(N, cfg.dim), e(N, cfg.dim), e(N))
            self.logits = np.empty((min(N, LOSS_CHUNK_ROWS) if frozen_base else N, cfg.vocab_size), dtype=dtype)
            self.losses = np.empty(N, dtype=np.float64)
        else:
            one = BlockActivations(cfg, N, dtype, in_place=True)
            self.layers = [one] * cfg.n_layers
            self.final = FinalStream(one.x, one.n1, one.r1)
            self.logits = None  # forward() returns a new array; loss() works in row chunks
        # where each block writes its output: the next block's input, the final stream after the last
        self.outputs = [acts.x for acts in self.layers[1:]] + [self.final.x]


class Workspaces:
    """A model's workspaces by (B, T, training, part), made on first use; at most one shape per
    mode and part is kept (a new shape frees the old one's buffers).  ``frozen_base``: training
    workspaces are made for a frozen base (``Workspace``); the model sets it when it freezes it."""

    def __init__(self, cfg, dtype, rope_freqs):
        self.cfg, self.dtype, self.rope_freqs = cfg, dtype, rope_freqs
        self.by_key = {}
        self.frozen_base = False

    def freeze_base(self):
        """Training workspaces for a frozen base from now on (those made before are dropped)."""
        self.frozen_base = True
        self.by_key = {k: v for k, v in self.by_key.items() if not k[2]}

    def __contains__(self, key) -> bool:
        return key in self.by_key

    def get(self, B, T, training, part=0) -> Workspace:
        key = (B, T, bool(training), part)
        ws = self.by_key.get(key)
        if ws is None:
            self.by_key = {k: v for k, v in self.by_key.items() if k[2:] != key[2:]}  # one shape each
            ws = Workspace(self.cfg, B, T, self.dtype, self.rope_freqs, keep_activations=training,
                           frozen_base=self.frozen_base)
            self.by_key[key] = ws
        return ws


class GradBuffers(NamedTuple):
    """Where a backward writes its gradients: the flat buffer, its views by name, per layer
    (``layer_views``, None entries when the base is frozen) and the LoRA adapters' (or None)."""
    flat: np.ndarray
    named: dict
    layers: list
    adapters: list | None


def grad_buffers(flat, layout, cfg, lora=None) -> GradBuffers:
    """GradBuffers over ``flat``, a gradient buffer of ``layout``: the model's parameters', or with
    LoRA (``lora``: its LoraSettings) the adapters' alone."""
    named = named_views(flat, layout)
    if lora is None:
        return GradBuffers(flat, named, layer_views(named, flat, layout, cfg), None)
    return GradBuffers(flat, named, [None] * cfg.n_layers, adapter_views(named, cfg.n_layers, lora))


class PartGradients:
    """Where each part of a training batch writes its gradients (engine/batch.py runs the parts):
    part 0 into the model's own buffers (``own``), every other part into buffers of its own, of the
    same layout, made on first use; the model adds them into its own after the parts ran."""

    def __init__(self, own: GradBuffers, layout, cfg, lora=None):
        self.own, self.layout, self.cfg, self.lora = own, layout, cfg, lora
        self.others = {}

    def __getitem__(self, part) -> GradBuffers:
        if part == 0:
            return self.own
        if part not in self.others:
            self.others[part] = grad_buffers(np.zeros_like(self.own.flat), self.layout, self.cfg, self.lora)
        return self.others[part]
