"""`npllama export RUN --to gguf|llama2c`: a model, with its tokenizer, in another runtime's format.

    npllama export runs/shakespeare --to gguf [--dtype f16]     # -> runs/shakespeare.gguf
    npllama export runs/shakespeare --to llama2c [--version 1]  # -> runs/shakespeare-llama2c/{model,tokenizer}.bin

RUN is anything ``Llama.from_pretrained`` loads (a run directory of `npllama train`, a Hugging Face
directory) and must come with its tokenizer.  GGUF files run in llama.cpp (``llama-cli -m FILE``);
llama2.c's go to ``run.c``: ``./run DIR/model.bin -z DIR/tokenizer.bin`` (run.c reads version 0
only; version 1 is for other readers).  Outputs are never overwritten without ``--force``, and are
written whole or not at all.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CheckpointError, ConfigError
from .formats.gguf_writer import DTYPES, write_gguf
from .formats.llama2c import llama2c_vocabulary, write_llama2c, write_tokenizer_bin
from .model import Llama

FORMATS = ("gguf", "llama2c")
LLAMA2C_FILES = ("model.bin", "tokenizer.bin")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory or Hugging Face directory of the model")
    p.add_argument("--to", required=True, choices=FORMATS, help="gguf (llama.cpp) or llama2c (run.c)")
    p.add_argument("--out", metavar="PATH", help="output: the .gguf file, or the directory for llama2.c's model.bin "
                   "and tokenizer.bin (default: beside RUN, RUN.gguf / RUN-f16.gguf / RUN-llama2c)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="f32", help="GGUF matrices' type (default f32)")
    p.add_argument("--version", type=int, choices=(0, 1), default=0,
                   help="llama2.c checkpoint version (default 0, the one run.c reads)")
    p.add_argument("--force", action="store_true", help="replace existing output files")


def default_output(run: Path, to: str, dtype: str) -> Path:
    stem = run.parent / (run.stem if run.is_file() else run.name)
    if to == "gguf":
        return stem.with_name(stem.name + ("" if dtype == "f32" else f"-{dtype}") + ".gguf")
    return stem.with_name(stem.name + "-llama2c")


def run(args) -> int:
    if args.to == "llama2c" and args.dtype != "f32":
        raise ConfigError("llama2.c's run.c reads float32 weights only; drop --dtype")
    if args.to == "gguf" and args.version != 0:
        raise ConfigError("--version is a llama2.c checkpoint version; GGUF has none")
    source = Path(args.run)
    out = Path(args.out) if args.out else default_output(source, args.to, args.dtype)
    targets = [out / name for name in LLAMA2C_FILES] if args.to == "llama2c" else [out]
    existing = [str(t) for t in targets if t.exists() or t.is_symlink()]
    if existing and not args.force:
        raise ConfigError(f"{existing[0]} exists; pass --force to replace it")
    if args.to == "llama2c" and out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; llama2.c's output is a directory (for model.bin and tokenizer.bin)")

    model = Llama.from_pretrained(source)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise CheckpointError(f"{source}: no tokenizer with the model; an exported model needs one")
    config = model.config
    if args.to == "gguf":
        write_gguf(out, config, model.params, tokenizer, dtype=args.dtype, name=source.name)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.dtype}); run it with llama.cpp: "
              f"llama-cli -m {out}")
        return 0
    vocab = llama2c_vocabulary(tokenizer, config.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    write_llama2c(out / "model.bin", config, model.params, version=args.version, token_order=vocab.order)
    write_tokenizer_bin(out / "tokenizer.bin", vocab.pieces, vocab.scores)
    how = (f"run it with llama2.c: ./run {out / 'model.bin'} -z {out / 'tokenizer.bin'}" if args.version == 0
           else "run.c reads version 0 only")
    print(f"wrote {out / 'model.bin'} ({(out / 'model.bin').stat().st_size / 1e6:.1f} MB, version {args.version}) "
          f"and {out / 'tokenizer.bin'}; {how}")
    return 0
