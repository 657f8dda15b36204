"""`npllama plot RUN_DIR`: draw a run's loss curves (from metrics.jsonl) to a PNG.

Left panel: training loss per step (faint) with its moving average, and the held-out loss at each
evaluation, both in nats per token.  Right panel: held-out bits per byte.  matplotlib is an optional
extra (``pip install -e ".[plot]"`` in a clone, as the README says); without it the command says so and exits with an error.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .train.checkpoint import read_metrics

MISSING_MATPLOTLIB = ("npllama plot needs matplotlib, which is not installed: pip install -e \".[plot]\" "
                      "in your npllama clone (or pip install matplotlib)")


def moving_average(values, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    c = np.cumsum(np.concatenate([[0.0], x]))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def held_out_curves(evals: list[dict]) -> list[dict]:
    """The held-out figures to draw, each ``{label, steps, val_loss, val_bpb, final}``.

    Periodic evaluations cover the first eval_tokens held-out tokens, the final one all of them (a
    different, usually harder, text), so they are not joined: the periodic curve ends with the final
    evaluation's figure on the periodic tokens (its "subset"), and the figure on all held-out tokens
    is a point of its own.  Each label says which tokens it covers."""
    def tokens(r, where):
        return f", {where} {r['val_tokens']:,} tokens" if "val_tokens" in r else ""

    periodic = [r for r in evals if not r.get("final")]
    final = [r for r in evals if r.get("final")][-1:]
    if final and "subset" in final[0]:
        periodic.append({"step": final[0]["step"], **final[0]["subset"]})
    curves = []
    if periodic:
        curves.append({"label": f"held-out{tokens(periodic[-1], 'first')} (periodic)", "final": False,
                       **{k: [r[k] for r in periodic] for k in ("val_loss", "val_bpb")},
                       "steps": [r["step"] for r in periodic]})
    if final:
        curves.append({"label": f"held-out{tokens(final[0], 'all')} (final)", "final": True,
                       "steps": [final[0]["step"]], "val_loss": [final[0]["val_loss"]],
                       "val_bpb": [final[0]["val_bpb"]]})
    return curves


def plot_run(run_dir, out=None, smooth: int | None = None) -> Path:
    """Draw RUN_DIR's curves to ``out`` (default RUN_DIR/loss.png); returns the PNG's path."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(MISSING_MATPLOTLIB) from None

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'}: no training or evaluation records to plot")
    out = Path(out) if out is not None else run_dir / "loss.png"

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4.2))
    if train:
        steps, losses = map(np.asarray, zip(*train))
        window = smooth or max(1, len(losses) // 50)
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax_loss.plot(steps, moving_average(losses, window), color="tab:blue", linewidth=1.6,
                     label=f"train (mean of {window})")
    for curve in held_out_curves(evals):
        style = dict(marker="*", linestyle="none", color="tab:red", markersize=11) if curve["final"] \
            else dict(marker="o", color="tab:orange", markersize=3.5)
        for ax, key in ((ax_loss, "val_loss"), (ax_bpb, "val_bpb")):
            ax.plot(curve["steps"], curve[key], label=curve["label"], **style)
    final = [r for r in evals if r.get("final")]
    if final:
        ax_bpb.annotate(f"{final[-1]['val_bpb']:.3f}", (final[-1]["step"], final[-1]["val_bpb"]),
                        textcoords="offset points", xytext=(-10, 8), ha="right")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="held-out bits per byte")
    ax_bpb.grid(alpha=0.3)
    if evals:
        ax_bpb.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `npllama train`")
    parser.add_argument("--out", "-o", metavar="PNG", default=None, help="output file (default RUN_DIR/loss.png)")
    parser.add_argument("--smooth", type=int, default=None, metavar="N",
                        help="moving-average window of the training loss (default: 1/50 of the run)")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    out = plot_run(args.run_dir, args.out, args.smooth)
    print(out)
    return 0
