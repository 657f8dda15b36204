"""Setting up a run: a fresh one (``new_run``: the run directory claimed, the tokenizer trained or
read from the corpus cache, the corpus tokenized or copied from the cache, the model made, or
loaded with --init-from), or a saved one (``load_run``: the directory claimed, checkpoint.py restores
the run); and undoing the setup of a run that never saved (``discard_unsaved_run``).
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from ..adapters import merge_adapters
from ..data import BatchSampler, Split
from ..errors import CheckpointError, ConfigError
from ..files import COMMIT_DIR, STAGING_DIR
from ..model import Llama
from . import corpus_cache
from .checkpoint import restore_run
from .config import DTYPES, TrainConfig, model_config
from .progress import say
from .run import (OWN_NAMES, STATE_FILE, TOKENS_DIR, Run, base_weights_sha256, load_dataset, make_optimizer,
                  read_split)
from .run_dir import RunDirectory


def _default_out_dir(cfg: TrainConfig) -> Path:
    name = "shakespeare" if cfg.data is None else (Path(cfg.data).stem or "data")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run(cfg: TrainConfig, verbose: bool = True) -> Run:
    """Set up a fresh run (or a fine-tune with ``init_from``): run dir, tokenizer, tokens, model.

    The configuration was checked when it was made (TrainConfig); here the corpus is read and
    checked before anything is written, the run directory is claimed (run_dir.py: a new, empty or
    npllama directory unless ``force``, locked), and if setting up fails what this run created
    there is removed again (``discard_unsaved_run``), so that no half-made run is left to --resume.
    """
    cfg = dataclasses.replace(cfg)
    # Absolute paths, so that --resume works from any working directory.
    if cfg.data is not None:
        cfg.data = str(Path(cfg.data).resolve())
    if cfg.val_data is not None:
        cfg.val_data = str(Path(cfg.val_data).resolve())
    if cfg.init_from is not None:
        cfg.init_from = str(Path(cfg.init_from).resolve())
    run_dir = Path(cfg.out_dir) if cfg.out_dir else _default_out_dir(cfg)
    run_dir = run_dir.resolve()
    cfg.out_dir = str(run_dir)
    if cfg.init_from is not None:
        source = Path(cfg.init_from)
        if run_dir in (source, source.parent):
            raise ConfigError(f"--out-dir {run_dir} is where --init-from {source} is: a fine-tune never writes "
                              "into the checkpoint it starts from; choose another --out-dir")
    if (run_dir / STATE_FILE).exists() or (run_dir / COMMIT_DIR).exists():
        raise ConfigError(f"{run_dir} already holds a training run; continue it with --resume {run_dir} "
                          "or choose another --out-dir")
    if cfg.init_from is not None:
        init_dir = Path(cfg.init_from)
        explicit = [n for n in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim") if getattr(cfg, n)]
        if explicit:
            raise ConfigError(f"--init-from takes the model shape from {init_dir}; do not also give "
                              f"{', '.join('--' + n.replace('_', '-') for n in explicit)}")
        # (a Hugging Face directory is checked here, before seconds of loading; a .gguf carries its
        # tokenizer in its metadata, which _set_up checks once the model is loaded)
        if (init_dir / "config.json").is_file() and not (init_dir / "tokenizer.json").is_file():
            raise ConfigError(f"--init-from {init_dir}: no tokenizer.json there; fine-tuning needs the "
                              "checkpoint's own tokenizer")
    text_digest, split, described = read_split(cfg)
    directory = RunDirectory.claim(run_dir, own_names=OWN_NAMES, fresh=True, force=cfg.force)
    say(described, verbose)
    try:
        return _set_up(cfg, directory, text_digest, split, verbose)
    except BaseException:
        discard_unsaved_run(directory)
        directory.release()
        raise


def _set_up(cfg: TrainConfig, directory: RunDirectory, text_digest: str, split: Split, verbose: bool) -> Run:
    run_dir = directory.path
    dtype = DTYPES[cfg.dtype]
    setup = {}    # seconds of each part of setting up, for the start-up line
    if cfg.init_from is not None:
        init_dir = Path(cfg.init_from)
        model = Llama.from_pretrained(init_dir, dtype=dtype,
                                      quantized=cfg.lora_rank is not None and not cfg.dequantize_base)
        if model.lora is not None:                    # a LoRA run or adapter directory
            if cfg.lora_rank is not None:
                raise ConfigError(f"--init-from {init_dir}: LoRA on top of a LoRA adapter is not supported; "
                                  f"start from its base {model.lora_base} (or drop --lora-rank to fine-tune "
                                  "the merged model)")
            if Path(model.lora_base).resolve() == run_dir:
                raise ConfigError(f"--out-dir {run_dir} is the base model of --init-from {init_dir}: a fine-tune "
                                  "never writes into the checkpoint it starts from; choose another --out-dir")
            model = merge_adapters(model)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ConfigError(f"--init-from {init_dir}: the checkpoint has no tokenizer (no tokenizer.json, no "
                              "tokenizer in the GGUF metadata); fine-tuning needs the checkpoint's own tokenizer")
        if model.config.max_seq_len < cfg.seq_len:
            raise ConfigError(f"--init-from {init_dir}: the model's context is {model.config.max_seq_len} "
                              f"tokens, shorter than --seq-len {cfg.seq_len}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"--init-from {init_dir}: tokenizer has {tokenizer.vocab_size} tokens but "
                              f"the model only {model.config.vocab_size} embeddings")
        model.config.dropout = cfg.dropout
        cfg.vocab_size = model.config.vocab_size
        say(f"fine-tuning from {init_dir} ({model.num_parameters() / 1e6:.2f}M parameters, "
            f"its tokenizer of {tokenizer.vocab_size} tokens)", verbose)
        if cfg.lora_rank is not None:
            model.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","), cfg.lora_dropout, seed=cfg.seed)
            say(f"LoRA: rank {cfg.lora_rank} on {cfg.lora_targets}, {model.flat_lora.size:,} trainable parameters; "
                "the base is frozen", verbose)
    else:
        t0 = time.monotonic()
        tokenizer, cached, how = corpus_cache.tokenizer_for(split, cfg.vocab_size)   # (never sees held-out text)
        setup["tokenizer"] = time.monotonic() - t0
        say(f"{how} in {setup['tokenizer']:.1f}s", verbose)
        model = None
    tokenizer.save(run_dir / "tokenizer.json")
    if cfg.init_from is not None:
        # The checkpoint's eos/bos and chat template, which a LoRA run directory (no config.json, no
        # model.safetensors) would otherwise lose: `npllama generate RUN --chat` needs the template.
        tokenizer.save_config(run_dir)

    t0 = time.monotonic()
    copied = cfg.init_from is None and corpus_cache.copy_tokens(cached, run_dir / TOKENS_DIR)
    copied_stamps = corpus_cache.sidecar_stamps(run_dir / TOKENS_DIR)
    data = load_dataset(tokenizer, run_dir, split, verbose)   # (checks copied tokens; tokenizes again if stale)
    from_cache = copied and corpus_cache.sidecar_stamps(run_dir / TOKENS_DIR) == copied_stamps
    if cfg.init_from is None and not from_cache:
        corpus_cache.copy_tokens(run_dir / TOKENS_DIR, cached)
    setup["tokenizing"] = time.monotonic() - t0
    say(f"data: {len(data.train_tokens):,} training and {len(data.val_tokens):,} held-out tokens "
        f"({data.val_bytes:,} bytes held out), {'read from the cache' if from_cache else 'tokenized'} in "
        f"{setup['tokenizing']:.1f}s", verbose)
    if model is None:
        model = Llama(model_config(cfg, tokenizer.vocab_size), seed=cfg.seed, dtype=dtype)
        model.tokenizer = tokenizer
    # The three random streams: weights (seed), dropout (seed + 1), data order (seed + 2).
    model.dropout_rng = np.random.default_rng(cfg.seed + 1)
    model.train()
    sampler = BatchSampler(data.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 2)
    base_sha256 = None if model.lora is None else base_weights_sha256(cfg.init_from)
    return Run(config=cfg, run_dir=run_dir, model=model, tokenizer=tokenizer, data=data,
               text_sha256=text_digest, split_sha256=split.digest, optimizer=make_optimizer(model, cfg),
               sampler=sampler, directory=directory, setup_seconds=setup, base_sha256=base_sha256)


def load_run(run_dir, verbose: bool = True) -> Run:
    """Restore a run from its directory exactly as it was saved (see the module docstring)."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: no such directory")
    directory = RunDirectory.claim(run_dir, own_names=OWN_NAMES, fresh=False)
    try:
        run = restore_run(run_dir, verbose)
    except BaseException:
        directory.release()
        raise
    run.directory = directory
    return run


def discard_unsaved_run(directory: RunDirectory | None) -> None:
    """Undo the setting up of a run that never saved a checkpoint: remove what this run created in
    its directory (the directory too if it made it), nothing else; a checkpoint after all (saved,
    or being moved into place) keeps everything."""
    if directory is None or (directory.path / STATE_FILE).exists() or (directory.path / COMMIT_DIR).exists():
        return
    stage = directory.path / STAGING_DIR
    if stage.is_dir() and not stage.is_symlink():   # (a save that failed midway: always npllama's own)
        shutil.rmtree(stage, ignore_errors=True)
    directory.discard()
