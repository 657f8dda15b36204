"""A session of a run, from its start or resume to its end or an interrupt: everything around the
step that loop.py takes -- metrics.jsonl, the progress, the time-budget planner, the evaluations
and samples (at step 0, every ``eval_interval`` / ``sample_interval`` steps and at the end),
checkpoints, Ctrl-C/SIGTERM (``StopSignals``) -- and what the session gives back (``TrainResult``).

Periodic evaluations use the first ``eval_tokens`` tokens of the held-out text (the same ones each
time, so the curve is not noisy); the final one uses the whole held-out text (or
``final_eval_tokens``) and reports those first tokens too, the figure to compare with the periodic
ones.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..engine.blas import BLAS, sgemm_gflops
from ..engine.jit import CompileClock
from ..engine.threads import get_threads
from ..memory import peak_rss_bytes
from .checkpoint import save_checkpoint
from .config import SAMPLE_LINES
from .evaluation import evaluate, generate_sample
from .metrics import MetricsLog, read_metrics
from .best import BEST_DIR, BestWeights, format_passes, passes, read_best
from .planner import BudgetPlanner
from .progress import Progress, hms, progress_text, sample_lines, say
from .run import METRICS_FILE, Run
from .setup import discard_unsaved_run


class Session:
    """One session of a run (from start or resume to the end or an interrupt): everything around
    the step -- metrics.jsonl, the progress, the time-budget planner, evaluations, samples,
    checkpoints, and Ctrl-C/SIGTERM, which end the session after the current step with a checkpoint."""

    def __init__(self, run: Run, t_start: float, compiling: CompileClock, resumed: bool, progress: bool,
                 verbose: bool):
        cfg, val_tokens = run.config, run.data.val_tokens
        self.run, self.t_start, self.compiling, self.resumed, self.verbose = run, t_start, compiling, resumed, verbose
        self.metrics = MetricsLog(run.run_dir / METRICS_FILE if run.world.root else None)
        # (a fresh run: records of a run stopped before its first save, or --force's file, replaced)
        self.metrics.truncate_after(run.step if resumed else -1)
        # Periodic evaluations read the first eval_tokens held-out tokens, the final one all of them
        # (or final_eval_tokens) and, to compare with the periodic ones, those first tokens again.
        self.eval_tokens = min(cfg.eval_tokens, len(val_tokens))
        self.final_tokens = len(val_tokens) if cfg.final_eval_tokens is None \
            else min(cfg.final_eval_tokens, len(val_tokens))
        self.final_subset = self.eval_tokens if cfg.eval_interval > 0 and self.eval_tokens < self.final_tokens \
            else None
        self.result = TrainResult(run_dir=run.run_dir, step=run.step, total_steps=run.total_steps or 0)
        self.stop = StopSignals()
        self.planner: BudgetPlanner | None = None
        self.warned_warmup = False
        self.progress = Progress(progress and verbose)
        self.ema_step = None           # smoothed seconds per step, for the time left
        self.window_losses = []        # training losses since the last evaluation
        self.evaluated = False         # (the first evaluation's line says which tokens they all read)
        self.session_start = time.monotonic()
        # the best weights by held-out loss (best.py): an earlier session's best/ is the one to beat
        self.best = BestWeights(cfg.early_stop, read_best(run.run_dir) if resumed and run.world.root else None)

    def __enter__(self):
        self.stop.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.close()
        self.metrics.close()
        return self.stop.__exit__(*exc)

    def stop_agreed(self) -> bool:
        """Whether to stop now: a signal on any rank stops every rank after the same step."""
        signum = self.run.world.max_int(self.stop.signum or 0, "agreeing whether to stop")
        self.stop.signum = signum or None
        return self.stop.requested

    def elapsed(self) -> float:
        """Training wall time of the run so far, earlier sessions included (the ``elapsed`` of every
        metrics.jsonl row; setup is not included)."""
        return self.run.train_seconds + time.monotonic() - self.session_start

    def start(self, time_a_step: Callable[[], float]) -> None:
        """For a fresh run, the step-0 evaluation and sample (which also measure what they cost) and
        the number of steps.  A resumed run keeps its saved plan.  ``time_a_step()``: seconds per
        step, from throw-away steps (for a time budget without evaluations to estimate from)."""
        run, cfg = self.run, self.run.config
        if not self.resumed:
            if cfg.steps is None:
                self.planner = BudgetPlanner(cfg, self.t_start, self.eval_tokens,
                                             self.final_tokens + (self.final_subset or 0),
                                             # (a save writes what trains and its two AdamW moments: with
                                             # LoRA the adapters, not the frozen base)
                                             checkpoint_seconds=0.3 + 4 * run.model.flat_trainable.nbytes / 200e6)
            if cfg.eval_interval > 0:
                self.evaluate()   # (its time gives the planner a first estimate of a step's)
            elif self.planner is not None:   # no evaluation to estimate from: time throw-away steps
                self.planner.observe_step(time_a_step())
            self.sample()
            if self.planner is None:
                run.total_steps = cfg.steps
                run.plan = {"mode": "steps", "steps": cfg.steps}
            else:
                run.total_steps = run.world.from_root(self.planner.plan(0, 1))   # rank 0 decides
                run.plan = {**self.planner.summary(), "setup_seconds": round(time.monotonic() - self.t_start, 3),
                            "first_plan": run.total_steps, "planned_steps": run.total_steps}
            self._set_warmup(warn=False)        # (an estimate: the warning waits for measured steps)
        elif run.extend_seconds is not None:   # --resume RUN --time-budget S: plan S seconds more (extend.py)
            self.planner = _extension_planner(run, self.t_start, self.eval_tokens,
                                              self.final_tokens + (self.final_subset or 0))
            run.total_steps = run.world.from_root(self.planner.plan(run.step, run.step + 1))
        say(self._setup_line(), self.verbose)
        self.train_start = time.monotonic()    # a time budget's progress counts from here (after set-up)
        self.result.total_steps = run.total_steps
        run.world.step_report()   # (communication is counted per step from here)

    def _set_warmup(self, warn: bool) -> None:
        """Warm-up within the planned steps.  When the budget fits fewer steps than --warmup-steps, the
        whole run is warm-up: with ``warn`` (the plan rests on a few measured steps), a warning, once."""
        run, warmup = self.run, self.run.config.warmup_steps
        run.warmup_steps = min(warmup, run.total_steps)
        if warn and run.total_steps < warmup and not self.warned_warmup:
            self.warned_warmup = True
            steps = f"{run.total_steps} step{'s' if run.total_steps != 1 else ''}"
            say(f"warning: the time budget fits {steps}, fewer than the {warmup} warm-up steps: the\n"
                "learning rate rises all run and never decays (a longer --time-budget or fewer --warmup-steps)",
                self.verbose)

    def _setup_line(self) -> str:
        """Where the time before the first step went, compiling included; the machine's speed; the plan."""
        run, cfg = self.run, self.run.config
        total = time.monotonic() - self.t_start
        parts = [f"{what} {seconds:.1f}s" for what, seconds in run.setup_seconds.items()]
        if self.compiling.seconds >= 0.05:
            parts.append(f"compiling kernels {self.compiling.seconds:.1f}s (first run only)")
        parts.append(f"the rest {total - sum(run.setup_seconds.values()) - self.compiling.seconds:.1f}s")
        line = f"setup {total:.1f}s: " + ", ".join(parts)
        if self.verbose:
            line += (f"\nthis machine multiplies float32 matrices at {sgemm_gflops():.0f} GFLOP/s now "
                     "(steps and tokens/s scale with it)")
        passes = self._passes_line(run.total_steps)
        budget = None if self.planner is None else self.planner.cfg.time_budget   # (an extension's: its own)
        if self.planner is not None and not math.isfinite(self.planner.step_seconds()):
            line += f"\ntime budget {budget:.0f}s: not planned (stopped before a step could be timed)"
        elif self.planner is not None:
            step_s = self.planner.step_seconds()
            how = "estimated" if self.planner.estimated else "measured"
            line += (f"\ntime budget {budget:.0f}s: {step_s:.3f}s/step ({how}; "
                     f"~{cfg.tokens_per_step / step_s:,.0f} tokens/s) -> {run.total_steps:,} steps{passes}, re-planned "
                     "as they run")
            costs, left = self.planner.costs(), budget - total
            if costs["final_eval_seconds"] + costs["checkpoint_seconds"] + step_s > left:
                line += (f"\nwarning: the time budget leaves {max(left, 0.0):.0f}s after setup, less than one step, "
                         f"a checkpoint and the final evaluation (~{costs['final_eval_seconds']:.0f}s on "
                         f"{self.final_tokens + (self.final_subset or 0):,} held-out tokens): the run will take longer "
                         "than the budget (a larger --time-budget, or a smaller --final-eval-tokens, fits)")
        else:
            line += f"\n{run.total_steps:,} steps{passes}"
        return line

    def _passes_line(self, total_steps: int) -> str:
        """`` = 12.3 passes over the 185,000 training tokens`` for a run of ``total_steps`` steps."""
        n = len(self.run.data.train_tokens)
        return f" = {format_passes(passes(total_steps * self.run.config.tokens_per_step, n))} passes over the {n:,} " \
               "training tokens"

    def log_step(self, loss: float, lr: float, norm: float, seconds: float) -> None:
        """Record a finished step; every ``REPLAN_EVERY`` steps of a time-budgeted run, re-plan."""
        run, cfg, planner = self.run, self.run.config, self.planner
        # (a session's first step may compile kernels: the average starts afresh at the second)
        self.ema_step = seconds if len(self.result.losses) < 2 else 0.9 * self.ema_step + 0.1 * seconds
        if planner is not None:
            planner.observe_step(seconds)
            if planner.replan_due(run.step, run.total_steps):
                run.total_steps = run.world.from_root(planner.plan(run.step, run.step))   # == step: stop
                run.plan.update(planner.summary(), planned_steps=run.total_steps)
                self.result.total_steps = run.total_steps
                self._set_warmup(warn=run.step >= min(3, run.total_steps))
        self.window_losses.append(loss)
        self.result.losses.append(loss)
        comm = run.world.step_report()   # {} for one process
        self.metrics.write({"step": run.step, "loss": loss, "lr": lr, "grad_norm": norm, "step_seconds": seconds,
                            "tokens_per_second": cfg.tokens_per_step / seconds, "elapsed": self.elapsed(), **comm})
        # (no rate after a session's first step: it may have loaded kernels, and says nothing of the next)
        timed = len(self.result.losses) >= 2
        tokens_per_second = cfg.tokens_per_step / self.ema_step if timed else None
        if planner is not None:   # progress in seconds of the budget: the step total moves as it re-plans
            now, budget = time.monotonic(), planner.cfg.time_budget   # (an extension's: its own)
            spent, setup = now - self.t_start, self.train_start - self.t_start
            self.progress.update((now - self.train_start) / max(budget - setup, 1e-9),
                                 progress_text(run.step, None, loss, tokens_per_second,
                                               budget - spent if timed else None)
                                 + _describe_comm(comm))
        else:
            left = (run.total_steps - run.step) * self.ema_step if timed else None
            self.progress.update(run.step / run.total_steps,
                                 progress_text(run.step, run.total_steps, loss, tokens_per_second, left)
                                 + _describe_comm(comm))

    def evaluate(self) -> None:
        ev = _evaluate(self.run, self.eval_tokens, self.stop)
        if ev is not None:
            if self.window_losses:
                ev["train_loss"] = float(np.mean(self.window_losses))
                self.window_losses = []
            if self.planner is not None:
                self.planner.observe_eval(ev)
            self._record_eval(ev)
        run = self.run
        if run.config.early_stop and run.step > 0 and run.world.from_root(self.best.stop, "agreeing on an early stop"):
            run.total_steps = run.step      # the run ends here: final evaluation, sample and checkpoint
            run.plan["early_stop_step"] = run.step
            self.result.total_steps = run.step

    def _record_eval(self, ev: dict) -> None:
        run = self.run
        ev["passes"] = round(passes(run.tokens_seen, len(run.data.train_tokens)), 4)
        self.metrics.write({"step": run.step, "kind": "eval", **ev, "elapsed": self.elapsed()})
        say(_eval_lines(run.step, ev, len(run.data.val_tokens), not self.evaluated), self.verbose)
        self.evaluated = True
        for line in self.best.observe(run.step, ev, run.model.flat_trainable, run.tokens_seen,
                                      len(run.data.train_tokens)):
            say(line, self.verbose)

    def _save(self) -> None:
        """A checkpoint, and the best weights if new since the last (best/ is never ahead of the run)."""
        save_checkpoint(self.run, self.metrics)
        if self.run.world.root:
            self.best.save(self.run.run_dir, self.run.model, self.run.config.init_from)

    def sample(self) -> None:
        """A short sample of the model's text: in metrics.jsonl whole, on the terminal its first
        lines with control characters escaped."""
        cfg = self.run.config
        if not self.run.world.root:   # data parallel: rank 0 samples, the others wait at the next step
            return
        t0 = time.perf_counter()
        text = generate_sample(self.run.model, self.run.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                               cfg.sample_temperature, cfg.sample_top_k, cfg.seed)
        if text is None:
            return
        seconds = time.perf_counter() - t0
        if self.planner is not None:
            self.planner.observe_sample(seconds)
        self.metrics.write({"step": self.run.step, "kind": "sample", "text": text, "seconds": seconds,
                            "elapsed": self.elapsed()})
        lines = sample_lines(text, SAMPLE_LINES)
        say("\n".join([f"step {self.run.step}: sample" + (":" if lines else " (only blank lines)")]
                      + ["  " + line for line in lines]), self.verbose)

    def checkpoint(self) -> None:
        """Save; the time a save takes counts as training time, and the planner learns it."""
        self.run.train_seconds += time.monotonic() - self.session_start
        self.session_start = time.monotonic()
        self._save()
        if self.planner is not None:
            self.planner.observe_checkpoint(time.monotonic() - self.session_start)

    def finish(self) -> None:
        """After the last step: the final evaluation, sample and checkpoint.  After an interrupt: a
        checkpoint (unless the last one is current) and how to resume."""
        run, result = self.run, self.result
        self.progress.close()
        run.train_seconds += time.monotonic() - self.session_start
        self.session_start = time.monotonic()
        if self.stop.requested and run.step < run.total_steps:
            result.interrupted = True
            result.signal_name = signal.Signals(self.stop.signum).name
            if run.step > 0 and run.step != run.last_checkpoint_step:
                self._save()
            if run.step > 0:
                say(f"\n{result.signal_name}: stopped at step {run.step} of {run.total_steps}; checkpoint saved "
                    f"in {run.run_dir}.\nResume with:  npllama train --resume {run.run_dir}", run.world.root)
            else:
                self.metrics.close()
                if run.world.root:
                    discard_unsaved_run(run.directory)
                say(f"\n{result.signal_name}: stopped before the first step; nothing saved", run.world.root)
        else:
            ev = self._final_eval()
            if ev is not None:
                self._record_eval(ev)
                result.final_eval = ev
            self.sample()
            self._save()
        result.step = run.step
        result.wall_seconds = time.monotonic() - self.t_start
        steps = [r for r in read_metrics(run.run_dir) if "loss" in r] if run.step > 0 and run.world.root else []
        if steps:   # the median over the run: robust to the first steps and to evaluation hiccups
            result.tokens_per_second = float(np.median([r["tokens_per_second"] for r in steps]))
        result.peak_rss_bytes = peak_rss_bytes()
        if not result.interrupted:
            ev = result.final_eval
            compiled = f" ({self.compiling.seconds:.0f}s compiling)" if self.compiling.seconds >= 1 else ""
            memory = f", peak memory {result.peak_rss_bytes / 1e9:.2f} GB" if result.peak_rss_bytes else ""
            say(f"done: {run.step:,} steps in {hms(result.wall_seconds)}{compiled}, median "
                f"{result.tokens_per_second or 0:,.0f} tokens/s"
                + (f", held-out {ev['val_bpb']:.4f} bits/byte" if ev else "") + memory
                + f"\nmodel saved in {run.run_dir}" + self._best_line(), self.verbose)

    def _best_line(self) -> str:
        best = self.best.best
        if best is None or best["step"] == self.run.step:
            return ""
        return (f"; the best held-out loss was at step {best['step']:,} ({best['val_bpb']:.4f} bits/byte on the "
                f"periodic evals' tokens): its weights are in {self.run.run_dir / BEST_DIR}, which `npllama generate "
                f"{self.run.run_dir}` uses (--last for the last)")

    def _final_eval(self) -> dict | None:
        """The final evaluation, and that of the periodic evaluations' tokens under "subset"."""
        ev = _evaluate(self.run, self.final_tokens, self.stop)
        if ev is None:
            return None
        if self.window_losses:
            ev["train_loss"] = float(np.mean(self.window_losses))
        ev["final"] = True
        if self.final_subset is not None:
            subset = _evaluate(self.run, self.final_subset, self.stop)
            if subset is not None:
                ev["subset"] = {k: subset[k] for k in ("val_loss", "val_bpb", "val_tokens", "val_bytes")}
        return ev


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
    peak_rss_bytes: int | None = None   # the process's peak resident memory at the end of the session

    @property
    def exit_code(self) -> int:
        # Ctrl-C is how a user ends a run on purpose: the checkpoint is saved, so that is success.
        # SIGTERM keeps the shell convention (128 + 15) so supervisors see the run was stopped.
        return 128 + signal.SIGTERM if self.interrupted and self.signal_name == "SIGTERM" else 0


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


def describe(run: Run) -> str:
    """The start-up lines: model, batch and the threads really in use, run directory."""
    c, cfg = run.model.config, run.config
    kv = f" ({c.n_kv_heads} kv)" if c.n_kv_heads != c.n_heads else ""
    return (f"model: {run.model.num_parameters() / 1e6:.2f}M parameters: dim {c.dim}, {c.n_layers} layers, "
            f"{c.n_heads} heads{kv}, hidden {c.hidden_dim}, vocab {c.vocab_size}, {cfg.dtype}\n"
            f"batch {cfg.batch_size} x {cfg.grad_accum} x {cfg.seq_len} = {cfg.tokens_per_step:,} tokens/step; "
            f"threads: {get_threads()}; matmuls: {BLAS}\n"
            f"run dir {run.run_dir}")



def _evaluate(run: Run, n_tokens: int, stop: StopSignals) -> dict | None:
    """``evaluate`` on the first ``n_tokens`` held-out tokens, timed (``eval_seconds``)."""
    if not run.world.root:   # data parallel: rank 0 evaluates, the others wait at the next step
        return None
    data = run.data
    tokens = data.val_tokens[:n_tokens]
    n_bytes = data.val_bytes if len(tokens) == len(data.val_tokens) \
        else len(run.tokenizer.decode(np.asarray(tokens)).encode("utf-8"))
    t0 = time.perf_counter()
    result = evaluate(run.model, tokens, data.eval_context_token, n_bytes, run.config.batch_size,
                      run.config.seq_len, should_stop=lambda: stop.requested)
    if result is not None:
        result["eval_seconds"] = time.perf_counter() - t0
    return result


def _extension_planner(run: Run, t_start: float, eval_tokens: int, final_tokens: int) -> BudgetPlanner:
    """The planner of ``--resume RUN --time-budget S``: S seconds from now, the step and evaluation
    costs taken from the run's metrics (re-measured as it goes)."""
    planner = BudgetPlanner(dataclasses.replace(run.config, time_budget=run.extend_seconds), t_start, eval_tokens,
                            final_tokens, checkpoint_seconds=0.3 + 4 * run.model.flat_trainable.nbytes / 200e6)
    records = read_metrics(run.run_dir) if run.world.root else []
    for r in [r for r in records if "step_seconds" in r][-planner.WINDOW:]:
        planner.observe_step(r["step_seconds"])
    evals = [r for r in records if r.get("kind") == "eval" and "eval_seconds" in r and not r.get("final")]
    if evals and planner.step_times:
        planner.observe_eval(evals[-1])
    if not planner.step_times:   # (no step recorded: 1 s a step until the first re-plan)
        planner.observe_step(1.0)
    return planner


def _describe_comm(comm: dict) -> str:
    """Data parallel: the step's wait on the other ranks and the bytes it all-reduced."""
    if not comm:
        return ""
    return f" comm {comm['comm_wait_seconds'] * 1e3:.0f}ms/{comm['comm_bytes'] / 1e6:.1f}MB"


def _held_out(n_tokens: int, n_held_out: int) -> str:
    return f"all {n_held_out:,} held-out tokens" if n_tokens >= n_held_out else f"first {n_tokens:,} held-out tokens"


def _eval_lines(step: int, ev: dict, n_held_out: int, say_tokens: bool) -> str:
    """``step 500: held-out 2.1234 bits/byte, loss 3.4567; train loss 3.5100`` (``say_tokens``: which
    held-out tokens, said at a session's first evaluation).  The final evaluation says which tokens
    it covers, and gives a second line on the periodic evaluations' tokens, comparable with theirs."""
    def figures(e):
        return f"{e['val_bpb']:.4f} bits/byte, loss {e['val_loss']:.4f}"

    train = f"; train loss {ev['train_loss']:.4f}" if ev.get("train_loss") is not None else ""
    if ev.get("passes") and step > 0 and not ev.get("final"):   # (the plan and the done line say the total)
        train += f"; {format_passes(ev['passes'])} passes"
    if not ev.get("final"):
        tokens = f" ({_held_out(ev['val_tokens'], n_held_out)}, as every periodic eval)" if say_tokens else ""
        return f"step {step}: held-out {figures(ev)}{tokens}{train}"
    line = f"step {step}: final eval on {_held_out(ev['val_tokens'], n_held_out)}: {figures(ev)}{train}"
    if "subset" in ev:
        line += (f"\nstep {step}: final eval on the periodic evals' first {ev['subset']['val_tokens']:,}: "
                 f"{figures(ev['subset'])}")
    return line
