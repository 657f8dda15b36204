"""A run's checkpoint: saved as one unit, restored exactly.

A checkpoint is written into a staging directory and replaces the previous one as a unit
(``files.begin_staged_write`` / ``commit_staged_write``), so a crash at any moment leaves one
complete checkpoint; on resume the recorded SHA-256 of the two safetensors files must match too.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..data import BatchSampler, generator_from_state
from ..errors import CheckpointError
from ..files import (atomic_write_json, begin_staged_write, commit_staged_write, file_sha256, read_json,
                     recover_staged_write)
from ..formats.peft import ADAPTER_FILE
from ..formats.safetensors import read_safetensors, write_safetensors
from ..model import Llama
from ..engine.threads import thread_report
from ..tokenizer import Tokenizer
from .config import DTYPES, TrainConfig
from .metrics import MetricsLog
from .progress import say
from .run import (MODEL_FILE, OPTIMIZER_FILE, SETTINGS_FILES, STATE_FILE, STATE_FORMAT, STATE_VERSION, Run,
                  base_weights_sha256, diverged, load_dataset, make_optimizer, read_split)


def _weights_file(model) -> str:
    return MODEL_FILE if model.lora is None else ADAPTER_FILE


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
        "data": {"text_sha256": run.text_sha256, "split_sha256": run.split_sha256,
                 "train_tokens": int(len(run.data.train_tokens)),
                 "val_tokens": int(len(run.data.val_tokens)), "val_bytes": run.data.val_bytes},
        "tokenizer_sha256": run.tokenizer.fingerprint,
        "plan": run.plan,
        **({"ranks": {"size": len(rank_states), "dropout_rngs": rank_states}} if len(rank_states) > 1 else {}),
        "threads": thread_report(),   # npllama's count, and what the BLAS really uses (threadpoolctl)
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


def restore_run(run_dir: Path, verbose: bool) -> Run:
    """The run saved in ``run_dir`` (claimed by the caller), exactly as it was saved."""
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
    # (a run saved before --include and --val-split read a folder's .txt files and held out the text's end)
    cfg = TrainConfig.from_dict({"include": "*.txt", "val_split": "tail", **state["train_config"]},
                                source=str(state_path))
    step, total = state["step"], state["total_steps"]
    cfg.out_dir = str(run_dir)

    tokenizer = Tokenizer.from_file(run_dir / "tokenizer.json")
    if tokenizer.fingerprint != state.get("tokenizer_sha256"):
        raise CheckpointError(f"{run_dir / 'tokenizer.json'}: differs from the one the run was trained with")
    text_digest, split, described = read_split(cfg)
    say(described, verbose)
    if text_digest != state["data"]["text_sha256"] or state["data"].get("split_sha256", split.digest) != split.digest:
        raise CheckpointError(f"the corpus {cfg.data or '(bundled)'} (or --val-data) changed since the run started; "
                              "resuming would not continue the same run")
    data = load_dataset(tokenizer, run_dir, split, verbose)

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
               text_sha256=state["data"]["text_sha256"], split_sha256=state["data"].get("split_sha256"),
               optimizer=optimizer, sampler=sampler, step=step,
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
    extension = (state["plan"] or {}).get("extension")
    if extension is not None:   # (an extended run's new tail of the schedule: extend.py)
        s0, r0 = (extension.get("from_step"), extension.get("from_lr")) if isinstance(extension, dict) else (None, None)
        if isinstance(s0, bool) or not isinstance(s0, int) or not 0 <= s0 <= state["step"] \
                or isinstance(r0, bool) or not isinstance(r0, (int, float)) or not (math.isfinite(r0) and r0 >= 0):
            raise bad("plan.extension", "must hold from_step (a step up to the saved one) and from_lr (a rate >= 0)")
    if not isinstance(state.get("tokenizer_sha256"), str):
        raise bad("tokenizer_sha256", "must be a string")
    settings = state.get("settings_sha256", {})   # (absent from a state saved before it was recorded)
    if not isinstance(settings, dict) or not set(settings) <= set(SETTINGS_FILES) \
            or not all(isinstance(d, str) and len(d) == 64 for d in settings.values()):
        raise bad("settings_sha256", f"must map some of {', '.join(SETTINGS_FILES)} to SHA-256 digests")
    return state
