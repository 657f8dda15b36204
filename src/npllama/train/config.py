"""The training configuration: TrainConfig (every option of `npllama train`, checked on creation),
the model-size presets, options from a TOML/JSON file, and the LlamaConfig of a fresh model."""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import LORA_TARGETS, LlamaConfig, short_repr
from ..data import DEFAULT_VAL_FRACTION, VAL_SPLITS, parse_include
from ..errors import ConfigError, one_line
from ..tokenizer import DEFAULT_SPECIAL_TOKENS, N_BYTE_TOKENS

DTYPES = {"float32": np.float32, "float64": np.float64}
SCHEDULES = ("cosine", "linear", "constant")
SAMPLE_LINES = 4                                               # of a sample, shown on the terminal
MIN_VOCAB_SIZE = N_BYTE_TOKENS + len(DEFAULT_SPECIAL_TOKENS)   # what a byte-level BPE starts from

# Learning rate and warmup when none is given: a fresh model's (the README's sweep), or a pretrained
# one's (--init-from).  3e-3 ruins a pretrained model: 24 full fine-tuning steps of SmolLM2-135M on
# Shakespeare (batch 4 x 128, 3 warmup steps, cosine) took its held-out bits/byte from 1.794 up to
# 2.095, where 3e-4 / 1e-4 / 3e-5 took it down to 1.658 / 1.628 / 1.667.  LoRA's few parameters
# (alpha/r = 2) want a larger step: 3e-4 / 1e-3 / 3e-3 gave 1.694 / 1.626 / 1.612; 1e-3 leaves a margin
# for longer runs.  Fine-tuning runs are short (tens to hundreds of steps): 10 warmup steps, not 50.
SCRATCH_LR, FINE_TUNE_LR, LORA_LR = 3e-3, 1e-4, 1e-3
SCRATCH_WARMUP, FINE_TUNE_WARMUP = 50, 10

# Model shapes by name; hidden_dim defaults to Llama's rule (see llama_hidden_dim), n_kv_heads to
# n_heads.  "small" is the default of `npllama train`, chosen by the sweep in the README.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4),
    "small": dict(dim=128, n_layers=4, n_heads=4),
    "medium": dict(dim=256, n_layers=6, n_heads=8),
    "large": dict(dim=512, n_layers=8, n_heads=8),
}


def llama_hidden_dim(dim: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim (same parameter count as a 4*dim GELU MLP), rounded up to 32."""
    return 32 * math.ceil(8 * dim / 3 / 32)


def preset_parameters(dims: dict[str, int], vocab_size: int = 2048) -> int:
    """Parameters of a preset's model: embeddings and output matrix, per layer the attention's four
    and SwiGLU's three matrices and two RMSNorm weights, the final norm (LlamaConfig.num_parameters)."""
    d, hidden = dims["dim"], llama_hidden_dim(dims["dim"])
    return 2 * vocab_size * d + dims["n_layers"] * (4 * d * d + 3 * d * hidden + 2 * d) + d


def _opt(default, help, *, flags=(), type=None, choices=None, metavar=None):
    """A TrainConfig field with what the command line needs to offer it as an option."""
    return field(default=default, metadata=dict(help=help, flags=flags, type=type, choices=choices,
                                                metavar=metavar))


@dataclass
class TrainConfig:
    # data
    data: str | None = _opt(None, "UTF-8 text file, or a folder of text and source files (see --include; "
                            "default: the bundled Shakespeare)", metavar="PATH")
    include: str | None = _opt(None, "the files of a --data folder, as comma-separated patterns such as "
                               "'*.py,docs/*.md' (default: common text and source suffixes: .txt .md .rst .py .c "
                               ".h .cpp .js .ts .java .go .rs .json .yaml .html .sh ... and their .gz; binary "
                               "files are skipped)", metavar="GLOBS")
    val_fraction: float = _opt(DEFAULT_VAL_FRACTION, "share of the text held out for evaluation (see --val-split)",
                               type=float)
    val_split: str = _opt("per-file", "how the held-out set is drawn: the last --val-fraction of each file, cut "
                          "at a line (per-file); whole files drawn at random with a fixed seed (documents); the "
                          "end of the joined text (tail).  One file: its end", choices=VAL_SPLITS)
    val_data: str | None = _opt(None, "a held-out text file or folder of your own (then all of --data trains)",
                                metavar="PATH")
    vocab_size: int = _opt(2048, "BPE vocabulary size of the tokenizer trained on the data", type=int)
    # model
    preset: str = _opt("small", "model size: " + "; ".join(
        f"{name} dim {p['dim']}, {p['n_layers']} layers, {p['n_heads']} heads, "
        f"{preset_parameters(p) / 1e6:.2f}M parameters" for name, p in PRESETS.items())
        + " (at --vocab-size 2048; default small); --dry-run says how much of your data one sees in your budget",
        choices=tuple(PRESETS))
    dim: int | None = _opt(None, "model width (overrides the preset)", type=int)
    n_layers: int | None = _opt(None, "number of decoder blocks (overrides the preset)", type=int)
    n_heads: int | None = _opt(None, "attention heads (overrides the preset)", type=int)
    n_kv_heads: int | None = _opt(None, "key/value heads, for grouped-query attention (default n_heads)",
                                  type=int)
    hidden_dim: int | None = _opt(None, "SwiGLU inner width (default: 8/3 dim rounded up to 32)", type=int)
    tie_embeddings: bool = _opt(False, "share the embedding and output matrices", type=bool)
    dropout: float = _opt(0.0, "dropout probability (attention and MLP outputs)", type=float)
    dtype: str = _opt("float32", "parameter and activation dtype", choices=tuple(DTYPES))
    init_from: str | None = _opt(None, "start from this pretrained model instead of a fresh one, with its "
                                 "tokenizer: an npllama run, a Hugging Face directory or a .gguf file",
                                 metavar="MODEL")
    # LoRA (with --init-from): train low-rank adapters on a frozen model
    lora_rank: int | None = _opt(None, "train LoRA adapters of this rank on the frozen --init-from model "
                                 "instead of every weight", type=int)
    lora_alpha: float = _opt(16.0, "LoRA scale numerator: the adapter adds (alpha / rank) B A", type=float)
    lora_dropout: float = _opt(0.0, "dropout probability on the LoRA adapters' inputs", type=float)
    dequantize_base: bool = _opt(False, "with --lora-rank on a GGUF base: dequantize its Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K matrices to "
                                 "--dtype (default: kept in their blocks and frozen, QLoRA)", type=bool)
    lora_targets: str = _opt(",".join(LORA_TARGETS), "projections that get LoRA adapters, comma-separated",
                             type=str, metavar="NAMES")
    # batches
    seq_len: int = _opt(128, "context length of a training window (tokens)", flags=("--context",), type=int)
    batch_size: int = _opt(16, "windows per micro-batch", type=int)
    grad_accum: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)", type=int)
    # length of the run
    steps: int | None = _opt(None, "optimizer steps (overrides --time-budget); with --resume: this many more",
                             type=int)
    time_budget: float = _opt(300.0, "with no --steps: plan the steps to end after about this many "
                              "seconds of wall time; with --resume: about this many more", type=float,
                              metavar="SECONDS")
    # optimizer and schedule
    lr: float | None = _opt(None, f"peak learning rate (default: {SCRATCH_LR:g}; fine-tuning with --init-from "
                            f"{FINE_TUNE_LR:g}, with --lora-rank too {LORA_LR:g})", type=float)
    min_lr: float | None = _opt(None, "final learning rate of the decay (default lr/10)", type=float)
    warmup_steps: int | None = _opt(None, f"linear warmup steps (default: {SCRATCH_WARMUP}; fine-tuning with "
                                    f"--init-from {FINE_TUNE_WARMUP})", type=int)
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
    sample_interval: int = _opt(500, "show a sample every this many steps, besides at the start and the end "
                                "(0: only those)", type=int)
    sample_tokens: int = _opt(64, "tokens generated for each sample; the terminal shows its first "
                              f"{SAMPLE_LINES} lines (0: no samples)", type=int)
    sample_prompt: str = _opt("\n", "prompt of the evaluation samples", type=str)
    sample_temperature: float = _opt(0.8, "sampling temperature of the evaluation samples", type=float)
    sample_top_k: int | None = _opt(40, "top-k of the evaluation samples", type=int)
    early_stop: int = _opt(0, "end the run after this many evaluations in a row without a new best held-out "
                           "loss (0: never); the best weights are kept in RUN/best/ either way", type=int)
    checkpoint_interval: int = _opt(500, "save a checkpoint every this many steps (0: only at the end)",
                                    type=int)
    seed: int = _opt(0, "seed of the weights, the data order and dropout", type=int)
    out_dir: str | None = _opt(None, "run directory (default runs/<data>-<date>-<time>)", metavar="DIR")
    force: bool = _opt(False, "use --out-dir even when it holds files that are not an npllama run's (the "
                       "run's files replace those of the same names)", type=bool)

    def __post_init__(self):
        def positive_int(name, allow_none=False, allow_zero=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ConfigError(f"{flag(name)} must be a{' non-negative' if allow_zero else ' positive'} "
                                  f"integer, got {v!r}")

        def number(name, lo=0.0, hi=math.inf, lo_open=False, hi_open=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
                raise ConfigError(f"{flag(name)} must be {_range(lo, hi, lo_open, hi_open)}, got {v!r}")
            setattr(self, name, float(v))

        if self.lr is None:
            self.lr = SCRATCH_LR if self.init_from is None else LORA_LR if self.lora_rank is not None else FINE_TUNE_LR
        if self.warmup_steps is None:
            self.warmup_steps = SCRATCH_WARMUP if self.init_from is None else FINE_TUNE_WARMUP
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "steps",
                     "final_eval_tokens", "sample_top_k", "lora_rank"):
            positive_int(name, allow_none=True)
        for name in ("vocab_size", "seq_len", "batch_size", "grad_accum", "eval_tokens"):
            positive_int(name)
        for name in ("warmup_steps", "eval_interval", "sample_interval", "sample_tokens", "checkpoint_interval",
                     "seed", "early_stop"):
            positive_int(name, allow_zero=True)
        number("val_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        number("dropout", 0.0, 1.0, hi_open=True)
        number("lora_alpha", 0.0, lo_open=True)
        number("lora_dropout", 0.0, 1.0, hi_open=True)
        targets = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else None
        if not targets or not set(targets) <= set(LORA_TARGETS):
            raise ConfigError(f"{flag('lora_targets')} must be a comma-separated subset of {','.join(LORA_TARGETS)}, "
                              f"got {short_repr(self.lora_targets)}")
        if self.lora_rank is not None and self.init_from is None:
            raise ConfigError(f"{flag('lora_rank')} needs {flag('init_from')}: LoRA fine-tunes a trained model")
        number("time_budget", 0.0, lo_open=True)
        number("lr", 0.0, lo_open=True)
        number("min_lr", allow_none=True)
        number("weight_decay")
        number("beta1", 0.0, 1.0, hi_open=True)
        number("beta2", 0.0, 1.0, hi_open=True)
        number("eps", 0.0, lo_open=True)
        number("grad_clip")
        number("sample_temperature")
        for name, options in (("preset", PRESETS), ("dtype", DTYPES), ("schedule", SCHEDULES),
                              ("val_split", VAL_SPLITS)):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in options:   # (a list from JSON is not even hashable)
                raise ConfigError(f"{flag(name)} must be one of {', '.join(options)}; got {short_repr(v)}")
        for name in ("tie_embeddings", "force"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")
        if self.min_lr is not None and self.schedule != "constant" and self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if self.include is not None and not isinstance(self.include, str):
            raise ConfigError(f"--include must be comma-separated file patterns, got {short_repr(self.include)}")
        parse_include(self.include)
        for name in ("data", "init_from", "out_dir", "val_data"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(f"{flag(name)} must be a non-empty path, got {v!r}")
        if not isinstance(self.sample_prompt, str):
            raise ConfigError(f"--sample-prompt must be a string, got {self.sample_prompt!r}")
        if self.init_from is None:
            self._check_model_shape()

    def _check_model_shape(self) -> None:
        """The fresh model's shape and vocabulary, checked before any work (a tokenizer takes
        seconds to train); with --init-from they come from the checkpoint instead."""
        dims = self.model_dims()
        given = {name: f"{flag(name)} {dims[name]}" if getattr(self, name) is not None
                 else f"{name} {dims[name]} (from --preset {self.preset})" for name in ("dim", "n_heads")}
        if dims["dim"] % dims["n_heads"]:
            raise ConfigError(f"{given['n_heads']} must divide {given['dim']}: each head gets dim / n_heads "
                              "channels")
        if (dims["dim"] // dims["n_heads"]) % 2:
            raise ConfigError(f"--dim / --n-heads = {dims['dim']} / {dims['n_heads']} = "
                              f"{dims['dim'] // dims['n_heads']} channels per head must be even (rotary "
                              "embeddings rotate pairs of channels)")
        if self.n_kv_heads is not None and dims["n_heads"] % self.n_kv_heads:
            raise ConfigError(f"--n-kv-heads {self.n_kv_heads} must divide {given['n_heads']}: "
                              "each key/value head serves the same number of query heads")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} ({N_BYTE_TOKENS} byte tokens "
                              f"and the special {', '.join(DEFAULT_SPECIAL_TOKENS)}), got {self.vocab_size}")
        try:
            model_config(self, self.vocab_size)
        except ConfigError as e:
            raise ConfigError(f"the model options do not make a Llama: {e}") from None

    def model_dims(self) -> dict[str, int]:
        """dim, n_layers, n_heads: the preset's, overridden by any given explicitly."""
        dims = dict(PRESETS[self.preset])
        for name in ("dim", "n_layers", "n_heads"):
            if getattr(self, name) is not None:
                dims[name] = getattr(self, name)
        return dims

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str | None = "config") -> "TrainConfig":
        """Build from ``{field: value}``; dashes in keys count as underscores; unknown keys are errors.
        Errors start with ``source: `` (the file the values came from; None: the command line)."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a table of options, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{source}: unknown option {key!r} (known: {', '.join(sorted(known))}; "
                                  "see npllama train --help)")
            clean[name] = value
        try:
            return cls(**clean)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def flag(name: str) -> str:
    """The command-line option of a TrainConfig field (what the user typed, also in a --config file)."""
    return "--" + name.replace("_", "-")


def _range(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    """'a number > 0', 'a number in [0, 1)', ... (``hi`` may be inf)."""
    if hi == math.inf:
        return f"a number {'>' if lo_open else '>='} {lo:g}"
    return f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def read_config_file(path) -> dict:
    """Options from a TOML or JSON file (by extension; otherwise tried as TOML then JSON)."""
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


def model_config(cfg: TrainConfig, vocab_size: int) -> LlamaConfig:
    """The LlamaConfig of a fresh model: the preset, overridden by any explicit dimension."""
    dims = cfg.model_dims()
    return LlamaConfig(
        vocab_size=vocab_size, dim=dims["dim"], n_layers=dims["n_layers"], n_heads=dims["n_heads"],
        n_kv_heads=cfg.n_kv_heads or dims["n_heads"],
        hidden_dim=cfg.hidden_dim or llama_hidden_dim(dims["dim"]),
        max_seq_len=cfg.seq_len, tie_embeddings=cfg.tie_embeddings, dropout=cfg.dropout)

