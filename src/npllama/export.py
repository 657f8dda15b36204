"""`npllama export RUN --to gguf|llama2c|hf [--merge]`: a model, with its tokenizer, in another runtime's format.

    npllama export runs/shakespeare --to gguf [--dtype f16]     # -> runs/shakespeare.gguf
    npllama export runs/shakespeare --to llama2c [--version 1]  # -> runs/shakespeare-llama2c/{model,tokenizer}.bin
    npllama export runs/my-lora --merge [--to gguf]             # -> runs/my-lora-hf/ (Hugging Face directory)

RUN is anything ``Llama.from_pretrained`` loads (a run directory of `npllama train`, a Hugging Face
directory) and must come with its tokenizer.  GGUF files run in llama.cpp (``llama-cli -m FILE``);
llama2.c's go to ``run.c``: ``./run DIR/model.bin -z DIR/tokenizer.bin`` (run.c reads version 0
only; version 1 is for other readers).  Outputs are never overwritten without ``--force``, and are
written whole or not at all.

A LoRA run (or any PEFT adapter directory) is exported with ``--merge``: every adapted weight
becomes W + (alpha / r) B A (``npllama.adapters.merge_adapters``), so the output is an ordinary model
of the base's size; ``--to hf`` (the default with ``--merge``) writes it as a Hugging Face directory
that transformers loads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CheckpointError, ConfigError
from .formats.gguf_writer import DTYPES, write_gguf
from .formats.llama2c import llama2c_vocabulary, write_llama2c, write_tokenizer_bin
from .adapters import merge_adapters
from .model import Llama

FORMATS = ("gguf", "llama2c", "hf")
LLAMA2C_FILES = ("model.bin", "tokenizer.bin")
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory or Hugging Face directory of the model")
    p.add_argument("--to", choices=FORMATS, help="gguf (llama.cpp), llama2c (run.c) or hf (a Hugging Face "
                   "directory; the default with --merge)")
    p.add_argument("--merge", action="store_true", help="fold a LoRA run's adapters into the weights "
                   "(W + alpha/r B A) and export the merged model")
    p.add_argument("--out", metavar="PATH", help="output: the .gguf file, or the directory for llama2.c's model.bin "
                   "and tokenizer.bin or the Hugging Face files (default: beside RUN, RUN.gguf / RUN-f16.gguf / "
                   "RUN-llama2c / RUN-hf)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="f32", help="GGUF matrices' type (default f32)")
    p.add_argument("--version", type=int, choices=(0, 1), default=0,
                   help="llama2.c checkpoint version (default 0, the one run.c reads)")
    p.add_argument("--force", action="store_true", help="replace existing output files")


def default_output(run: Path, to: str, dtype: str) -> Path:
    stem = run.parent / (run.stem if run.is_file() else run.name)
    if to == "gguf":
        return stem.with_name(stem.name + ("" if dtype == "f32" else f"-{dtype}") + ".gguf")
    return stem.with_name(stem.name + f"-{to}")


def run(args) -> int:
    args.to = args.to or ("hf" if args.merge else None)
    if args.to is None:
        raise ConfigError(f"give the output format: --to {'|'.join(FORMATS)}")
    if args.to == "hf" and args.dtype != "f32":
        raise ConfigError("--dtype is the GGUF matrices' type; a Hugging Face export keeps the model's float32")
    if args.to == "llama2c" and args.dtype != "f32":
        raise ConfigError("llama2.c's run.c reads float32 weights only; drop --dtype")
    if args.to != "llama2c" and args.version != 0:
        raise ConfigError(f"--version is a llama2.c checkpoint version; {'GGUF' if args.to == 'gguf' else 'Hugging Face'} "
                          "has none")
    source = Path(args.run)
    out = Path(args.out) if args.out else default_output(source, args.to, args.dtype)
    targets = {"llama2c": [out / name for name in LLAMA2C_FILES], "hf": [out / name for name in HF_FILES],
               "gguf": [out]}[args.to]
    existing = [str(t) for t in targets if t.exists() or t.is_symlink()]
    if existing and not args.force:
        raise ConfigError(f"{existing[0]} exists; pass --force to replace it")
    if args.to in ("llama2c", "hf") and out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; the {args.to} output is a directory")

    model = Llama.from_pretrained(source)
    if model.lora is not None:
        if not args.merge:
            raise ConfigError(f"{source} is a LoRA adapter on {model.lora_base}; pass --merge to fold it into the "
                              "weights")
        model = merge_adapters(model)
    elif args.merge:
        raise ConfigError(f"{source} has no LoRA adapter to merge; drop --merge")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise CheckpointError(f"{source}: no tokenizer with the model; an exported model needs one")
    config = model.config
    if args.to == "hf":
        model.save_pretrained(out)
        print(f"wrote {out} (config.json, model.safetensors, tokenizer.json); transformers loads it with "
              f"LlamaForCausalLM.from_pretrained({str(out)!r})")
        return 0
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
