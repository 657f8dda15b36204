"""A training run and its checkpoints: everything a step depends on (``Run``), setting up a fresh
run, saving it as one unit and restoring it exactly, and the metrics log.

A checkpoint is written into a staging directory and replaces the previous one as a unit
(``files.begin_staged_write`` / ``commit_staged_write``), so a crash at any moment leaves one
complete checkpoint; on resume the recorded SHA-256 of the two safetensors files must match too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data import BatchSampler, TokenDataset, generator_from_state, load_text, split_train_val, text_sha256
from ..errors import CheckpointError, ConfigError, NpllamaError
from ..files import (COMMIT_DIR, STAGING_DIR, atomic_write_bytes, atomic_write_json, begin_staged_write,
                     commit_staged_write, file_sha256, read_json, recover_staged_write)
from ..formats import hf
from ..formats.gguf import find_gguf
from ..formats.peft import ADAPTER_CONFIG, ADAPTER_FILE
from ..formats.safetensors import read_safetensors, write_safetensors
from ..adapters import merge_adapters
from ..model import Llama
from ..optim import AdamW, lr_at
from ..threads import live_thread_counts
from ..tokenizer import TOKENIZER_CONFIG_FILE, Tokenizer
from . import corpus_cache
from .config import DTYPES, TrainConfig, model_config
from .distributed import World
from .run_dir import RunDirectory

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
TOKENS_DIR = "tokens"
STATE_FORMAT = "npllama-train-state"
SETTINGS_FILES = ("config.json", ADAPTER_CONFIG, TOKENIZER_CONFIG_FILE)   # fingerprinted beside the weights
# what a run writes before its first checkpoint (directories before their contents): the paths of
# these it creates are all that a run which never saves removes again (RunDirectory.discard)
OWN_NAMES = ("tokenizer.json", TOKENIZER_CONFIG_FILE, METRICS_FILE, TOKENS_DIR,
             *(f"{TOKENS_DIR}/{name}" for name in corpus_cache.TOKEN_FILES), STAGING_DIR, COMMIT_DIR)
STATE_VERSION = 1


class TrainingDiverged(NpllamaError):
    """The loss or the gradient norm became NaN or infinite."""
    same_on_every_rank = True   # data parallel: loss, norm and weights are the same on every rank


@dataclass
class Run:
    config: TrainConfig
    run_dir: Path
    model: Llama
    tokenizer: Tokenizer
    data: TokenDataset
    text_sha256: str
    optimizer: AdamW
    sampler: BatchSampler
    step: int = 0
    total_steps: int | None = None
    warmup_steps: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0          # wall time spent in earlier sessions of this run
    plan: dict = field(default_factory=dict)
    last_checkpoint_step: int | None = None
    directory: RunDirectory | None = None   # run_dir locked by this process, and what this run made there
    setup_seconds: dict = field(default_factory=dict)   # seconds of each part of this session's setup
    base_sha256: str | None = None      # LoRA: the frozen base's weights, checked on resume
    world: World = field(default_factory=World)   # the ranks training this run (distributed.py)

    def release(self) -> None:
        """Unlock the run directory (at the end of the session)."""
        if self.directory is not None:
            self.directory.release()

    def lr_at(self, step: int) -> float:
        return lr_at(step, max_lr=self.config.lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps, min_lr=self.config.final_lr, kind=self.config.schedule)


def _weights_file(model) -> str:
    return MODEL_FILE if model.lora is None else ADAPTER_FILE


def base_weights_sha256(base) -> str:
    """One SHA-256 over the base model's files (a LoRA run trains against it): a single-file
    checkpoint (.gguf, llama2.c .bin) or a directory's one .gguf as Llama.from_pretrained finds them,
    else a Hugging Face directory's config.json and weight files."""
    base = Path(base)
    if base.is_file():
        paths = [base]
    elif not (base / "config.json").exists() and any(base.glob("*.gguf")):
        paths = [find_gguf(base)]
    else:
        paths = [base / "config.json", *hf.weight_files(base)]
    return hashlib.sha256("".join(file_sha256(p) for p in paths).encode()).hexdigest()


def say(msg: str, verbose: bool) -> None:
    """A line on stderr that does not break the progress bar."""
    if verbose:
        tqdm.write(msg, file=sys.stderr)


def _default_out_dir(cfg: TrainConfig) -> Path:
    name = "shakespeare" if cfg.data is None else (Path(cfg.data).stem or "data")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _load_dataset(cfg: TrainConfig, tokenizer, run_dir: Path, text: str):
    return TokenDataset.from_text(text, tokenizer, cache_dir=run_dir / TOKENS_DIR, val_fraction=cfg.val_fraction)


def make_optimizer(model, cfg: TrainConfig):
    """AdamW over what trains: with LoRA the adapters' buffer only (no state for frozen weights)."""
    return AdamW(model.trainable_params, cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 weight_decay=cfg.weight_decay, flat_params=model.flat_trainable)


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
    text = load_text(cfg.data)
    directory = RunDirectory.claim(run_dir, own_names=OWN_NAMES, fresh=True, force=cfg.force)
    try:
        return _set_up(cfg, directory, text, verbose)
    except BaseException:
        discard_unsaved_run(directory)
        directory.release()
        raise


def _set_up(cfg: TrainConfig, directory: RunDirectory, text: str, verbose: bool) -> Run:
    run_dir = directory.path
    dtype = DTYPES[cfg.dtype]
    setup = {}    # seconds of each part of setting up, for the start-up line
    text_digest = text_sha256(text)
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
        cached = corpus_cache.entry_dir(text_digest, cfg.vocab_size, cfg.val_fraction)
        tokenizer = corpus_cache.load_tokenizer(cached)
        if tokenizer is None:
            train_text, _ = split_train_val(text, cfg.val_fraction)
            with warnings.catch_warnings():   # a short vocabulary is an error here, not a warning
                warnings.simplefilter("ignore", UserWarning)
                tokenizer = Tokenizer.train(train_text, cfg.vocab_size)  # never sees the held-out text
            if tokenizer.vocab_size < cfg.vocab_size:
                raise ConfigError(f"--vocab-size {cfg.vocab_size} is more than this text supports: BPE found "
                                  f"only {tokenizer.vocab_size} tokens (pairs seen at least twice); use "
                                  f"--vocab-size {tokenizer.vocab_size} or less, or more text")
            corpus_cache.store_tokenizer(cached, tokenizer)
            how = f"trained a byte-level BPE tokenizer of {tokenizer.vocab_size} tokens"
        else:
            how = (f"byte-level BPE tokenizer of {tokenizer.vocab_size} tokens trained on this text by an earlier "
                   f"run, read from {cached}")
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
    data = _load_dataset(cfg, tokenizer, run_dir, text)   # (checks copied tokens; tokenizes again if stale)
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
               text_sha256=text_digest, optimizer=make_optimizer(model, cfg), sampler=sampler,
               directory=directory, setup_seconds=setup, base_sha256=base_sha256)


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


def save_checkpoint(run: Run, metrics: MetricsLog | None = None) -> None:
    """Write the model (HF format), the optimizer moments and the training state as one unit.

    The files are written into a staging directory and then replace the previous checkpoint's
    together (``files.begin_staged_write`` / ``commit_staged_write``; training_state.json moves last),
    so a crash at any moment leaves either the old checkpoint or the new one.
    """
    # A finite loss does not prove finite weights (a huge step can overflow them after the loss
    # was computed), and a checkpoint with inf/nan weights would replace the last good one.
    if not np.isfinite(run.model.flat_trainable).all():
        raise diverged(run, run.step, "the weights are not finite")
    rank_states = run.world.gather_rank_states(run.model)   # every rank takes part; rank 0 writes
    if rank_states is None:
        run.last_checkpoint_step = run.step
        return
    stage = begin_staged_write(run.run_dir, last=(STATE_FILE,))
    if run.model.lora is None:
        run.model.save_pretrained(stage)
    else:        # the adapter in PEFT's layout; the frozen base stays where it is (its hash in the state)
        run.model.save_adapter(stage, run.config.init_from)
    arrays, opt_meta = run.optimizer.state_dict()
    write_safetensors(stage / OPTIMIZER_FILE, arrays, {"format": "npllama-adamw", "step": str(run.step)})
    del arrays
    if metrics is not None:
        metrics.sync()
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": run.step,
        "total_steps": run.total_steps,
        "warmup_steps": run.warmup_steps,
        "tokens_seen": run.tokens_seen,
        "train_seconds": run.train_seconds,
        "train_config": run.config.to_dict(),
        "optimizer": opt_meta,
        "sampler": run.sampler.state_dict(),
        "dropout_rng": run.model.dropout_rng.bit_generator.state,
        "data": {"text_sha256": run.text_sha256, "train_tokens": int(len(run.data.train_tokens)),
                 "val_tokens": int(len(run.data.val_tokens)), "val_bytes": run.data.val_bytes},
        "tokenizer_sha256": run.tokenizer.fingerprint,
        "plan": run.plan,
        **({"ranks": {"size": len(rank_states), "dropout_rngs": rank_states}} if len(rank_states) > 1 else {}),
        "threads": live_thread_counts(),   # what OpenBLAS and Numba really use, not what was asked
        # checked on resume: a file replaced by hand (or a torn copy) is caught, not trained on
        "files_sha256": {name: file_sha256(stage / name) for name in (_weights_file(run.model), OPTIMIZER_FILE)},
        # and the model's settings beside them: a rope_theta or an eos edited in by hand is not the same run
        "settings_sha256": _settings_sha256(stage, run.run_dir),
        "lora_base_sha256": None if run.model.lora is None else run.base_sha256,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(stage / STATE_FILE, state)
    commit_staged_write(run.run_dir, stage, last=(STATE_FILE,))
    run.last_checkpoint_step = run.step


def _settings_sha256(stage: Path, run_dir: Path) -> dict:
    """SHA-256 of each of SETTINGS_FILES the checkpoint will have: the staged one, else the run
    directory's (a LoRA run's tokenizer_config.json, written at setup)."""
    digests = {}
    for name in SETTINGS_FILES:
        path = next((p for p in (stage / name, run_dir / name) if p.is_file()), None)
        if path is not None:
            digests[name] = file_sha256(path)
    return digests


def load_run(run_dir, verbose: bool = True) -> Run:
    """Restore a run from its directory exactly as it was saved (see the module docstring)."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: no such directory")
    directory = RunDirectory.claim(run_dir, own_names=OWN_NAMES, fresh=False)
    try:
        run = _restore(run_dir, verbose)
    except BaseException:
        directory.release()
        raise
    run.directory = directory
    return run


def _restore(run_dir: Path, verbose: bool) -> Run:
    recover_staged_write(run_dir, last=(STATE_FILE,))   # finish (or discard) a checkpoint a crash interrupted
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        if (run_dir / MODEL_FILE).is_file():
            hint = "to start from its weights use --init-from"
        elif (run_dir / "tokenizer.json").is_file():
            hint = ("a run killed before its first checkpoint; start it again with the same options "
                    f"and --out-dir {run_dir}")
        else:
            hint = "give the directory that npllama train printed"
        raise CheckpointError(f"{run_dir}: no {STATE_FILE}, so not a resumable npllama run ({hint})")
    state = _validated_state(read_json(state_path, STATE_FILE), state_path)
    for name, digest in {**state["files_sha256"], **state.get("settings_sha256", {})}.items():
        path = run_dir / name
        if not path.is_file() or file_sha256(path) != digest:
            raise CheckpointError(f"{path}: does not match {STATE_FILE} (missing, or changed after the "
                                  "checkpoint was saved, e.g. by hand or by a crash during a save); resuming "
                                  "would not continue the same run")
    cfg = TrainConfig.from_dict(state["train_config"], source=str(state_path))
    step, total = state["step"], state["total_steps"]
    cfg.out_dir = str(run_dir)

    tokenizer = Tokenizer.from_file(run_dir / "tokenizer.json")
    if tokenizer.fingerprint != state.get("tokenizer_sha256"):
        raise CheckpointError(f"{run_dir / 'tokenizer.json'}: differs from the one the run was trained with")
    text = load_text(cfg.data)
    if text_sha256(text) != state["data"]["text_sha256"]:
        raise CheckpointError(f"the corpus {cfg.data or '(bundled)'} changed since the run started; "
                              "resuming would not continue the same run")
    data = _load_dataset(cfg, tokenizer, run_dir, text)

    model = Llama.from_pretrained(run_dir, dtype=DTYPES[cfg.dtype], quantized=not cfg.dequantize_base)
    base_sha256 = None
    if model.lora is not None:
        base_sha256 = base_weights_sha256(model.lora_base)
        if base_sha256 != state.get("lora_base_sha256"):
            raise CheckpointError(f"{model.lora_base}: the base model of this LoRA run changed since it was "
                                  "trained; resuming would not continue the same run")
    model.tokenizer = tokenizer
    model.config.dropout = cfg.dropout   # config.json does not carry dropout back
    model.train()
    model.dropout_rng = generator_from_state(state["dropout_rng"], f"{state_path}: dropout_rng")

    optimizer = make_optimizer(model, cfg)
    arrays = {name: arr for name, (_, arr) in read_safetensors(run_dir / OPTIMIZER_FILE).items()}
    optimizer.load_state_dict(arrays, state["optimizer"])
    if optimizer.t != step:
        raise CheckpointError(f"{state_path}: step {step} but the optimizer has taken {optimizer.t} steps")
    sampler = BatchSampler(data.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 2)
    sampler.load_state_dict(state["sampler"])
    say(f"resuming {run_dir} at step {step} of {total}", verbose)
    return Run(config=cfg, run_dir=run_dir, model=model, tokenizer=tokenizer, data=data,
               text_sha256=state["data"]["text_sha256"], optimizer=optimizer, sampler=sampler, step=step,
               total_steps=total, warmup_steps=state["warmup_steps"], tokens_seen=state["tokens_seen"],
               train_seconds=float(state["train_seconds"]), plan=state["plan"] or {}, last_checkpoint_step=step,
               base_sha256=base_sha256)


def _validated_state(state, state_path) -> dict:
    """The training state's fields checked for type and range before anything trusts them (its
    model and optimizer files are covered by their SHA-256; this file has no checksum of its own)."""
    def bad(field, why):
        return CheckpointError(f"{state_path}: {field} {why}")

    def count(field, lo=0):
        x = state.get(field)
        if isinstance(x, bool) or not isinstance(x, int) or not lo <= x < 2**53:
            raise bad(field, f"must be an integer >= {lo}, got {str(x)[:50]}")
        return x

    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_path}: not an npllama training state")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{state_path}: unsupported training state version {str(state.get('version'))[:50]}")
    step, total = count("step"), count("total_steps", lo=1)
    if total < step:
        raise bad("total_steps", f"({total}) is less than step ({step})")
    count("warmup_steps")
    count("tokens_seen")
    seconds = state.get("train_seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < 1e12:
        raise bad("train_seconds", "must be a non-negative number")
    digests = state.get("files_sha256")
    if not isinstance(digests, dict) or set(digests) not in ({MODEL_FILE, OPTIMIZER_FILE}, {ADAPTER_FILE, OPTIMIZER_FILE}) \
            or not all(isinstance(d, str) and len(d) == 64 for d in digests.values()):
        raise bad("files_sha256", f"must map exactly {MODEL_FILE} (or {ADAPTER_FILE}) and {OPTIMIZER_FILE} to "
                  "SHA-256 digests")
    data = state.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("text_sha256"), str):
        raise bad("data", "must hold the corpus text_sha256")
    for field in ("train_config", "optimizer", "sampler", "dropout_rng"):
        if not isinstance(state.get(field), dict):
            raise bad(field, f"must be an object, got {type(state.get(field)).__name__}")
    if "plan" not in state or not isinstance(state["plan"], (dict, type(None))):
        raise bad("plan", "must be an object or null")
    if not isinstance(state.get("tokenizer_sha256"), str):
        raise bad("tokenizer_sha256", "must be a string")
    settings = state.get("settings_sha256", {})   # (absent from a state saved before it was recorded)
    if not isinstance(settings, dict) or not set(settings) <= set(SETTINGS_FILES) \
            or not all(isinstance(d, str) and len(d) == 64 for d in settings.values()):
        raise bad("settings_sha256", f"must map some of {', '.join(SETTINGS_FILES)} to SHA-256 digests")
    return state


def diverged(run: Run, step: int, what: str) -> TrainingDiverged:
    if run.last_checkpoint_step is not None:
        kept = f"the last good checkpoint (step {run.last_checkpoint_step}) in {run.run_dir} is kept unchanged"
    else:
        kept = "no checkpoint had been saved yet"
    return TrainingDiverged(f"training diverged at step {step}: {what}; stopped without saving, "
                            f"{kept}. Try a lower --lr, more --warmup-steps or --grad-clip 1.0")



# ---- metrics.jsonl -----------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with the step it belongs to."""

    def __init__(self, path: Path | None):
        self.path = path   # None: write nothing (the ranks of a data-parallel job other than 0)
        self._file = None

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (logged by a run that went on after its last checkpoint)."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line + "\n")
        atomic_write_bytes(self.path, ["".join(keep).encode("utf-8")])


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (skipping a torn last line)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no metrics file (is {run_dir} an npllama run directory?)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records

