"""The training loop, in the style of nanoGPT's train.py.  One optimizer step:

    for k in 1..K (K = grad_accum micro-batches of batch_size windows of seq_len tokens):
        L_k, g_k = model.loss_and_grad(x_k, y_k)        mean cross-entropy of micro-batch k
    L = (1/K) sum_k L_k,   g = (1/K) sum_k g_k          = loss and gradient of one batch of K*B windows
    g <- g * min(1, clip / ||g||)                       global-norm clipping
    lr = lr_at(step)                                    linear warmup, then cosine (or linear) decay
    AdamW(p, g, lr)                                     decoupled weight decay on matrices only

``train`` is that step in a loop; ``Session`` does the bookkeeping around it (metrics, progress
bar, time-budget planning, evaluations, checkpoints, Ctrl-C).

Evaluation (every ``eval_interval`` steps, at step 0 and at the end): mean held-out cross-entropy
and bits per byte, bpb = (sum of -ln p over the held-out tokens) / (UTF-8 bytes of that text) / ln 2,
which does not depend on the tokenizer.  Periodic evaluations use the first ``eval_tokens`` tokens
of the held-out text (the same ones each time, so the curve is not noisy); the final one uses the
whole held-out text (or ``final_eval_tokens``) and reports those first tokens too, the figure to
compare with the periodic ones.  A short sample at step 0, every ``sample_interval`` steps and at
the end.

Why one module of over 500 lines: ``Session`` (progress, metrics, evaluations, samples,
checkpoints, Ctrl-C/SIGTERM, the time-budget re-plans) is all state of the loop it serves; split
off, every method would need the loop's locals passed in.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numba
import numpy as np

from ..data import BatchSampler, iter_eval_batches
from ..memory import peak_rss_bytes
from ..errors import ConfigError
from ..layers.cross_entropy import IGNORE_INDEX
from ..optim import clip_grad_norm
from ..threads import live_thread_counts
from ..layers._blas import BLAS
from ..layers._numba import CompileClock
from .checkpoint import (METRICS_FILE, MetricsLog, Run, diverged, discard_unsaved_run, read_metrics,
                         save_checkpoint, say)
from .config import SAMPLE_LINES, TrainConfig
from .distributed import World, current_world, end_job_on_error, local_batches
from .planner import BudgetPlanner
from . import precompile
from .progress import Progress, hms, progress_text, sample_lines
from .ranks import setup_run


@end_job_on_error
def train(config: TrainConfig | None = None, *, resume=None, progress: bool = True, verbose: bool = True,
          on_step: Callable[[int, float, Run], None] | None = None) -> TrainResult:
    """Train a model (``config``) or continue a saved run (``resume=RUN_DIR``); see the module docstring.

    ``on_step(step, loss, run)`` is called after every optimizer step (tests use it to interrupt).
    Raises TrainingDiverged when the loss, the gradient norm or (when saving) the weights are not
    finite; nothing is saved then, so the last checkpoint on disk is the last good state.  A fresh
    run that ends before its first checkpoint (an error, an interrupt before the first step)
    removes again what it created in its run directory, nothing else (run_dir.py).

    Started by mpiexec with several processes, each trains its share of every batch and only rank
    0 speaks and writes (see distributed.py).
    """
    t_start = time.monotonic()
    if (config is None) == (resume is None):
        if resume is not None:
            raise ConfigError("give either a config or resume=RUN_DIR, not both")
        config = TrainConfig()
    world = current_world()
    verbose = verbose and world.root
    # a first run: the kernels needed after the forward compile in a second process meanwhile
    precompiler = precompile.start(_kernel_spec(config), numba.get_num_threads()) \
        if resume is None and world.size == 1 else None
    try:
        with CompileClock() as compiling:
            run = setup_run(world, config, resume, verbose)
            try:
                return _train(run, t_start, compiling, precompiler, resume is not None, progress, verbose, on_step)
            except BaseException:
                if world.root:   # (the run directory is rank 0's)
                    discard_unsaved_run(run.directory)   # (keeps a directory holding a checkpoint)
                raise
            finally:
                run.release()
    finally:
        if precompiler is not None:
            precompiler.stop()


def _kernel_spec(cfg: TrainConfig) -> dict:
    return precompile.kernel_spec(cfg.dtype, cfg.dropout, cfg.lora_rank, cfg.lora_targets, cfg.lora_dropout,
                                  cfg.sample_temperature, cfg.sample_top_k)


def _train(run: Run, t_start: float, compiling: CompileClock, precompiler, resumed: bool, progress: bool,
           verbose: bool, on_step) -> TrainResult:
    cfg, model = run.config, run.model
    if resumed and run.step >= run.total_steps:
        say(f"{run.run_dir} is already complete ({run.step} of {run.total_steps} steps); nothing to do", verbose)
        return TrainResult(run_dir=run.run_dir, step=run.step, total_steps=run.total_steps)
    say(_describe(run), verbose)
    if run.world.size > 1:
        say(run.world.describe(), verbose)
    grad_buffer = np.empty_like(model.flat_grads) if cfg.grad_accum > 1 else None
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else sys.float_info.max

    with Session(run, t_start, compiling, precompiler, resumed, progress, verbose) as s:
        s.start(grad_buffer)           # a fresh run: step-0 evaluation and sample, number of steps
        while run.step < run.total_steps and not s.stop_agreed():
            t0 = time.perf_counter()
            lr = run.lr_at(run.step)
            batches = local_batches(run.sampler, cfg.grad_accum, run.world)   # this rank's share
            loss, grads = forward_backward(model, batches, grad_buffer, run.world)
            norm = clip_grad_norm(grads, max_norm)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise diverged(run, run.step + 1, f"the loss is {loss}" if not math.isfinite(loss)
                               else f"the gradient norm is {norm}")
            run.optimizer.step(flat_grads=grads, lr=lr)
            run.step += 1
            run.tokens_seen += cfg.tokens_per_step
            s.log_step(loss, lr, norm, time.perf_counter() - t0)   # may re-plan run.total_steps
            if on_step is not None:
                on_step(run.step, loss, run)
            if run.step < run.total_steps:               # (after the last step, finish() does all three)
                if cfg.eval_interval > 0 and run.step % cfg.eval_interval == 0:
                    s.evaluate()
                if cfg.sample_interval > 0 and run.step % cfg.sample_interval == 0:
                    s.sample()
                if cfg.checkpoint_interval > 0 and run.step % cfg.checkpoint_interval == 0:
                    s.checkpoint()
        s.finish()                     # final evaluation, sample and checkpoint, or the interrupt's checkpoint
    return s.result


class Session:
    """One session of a run (from start or resume to the end or an interrupt): everything around
    the step -- metrics.jsonl, the progress, the time-budget planner, evaluations, samples,
    checkpoints, and Ctrl-C/SIGTERM, which end the session after the current step with a checkpoint."""

    def __init__(self, run: Run, t_start: float, compiling: CompileClock, precompiler, resumed: bool,
                 progress: bool, verbose: bool):
        cfg, val_tokens = run.config, run.data.val_tokens
        self.run, self.t_start, self.compiling, self.resumed, self.verbose = run, t_start, compiling, resumed, verbose
        self.precompiler = precompiler
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

    def start(self, grad_buffer) -> None:
        """For a fresh run, the step-0 evaluation and sample (which also measure what they cost) and
        the number of steps.  A resumed run keeps its saved plan."""
        run, cfg = self.run, self.run.config
        if not self.resumed:
            self._finish_compiling()
            if cfg.steps is None:
                self.planner = BudgetPlanner(cfg, self.t_start, self.eval_tokens,
                                             self.final_tokens + (self.final_subset or 0),
                                             # (a save writes what trains and its two AdamW moments: with
                                             # LoRA the adapters, not the frozen base)
                                             checkpoint_seconds=0.3 + 4 * run.model.flat_trainable.nbytes / 200e6)
            if cfg.eval_interval > 0:
                self.evaluate()   # (its time gives the planner a first estimate of a step's)
            elif self.planner is not None:   # no evaluation to estimate from: time throw-away steps
                self.planner.observe_step(_measure_step_seconds(run, grad_buffer))
            self.sample()
            if self.planner is None:
                run.total_steps = cfg.steps
                run.plan = {"mode": "steps", "steps": cfg.steps}
            else:
                run.total_steps = run.world.from_root(self.planner.plan(0, 1))   # rank 0 decides
                run.plan = {**self.planner.summary(), "setup_seconds": round(time.monotonic() - self.t_start, 3),
                            "first_plan": run.total_steps, "planned_steps": run.total_steps}
            self._set_warmup(warn=False)        # (an estimate: the warning waits for measured steps)
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

    def _finish_compiling(self) -> None:
        """With a second process compiling the kernels of the backward, AdamW and sampling
        (precompile.py): the forward's kernels here, on one held-out batch, then wait for it to
        finish a training step's (and, in ``sample``, for the rest)."""
        if self.precompiler is None:
            return
        cfg, data = self.run.config, self.run.data
        x, y = next(iter_eval_batches(data.val_tokens, cfg.batch_size, cfg.seq_len, data.eval_context_token))
        self.run.model.loss(x, y)
        self.precompiler.wait("step")

    def _setup_line(self) -> str:
        """Where the time before the first step went, compiling included; the machine's speed; the plan."""
        run, cfg = self.run, self.run.config
        total = time.monotonic() - self.t_start
        parts = [f"{what} {seconds:.1f}s" for what, seconds in run.setup_seconds.items()]
        waited = 0.0 if self.precompiler is None else self.precompiler.waited_seconds
        if self.compiling.seconds >= 0.05:
            parts.append(f"compiling Numba kernels {self.compiling.seconds:.1f}s (first run only)")
        if waited >= 0.05:
            parts.append(f"waiting {waited:.1f}s for a second process compiling the rest")
        if self.precompiler is not None and self.precompiler.failed is not None:
            parts.append(f"(the second compiling process ended with exit code {self.precompiler.failed}: "
                         "the run compiles the rest itself)")
        parts.append(f"the rest {total - sum(run.setup_seconds.values()) - self.compiling.seconds - waited:.1f}s")
        line = f"setup {total:.1f}s: " + ", ".join(parts)
        if self.verbose:
            line += (f"\nthis machine multiplies float32 matrices at {sgemm_gflops():.0f} GFLOP/s now "
                     "(steps and tokens/s scale with it)")
        if self.planner is not None and not math.isfinite(self.planner.step_seconds()):
            line += f"\ntime budget {cfg.time_budget:.0f}s: not planned (stopped before a step could be timed)"
        elif self.planner is not None:
            step_s = self.planner.step_seconds()
            how = "estimated" if self.planner.estimated else "measured"
            line += (f"\ntime budget {cfg.time_budget:.0f}s: {step_s:.3f}s/step ({how}; "
                     f"~{cfg.tokens_per_step / step_s:,.0f} tokens/s) -> {run.total_steps:,} steps, re-planned as they run")
            costs, left = self.planner.costs(), cfg.time_budget - total
            if costs["final_eval_seconds"] + costs["checkpoint_seconds"] + step_s > left:
                line += (f"\nwarning: the time budget leaves {max(left, 0.0):.0f}s after setup, less than one step, "
                         f"a checkpoint and the final evaluation (~{costs['final_eval_seconds']:.0f}s on "
                         f"{self.final_tokens + (self.final_subset or 0):,} held-out tokens): the run will take longer "
                         "than the budget (a larger --time-budget, or a smaller --final-eval-tokens, fits)")
        return line

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
        tokens_per_second = cfg.tokens_per_step / self.ema_step
        if planner is not None:   # progress in seconds of the budget: the step total moves as it re-plans
            now = time.monotonic()
            spent, setup = now - self.t_start, self.train_start - self.t_start
            self.progress.update((now - self.train_start) / max(cfg.time_budget - setup, 1e-9),
                                 progress_text(run.step, None, loss, tokens_per_second, cfg.time_budget - spent)
                                 + _describe_comm(comm))
        else:
            left = (run.total_steps - run.step) * self.ema_step
            self.progress.update(run.step / run.total_steps,
                                 progress_text(run.step, run.total_steps, loss, tokens_per_second, left)
                                 + _describe_comm(comm))

    def evaluate(self) -> None:
        ev = _evaluate(self.run, self.eval_tokens, self.stop)
        if ev is None:
            return
        if self.window_losses:
            ev["train_loss"] = float(np.mean(self.window_losses))
            self.window_losses = []
        if self.planner is not None:
            self.planner.observe_eval(ev)
        self._record_eval(ev)

    def _record_eval(self, ev: dict) -> None:
        self.metrics.write({"step": self.run.step, "kind": "eval", **ev, "elapsed": self.elapsed()})
        say(_eval_lines(self.run.step, ev, len(self.run.data.val_tokens), not self.evaluated), self.verbose)
        self.evaluated = True

    def sample(self) -> None:
        """A short sample of the model's text: in metrics.jsonl whole, on the terminal its first
        lines with control characters escaped."""
        cfg = self.run.config
        if not self.run.world.root:   # data parallel: rank 0 samples, the others wait at the next step
            return
        if self.precompiler is not None:
            self.precompiler.wait("all")
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
        save_checkpoint(self.run, self.metrics)
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
                save_checkpoint(run, self.metrics)
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
            save_checkpoint(run, self.metrics)
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
                + f"\nmodel saved in {run.run_dir}", self.verbose)

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


def _describe(run: Run) -> str:
    """The start-up lines: model, batch and the threads really in use, run directory."""
    c, cfg, threads = run.model.config, run.config, live_thread_counts()
    kv = f" ({c.n_kv_heads} kv)" if c.n_kv_heads != c.n_heads else ""
    return (f"model: {run.model.num_parameters() / 1e6:.2f}M parameters: dim {c.dim}, {c.n_layers} layers, "
            f"{c.n_heads} heads{kv}, hidden {c.hidden_dim}, vocab {c.vocab_size}, {cfg.dtype}\n"
            f"batch {cfg.batch_size} x {cfg.grad_accum} x {cfg.seq_len} = {cfg.tokens_per_step:,} tokens/step; "
            f"threads: OpenBLAS {threads['openblas']}, Numba {threads['numba']}; matmuls: {BLAS}\n"
            f"run dir {run.run_dir}")


def sgemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """The machine's float32 matrix-multiply rate now (best of ``repeats`` n x n @ n x n, 2 n^3 FLOP
    each), with the threads this process uses: the figure to compare training speeds across
    machines by (about 0.1 s; the benchmarks measure the same at n = 2048)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def forward_backward(model, batches, grad_buffer: np.ndarray | None = None,
                     world: World | None = None) -> tuple[float, np.ndarray]:
    """Loss and gradient of one step's batch, the mean over its N kept targets, as if it were one
    batch.  Micro-batch k (mean loss L_k over its M_k kept targets, gradient g_k) counts by its share:

        L = sum_k (M_k/N) L_k      g = sum_k (M_k/N) g_k

    Each backward is scaled by dloss = M_k/N (``loss_and_grad(dloss=...)``), so the sums need no
    division after.  K = 1 leaves the gradient in ``model.flat_grads`` and returns it; K > 1 sums
    into ``grad_buffer`` (allocated once by the caller).  With several ranks (``world``) the
    micro-batches are spread over them: N and L are summed over the ranks, and so is g, in buckets
    that start while the last micro-batch's backward runs (distributed.GradientReduction).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    world = World() if world is None else world
    counts = [int(np.count_nonzero(y != IGNORE_INDEX)) for _, y in batches]
    n_kept = max(world.sum_int(sum(counts), "counting the batch's targets"), 1)
    last = len(batches) - 1
    grads = model.flat_grads if last == 0 else grad_buffer
    reduction = world.gradient_reduction(grads, accumulate_from=model.flat_grads if last > 0 else None)
    loss = 0.0
    for k, ((x, y), m) in enumerate(zip(batches, counts)):
        share = m / n_kept
        batch_loss, _ = model.loss_and_grad(x, y, copy=False, dloss=share,
                                            on_grads_ready=reduction.ready if k == last else None)
        loss += float(batch_loss) * share
        if k == 0 and k < last:
            np.copyto(grad_buffer, model.flat_grads)
        elif k < last:
            np.add(grad_buffer, model.flat_grads, out=grad_buffer)
    reduction.finish()
    return world.sum_float(loss, "summing the loss"), grads


def evaluate(model, tokens: np.ndarray, context_token: int | None, n_bytes: int, batch_size: int,
             seq_len: int, should_stop: Callable[[], bool] = lambda: False) -> dict | None:
    """Held-out loss over ``tokens``, every token predicted exactly once (``iter_eval_batches``).

        val_loss = N / n   (mean nats per token)      val_bpb = N / n_bytes / ln 2

    where N is the total nats and n the number of tokens.  Dropout is off.  Returns None if
    ``should_stop()`` became true midway (an interrupt is being served).
    """
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


def _measure_step_seconds(run: Run, grad_buffer, repeats: int = 2) -> float:
    """Seconds per optimizer step, from throw-away steps on batches the run never sees.

    The first call is not timed (it may compile Numba kernels).  Weights and optimizer are not
    touched, and the dropout generator is put back, so the run is the same as without this.
    """
    cfg, model = run.config, run.model
    sampler = BatchSampler(run.data.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 3)
    dropout_state = model.dropout_rng.bit_generator.state
    times = []
    for i in range(repeats + 1):
        batches = local_batches(sampler, cfg.grad_accum, run.world)
        t = time.perf_counter()
        _, grads = forward_backward(model, batches, grad_buffer, run.world)
        clip_grad_norm(grads, sys.float_info.max)
        times.append(time.perf_counter() - t)
    model.dropout_rng.bit_generator.state = dropout_state
    # The AdamW update reads and writes ~4 arrays of the model's size: about 2 norm passes.
    return float(np.median(times[1:])) * 1.02


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
    if not ev.get("final"):
        tokens = f" ({_held_out(ev['val_tokens'], n_held_out)}, as every periodic eval)" if say_tokens else ""
        return f"step {step}: held-out {figures(ev)}{tokens}{train}"
    line = f"step {step}: final eval on {_held_out(ev['val_tokens'], n_held_out)}: {figures(ev)}{train}"
    if "subset" in ev:
        line += (f"\nstep {step}: final eval on the periodic evals' first {ev['subset']['val_tokens']:,}: "
                 f"{figures(ev['subset'])}")
    return line


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

