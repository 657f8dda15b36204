"""The training loop, in the style of nanoGPT's train.py.  One optimizer step:

    for k in 1..K (K = grad_accum micro-batches of batch_size windows of seq_len tokens):
        L_k, g_k = model.loss_and_grad(x_k, y_k)        mean cross-entropy of micro-batch k
    L = (1/K) sum_k L_k,   g = (1/K) sum_k g_k          = loss and gradient of one batch of K*B windows
    g <- g * min(1, clip / ||g||)                       global-norm clipping
    lr = lr_at(step)                                    linear warmup, then cosine (or linear) decay
    AdamW(p, g, lr)                                     decoupled weight decay on matrices only

``train`` sets the run up (setup.py, or ranks.py on several processes) and runs that step in a
loop; the session around it (session.py) keeps the metrics, the progress, the time-budget plan,
the evaluations, samples and checkpoints, and Ctrl-C.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable

import numpy as np

from ..data import BatchSampler
from ..errors import ConfigError
from ..engine.jit import CompileClock
from ..layers.cross_entropy import IGNORE_INDEX
from ..optim import clip_grad_norm
from ..warmup import first_run_warm_up
from .config import TrainConfig
from .distributed import World, current_world, end_job_on_error, local_batches
from .extend import extend
from .progress import say
from .ranks import setup_run
from .run import Run, diverged
from .session import Session, TrainResult, describe
from .setup import discard_unsaved_run


@end_job_on_error
def train(config: TrainConfig | None = None, *, resume=None, progress: bool = True, verbose: bool = True,
          on_step: Callable[[int, float, Run], None] | None = None, more_steps: int | None = None,
          more_seconds: float | None = None) -> TrainResult:
    """Train a model (``config``) or continue a saved run (``resume=RUN_DIR``); see the module docstring.

    ``more_steps`` / ``more_seconds`` (with ``resume``): extend the run by that many steps, or by the
    steps that fit in that many seconds, finished or not (extend.py: a new tail of the learning-rate
    schedule from the current rate).

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
    if (more_steps is not None or more_seconds is not None) and resume is None:
        raise ConfigError("more_steps / more_seconds extend a saved run: give resume=RUN_DIR")
    world = current_world()
    verbose = verbose and world.root
    # a first run (or one after npllama's kernels changed) compiles them, once: say so when it starts;
    # a second process compiles them too, meanwhile (warmup.py)
    with (CompileClock(on_first=lambda: say("compiling kernels (first run only)", verbose)) as compiling,
          first_run_warm_up(config.dtype if config else None, resume is None, world.size) as warm_up):
        run = setup_run(world, config, resume, verbose)
        try:
            warm_up.finish(compiling)
            if more_steps is not None or more_seconds is not None:
                extend(run, more_steps, more_seconds, verbose)
            return _train(run, t_start, compiling, resume is not None, progress, verbose, on_step)
        except BaseException:
            if world.root:   # (the run directory is rank 0's)
                discard_unsaved_run(run.directory)   # (keeps a directory holding a checkpoint)
            raise
        finally:
            run.release()


def _train(run: Run, t_start: float, compiling: CompileClock, resumed: bool, progress: bool, verbose: bool,
           on_step) -> TrainResult:
    cfg, model = run.config, run.model
    if resumed and run.step >= run.total_steps and run.extend_seconds is None:
        say(f"{run.run_dir} is already complete ({run.step} of {run.total_steps} steps); nothing to do (to train it "
            f"further: --resume {run.run_dir} --steps N, or --time-budget SECONDS)", verbose)
        return TrainResult(run_dir=run.run_dir, step=run.step, total_steps=run.total_steps)
    say(describe(run), verbose)
    if run.world.size > 1:
        say(run.world.describe(), verbose)
    grad_buffer = np.empty_like(model.flat_grads) if cfg.grad_accum > 1 else None
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else sys.float_info.max

    with Session(run, t_start, compiling, resumed, progress, verbose) as s:
        s.start(lambda: step_seconds(run, grad_buffer))   # a fresh run: step-0 evaluation and sample, steps
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


def step_seconds(run: Run, grad_buffer, repeats: int = 2) -> float:
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
