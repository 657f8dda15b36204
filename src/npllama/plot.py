"""`npllama plot RUN_DIR [RUN_DIR ...]`: draw the loss curves of runs (from metrics.jsonl) to a PNG,
against steps, tokens seen or wall time, and optionally write them all to one CSV file.

Left panel: training loss per step (faint) with its moving average, and the held-out loss at each
evaluation, both in nats per token.  Right panel: held-out bits per byte.  Several runs are drawn
together, one colour each (their names in the legend).  The CSV needs nothing; matplotlib is an optional
extra (``pip install -e ".[plot]"`` in a clone, as the README says); without it the command says so and exits with an error.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .train import read_metrics

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


X_AXES = {"step": "step", "tokens": "tokens seen", "time": "training wall time (s)"}
CSV_COLUMNS = ("run", "step", "tokens", "elapsed", "kind", "loss", "lr", "val_loss", "val_bpb", "final")


class RunCurves:
    """One run's records from metrics.jsonl, and where each step lies on the chosen x axis."""

    def __init__(self, run_dir, label: str | None = None):
        self.run_dir = Path(run_dir)
        self.label = label or self.run_dir.name
        records = read_metrics(self.run_dir)
        self.train = [r for r in records if "loss" in r]
        self.evals = [r for r in records if r.get("kind") == "eval"]
        if not self.train and not self.evals:
            raise ConfigError(f"{self.run_dir / 'metrics.jsonl'}: no training or evaluation records to plot")
        # tokens per step: a step record's tokens/s times its seconds (the batch is the same every step)
        rates = [r["tokens_per_second"] * r["step_seconds"] for r in self.train
                 if "tokens_per_second" in r and "step_seconds" in r]
        self.tokens_per_step = int(round(float(np.median(rates)))) if rates else None
        timed = [(r["step"], r["elapsed"]) for r in self.train if "elapsed" in r]
        self._elapsed_steps, self._elapsed = (np.array([0.0] + [s for s, _ in timed]),
                                              np.array([0.0] + [e for _, e in timed]))

    def x(self, steps, axis: str) -> np.ndarray:
        """Steps on the x axis: the steps, the tokens seen by then, or the training wall time then."""
        steps = np.asarray(steps, dtype=np.float64)
        if axis == "step":
            return steps
        if axis == "tokens":
            if self.tokens_per_step is None:
                raise ConfigError(f"{self.run_dir}: its metrics.jsonl does not give the tokens per step; "
                                  "plot it against --x step")
            return steps * self.tokens_per_step
        if len(self._elapsed) < 2:
            raise ConfigError(f"{self.run_dir}: its metrics.jsonl has no wall times; plot it against --x step")
        return np.interp(steps, self._elapsed_steps, self._elapsed)

    def csv_rows(self):
        def row(r, kind):
            tokens = r["step"] * self.tokens_per_step if self.tokens_per_step else ""
            return [self.label, r["step"], tokens, _fmt(r.get("elapsed")), kind, _fmt(r.get("loss")),
                    _fmt(r.get("lr")), _fmt(r.get("val_loss")), _fmt(r.get("val_bpb")), int(bool(r.get("final")))]
        rows = [row(r, "train") for r in self.train] + [row(r, "eval") for r in self.evals]
        return sorted(rows, key=lambda row: (row[1], row[4] == "eval"))


def _fmt(value) -> str:
    return "" if value is None else repr(float(value))


def _labels(run_dirs) -> list[str]:
    """Each run's name; where two share a name, the path as given."""
    names = [Path(d).name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def write_csv(runs: list[RunCurves], out) -> Path:
    """All runs' training and evaluation records in one table (CSV_COLUMNS; one row per record)."""
    import csv
    out = Path(out)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for run in runs:
            writer.writerows(run.csv_rows())
    return out


def plot_run(run_dir, out=None, smooth: int | None = None, x: str = "step") -> Path:
    """Draw RUN_DIR's curves to ``out`` (default RUN_DIR/loss.png); returns the PNG's path."""
    return plot_runs([run_dir], out, smooth, x)


def plot_runs(run_dirs, out=None, smooth: int | None = None, x: str = "step", csv=None) -> Path:
    """Draw the curves of one run, or of several together (one colour each), against ``x`` (a key
    of X_AXES) to ``out``: default RUN_DIR/loss.png for one run, compare.png here for several.
    ``csv``: also write every record of every run to this CSV file (``write_csv``)."""
    if x not in X_AXES:
        raise ConfigError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    if not run_dirs:
        raise ConfigError("give at least one run directory")
    runs = [RunCurves(d, label) for d, label in zip(run_dirs, _labels(run_dirs))]
    if csv is not None:
        write_csv(runs, csv)
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(MISSING_MATPLOTLIB) from None
    if out is None:
        out = runs[0].run_dir / "loss.png" if len(runs) == 1 else Path("compare.png")
    out = Path(out)

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, run in enumerate(runs):
        _draw_run(ax_loss, ax_bpb, run, x, smooth, None if len(runs) == 1 else f"C{i}")
    ax_loss.set(xlabel=X_AXES[x], ylabel="cross-entropy (nats/token)", title="loss")
    ax_loss.legend(fontsize="small" if len(runs) > 1 else None)
    ax_loss.grid(alpha=0.3)
    ax_bpb.set(xlabel=X_AXES[x], ylabel="bits per byte", title="held-out bits per byte")
    ax_bpb.grid(alpha=0.3)
    if any(run.evals for run in runs):
        ax_bpb.legend(fontsize="small" if len(runs) > 1 else None)
    fig.suptitle(runs[0].label if len(runs) == 1 else f"{len(runs)} runs")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _draw_run(ax_loss, ax_bpb, run: RunCurves, x: str, smooth: int | None, color: str | None) -> None:
    """One run's curves.  Alone (``color`` None): the raw training loss faint under its moving
    average, held-out in orange, the final figure a red star.  Among several: everything in the
    run's colour, the training loss smoothed only, held-out dashed with dots."""
    alone = color is None
    name = "" if alone else f"{run.label}: "
    if run.train:
        steps, losses = map(np.asarray, zip(*[(r["step"], r["loss"]) for r in run.train]))
        window = smooth or max(1, len(losses) // 50)
        xs = run.x(steps, x)
        if alone:
            ax_loss.plot(xs, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax_loss.plot(xs, moving_average(losses, window), color="tab:blue" if alone else color, linewidth=1.6,
                     label=f"{name}train (mean of {window})")
    for curve in held_out_curves(run.evals):
        if curve["final"]:
            style = dict(marker="*", linestyle="none", color="tab:red" if alone else color, markersize=11)
        else:
            style = dict(marker="o", color="tab:orange", markersize=3.5) if alone \
                else dict(marker="o", linestyle="--", color=color, markersize=3)
        for ax, key in ((ax_loss, "val_loss"), (ax_bpb, "val_bpb")):
            ax.plot(run.x(curve["steps"], x), curve[key], label=name + curve["label"], **style)
    final = [r for r in run.evals if r.get("final")]
    if final:
        # Each star says what it measures: all held-out tokens, not the periodic curve's first ones,
        # so it may sit above the curve in one panel and below it in the other (tokens per byte
        # differ between the two sets of tokens).
        r = final[-1]
        over = f"all {r['val_tokens']:,} tokens: " if "val_tokens" in r else "final: "
        for ax, key in ((ax_loss, "val_loss"), (ax_bpb, "val_bpb")):
            ax.annotate(f"{over}{r[key]:.3f}", (run.x([r["step"]], x)[0], r[key]), textcoords="offset points",
                        xytext=(-10, 8), ha="right", fontsize="small")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", metavar="RUN_DIR", nargs="+",
                        help="run directories of `npllama train`; several are drawn together, one colour each")
    parser.add_argument("--out", "-o", metavar="PNG", default=None,
                        help="output file (default: RUN_DIR/loss.png for one run, compare.png for several)")
    parser.add_argument("--x", choices=tuple(X_AXES), default="step",
                        help="the x axis: optimizer steps, tokens seen, or training wall time (default: step)")
    parser.add_argument("--csv", metavar="FILE", default=None,
                        help="also write every training and evaluation record of the runs to this CSV file "
                             f"(columns: {', '.join(CSV_COLUMNS)})")
    parser.add_argument("--smooth", type=int, default=None, metavar="N",
                        help="moving-average window of the training loss (default: 1/50 of the run)")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    out = plot_runs(args.run_dirs, args.out, args.smooth, args.x, args.csv)
    if args.csv:
        print(args.csv)
    print(out)
    return 0
