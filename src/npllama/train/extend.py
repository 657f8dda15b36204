"""Extending a run: `npllama train --resume RUN --steps N` (N more steps) or `--time-budget S` (about S
more seconds of training, planned and re-planned as a fresh run's budget is), whether the run
finished or was stopped.

The learning-rate schedule.  The planned schedule ends where the run was planned to end, so the
added steps get a new tail of it: from the current rate r0 (what the next step would have had; a
finished run's is its final rate) down to the final rate over the new steps, in the run's
--schedule kind:

    lr(s) = lr_at(s - s0, max_lr=r0, warmup_steps=0, total_steps=T - s0, min_lr=min(final_lr, r0))

for s >= s0 (the step the extension starts at), T the new total.  A finished cosine or linear run
therefore continues at its final rate (r0 = final_lr: the tail is flat); a run stopped halfway decays
from where it was to the final rate at the new end; a constant schedule stays constant.  The
extension is saved in the run's plan, so a later --resume continues it exactly; the steps go on in
the same metrics.jsonl (one curve), the optimizer's moments and the data order carry on.
"""
from __future__ import annotations

from ..errors import ConfigError
from .progress import say
from .run import Run, tail_lr   # noqa: F401  (tail_lr: the schedule's new tail, with Run.lr_at that uses it)


def extend(run: Run, more_steps: int | None, more_seconds: float | None, verbose: bool) -> None:
    """Set ``run`` (just resumed) to go on for ``more_steps`` steps or ``more_seconds`` seconds."""
    if (more_steps is None) == (more_seconds is None):
        raise ConfigError("extend a run by --steps N or by --time-budget SECONDS, not both")
    if more_steps is not None and (isinstance(more_steps, bool) or not isinstance(more_steps, int) or more_steps < 1):
        raise ConfigError(f"--steps must be a positive integer, got {more_steps!r}")
    if more_seconds is not None and not (isinstance(more_seconds, (int, float)) and more_seconds > 0):
        raise ConfigError(f"--time-budget must be a number > 0, got {more_seconds!r}")
    cfg, s0, old_total = run.config, run.step, run.total_steps
    r0 = run.lr_at(s0)   # (past a finished run's last step: its final rate)
    extension = {"from_step": s0, "from_lr": r0}
    if more_steps is not None:
        extension["steps"] = more_steps
        run.total_steps = s0 + more_steps
        length = f"by {more_steps:,} steps: {s0:,} -> {run.total_steps:,}"
    else:
        extension["seconds"] = float(more_seconds)
        run.total_steps = s0 + 1          # (the session plans the steps that fit, and re-plans)
        run.extend_seconds = float(more_seconds)
        length = f"by about {more_seconds:.0f}s of training from step {s0:,} (the steps planned as it goes)"
    run.warmup_steps = min(run.warmup_steps, run.total_steps)
    run.plan["extension"] = extension
    run.plan.setdefault("extensions", []).append(dict(extension))
    if cfg.schedule == "constant":
        rate = f"stays at {r0:.3g} (--schedule constant)"
    elif r0 <= cfg.final_lr:
        rate = f"stays at {r0:.3g}, the final rate the run's schedule had reached"
    else:
        rate = f"a new {cfg.schedule} tail from the current {r0:.3g} down to {cfg.final_lr:.3g} at the new last step"
    done = "finished" if s0 >= old_total else f"stopped at step {s0:,} of {old_total:,}"
    say(f"extending {run.run_dir} ({done}) {length}; learning rate: {rate}", verbose)
