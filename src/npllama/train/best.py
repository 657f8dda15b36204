"""Overfitting seen and stopped: the best weights by held-out loss kept beside the last, a warning
when held-out has risen for a while, and early stopping.

A small corpus trained for long is learnt by heart: the training loss keeps falling while the
held-out loss turns and rises (on a 163 KB corpus: 2.30 at step 200, 3.19 at the end, ~43 passes over
the data).  So each evaluation is compared with the best so far (on the same held-out tokens: the
periodic evaluations', also for the final one):

* a new best: its weights are copied (in memory, one copy of what trains) and written to
  ``RUN/best/`` with the next checkpoint, so ``best/`` is never ahead of the run it belongs to;
* ``RISING_EVALS`` evaluations in a row above the best (by more than ``RISING_MARGIN``): a warning,
  once, naming the best step and the passes over the data;
* ``--early-stop N``: the run ends (final evaluation, sample, checkpoint) after N evaluations in a
  row without a new best.

``RUN/best/`` is a model directory like the run's own (config.json, weights, tokenizer; for LoRA the
adapter), plus ``best.json``: the step, its held-out loss and bits per byte, the passes over the
data.  `npllama generate RUN` uses it when it exists (and says so); ``--last`` takes the last weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..files import atomic_write_json, begin_staged_write, commit_staged_write, recover_staged_write

BEST_DIR = "best"
BEST_FILE = "best.json"
RISING_EVALS = 3        # evaluations in a row above the best before the warning
RISING_MARGIN = 0.01    # ... each more than 1 % above it (noise is well below that)


def passes(tokens_seen: int, train_tokens: int) -> float:
    """Passes over the training tokens: tokens trained on / tokens in the training text."""
    return tokens_seen / max(train_tokens, 1)


def format_passes(p: float) -> str:
    """``12.3``, or ``0.047`` under one pass."""
    return f"{p:.1f}" if p >= 1 else f"{p:.2g}"


def compared_loss(ev: dict) -> float:
    """The figure compared across evaluations: on the periodic evaluations' tokens (a final
    evaluation over all held-out tokens gives that as its "subset")."""
    return float(ev["subset"]["val_loss"] if "subset" in ev else ev["val_loss"])


def read_best(run_dir) -> dict | None:
    """``RUN/best/best.json`` (after finishing or discarding a write a crash interrupted), or None."""
    best_dir = Path(run_dir) / BEST_DIR
    if not best_dir.is_dir():
        return None
    recover_staged_write(best_dir, last=(BEST_FILE,))
    try:
        best = json.loads((best_dir / BEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(best, dict) and isinstance(best.get("step"), int) and isinstance(best.get("val_loss"), float)
    return best if ok and math.isfinite(best["val_loss"]) else None


class BestWeights:
    """The best evaluation so far, its weights until written, the rising warning and early stopping."""

    def __init__(self, early_stop: int = 0, best: dict | None = None):
        self.early_stop = early_stop        # 0: never stop early
        self.best = best                    # {"step", "val_loss", "val_bpb", "passes"} or None
        self.weights: np.ndarray | None = None   # the best's weights (a copy)
        self.pending = False                # ... not yet written to best/
        self.since_best = 0                 # evaluations in a row without a new best
        self.warned = False
        self.stop = False                   # early stopping asks the run to end

    def observe(self, step: int, ev: dict, trainable: np.ndarray, tokens_seen: int, train_tokens: int) -> list[str]:
        """Compare the evaluation at ``step`` with the best; returns the lines to show (a warning,
        the early stop).  Step 0 (the untrained model) is never the best."""
        if step == 0:
            return []
        loss, seen = compared_loss(ev), passes(tokens_seen, train_tokens)
        if self.best is None or loss < self.best["val_loss"]:
            bpb = ev["subset"]["val_bpb"] if "subset" in ev else ev["val_bpb"]
            self.best = {"step": step, "val_loss": loss, "val_bpb": float(bpb), "passes": round(seen, 3)}
            if self.weights is None or self.weights.shape != trainable.shape:
                self.weights = np.empty_like(trainable)
            np.copyto(self.weights, trainable)
            self.pending = True
            self.since_best = 0
            return []
        self.since_best += 1
        lines = []
        best = self.best
        if not self.warned and self.since_best >= RISING_EVALS and loss > best["val_loss"] * (1 + RISING_MARGIN):
            self.warned = True
            lines.append(f"warning: held-out loss has risen for {self.since_best} evaluations: {loss:.4f} at step "
                         f"{step:,} against {best['val_loss']:.4f} at step {best['step']:,}, after {format_passes(seen)} passes "
                         f"over the training tokens: the model is learning this corpus by heart (overfitting). "
                         f"{BEST_DIR}/ keeps step {best['step']:,}'s weights, which `npllama generate` uses; "
                         "--early-stop N ends a run after N evaluations without a new best; a smaller model, "
                         "more text or --dropout 0.1 overfit later")
        if self.early_stop and self.since_best >= self.early_stop:
            self.stop = True
            lines.append(f"early stop: {self.since_best} evaluations without a new best held-out loss (best "
                         f"{best['val_loss']:.4f} at step {best['step']:,}, --early-stop {self.early_stop})")
        return lines

    def save(self, run_dir, model, lora_base=None) -> None:
        """Write the best weights, if new since the last save, to ``RUN/best/`` as one unit (staged
        like a checkpoint; best.json moves in last).  The model's trainable weights are swapped for
        the best ones while they are written, and put back after."""
        if not self.pending:
            return
        best_dir = Path(run_dir) / BEST_DIR
        stage = begin_staged_write(best_dir, last=(BEST_FILE,))
        trainable = model.flat_trainable
        current = trainable.copy()
        np.copyto(trainable, self.weights)
        try:
            if model.lora is None:
                model.save_pretrained(stage)
            else:
                model.save_adapter(stage, lora_base)
                model.tokenizer.save(stage / "tokenizer.json")
                model.tokenizer.save_config(stage)
        finally:
            np.copyto(trainable, current)
        atomic_write_json(stage / BEST_FILE, self.best)
        commit_staged_write(best_dir, stage, last=(BEST_FILE,))
        self.pending = False
