"""Golden files: the reference model's every named activation and gradient, for another implementation's CI.

`npllama reference MODEL --out golden.safetensors` runs ``npllama.reference.run_with_cache`` on a
batch and writes one safetensors file holding

    tokens, targets            int64 (B, T): targets[b, t] is the token that should follow position t
                               (already shifted; -100 = not counted)
    segment_ids, position_ids, attention_mask
                               int64 (B, T), when given (packed rows, padding)
    loss                       float (), the mean cross-entropy over the counted positions
    <activation>               every named activation (docs/check-your-implementation.md lists them)
    grad.<activation>          dL/d(activation)
    grad.<parameter>           dL/d(parameter), Hugging Face names

with, in the metadata, "npllama.config" (the LlamaConfig as JSON), "npllama.dtype" (float64,
float32 or bfloat16), "npllama.version" and "npllama.command" (the command line).  ``npllama
compare`` reads it (and .npz files with the same names); ``npllama.hf_oracle`` writes transformers'
values in the same format.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .config import LlamaConfig
from .errors import CheckpointError, InputError
from .files import read_json
from .adapters import merge_adapters
from .formats import load
from .formats.hf import save_pretrained
from .formats.safetensors import read_safetensors, read_safetensors_header, write_safetensors
from .gradcheck import random_params
from .reference import DTYPES, run_with_cache

FORMAT = "npllama-golden-1"


def next_token_targets(tokens, segment_ids=None, attention_mask=None, position_ids=None):
    """targets[b, t] = tokens[b, t + 1], and -100 where nothing follows: at the last position, at
    a document's last position (segment_ids) and at padding (attention_mask == 0).  (position_ids
    is accepted and unused, so that a dict of inputs can be passed.)"""
    tokens = np.asarray(tokens)
    targets = np.concatenate([tokens[:, 1:], np.full((tokens.shape[0], 1), -100, dtype=tokens.dtype)], axis=1)
    if segment_ids is not None:
        segment_ids = np.asarray(segment_ids)
        targets[:, :-1][segment_ids[:, 1:] != segment_ids[:, :-1]] = -100
    if attention_mask is not None:
        targets[np.asarray(attention_mask) == 0] = -100
    return targets


def positions_per_document(segment_ids):
    """RoPE positions restarting at 0 with each document of a packed row: (B, T) ints."""
    segment_ids = np.asarray(segment_ids)
    positions = np.zeros(segment_ids.shape, dtype=np.int64)
    for t in range(1, segment_ids.shape[1]):
        same = segment_ids[:, t] == segment_ids[:, t - 1]
        positions[:, t] = np.where(same, positions[:, t - 1] + 1, 0)
    return positions


def golden_tensors(run, tokens, targets) -> dict:
    """The file's tensors from a ``reference.Run`` (or anything with activations, grads and loss)."""
    tensors = {**run.activations, **run.grads}
    if tokens is not None:
        tensors["tokens"] = np.asarray(tokens, dtype=np.int64)
    if targets is not None:
        tensors["targets"] = np.asarray(targets, dtype=np.int64)
    if run.loss is not None:
        tensors["loss"] = np.asarray(run.loss, dtype=np.float64)
    return tensors


def write_golden(path, tensors: dict, cfg: LlamaConfig | None = None, dtype: str = "float64", command=None,
                 producer: str = "npllama.reference"):
    """Write ``tensors`` (name -> array) as a golden file, atomically, with the metadata above."""
    meta = {"format": FORMAT, "npllama.version": __version__, "npllama.dtype": dtype, "npllama.producer": producer,
            "npllama.command": command if command is not None else shlex.join(sys.argv)}
    if cfg is not None:
        meta["npllama.config"] = json.dumps(cfg.to_dict())
    arrays = {}
    for name, value in tensors.items():
        a = np.asarray(value)
        arrays[name] = np.ascontiguousarray(a)
    write_safetensors(path, arrays, meta)


def read_tensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors or .npz file; bfloat16 tensors come as float32."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}, {}
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
    _, metadata, _ = read_safetensors_header(path)
    tensors = {}
    for name, (st_dtype, arr) in read_safetensors(path).items():
        tensors[name] = (arr.astype(np.uint32) << 16).view(np.float32) if st_dtype == "BF16" else arr
    return tensors, metadata


# ---- `npllama reference` ------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("model", nargs="?", help="a Hugging Face or run directory, a .gguf file, a llama2.c .bin or "
                        "a PEFT adapter directory (its adapters merged) (or none, with --random-config)")
    parser.add_argument("--random-config", metavar="CONFIG.json",
                        help="a random model of this config (npllama's LlamaConfig fields or a Hugging Face "
                             "config.json) instead of MODEL; its weights are saved beside --out (OUT.model/, "
                             "Hugging Face format) so that your implementation loads the same ones")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="the input text (needs the model's tokenizer)")
    source.add_argument("--tokens", help="token ids: '1,2,3' (one row) or '1,2,3;4,5,6' (rows of equal length)")
    parser.add_argument("--batch", type=int, default=2, help="random tokens: rows (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=8, help="random tokens: positions (default: %(default)s)")
    parser.add_argument("--targets", help="target ids, as --tokens (-100: not counted); default: the next token "
                        "of each position, -100 at the last")
    parser.add_argument("--segment-ids", metavar="ROWS", help="packed rows: each position's document, as --tokens "
                        "(a position attends only to earlier positions of its document; RoPE positions restart "
                        "with each unless --position-ids)")
    parser.add_argument("--position-ids", metavar="ROWS", help="RoPE positions, as --tokens (default: 0, 1, ...)")
    parser.add_argument("--attention-mask", metavar="ROWS", help="1 for a token, 0 for padding, as --tokens "
                        "(padding targets become -100)")
    parser.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                        help="the loss over the counted positions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tokens and random weights "
                        "(default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float64",
                        help="compute in float64 (the reference values), float32, or float32 with bfloat16 "
                             "matmul inputs (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="the golden file to write")


def _id_rows(text, what):
    try:
        rows = [[int(v) for v in row.split(",")] for row in text.strip().split(";")]
    except ValueError:
        raise InputError(f"--{what} expects integers like '1,2,3;4,5,6', got {text[:60]!r}") from None
    if len({len(r) for r in rows}) != 1:
        raise InputError(f"--{what}: every row needs the same length, got {[len(r) for r in rows]}")
    return np.array(rows, dtype=np.int64)


def _random_model(config_path, seed):
    raw = read_json(Path(config_path), "config")
    cfg = LlamaConfig.from_hf_dict(raw, str(config_path)) if "hidden_size" in raw else LlamaConfig.from_dict(raw)
    return cfg, random_params(cfg, np.random.default_rng(seed)), None


def _load_model(path):
    model = load(path, dtype=np.float64)
    if model.lora is not None:           # a PEFT adapter directory: what it computes, as one model
        model = merge_adapters(model)
    return model.config, model.params, model.tokenizer


def run(args) -> int:
    if (args.model is None) == (args.random_config is None):
        raise InputError("give MODEL or --random-config CONFIG.json, exactly one")
    out = Path(args.out)
    if args.random_config:
        cfg, params, tokenizer = _random_model(args.random_config, args.seed)
    else:
        cfg, params, tokenizer = _load_model(args.model)
    if args.text is not None:
        if tokenizer is None:
            raise InputError("--text needs the model's tokenizer, and this model has none: give --tokens")
        tokens = np.asarray(tokenizer.encode(args.text), dtype=np.int64)[None]
    elif args.tokens is not None:
        tokens = _id_rows(args.tokens, "tokens")
    else:
        if args.batch < 1 or args.seq_len < 1:
            raise InputError(f"--batch and --seq-len must be positive, got {args.batch} and {args.seq_len}")
        tokens = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, size=(args.batch, args.seq_len))
    inputs = {}
    if args.segment_ids is not None:
        inputs["segment_ids"] = _id_rows(args.segment_ids, "segment-ids")
        inputs["position_ids"] = positions_per_document(inputs["segment_ids"])
    if args.position_ids is not None:
        inputs["position_ids"] = _id_rows(args.position_ids, "position-ids")
    if args.attention_mask is not None:
        inputs["attention_mask"] = _id_rows(args.attention_mask, "attention-mask")
    targets = next_token_targets(tokens, **inputs) if args.targets is None else _id_rows(args.targets, "targets")
    result = run_with_cache(params, cfg, tokens, targets, dtype=args.dtype, reduction=args.reduction, **inputs)
    write_golden(out, {**golden_tensors(result, tokens, targets), **inputs}, cfg, args.dtype)
    print(f"wrote {out}: {len(result.activations)} activations, {len(result.grads)} gradients, loss "
          f"{result.loss:.6f} ({tokens.shape[0]} x {tokens.shape[1]} tokens, {args.dtype})")
    if args.random_config:
        weights = out.with_suffix(".model")
        save_pretrained(weights, cfg, params, None)
        print(f"wrote {weights}/: the random model's weights (Hugging Face format)")
    return 0
