"""Training: `npllama train`, a readable loop in the style of nanoGPT's train.py.

    npllama train                                   # a small Llama on the bundled Shakespeare, ~5 min
    npllama train --data my.txt --preset medium --steps 2000
    npllama train --resume runs/shakespeare-20250101-120000
    npllama train --init-from runs/shakespeare-... --data my.txt   # fine-tune, same tokenizer

One optimizer step:

    for k in 1..K (K = grad_accum micro-batches of batch_size windows of seq_len tokens):
        L_k, g_k = model.loss_and_grad(x_k, y_k)        mean cross-entropy of micro-batch k
    L = (1/K) sum_k L_k,   g = (1/K) sum_k g_k          = loss and gradient of one batch of K*B windows
    g <- g * min(1, clip / ||g||)                       global-norm clipping
    lr = lr_at(step)                                    linear warmup, then cosine (or linear) decay
    AdamW(p, g, lr)                                     decoupled weight decay on matrices only

Length of a run.  ``--steps N`` fixes it (use it for reproducible runs).  Without it,
``--time-budget S`` (default 300 s) plans the number of steps so that the whole command -- setup
(tokenizer training and tokenization included), training, evaluations, checkpoints and the final
evaluation -- takes about S seconds of wall time.  A first plan comes from a few throw-away steps
and the step-0 evaluation; as the machine is shared and its speed drifts, the plan is then redone
every 10 steps from the recent step times (``BudgetPlanner``), and the learning-rate schedule
follows the latest plan (warmup does not depend on it; the decay is stretched or shrunk).  The
planned total is saved with each checkpoint, and a resumed run keeps it and no longer re-plans, so
it continues exactly the schedule it was on.

Run directory (``--out-dir``, default ``runs/<data>-<time>``):

    config.json, model.safetensors, tokenizer.json   the model in Hugging Face format
    optimizer.safetensors                           AdamW moments m.<name>, v.<name>
    training_state.json                             step, planned steps, the training config,
                                                    optimizer scalars, data-sampler and dropout RNG
                                                    states, data/tokenizer fingerprints, and the
                                                    SHA-256 of both safetensors files
    metrics.jsonl                                   one JSON line per step and per evaluation
    tokens/                                         the tokenized corpus (cache)

A checkpoint is written into a staging directory and replaces the previous one as a unit
(``io.begin_staged_write``/``commit_staged_write``), so a crash at any moment leaves one complete
checkpoint; on resume the recorded SHA-256 of the two safetensors files must match as well.

Exact resume.  The state holds everything a step depends on: weights, AdamW moments and step
count, the data sampler's generator, the dropout generator and the planned schedule.  So
``--resume`` continues with the same losses, bit for bit (same dtype and thread count), as a run
that never stopped.

Evaluation (every ``eval_interval`` steps, at step 0 and at the end): mean held-out cross-entropy
and bits per byte, bpb = (sum of -ln p over the held-out tokens) / (UTF-8 bytes of that text) / ln 2,
which does not depend on the tokenizer, plus a short sample.  Periodic evaluations use the first
``eval_tokens`` tokens of the held-out text (the same ones each time, so the curve is not noisy);
the final one uses the whole held-out text (or ``final_eval_tokens``).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import LlamaConfig, _short
from .data import DEFAULT_VAL_FRACTION
from .errors import CheckpointError, ConfigError, NpllamaError, one_line

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
TOKENS_DIR = "tokens"
STATE_FORMAT = "npllama-train-state"
STATE_VERSION = 1
DTYPES = {"float32": np.float32, "float64": np.float64}
SCHEDULES = ("cosine", "linear", "constant")

# Model shapes by name; hidden_dim defaults to Llama's rule (see llama_hidden_dim), n_kv_heads to
# n_heads.  "small" is the default of `npllama train`, chosen by the sweep in the README.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4),
    "small": dict(dim=128, n_layers=4, n_heads=4),
    "medium": dict(dim=256, n_layers=6, n_heads=8),
    "large": dict(dim=512, n_layers=8, n_heads=8),
}


class TrainingDiverged(NpllamaError):
    """The loss or the gradient norm became NaN or infinite."""


# ------------------------------------------------------------------------------------------
# The configuration: a handful of plain values
# ------------------------------------------------------------------------------------------

def _opt(default, help, *, flags=(), type=None, choices=None, metavar=None):
    """A TrainConfig field with what the command line needs to offer it as an option."""
    return field(default=default, metadata=dict(help=help, flags=flags, type=type, choices=choices,
                                                metavar=metavar))


@dataclass
class TrainConfig:
    # data
    data: str | None = _opt(None, "UTF-8 text file or folder of .txt files (default: the bundled "
                            "Shakespeare)", metavar="PATH")
    val_fraction: float = _opt(DEFAULT_VAL_FRACTION, "fraction of the text held out for evaluation (its end)",
                               type=float)
    vocab_size: int = _opt(2048, "BPE vocabulary size of the tokenizer trained on the data", type=int)
    # model
    preset: str = _opt("small", "model size preset", choices=tuple(PRESETS))
    dim: int | None = _opt(None, "model width (overrides the preset)", type=int)
    n_layers: int | None = _opt(None, "number of decoder blocks (overrides the preset)", type=int)
    n_heads: int | None = _opt(None, "attention heads (overrides the preset)", type=int)
    n_kv_heads: int | None = _opt(None, "key/value heads, for grouped-query attention (default n_heads)",
                                  type=int)
    hidden_dim: int | None = _opt(None, "SwiGLU inner width (default: 8/3 dim rounded up to 32)", type=int)
    tie_embeddings: bool = _opt(False, "share the embedding and output matrices", type=bool)
    dropout: float = _opt(0.0, "dropout probability (attention and MLP outputs)", type=float)
    dtype: str = _opt("float32", "parameter and activation dtype", choices=tuple(DTYPES))
    init_from: str | None = _opt(None, "start from this Hugging Face checkpoint or npllama run (its "
                                 "weights and tokenizer) instead of a fresh model", metavar="DIR")
    # batches
    seq_len: int = _opt(128, "context length of a training window (tokens)", flags=("--context",), type=int)
    batch_size: int = _opt(16, "windows per micro-batch", type=int)
    grad_accum: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)", type=int)
    # length of the run
    steps: int | None = _opt(None, "optimizer steps (overrides --time-budget)", type=int)
    time_budget: float = _opt(300.0, "with no --steps: plan the steps to end after about this many "
                              "seconds of wall time", type=float, metavar="SECONDS")
    # optimizer and schedule
    lr: float = _opt(3e-3, "peak learning rate", type=float)
    min_lr: float | None = _opt(None, "final learning rate of the decay (default lr/10)", type=float)
    warmup_steps: int = _opt(50, "linear warmup steps", type=int)
    schedule: str = _opt("cosine", "learning-rate decay after warmup", choices=SCHEDULES)
    weight_decay: float = _opt(0.1, "AdamW decoupled weight decay (matrices only)", type=float)
    beta1: float = _opt(0.9, "AdamW beta1", type=float)
    beta2: float = _opt(0.95, "AdamW beta2", type=float)
    eps: float = _opt(1e-8, "AdamW epsilon", type=float)
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping)", type=float)
    # evaluation, samples, checkpoints
    eval_interval: int = _opt(100, "evaluate every this many steps (0: only at the end)", type=int)
    eval_tokens: int = _opt(16384, "held-out tokens used by the periodic evaluations", type=int)
    final_eval_tokens: int | None = _opt(None, "held-out tokens of the final evaluation (default: all)",
                                         type=int)
    sample_tokens: int = _opt(120, "tokens generated at each evaluation (0: none)", type=int)
    sample_prompt: str = _opt("\n", "prompt of the evaluation samples", type=str)
    sample_temperature: float = _opt(0.8, "sampling temperature of the evaluation samples", type=float)
    sample_top_k: int | None = _opt(40, "top-k of the evaluation samples", type=int)
    checkpoint_interval: int = _opt(500, "save a checkpoint every this many steps (0: only at the end)",
                                    type=int)
    seed: int = _opt(0, "seed of the weights, the data order and dropout", type=int)
    out_dir: str | None = _opt(None, "run directory (default runs/<data>-<date>-<time>)", metavar="DIR")

    def __post_init__(self):
        def positive_int(name, allow_none=False, allow_zero=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ConfigError(f"{name} must be a{' non-negative' if allow_zero else ' positive'} "
                                  f"integer, got {v!r}")

        def number(name, lo=0.0, hi=math.inf, lo_open=False, hi_open=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
                raise ConfigError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo}, "
                                  f"{hi}{')' if hi_open else ']'}, got {v!r}")
            setattr(self, name, float(v))

        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "steps",
                     "final_eval_tokens", "sample_top_k"):
            positive_int(name, allow_none=True)
        for name in ("vocab_size", "seq_len", "batch_size", "grad_accum", "eval_tokens"):
            positive_int(name)
        for name in ("warmup_steps", "eval_interval", "sample_tokens", "checkpoint_interval", "seed"):
            positive_int(name, allow_zero=True)
        number("val_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        number("dropout", 0.0, 1.0, hi_open=True)
        number("time_budget", 0.0, lo_open=True)
        number("lr", 0.0, lo_open=True)
        number("min_lr", allow_none=True)
        number("weight_decay")
        number("beta1", 0.0, 1.0, hi_open=True)
        number("beta2", 0.0, 1.0, hi_open=True)
        number("eps", 0.0, lo_open=True)
        number("grad_clip")
        number("sample_temperature")
        for name, options in (("preset", PRESETS), ("dtype", DTYPES), ("schedule", SCHEDULES)):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in options:   # (a list from JSON is not even hashable)
                raise ConfigError(f"{name} must be one of {list(options)}, got {_short(v)}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.min_lr is not None and self.schedule != "constant" and self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        for name in ("data", "init_from", "out_dir"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(f"{name} must be a non-empty path string, got {v!r}")
        if not isinstance(self.sample_prompt, str):
            raise ConfigError(f"sample_prompt must be a string, got {self.sample_prompt!r}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        """Build from ``{field: value}``; dashes in keys count as underscores; unknown keys are errors."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a table of options, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{source}: unknown option {key!r} (known: {', '.join(sorted(known))})")
            clean[name] = value
        try:
            return cls(**clean)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def read_config_file(path) -> dict:
    """Options from a TOML or JSON file (by extension; otherwise tried as TOML then JSON)."""
    import tomllib

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            values = json.loads(raw.decode("utf-8"))
        elif suffix == ".toml":
            values = tomllib.loads(raw.decode("utf-8"))
        else:
            try:
                values = tomllib.loads(raw.decode("utf-8"))
            except tomllib.TOMLDecodeError:
                values = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ConfigError(f"config file {path}: cannot parse it (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError, tomllib.TOMLDecodeError) as e:  # ValueError: JSON, int digits
        raise ConfigError(f"config file {path}: cannot parse it ({one_line(e, 200)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a table of options at the top level")
    if "threads" in values:
        raise ConfigError(f"config file {path}: 'threads' must be given on the command line (--threads N), "
                          "because thread counts are fixed when NumPy is first imported")
    return values


def llama_hidden_dim(dim: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim (same parameter count as a 4*dim GELU MLP), rounded up to 32."""
    return 32 * math.ceil(8 * dim / 3 / 32)


def model_config(cfg: TrainConfig, vocab_size: int) -> LlamaConfig:
    """The LlamaConfig of a fresh model: the preset, overridden by any explicit dimension."""
    dims = dict(PRESETS[cfg.preset])
    for name in ("dim", "n_layers", "n_heads"):
        if getattr(cfg, name) is not None:
            dims[name] = getattr(cfg, name)
    return LlamaConfig(
        vocab_size=vocab_size, dim=dims["dim"], n_layers=dims["n_layers"], n_heads=dims["n_heads"],
        n_kv_heads=cfg.n_kv_heads or dims["n_heads"],
        hidden_dim=cfg.hidden_dim or llama_hidden_dim(dims["dim"]),
        max_seq_len=cfg.seq_len, tie_embeddings=cfg.tie_embeddings, dropout=cfg.dropout)


# ------------------------------------------------------------------------------------------
# The pieces of a step
# ------------------------------------------------------------------------------------------

def forward_backward(model, batches, grad_buffer: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Loss and gradient of the mean loss over micro-batches, as if they were one batch.

        L = (1/K) sum_k L_k      g = (1/K) sum_k dL_k/dp

    With equal micro-batch sizes and no ignored targets (training windows), L_k is the mean over
    the same number of tokens in every micro-batch, so L is the mean over all K*B*T tokens and g
    its gradient: accumulation equals one big batch.  K = 1 returns ``model.flat_grads`` itself;
    K > 1 sums into ``grad_buffer`` (allocated once by the caller) and scales by 1/K at the end.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    total = 0.0
    for k, (x, y) in enumerate(batches):
        loss, _ = model.loss_and_grad(x, y, copy=False)
        total += float(loss)
        if len(batches) == 1:
            return total, model.flat_grads
        if k == 0:
            np.copyto(grad_buffer, model.flat_grads)
        else:
            np.add(grad_buffer, model.flat_grads, out=grad_buffer)
    grad_buffer *= grad_buffer.dtype.type(1.0 / len(batches))
    return total / len(batches), grad_buffer


def evaluate(model, tokens: np.ndarray, context_token: int | None, n_bytes: int, batch_size: int,
             seq_len: int, should_stop: Callable[[], bool] = lambda: False) -> dict | None:
    """Held-out loss over ``tokens``, every token predicted exactly once (``iter_eval_batches``).

        val_loss = N / n   (mean nats per token)      val_bpb = N / n_bytes / ln 2

    where N is the total nats and n the number of tokens.  Dropout is off.  Returns None if
    ``should_stop()`` became true midway (an interrupt is being served).
    """
    from .data import iter_eval_batches

    was_training = model.training
    model.eval()
    try:
        nats, count = 0.0, 0
        for x, y in iter_eval_batches(tokens, batch_size, seq_len, context_token=context_token):
            if should_stop():
                return None
            nats += float(model.loss(x, y, reduction="sum"))
            count += int(np.count_nonzero(y != -100))
    finally:
        model.training = was_training
    return {"val_loss": nats / count, "val_bpb": nats / n_bytes / math.log(2), "val_tokens": count,
            "val_bytes": int(n_bytes)}


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                    top_k: int | None, seed: int) -> str | None:
    """A short text sample; None when the model has no generate() (yet)."""
    if max_new_tokens <= 0:
        return None
    prompt_ids = tokenizer.encode(prompt)
    if prompt_ids.size == 0:
        first = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        prompt_ids = np.array([first], dtype=np.int64)
    prompt_ids = prompt_ids[-(model.config.max_seq_len - 1):]
    room = model.config.max_seq_len - prompt_ids.size
    was_training = model.training
    model.eval()
    try:
        new = model.generate(prompt_ids, min(max_new_tokens, room), temperature=temperature,
                             top_k=top_k, seed=seed)
    except (ImportError, AttributeError, NotImplementedError):
        return None
    finally:
        model.training = was_training
    return tokenizer.decode(np.concatenate([prompt_ids, np.asarray(new, dtype=np.int64)]))


def plan_steps(seconds_left: float, step_seconds: float, eval_seconds: float, eval_interval: int,
               final_eval_seconds: float, checkpoint_seconds: float, checkpoint_interval: int) -> int:
    """Steps that fit in ``seconds_left``: the largest N with

        N * (step + eval / eval_interval + checkpoint / checkpoint_interval) + final_eval + checkpoint
            <= seconds_left

    (an interval of 0 means no periodic evaluations / checkpoints); at least 1.
    """
    per_step = step_seconds
    if eval_interval > 0:
        per_step += eval_seconds / eval_interval
    if checkpoint_interval > 0:
        per_step += checkpoint_seconds / checkpoint_interval
    usable = seconds_left - final_eval_seconds - checkpoint_seconds
    return max(1, int(usable // per_step)) if per_step > 0 else 1


class BudgetPlanner:
    """Plans the number of steps of a time-budgeted run, and re-plans it as the speed changes.

    The machine may be shared, and its speed can change by a factor of 2 or 3 within a minute.  So
    every ``REPLAN_EVERY`` steps the plan is recomputed from the median of the recent step times:

        total = step + plan_steps(budget - elapsed, step_seconds, eval_seconds, ...)
                at least step + 1 and warmup_steps

    Evaluation costs are kept in units of the step time at which they were measured (an
    evaluation of n tokens costs about n * c step-times), so that they scale with the machine's
    current speed too; checkpoint costs (disk) are kept in seconds.  The learning-rate schedule
    follows the latest total (its warmup part does not depend on it).  Only the first session of a
    run re-plans; a resumed run keeps the plan it saved, so it continues exactly its schedule.
    """
    REPLAN_EVERY = 10
    WINDOW = 30

    def __init__(self, cfg: "TrainConfig", t_start: float, eval_tokens: int, final_tokens: int,
                 checkpoint_seconds: float):
        self.cfg = cfg
        self.t_start = t_start
        self.eval_tokens, self.final_tokens = eval_tokens, final_tokens
        self.checkpoint_seconds = checkpoint_seconds
        self.step_times: list[float] = []
        # Until an evaluation is measured: forward only costs about 1/3 of forward + backward.
        self.eval_steps_per_token = 1.0 / (3 * cfg.tokens_per_step)
        self.sample_steps = 0.0

    def step_seconds(self) -> float:
        return float(np.median(self.step_times))

    def observe_step(self, seconds: float) -> None:
        self.step_times.append(seconds)
        del self.step_times[:-self.WINDOW]

    def observe_eval(self, ev: dict) -> None:
        step = self.step_seconds()
        self.eval_steps_per_token = ev["eval_seconds"] / max(ev["val_tokens"], 1) / step
        self.sample_steps = ev["sample_seconds"] / step

    def observe_checkpoint(self, seconds: float) -> None:
        self.checkpoint_seconds = seconds

    def costs(self) -> dict:
        """Current estimates, in seconds, of a step, a periodic and the final evaluation."""
        step = self.step_seconds()
        return {"step_seconds": step,
                "eval_seconds": (self.eval_steps_per_token * self.eval_tokens + self.sample_steps) * step,
                "final_eval_seconds": (self.eval_steps_per_token * self.final_tokens + self.sample_steps) * step,
                "checkpoint_seconds": self.checkpoint_seconds}

    def plan(self, step: int, min_total: int) -> int:
        c = self.costs()
        left = self.cfg.time_budget - (time.monotonic() - self.t_start)
        more = plan_steps(left, c["step_seconds"], c["eval_seconds"], self.cfg.eval_interval,
                          c["final_eval_seconds"], c["checkpoint_seconds"], self.cfg.checkpoint_interval)
        return max(step + more, step + 1, min_total)

    def summary(self) -> dict:
        return {"mode": "time_budget", "time_budget": self.cfg.time_budget, **self.costs()}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Interrupts: Ctrl-C and SIGTERM finish the current step, save, and exit
# ------------------------------------------------------------------------------------------

class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps.

    A KeyboardInterrupt raised in the middle of ``AdamW.step`` could leave half the parameters
    updated; a flag lets the step finish, so the checkpoint is a consistent state.  A second signal
    restores the default handlers and interrupts immediately (the files on disk are safe: every
    write is atomic).  Only installable from the main thread; elsewhere it is inert.
    """
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()
        return False


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with the step it belongs to."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def write(self, record: dict) -> None:
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
        from .io import atomic_write_bytes

        if not self.path.exists():
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


# ------------------------------------------------------------------------------------------
# A run: everything a step depends on, and saving / restoring it
# ------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    interrupted: bool = False
    signal_name: str | None = None
    final_eval: dict | None = None
    losses: list = field(default_factory=list)
    tokens_per_second: float | None = None
    wall_seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        # Ctrl-C is how a user ends a run on purpose: the checkpoint is saved, so that is success.
        # SIGTERM keeps the shell convention (128 + 15) so supervisors see the run was stopped.
        return 128 + signal.SIGTERM if self.interrupted and self.signal_name == "SIGTERM" else 0


@dataclass
class Run:
    config: TrainConfig
    run_dir: Path
    model: Any
    tokenizer: Any
    data: Any
    text_sha256: str
    optimizer: Any
    sampler: Any
    step: int = 0
    total_steps: int | None = None
    warmup_steps: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0          # wall time spent in earlier sessions of this run
    plan: dict = field(default_factory=dict)
    last_checkpoint_step: int | None = None

    def lr_at(self, step: int) -> float:
        from .optim import lr_at
        return lr_at(step, max_lr=self.config.lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps, min_lr=self.config.final_lr, kind=self.config.schedule)


def _say(msg: str, verbose: bool) -> None:
    if verbose:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


def _default_out_dir(cfg: TrainConfig) -> Path:
    name = "shakespeare" if cfg.data is None else (Path(cfg.data).stem or "data")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _load_dataset(cfg: TrainConfig, tokenizer, run_dir: Path, text: str):
    from .data import TokenDataset
    return TokenDataset.from_text(text, tokenizer, cache_dir=run_dir / TOKENS_DIR, val_fraction=cfg.val_fraction)


def _make_optimizer(model, cfg: TrainConfig):
    from .optim import AdamW
    return AdamW(model.params, cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 weight_decay=cfg.weight_decay, flat_params=model.flat_params)


def new_run(cfg: TrainConfig, verbose: bool = True) -> Run:
    """Set up a fresh run (or a fine-tune with ``init_from``): run dir, tokenizer, tokens, model."""
    from .data import BatchSampler, load_text, split_train_val, text_sha256
    from .io import COMMIT_DIR
    from .model import Llama
    from .tokenizer import Tokenizer

    cfg = dataclasses.replace(cfg)
    # Absolute paths, so that --resume works from any working directory.
    if cfg.data is not None:
        cfg.data = str(Path(cfg.data).resolve())
    if cfg.init_from is not None:
        cfg.init_from = str(Path(cfg.init_from).resolve())
    run_dir = Path(cfg.out_dir) if cfg.out_dir else _default_out_dir(cfg)
    run_dir = run_dir.resolve()
    cfg.out_dir = str(run_dir)
    if (run_dir / STATE_FILE).exists() or (run_dir / COMMIT_DIR).exists():
        raise ConfigError(f"{run_dir} already holds a training run; continue it with --resume {run_dir} "
                          "or choose another --out-dir")
    dtype = DTYPES[cfg.dtype]

    text = load_text(cfg.data)
    if cfg.init_from is not None:
        init_dir = Path(cfg.init_from)
        explicit = [n for n in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim") if getattr(cfg, n)]
        if explicit:
            raise ConfigError(f"--init-from takes the model shape from {init_dir}; do not also give "
                              f"{', '.join('--' + n.replace('_', '-') for n in explicit)}")
        if not (init_dir / "tokenizer.json").is_file():
            raise ConfigError(f"--init-from {init_dir}: no tokenizer.json there; fine-tuning needs the "
                              "checkpoint's own tokenizer")
        model = Llama.from_pretrained(init_dir, dtype=dtype)
        tokenizer = model.tokenizer
        if model.config.max_seq_len < cfg.seq_len:
            raise ConfigError(f"--init-from {init_dir}: the model's context is {model.config.max_seq_len} "
                              f"tokens, shorter than --seq-len {cfg.seq_len}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"--init-from {init_dir}: tokenizer has {tokenizer.vocab_size} tokens but "
                              f"the model only {model.config.vocab_size} embeddings")
        model.config.dropout = cfg.dropout
        cfg.vocab_size = model.config.vocab_size
        _say(f"fine-tuning from {init_dir} ({model.num_parameters() / 1e6:.2f}M parameters, "
             f"its tokenizer of {tokenizer.vocab_size} tokens)", verbose)
    else:
        t0 = time.monotonic()
        train_text, _ = split_train_val(text, cfg.val_fraction)
        with warnings.catch_warnings():   # a short vocabulary is an error here, not a warning
            warnings.simplefilter("ignore", UserWarning)
            tokenizer = Tokenizer.train(train_text, cfg.vocab_size)  # never sees the held-out text
        if tokenizer.vocab_size < cfg.vocab_size:
            raise ConfigError(f"--vocab-size {cfg.vocab_size} is more than this text supports: BPE found "
                              f"only {tokenizer.vocab_size} tokens (pairs seen at least twice); use "
                              f"--vocab-size {tokenizer.vocab_size} or less, or more text")
        _say(f"trained a byte-level BPE tokenizer of {tokenizer.vocab_size} tokens in "
             f"{time.monotonic() - t0:.1f}s", verbose)
        model = None
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / "tokenizer.json")
    (run_dir / METRICS_FILE).unlink(missing_ok=True)   # left by a run stopped before its first save

    t0 = time.monotonic()
    data = _load_dataset(cfg, tokenizer, run_dir, text)
    _say(f"data: {len(data.train_tokens):,} training and {len(data.val_tokens):,} held-out tokens "
         f"({data.val_bytes:,} bytes held out), tokenized in {time.monotonic() - t0:.1f}s", verbose)
    if model is None:
        model = Llama(model_config(cfg, tokenizer.vocab_size), seed=cfg.seed, dtype=dtype)
        model.tokenizer = tokenizer
    # The three random streams: weights (seed), dropout (seed + 1), data order (seed + 2).
    model._dropout_rng = np.random.default_rng(cfg.seed + 1)
    model.train()
    sampler = BatchSampler(data.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 2)
    return Run(config=cfg, run_dir=run_dir, model=model, tokenizer=tokenizer, data=data,
               text_sha256=text_sha256(text), optimizer=_make_optimizer(model, cfg), sampler=sampler)


def save_checkpoint(run: Run, metrics: MetricsLog | None = None) -> None:
    """Write the model (HF format), the optimizer moments and the training state as one unit.

    The files are written into a staging directory and then replace the previous checkpoint's
    together (``io.begin_staged_write`` / ``commit_staged_write``; training_state.json moves last),
    so a crash at any moment leaves either the old checkpoint or the new one.
    """
    from .io import atomic_write_json, begin_staged_write, commit_staged_write, write_safetensors

    # A finite loss does not prove finite weights (a huge step can overflow them after the loss
    # was computed), and a checkpoint with inf/nan weights would replace the last good one.
    if not np.isfinite(run.model.flat_params).all():
        raise _diverged(run, run.step, "the weights are not finite")
    stage = begin_staged_write(run.run_dir)
    run.model.save_pretrained(stage)
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
        "dropout_rng": run.model._dropout_rng.bit_generator.state,
        "data": {"text_sha256": run.text_sha256, "train_tokens": int(len(run.data.train_tokens)),
                 "val_tokens": int(len(run.data.val_tokens)), "val_bytes": run.data.val_bytes},
        "tokenizer_sha256": run.tokenizer.fingerprint,
        "plan": run.plan,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        # checked on resume: a file replaced by hand (or a torn copy) is caught, not trained on
        "files_sha256": {name: file_sha256(stage / name) for name in (MODEL_FILE, OPTIMIZER_FILE)},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(stage / STATE_FILE, state)
    commit_staged_write(run.run_dir, stage)
    run.last_checkpoint_step = run.step


def load_run(run_dir, verbose: bool = True) -> Run:
    """Restore a run from its directory exactly as it was saved (see the module docstring)."""
    from .data import BatchSampler, generator_from_state, load_text, text_sha256
    from .io import read_json, read_safetensors
    from .model import Llama
    from .tokenizer import Tokenizer

    from .io import recover_staged_write

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: no such directory")
    recover_staged_write(run_dir)   # finish (or discard) a checkpoint a crash interrupted
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{run_dir}: no {STATE_FILE}, so not a resumable npllama run (to start "
                              f"from its weights use --init-from)")
    state = _validated_state(read_json(state_path, STATE_FILE), state_path)
    for name, digest in state["files_sha256"].items():
        path = run_dir / name
        if not path.is_file() or file_sha256(path) != digest:
            raise CheckpointError(f"{path}: does not match {STATE_FILE} (missing, or changed after the "
                                  "checkpoint was saved, e.g. by a crash during a save)")
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

    model = Llama.from_pretrained(run_dir, dtype=DTYPES[cfg.dtype])
    model.tokenizer = tokenizer
    model.config.dropout = cfg.dropout   # config.json does not carry dropout back
    model.train()
    model._dropout_rng = generator_from_state(state["dropout_rng"], f"{state_path}: dropout_rng")

    optimizer = _make_optimizer(model, cfg)
    arrays = {name: arr for name, (_, arr) in read_safetensors(run_dir / OPTIMIZER_FILE).items()}
    optimizer.load_state_dict(arrays, state["optimizer"])
    if optimizer.t != step:
        raise CheckpointError(f"{state_path}: step {step} but the optimizer has taken {optimizer.t} steps")
    sampler = BatchSampler(data.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 2)
    sampler.load_state_dict(state["sampler"])
    _say(f"resuming {run_dir} at step {step} of {total}", verbose)
    return Run(config=cfg, run_dir=run_dir, model=model, tokenizer=tokenizer, data=data,
               text_sha256=state["data"]["text_sha256"], optimizer=optimizer, sampler=sampler, step=step,
               total_steps=total, warmup_steps=state["warmup_steps"], tokens_seen=state["tokens_seen"],
               train_seconds=float(state["train_seconds"]), plan=state["plan"] or {}, last_checkpoint_step=step)


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
    if not isinstance(digests, dict) or set(digests) != {MODEL_FILE, OPTIMIZER_FILE} or not all(
            isinstance(d, str) and len(d) == 64 for d in digests.values()):
        raise bad("files_sha256", f"must map exactly {MODEL_FILE} and {OPTIMIZER_FILE} to SHA-256 digests")
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
    return state


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------

def _measure_step_seconds(run: Run, grad_buffer, repeats: int = 2) -> float:
    """Seconds per optimizer step, from throw-away steps on batches the run never sees.

    The first call is not timed (it may compile Numba kernels).  Weights and optimizer are not
    touched, and the dropout generator is put back, so the run is the same as without this.
    """
    from .data import get_batch
    from .optim import clip_grad_norm

    cfg, model = run.config, run.model
    rng = np.random.default_rng(cfg.seed + 3)
    dropout_state = model._dropout_rng.bit_generator.state
    times = []
    for i in range(repeats + 1):
        batches = [get_batch(run.data.train_tokens, cfg.batch_size, cfg.seq_len, rng)
                   for _ in range(cfg.grad_accum)]
        t = time.perf_counter()
        _, grads = forward_backward(model, batches, grad_buffer)
        clip_grad_norm(grads, sys.float_info.max)
        times.append(time.perf_counter() - t)
    model._dropout_rng.bit_generator.state = dropout_state
    # The AdamW update reads and writes ~4 arrays of the model's size: about 2 norm passes.
    return float(np.median(times[1:])) * 1.02


def _eval_and_sample(run: Run, n_tokens: int | None, stop: StopSignals) -> dict | None:
    cfg, data = run.config, run.data
    tokens = data.val_tokens
    if n_tokens is not None and n_tokens < len(tokens):
        tokens = tokens[:n_tokens]
        n_bytes = len(run.tokenizer.decode(np.asarray(tokens)).encode("utf-8"))
    else:
        n_bytes = data.val_bytes
    t0 = time.perf_counter()
    result = evaluate(run.model, tokens, data.eval_context_token, n_bytes, cfg.batch_size, cfg.seq_len,
                      should_stop=lambda: stop.requested)
    if result is None:
        return None
    t1 = time.perf_counter()
    result["sample"] = generate_sample(run.model, run.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                       cfg.sample_temperature, cfg.sample_top_k, cfg.seed)
    result["eval_seconds"] = t1 - t0
    result["sample_seconds"] = time.perf_counter() - t1
    return result


def _report_eval(run: Run, ev: dict, verbose: bool, final: bool = False) -> None:
    what = "final eval on all held-out text" if final and ev["val_tokens"] == len(run.data.val_tokens) \
        else ("final eval" if final else "eval")
    _say(f"step {run.step}: {what}: val loss {ev['val_loss']:.4f}, {ev['val_bpb']:.4f} bits/byte "
         f"({ev['val_tokens']:,} tokens)", verbose)
    if ev.get("sample") is not None:
        _say("  sample: " + ev["sample"].strip().replace("\n", "\n          ")[:800], verbose)


def train(config: TrainConfig | None = None, *, resume=None, progress: bool = True, verbose: bool = True,
          on_step: Callable[[int, float, Run], None] | None = None) -> TrainResult:
    """Train a model (``config``) or continue a saved run (``resume=RUN_DIR``); see the module docstring.

    ``on_step(step, loss, run)`` is called after every optimizer step (tests use it to interrupt).
    Raises TrainingDiverged when the loss, the gradient norm or (when saving) the weights are not
    finite; nothing is saved then, so the last checkpoint on disk is the last good state.
    """
    from tqdm import tqdm

    from .optim import clip_grad_norm

    t_start = time.monotonic()
    if (config is None) == (resume is None):
        if resume is not None:
            raise ConfigError("give either a config or resume=RUN_DIR, not both")
        config = TrainConfig()
    run = load_run(resume, verbose) if resume is not None else new_run(config, verbose)
    cfg, model, data = run.config, run.model, run.data
    resumed = resume is not None
    metrics = MetricsLog(run.run_dir / METRICS_FILE)
    if resumed:
        metrics.truncate_after(run.step)
    grad_buffer = np.empty_like(model.flat_params) if cfg.grad_accum > 1 else None
    eval_tokens = min(cfg.eval_tokens, len(data.val_tokens))
    final_tokens = len(data.val_tokens) if cfg.final_eval_tokens is None \
        else min(cfg.final_eval_tokens, len(data.val_tokens))
    result = TrainResult(run_dir=run.run_dir, step=run.step, total_steps=run.total_steps or 0)
    if resumed and run.step >= run.total_steps:
        _say(f"{run.run_dir} is already complete ({run.step} of {run.total_steps} steps); nothing to do", verbose)
        return result

    if verbose:
        c = model.config
        _say(f"model: {model.num_parameters() / 1e6:.2f}M parameters (dim {c.dim}, {c.n_layers} layers, "
             f"{c.n_heads} heads, {c.n_kv_heads} kv heads, hidden {c.hidden_dim}, vocab {c.vocab_size}, "
             f"context {cfg.seq_len}, {cfg.dtype}); batch {cfg.batch_size} x {cfg.grad_accum} x {cfg.seq_len} "
             f"= {cfg.tokens_per_step:,} tokens/step; run dir {run.run_dir}", verbose)

    stop = StopSignals()
    pbar = None
    planner = None
    session_start = time.monotonic()
    try:
        with stop:
            if not resumed:
                # Step-0 evaluation (also measures what an evaluation costs), then plan the steps.
                if cfg.steps is None:
                    planner = BudgetPlanner(cfg, t_start, eval_tokens, final_tokens,
                                            checkpoint_seconds=0.3 + 4 * model.flat_params.nbytes / 200e6)
                    planner.observe_step(_measure_step_seconds(run, grad_buffer))
                ev = _eval_and_sample(run, eval_tokens, stop) if cfg.eval_interval > 0 else None
                if ev is not None:
                    metrics.write({"step": 0, "kind": "eval", **ev, "elapsed": time.monotonic() - t_start})
                    _report_eval(run, ev, verbose)
                    if planner is not None:
                        planner.observe_eval(ev)
                if cfg.steps is not None:
                    run.total_steps = cfg.steps
                    run.plan = {"mode": "steps", "steps": cfg.steps}
                else:
                    run.total_steps = planner.plan(0, 1)
                    run.plan = {**planner.summary(), "setup_seconds": round(time.monotonic() - t_start, 3),
                                "first_plan": run.total_steps, "planned_steps": run.total_steps}
                    step_s = planner.step_seconds()
                    _say(f"time budget {cfg.time_budget:.0f}s: {time.monotonic() - t_start:.0f}s spent on "
                         f"setup, {step_s:.3f}s/step measured -> {run.total_steps} steps "
                         f"(~{cfg.tokens_per_step / step_s:,.0f} tokens/s; re-planned every "
                         f"{planner.REPLAN_EVERY} steps)", verbose)
                run.warmup_steps = min(cfg.warmup_steps, run.total_steps)
            result.total_steps = run.total_steps

            pbar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step",
                        disable=not progress, dynamic_ncols=True, file=sys.stderr)
            ema_step = None
            window_losses = []
            while run.step < run.total_steps and not stop.requested:
                t0 = time.perf_counter()
                lr = run.lr_at(run.step)
                batches = [run.sampler.next_batch() for _ in range(cfg.grad_accum)]
                loss, grads = forward_backward(model, batches, grad_buffer)
                step_number = run.step + 1
                if not math.isfinite(loss):
                    raise _diverged(run, step_number, f"the loss is {loss}")
                norm = clip_grad_norm(grads, cfg.grad_clip if cfg.grad_clip > 0 else sys.float_info.max)
                if not math.isfinite(norm):
                    raise _diverged(run, step_number, f"the gradient norm is {norm}")
                run.optimizer.step(flat_grads=grads, lr=lr)
                run.step = step_number
                run.tokens_seen += cfg.tokens_per_step
                dt = time.perf_counter() - t0
                ema_step = dt if ema_step is None else 0.9 * ema_step + 0.1 * dt
                if planner is not None:
                    planner.observe_step(dt)
                    if run.step % planner.REPLAN_EVERY == 0 and run.step < run.total_steps:
                        run.total_steps = planner.plan(run.step, run.warmup_steps)
                        run.plan.update(planner.summary(), planned_steps=run.total_steps)
                        pbar.total = result.total_steps = run.total_steps
                window_losses.append(loss)
                result.losses.append(loss)
                metrics.write({"step": run.step, "loss": loss, "lr": lr, "grad_norm": norm,
                               "step_seconds": dt, "tokens_per_second": cfg.tokens_per_step / dt,
                               "elapsed": run.train_seconds + time.monotonic() - session_start})
                left = (run.total_steps - run.step) * ema_step
                pbar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {cfg.tokens_per_step / ema_step:,.0f} tok/s "
                                     f"left {_hms(left)}", refresh=False)
                pbar.update(1)
                if on_step is not None:
                    on_step(run.step, loss, run)

                last = run.step == run.total_steps
                if cfg.eval_interval > 0 and run.step % cfg.eval_interval == 0 and not last:
                    ev = _eval_and_sample(run, eval_tokens, stop)
                    if ev is not None:
                        if planner is not None:
                            planner.observe_eval(ev)
                        ev["train_loss"] = float(np.mean(window_losses))
                        window_losses = []
                        metrics.write({"step": run.step, "kind": "eval", **ev,
                                       "elapsed": run.train_seconds + time.monotonic() - session_start})
                        _report_eval(run, ev, verbose)
                if cfg.checkpoint_interval > 0 and run.step % cfg.checkpoint_interval == 0 and not last:
                    run.train_seconds += time.monotonic() - session_start
                    session_start = time.monotonic()
                    save_checkpoint(run, metrics)
                    if planner is not None:
                        planner.observe_checkpoint(time.monotonic() - session_start)

            pbar.close()
            run.train_seconds += time.monotonic() - session_start
            session_start = time.monotonic()
            if stop.requested and run.step < run.total_steps:
                result.interrupted = True
                result.signal_name = signal.Signals(stop.signum).name
                if run.step > 0 and run.step != run.last_checkpoint_step:
                    save_checkpoint(run, metrics)
                if run.step > 0:
                    _say(f"\n{result.signal_name}: stopped at step {run.step} of {run.total_steps}; checkpoint saved "
                         f"in {run.run_dir}.\nResume with:  npllama train --resume {run.run_dir}", True)
                else:
                    _say(f"\n{result.signal_name}: stopped before the first step; nothing to save", True)
            else:
                ev = _eval_and_sample(run, final_tokens, stop)
                if ev is not None:
                    ev["train_loss"] = float(np.mean(window_losses)) if window_losses else None
                    ev["final"] = True
                    metrics.write({"step": run.step, "kind": "eval", **ev,
                                   "elapsed": run.train_seconds + time.monotonic() - session_start})
                    _report_eval(run, ev, verbose, final=True)
                    result.final_eval = ev
                save_checkpoint(run, metrics)
    finally:
        if pbar is not None:
            pbar.close()
        metrics.close()

    result.step = run.step
    result.wall_seconds = time.monotonic() - t_start
    steps_lines = [r for r in read_metrics(run.run_dir) if "loss" in r]
    if steps_lines:
        # Median over the run: robust to the first steps and to evaluation hiccups.
        result.tokens_per_second = float(np.median([r["tokens_per_second"] for r in steps_lines]))
    if not result.interrupted:
        ev = result.final_eval
        _say(f"done: {run.step} steps in {_hms(result.wall_seconds)} wall time, "
             f"median {result.tokens_per_second or 0:,.0f} tokens/s"
             + (f", held-out {ev['val_bpb']:.4f} bits/byte" if ev else "")
             + f"; model saved in {run.run_dir}", verbose)
    return result


def _diverged(run: Run, step: int, what: str) -> TrainingDiverged:
    if run.last_checkpoint_step is not None:
        kept = f"the last good checkpoint (step {run.last_checkpoint_step}) in {run.run_dir} is kept unchanged"
    else:
        kept = "no checkpoint had been saved yet"
    return TrainingDiverged(f"training diverged at step {step}: {what}; stopped without saving, "
                            f"{kept}. Try a lower --lr, more --warmup-steps or --grad-clip 1.0")


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options: one per TrainConfig field (dashes for underscores), plus --config/--resume/--threads.

    Every default is SUPPRESS, so that the namespace holds only what was typed: the command line
    then overrides the --config file, which overrides TrainConfig's defaults.
    """
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML or JSON file of options (same names as below, e.g. lr = 1e-3)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=argparse.SUPPRESS,
                        help="continue a saved run exactly where it stopped")
    parser.add_argument("--threads", type=int, metavar="N", default=argparse.SUPPRESS,
                        help="threads for BLAS and Numba (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bar (evaluations are still printed)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        flags = ["--" + f.name.replace("_", "-"), *meta["flags"]]
        default = getattr(defaults, f.name)
        shown = "" if default is None else f" (default: {default!r})" if isinstance(default, str) \
            else f" (default: {default})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=meta["help"] + shown)
        if meta["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta["type"] or str
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            metavar = meta["metavar"] or {int: "N", float: "X"}.get(meta["type"])
            if metavar and not meta["choices"]:
                kwargs["metavar"] = metavar
        parser.add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in fields})
    source = f"config file {args.config} + command line" if getattr(args, "config", None) else "command line"
    return TrainConfig.from_dict(values, source=source)


def run(args: argparse.Namespace) -> int:
    progress = not getattr(args, "no_progress", False)
    if getattr(args, "resume", None):
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        given = sorted(k for k in vars(args) if k in fields or k == "config")
        if given:
            raise ConfigError("--resume continues the saved run exactly, with its own settings; "
                              f"remove {', '.join('--' + g.replace('_', '-') for g in given)} (to train "
                              "on with other settings, start a new run with --init-from RUN_DIR)")
        result = train(resume=args.resume, progress=progress)
    else:
        result = train(config_from_args(args), progress=progress)
    return result.exit_code
