"""LoRA adapters on a Llama's projections: which matrices they are, where they sit in the trainable
buffer, their initial values, the dropout masks of their inputs, and folding them into the base.

The maths (forward, backward, init, merge of one adapter) is npllama/layers/lora.py and
docs/12-lora.md; the model (``Llama.add_lora``) owns the buffers, and this module says what goes in
them.  Names are PEFT's without its "base_model.model." prefix: ``model.layers.{i}.{module}.lora_A.weight``
(r, in) and ``...lora_B.weight`` (out, r).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import LORA_TARGETS
from .errors import ConfigError
from .layers.dropout import dropout_mask
from .layers.lora import lora_init, merge_lora

# where each LoRA target (PEFT's target_modules) sits in a layer
LORA_MODULES = {t: ("mlp." if t in ("gate_proj", "up_proj", "down_proj") else "self_attn.") + t for t in LORA_TARGETS}


def lora_module(layer: int, target: str) -> str:
    """The name of the module ``target`` adapts in layer ``layer``, e.g. model.layers.0.self_attn.q_proj."""
    return f"model.layers.{layer}.{LORA_MODULES[target]}"


class LoraSettings(NamedTuple):
    rank: int
    alpha: float
    targets: tuple[str, ...]   # PEFT's target_modules, in LORA_TARGETS order
    dropout: float             # on the adapters' inputs

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_settings(rank, alpha, targets=LORA_TARGETS, dropout=0.0) -> LoraSettings:
    """The settings checked, or ConfigError naming the bad one."""
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ConfigError(f"LoRA targets must be among {', '.join(LORA_TARGETS)}, got {', '.join(unknown) or 'none'}")
    if int(rank) != rank or rank < 1 or not alpha > 0 or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got {rank}, {alpha}, {dropout}")
    return LoraSettings(int(rank), float(alpha), tuple(t for t in LORA_TARGETS if t in targets), float(dropout))


def lora_layout(base_params: dict, n_layers: int, lora: LoraSettings) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every adapter matrix, in the order they sit in the trainable buffer: per
    layer and target, A (r, in) then B (out, r); ``base_params`` gives the adapted weights' shapes."""
    layout = []
    for i in range(n_layers):
        for target in lora.targets:
            module = lora_module(i, target)
            d_out, d_in = base_params[module + ".weight"].shape
            layout += [(module + ".lora_A.weight", (lora.rank, d_in)), (module + ".lora_B.weight", (d_out, lora.rank))]
    return layout


def init_adapters(lora_params: dict, rank: int, seed: int) -> None:
    """A and B as PEFT initialises them (layers/lora.py's lora_init: B = 0, so the model computes
    exactly what the base does until a step moves B), the A's drawn in layout order."""
    rng = np.random.default_rng(seed)
    for name, a in lora_params.items():
        if name.endswith(".lora_A.weight"):
            b = lora_params[name.removesuffix("A.weight") + "B.weight"]
            a[...], b[...] = lora_init(rng, a.shape[1], b.shape[0], rank, a.dtype)


def adapter_views(views: dict, n_layers: int, lora: LoraSettings) -> list[dict]:
    """Per layer, {target: (A, B)} of ``views`` (keyed like lora_layout)."""
    return [{t: tuple(views[f"{lora_module(i, t)}.lora_{m}.weight"] for m in "AB") for t in lora.targets}
            for i in range(n_layers)]


def layer_adapters(layer_views: dict, i: int, lora: LoraSettings, lora_masks) -> dict:
    """Layer i's adapters as the block takes them: {target: (A, B, scale, mask or None)}."""
    masks = {} if lora_masks is None else lora_masks
    return {t: (a, b, lora.scale, masks.get(lora_module(i, t))) for t, (a, b) in layer_views.items()}


def draw_lora_masks(layer_views: dict, i: int, N: int, p: float, rng, dtype) -> dict:
    """Layer i's adapters' input masks over N rows, {module name: (N, in)}, in target order."""
    return {lora_module(i, t): dropout_mask((N, a.shape[1]), p, rng, dtype) for t, (a, _) in layer_views.items()}


def merge_adapters(model):
    """A new model without adapters whose every adapted weight is W + (alpha/r) B A (layers/lora.py's
    merge_lora): what a LoRA model computes without dropout, in a plain Llama (its tokenizer too)."""
    merged = type(model)(model.config, dtype=model.dtype, init=False)
    merged.flat_params[...] = model.flat_params
    merged.tokenizer = model.tokenizer
    for name, w in model.params.items():
        if getattr(w, "quantized", False):     # a QLoRA base: its dequantized values (quantized_linear.py)
            merged.params[name][...] = w.dequantize(model.dtype)
    if model.lora is not None:
        for name, a in model.lora_params.items():
            if name.endswith(".lora_A.weight"):
                module = name.removesuffix(".lora_A.weight")
                b = model.lora_params[module + ".lora_B.weight"]
                merged.params[module + ".weight"][...] = merge_lora(merged.params[module + ".weight"], a, b,
                                                                    model.lora.scale)
    return merged
