"""`npllama inspect MODEL --text ...`: draw a trained model's attention patterns for a prompt.

MODEL is anything ``Llama.from_pretrained`` reads (a run directory of `npllama train`, a Hugging
Face directory, a .gguf file, ...).  The prompt goes through the reference model (npllama/reference.py,
float64) and every head's T x T attention probabilities are drawn, a row of heads per layer
(npllama/pictures.py: ``draw_attention``), to MODEL/attention.png or --out.  One line per head says
where it looks: how much of its attention goes to the first position, to the query's own position
and to the one before it, and how far back it looks on average.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import ConfigError
from .model import Llama
from .pictures import attention_patterns, draw_attention, head_summary

MAX_TOKENS = 64   # a T x T map per head: beyond this the cells are too small to read


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a run directory, Hugging Face directory or .gguf file")
    parser.add_argument("--text", required=True, help="the prompt whose attention is drawn")
    parser.add_argument("--out", "-o", metavar="PNG", default=None,
                        help="output file (default: MODEL/attention.png, or attention.png beside a file)")
    parser.add_argument("--layer", type=int, action="append", default=None,
                        help="draw only this layer (repeatable; default: all)")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    model = Llama.from_pretrained(args.model)
    if model.tokenizer is None:
        raise ConfigError(f"{args.model}: no tokenizer with this model, so --text cannot be encoded")
    ids = model.tokenizer.encode(args.text)
    if not len(ids):
        raise ConfigError("--text encodes to no tokens")
    if len(ids) > min(MAX_TOKENS, model.config.max_seq_len):
        raise ConfigError(f"--text is {len(ids)} tokens; at most {min(MAX_TOKENS, model.config.max_seq_len)} "
                          f"can be drawn")
    cfg = model.config
    layers = sorted(set(args.layer)) if args.layer else list(range(cfg.n_layers))
    bad = [i for i in layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise ConfigError(f"--layer {bad[0]}: the model has layers 0 to {cfg.n_layers - 1}")
    probs = attention_patterns(model.params, cfg, ids)
    labels = [model.tokenizer.decode([int(i)]) for i in ids]
    path = Path(args.model)
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "attention.png"
    draw_attention(probs[layers], labels, out, kv_heads=cfg.n_kv_heads if cfg.n_kv_heads < cfg.n_heads else None,
                   title=f"{path.name}: {args.text!r}" + ("" if args.layer is None else f", layers {layers}"))
    print(f"{len(ids)} tokens: " + " | ".join(labels))
    for row in head_summary(probs):
        if row["layer"] in layers:
            print("layer {layer} head {head}: first {first:.2f}, self {self:.2f}, previous {previous:.2f}, "
                  "mean distance back {distance:.1f}".format(**row))
    print(out)
    return 0

