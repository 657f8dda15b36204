"""A training run: everything a step depends on (``Run``), the files of its directory, and what
its setting up and its checkpoints share (the optimizer over what trains, the tokenized corpus, the
LoRA base's fingerprint).  setup.py makes a Run, checkpoint.py saves and restores it, loop.py trains it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..data import BatchSampler, Split, TokenDataset, load_corpus, split_corpus, text_sha256
from ..errors import NpllamaError
from ..files import COMMIT_DIR, STAGING_DIR, file_sha256
from ..formats import hf
from ..formats.gguf import find_gguf
from ..formats.peft import ADAPTER_CONFIG
from ..model import Llama
from ..optim import AdamW, lr_at
from ..tokenizer import TOKENIZER_CONFIG_FILE, Tokenizer
from . import corpus_cache
from .config import TrainConfig
from .distributed import World
from .progress import tokenizing_progress
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
    split_sha256: str | None = None     # the training and held-out texts (data.Split.digest); None: an older run
    extend_seconds: float | None = None  # this session extends the run by about this many seconds (extend.py)

    def release(self) -> None:
        """Unlock the run directory (at the end of the session)."""
        if self.directory is not None:
            self.directory.release()

    def lr_at(self, step: int) -> float:
        extension = self.plan.get("extension")
        if extension is not None and step >= extension["from_step"]:   # an extended run (extend.py)
            return tail_lr(step, extension, self.total_steps, self.config.final_lr, self.config.schedule)
        return lr_at(step, max_lr=self.config.lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps, min_lr=self.config.final_lr, kind=self.config.schedule)


def tail_lr(step: int, extension: dict, total_steps: int, final_lr: float, kind: str) -> float:
    """The rate of step ``step`` >= extension["from_step"] of an extended run: a new tail of the
    schedule from extension["from_lr"] down to the final rate at the last step (see extend.py)."""
    s0, r0 = extension["from_step"], extension["from_lr"]
    return lr_at(step - s0, max_lr=r0, warmup_steps=0, total_steps=max(total_steps - s0, 1),
                 min_lr=min(final_lr, r0), kind=kind)


def make_optimizer(model, cfg: TrainConfig):
    """AdamW over what trains: with LoRA the adapters' buffer only (no state for frozen weights)."""
    return AdamW(model.trainable_params, cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 weight_decay=cfg.weight_decay, flat_params=model.flat_trainable)


def read_split(cfg: TrainConfig) -> tuple[str, Split, str]:
    """The corpus of ``cfg`` read (--data, --include) and split (--val-split, --val-fraction,
    --val-data); returns the corpus text's SHA-256, the split, and the lines for the log (which files,
    how many bytes, what is held out)."""
    corpus = load_corpus(cfg.data, cfg.include)
    lines = [corpus.describe()]
    val_corpus = load_corpus(cfg.val_data) if cfg.val_data is not None else None
    if val_corpus is not None:
        lines.append(val_corpus.describe().replace("corpus:", "held-out corpus:", 1))
    split = split_corpus(corpus, cfg.val_fraction, cfg.val_split, val_corpus)
    return text_sha256(corpus.text), split, "\n".join(lines + [split.description])


def load_dataset(tokenizer, run_dir: Path, split: Split, verbose: bool = False):
    """The split corpus tokenized (or read back from RUN_DIR/tokens); with ``verbose``, a line every
    ``TOKENIZING_EVERY`` seconds while a long corpus is tokenized."""
    return TokenDataset.from_texts(split.train_text, split.val_text, tokenizer, cache_dir=run_dir / TOKENS_DIR,
                                   progress=tokenizing_progress(verbose))


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


def diverged(run: Run, step: int, what: str) -> TrainingDiverged:
    if run.last_checkpoint_step is not None:
        kept = f"the last good checkpoint (step {run.last_checkpoint_step}) in {run.run_dir} is kept unchanged"
    else:
        kept = "no checkpoint had been saved yet"
    return TrainingDiverged(f"training diverged at step {step}: {what}; stopped without saving, "
                            f"{kept}. Try a lower --lr, more --warmup-steps or --grad-clip 1.0")
