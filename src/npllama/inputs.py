"""Checks of what callers hand the model (``Llama.forward``, ``loss``, ``loss_and_grad``): token
ids, targets, packed rows and padding (position_ids, segment_ids, attention_mask; npllama.reference
checks them here too), dropout masks and the LoRA adapters' masks.  Each returns the array the passes want
(contiguous, of the model's dtype, rows flattened) or raises InputError naming the argument and the
problem (a continuation's key/value cache, ``check_kv_cache``, is only checked).  The masks a training step draws when it is given none: ``draw_masks``.  Generation's own arguments are checked in npllama/generate/sampling.py.
"""
from typing import NamedTuple

import numpy as np

from .adapters import draw_lora_masks
from .errors import InputError
from .layers.cross_entropy import IGNORE_INDEX
from .layers.dropout import dropout_mask


def check_tokens(tokens, config, name="tokens", allow_ignore=False) -> np.ndarray:
    """Token ids (B, T) -> contiguous int64, each in [0, vocab_size) (or IGNORE_INDEX with
    ``allow_ignore``), T <= max_seq_len."""
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
    if T > config.max_seq_len:
        raise InputError(f"{name} has length {T}, past max_seq_len={config.max_seq_len}")
    V = config.vocab_size
    bad = (arr < 0) | (arr >= V)
    if allow_ignore:
        bad &= arr != IGNORE_INDEX
    if bad.any():
        extra = f" (or {IGNORE_INDEX} to ignore)" if allow_ignore else ""
        raise InputError(f"{name} has id {int(arr[bad].flat[0])} outside [0, {V}){extra}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_tokens_and_targets(tokens, targets, config) -> tuple[np.ndarray, np.ndarray]:
    """check_tokens of both, targets allowed IGNORE_INDEX, of the same shape."""
    tokens = check_tokens(tokens, config)
    targets = check_tokens(targets, config, "targets", allow_ignore=True)
    if targets.shape != tokens.shape:
        raise InputError(f"targets shape {targets.shape} does not match tokens shape {tokens.shape}")
    return tokens, targets


class PackedRows(NamedTuple):
    """A batch's checked position_ids (B, T) (RoPE positions, restarting per document of a packed
    row), segment_ids (B, T) (a position attends only to earlier positions of its own document) and
    attention_mask (B, T) (1 = token, 0 = padding: no other position attends to a padding
    position); each None when not given."""
    position_ids: np.ndarray | None
    segment_ids: np.ndarray | None
    attention_mask: np.ndarray | None

    def rows(self, lo, hi) -> "PackedRows":
        """Those of sequences lo .. hi-1 (a part of the batch)."""
        return PackedRows(*(None if a is None else a[lo:hi] for a in self))


def _integers(value, what):
    a = np.asarray(value)
    if a.dtype.kind not in "iu":
        raise InputError(f"{what} must be integers, got dtype {a.dtype}")
    return a


def check_packing(config, B, T, position_ids=None, segment_ids=None, attention_mask=None) -> PackedRows | None:
    """position_ids (T,) or (B, T) in [0, max_seq_len), segment_ids (B, T) integers, attention_mask
    (B, T) of 0 and 1 -> PackedRows (position_ids as (B, T) int64), or None when none is given."""
    if position_ids is None and segment_ids is None and attention_mask is None:
        return None
    if position_ids is not None:
        p = _integers(position_ids, "position_ids")
        if p.shape not in ((T,), (B, T)):
            raise InputError(f"position_ids must have shape ({T},) or ({B}, {T}), got {p.shape}")
        if p.min() < 0 or p.max() >= config.max_seq_len:
            raise InputError(f"position_ids must lie in [0, max_seq_len = {config.max_seq_len}), got "
                             f"{int(p.min()) if p.min() < 0 else int(p.max())}")
        position_ids = np.ascontiguousarray(np.broadcast_to(p, (B, T)), dtype=np.int64)
    for value, what in ((segment_ids, "segment_ids"), (attention_mask, "attention_mask")):
        if value is not None and np.shape(value) != (B, T):
            raise InputError(f"{what} must have shape ({B}, {T}), got {np.shape(value)}")
    if segment_ids is not None:
        segment_ids = _integers(segment_ids, "segment_ids")
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask)
        if attention_mask.dtype.kind not in "biu" or not np.isin(attention_mask, (0, 1)).all():
            raise InputError("attention_mask must hold 0 (padding) and 1 (token) only")
    return PackedRows(position_ids, segment_ids, attention_mask)


def check_kv_cache(kv_cache, config, dtype, B, T):
    """A continuation's (k_cache_t, v_cache, start) (``Llama.last_hidden_state``): the cache's arrays
    (L, K, hd, S) and (L, K, S, hd), C-contiguous, of the model's dtype; one sequence (B = 1) whose
    T new positions start .. start+T-1 fit in the S the cache holds."""
    k_cache_t, v_cache, start = kv_cache
    L, K, hd = config.n_layers, config.n_kv_heads, config.head_dim
    S = getattr(k_cache_t, "shape", (0,))[-1]
    for name, a, shape in (("k_cache_t", k_cache_t, (L, K, hd, S)), ("v_cache", v_cache, (L, K, S, hd))):
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype or not a.flags.c_contiguous:
            raise InputError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if B != 1:
        raise InputError(f"a continuation over a key/value cache runs one sequence, got a batch of {B}")
    if not 0 <= int(start) <= S - T:
        raise InputError(f"{T} positions from {start} do not fit in the cache's {S}")


def check_dropout_masks(masks, config, B, T, dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (attn_mask, ffn_mask) pair per layer, each (B, T, D) -> the pairs as (B*T, D) arrays of
    ``dtype``."""
    L, D = config.n_layers, config.dim
    if not isinstance(masks, (list, tuple)) or len(masks) != L:
        got = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
        raise InputError(f"dropout_masks must be a list of {L} (attn_mask, ffn_mask) pairs, one per layer, "
                         f"got {got}")
    checked = []
    for i, pair in enumerate(masks):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InputError(f"dropout_masks[{i}] must be an (attn_mask, ffn_mask) pair")
        rows = []
        for j, mask in enumerate(pair):
            mask = np.asarray(mask)
            if mask.dtype.kind not in "biuf" or mask.shape != (B, T, D):
                raise InputError(f"dropout_masks[{i}][{j}] must be a real array of shape (batch, seq_len, dim) "
                                 f"= {(B, T, D)}, got {mask.dtype} {mask.shape}")
            rows.append(np.ascontiguousarray(mask, dtype=dtype).reshape(B * T, D))
        checked.append(tuple(rows))
    return checked


def check_lora_masks(masks, lora_params, B, T, dtype) -> dict:
    """{module name: (B, T, in)} -> {module name: (B*T, in)} of ``dtype``, or InputError."""
    if lora_params is None:
        raise InputError("lora_masks given but the model has no LoRA adapters")
    checked = {}
    for name, mask in masks.items():
        if name + ".lora_A.weight" not in lora_params:
            raise InputError(f"lora_masks: {name!r} is not a module with a LoRA adapter")
        d_in = lora_params[name + ".lora_A.weight"].shape[1]
        mask = np.asarray(mask)
        if mask.dtype.kind not in "biuf" or mask.shape != (B, T, d_in):
            raise InputError(f"lora_masks[{name!r}] must be a real array of shape {(B, T, d_in)}, "
                             f"got {mask.dtype} {mask.shape}")
        checked[name] = np.ascontiguousarray(mask, dtype=dtype).reshape(B * T, d_in)
    return checked


def draw_masks(model, N, base=True, lora=True):
    """The dropout masks of a training step over N rows, drawn from ``model.dropout_rng`` (None
    where there is no dropout): per layer the attention's and the feed-forward's (``base``),
    then the adapters' inputs' (``lora``), in that order.  The step's parts take their rows."""
    cfg = model.config
    if not model.training:
        return None, None
    p_base = cfg.dropout if base else 0.0
    p_lora = model.lora.dropout if lora and model.lora is not None else 0.0
    masks, lora_masks = [], {}
    for i in range(cfg.n_layers):
        if p_base > 0.0:
            masks.append(tuple(dropout_mask((N, cfg.dim), p_base, model.dropout_rng, model.dtype) for _ in range(2)))
        if p_lora > 0.0:
            lora_masks.update(draw_lora_masks(model.lora_layers[i], i, N, p_lora, model.dropout_rng, model.dtype))
    return masks or None, lora_masks or None
