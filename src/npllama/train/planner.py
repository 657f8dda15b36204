"""How many steps fit in a time budget: ``plan_steps`` and ``BudgetPlanner`` (which re-plans as the
machine's speed changes).  See the train package's docstring for how a time-budgeted run uses it."""
from __future__ import annotations

import time

import numpy as np

from .config import TrainConfig


def plan_steps(seconds_left: float, step_seconds: float, eval_seconds: float, eval_interval: int,
               final_eval_seconds: float, checkpoint_seconds: float, checkpoint_interval: int,
               sample_seconds: float = 0.0, sample_interval: int = 0) -> int:
    """Steps that fit in ``seconds_left``: the largest N with

        N * (step + eval / eval_interval + checkpoint / checkpoint_interval + sample / sample_interval)
            + final_eval + checkpoint  <=  seconds_left

    (an interval of 0 means no periodic evaluations / checkpoints / samples); 0 when not even one
    step fits.
    """
    per_step = step_seconds
    for seconds, interval in ((eval_seconds, eval_interval), (checkpoint_seconds, checkpoint_interval),
                              (sample_seconds, sample_interval)):
        if interval > 0:
            per_step += seconds / interval
    usable = seconds_left - final_eval_seconds - checkpoint_seconds
    return max(0, int(usable // per_step)) if per_step > 0 else 1


class BudgetPlanner:
    """Plans the number of steps of a time-budgeted run, and re-plans it as the speed changes.

    The machine may be shared, and its speed can change by a factor of 2 or 3 within a minute.  So
    after each of the first ``REPLAN_EVERY`` steps, then every ``REPLAN_EVERY`` steps, and at the
    planned last step (the budget may fit more), the plan is recomputed from the median of the
    recent step times:

        total = step + plan_steps(budget - elapsed, step_seconds, eval_seconds, ...)

    so it converges on the measured step time within a few steps, however far off the first
    estimate was, and ends when the budget is used (total == step: stop after this step).

    Evaluation costs are kept in units of the step time at which they were measured (an
    evaluation of n tokens costs about n * c step-times, a sample s step-times), so that they scale
    with the machine's current speed too; checkpoint costs (disk) are kept in seconds.  The learning-rate schedule
    follows the latest total (its warmup part does not depend on it).  Only the first session of a
    run re-plans; a resumed run keeps the plan it saved, so it continues exactly its schedule.
    """
    REPLAN_EVERY = 10
    WINDOW = 30
    # Before any training step has run, a step is taken to cost this many forward passes over the
    # same tokens (forward + backward + AdamW; measured 2.8 for the default model, where the step-0
    # evaluation's forward takes 41 ms per 2048 tokens and a step 114 ms).  The first plan comes
    # from that estimate, and the real step times replace it from the first step on (the first
    # re-plan, at step REPLAN_EVERY, uses them), so no step is run only to be timed.
    STEP_IN_FORWARDS = 3.0

    def __init__(self, cfg: TrainConfig, t_start: float, eval_tokens: int, final_tokens: int,
                 checkpoint_seconds: float):
        self.cfg = cfg
        self.t_start = t_start
        self.eval_tokens, self.final_tokens = eval_tokens, final_tokens
        self.checkpoint_seconds = checkpoint_seconds
        self.step_times: list[float] = []
        self.estimated = False   # step_times holds an estimate, not a measured step
        # Until an evaluation is measured: forward only costs about 1/3 of forward + backward.
        self.eval_steps_per_token = 1.0 / (3 * cfg.tokens_per_step)
        self.sample_steps = 0.0

    def step_seconds(self) -> float:
        return float(np.median(self.step_times)) if self.step_times else float("nan")

    def observe_step(self, seconds: float) -> None:
        if self.estimated:
            self.step_times, self.estimated = [], False
        self.step_times.append(seconds)
        del self.step_times[:-self.WINDOW]

    def observe_eval(self, ev: dict) -> None:
        seconds_per_token = ev["eval_seconds"] / max(ev["val_tokens"], 1)
        if not self.step_times:   # no step yet: estimate one from this forward pass (see STEP_IN_FORWARDS)
            self.step_times = [self.STEP_IN_FORWARDS * seconds_per_token * self.cfg.tokens_per_step]
            self.estimated = True
        self.eval_steps_per_token = seconds_per_token / self.step_seconds()

    def observe_sample(self, seconds: float) -> None:
        self.sample_steps = seconds / self.step_seconds()

    def observe_checkpoint(self, seconds: float) -> None:
        self.checkpoint_seconds = seconds

    def costs(self) -> dict:
        """Current estimates, in seconds, of a step, a periodic evaluation, a sample, and the final
        evaluation (with its sample)."""
        step = self.step_seconds()
        return {"step_seconds": step,
                "eval_seconds": self.eval_steps_per_token * self.eval_tokens * step,
                "sample_seconds": self.sample_steps * step,
                "final_eval_seconds": (self.eval_steps_per_token * self.final_tokens + self.sample_steps) * step,
                "checkpoint_seconds": self.checkpoint_seconds}

    def replan_due(self, step: int, total_steps: int) -> bool:
        """Whether to re-plan after ``step`` steps (see the class docstring)."""
        return step < self.REPLAN_EVERY or step % self.REPLAN_EVERY == 0 or step >= total_steps

    def plan(self, step: int, min_total: int) -> int:
        """The run's total number of steps, at least ``min_total``, after ``step`` steps."""
        if not self.step_times:   # (a rank that has measured nothing yet: rank 0's plan is taken)
            return max(step + 1, min_total)
        c = self.costs()
        left = self.cfg.time_budget - (time.monotonic() - self.t_start)
        more = plan_steps(left, c["step_seconds"], c["eval_seconds"], self.cfg.eval_interval,
                          c["final_eval_seconds"], c["checkpoint_seconds"], self.cfg.checkpoint_interval,
                          c["sample_seconds"], self.cfg.sample_interval)
        return max(step + more, min_total)

    def summary(self) -> dict:
        return {"mode": "time_budget", "time_budget": self.cfg.time_budget, **self.costs()}

