"""The time budget: the number of steps planned, recorded, re-planned from recent step times, and
a budget too small said, Ctrl-C before any step timed."""
import json
import re

import pytest

from npllama.train import STATE_FILE, TrainConfig, plan_steps, train

from train_helpers import corpus, step_losses, tiny  # noqa: F401  (corpus: a fixture)


def test_plan_steps():
    # 100 s left, 1 s/step, eval 5 s every 10 steps, final eval 10 s, checkpoint 2 s every 50 steps:
    # per step 1 + 0.5 + 0.04 = 1.54 s; (100 - 10 - 2) / 1.54 = 57.1
    assert plan_steps(100, 1.0, 5.0, 10, 10.0, 2.0, 50) == 57
    assert plan_steps(100, 1.0, 5.0, 0, 0.0, 0.0, 0) == 100
    assert plan_steps(1, 1.0, 5.0, 10, 10.0, 2.0, 50) == 0    # no room for a step


def test_time_budget_plans_and_records_the_steps(corpus, tmp_path):
    d = tmp_path / "run"
    result = train(tiny(corpus, d, steps=None, time_budget=3.0, eval_interval=5), progress=False, verbose=False)
    state = json.loads((d / STATE_FILE).read_text())
    plan = state["plan"]
    assert plan["mode"] == "time_budget" and plan["planned_steps"] == state["total_steps"] == result.step
    assert plan["step_seconds"] > 0
    assert len(step_losses(d)) == result.step >= 1


def test_a_budget_too_small_for_the_final_evaluation_is_said(corpus, tmp_path, capsys):
    # a budget gone before the first step: the setup line warns that the run will overrun it (one
    # step and the final evaluation still run); a budget with room for them says nothing of the kind
    result = train(tiny(corpus, tmp_path / "small", steps=None, time_budget=1e-3), progress=False, verbose=True)
    err = capsys.readouterr().err
    assert result.step == 1
    assert re.search(r"warning: the time budget leaves 0s after setup, less than one step, a checkpoint and "
                     r"the final evaluation \(~\d+s on 600 held-out tokens\): the run will take longer", err), err
    train(tiny(corpus, tmp_path / "roomy", steps=None, time_budget=4.0, final_eval_tokens=200), progress=False,
          verbose=True)
    assert "warning: the time budget" not in capsys.readouterr().err


def test_budget_planner_replans_from_recent_step_times():
    import time

    from npllama.train import BudgetPlanner

    cfg = TrainConfig(time_budget=150.0, eval_interval=10, checkpoint_interval=0, batch_size=4, seq_len=16)
    # 50 s already spent, 1 s per step; an eval of 1000 tokens took 2 s (= 2 steps); final eval 3000 tokens
    planner = BudgetPlanner(cfg, time.monotonic() - 50.0, eval_tokens=1000, final_tokens=3000,
                            checkpoint_seconds=1.0)
    for _ in range(5):
        planner.observe_step(1.0)
    planner.observe_eval({"eval_seconds": 2.0, "sample_seconds": 0.0, "val_tokens": 1000})
    assert planner.costs()["final_eval_seconds"] == pytest.approx(6.0)
    # ~100 s left: (100 - final 6 - checkpoint 1) / (1 + 2/10) = 77.5 -> 77 more steps
    assert 20 + 76 <= planner.plan(step=20, min_total=0) <= 20 + 77
    for _ in range(planner.WINDOW):   # twice as slow: the window forgets the old speed, evals scale too
        planner.observe_step(2.0)
    assert planner.costs()["eval_seconds"] == pytest.approx(4.0)
    assert 20 + 35 <= planner.plan(step=20, min_total=0) <= 20 + 36     # (100 - 12 - 1) / 2.4 = 36.25
    assert planner.plan(step=20, min_total=500) == 500
    planner.t_start -= 1000                                             # over budget: stop at this step
    assert planner.plan(step=20, min_total=20) == 20


def test_budget_planner_converges_from_a_first_estimate_far_off():
    """The issue's fine-tune: an estimate of 28 s a step planned 1 step of a 120 s budget, and the
    run stopped there at 85 s.  The plan is redone after each of the first steps, and at its last."""
    import time

    from npllama.train import BudgetPlanner

    cfg = TrainConfig(time_budget=120.0, eval_interval=0, checkpoint_interval=0, batch_size=4, seq_len=16)
    planner = BudgetPlanner(cfg, time.monotonic() - 30.0, eval_tokens=0, final_tokens=64, checkpoint_seconds=1.0)
    planner.observe_eval({"eval_seconds": 9.3 * 64 / cfg.tokens_per_step, "val_tokens": 64})   # -> ~28 s a step
    assert planner.step_seconds() == pytest.approx(28, rel=0.01) and planner.estimated
    total = planner.plan(step=0, min_total=1)
    assert total == 2            # (90 - final eval ~9 - checkpoint 1) / 28
    planner.t_start -= 4.0       # the first step took 4 s
    planner.observe_step(4.0)
    assert planner.replan_due(1, total)
    total = planner.plan(step=1, min_total=1)
    assert total == 1 + 20               # (86 - final eval 1.3 - checkpoint 1) / 4 = 20.9
    assert all(planner.replan_due(step, 1000) for step in range(1, planner.REPLAN_EVERY))
    assert not planner.replan_due(planner.REPLAN_EVERY + 1, 1000) and planner.replan_due(1000, 1000)


def test_a_time_budget_is_used_even_when_the_first_estimate_is_far_off(corpus, tmp_path, capsys, monkeypatch):
    """A first estimate 100 times too slow plans one step; the re-plans after the first steps use
    the budget.  A budget that fits fewer steps than the warm-up is warned about, once."""
    import time

    from npllama.train import BudgetPlanner
    monkeypatch.setattr(BudgetPlanner, "STEP_IN_FORWARDS", 300.0)
    t0 = time.monotonic()
    result = train(tiny(corpus, tmp_path / "run", steps=None, time_budget=6.0, eval_interval=1000, warmup_steps=10**6),
                   progress=False, verbose=True)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert result.step > 5 and elapsed > 0.6 * 6.0, (result.step, elapsed, err)
    assert err.count(f"warning: the time budget fits ") == 1, err
    assert re.search(rf"fits {result.step} steps|fits \d+ steps", err) and "warm-up steps:" in err
    state = json.loads((tmp_path / "run" / STATE_FILE).read_text())
    assert state["warmup_steps"] == state["total_steps"] == result.step


def test_ctrl_c_before_the_first_step_says_the_budget_was_not_planned(corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the step-0 evaluation: no step was timed, so no plan (it printed 'nans/step')."""
    import os
    import signal

    from npllama.train import session

    def interrupted(run, tokens, stop):
        os.kill(os.getpid(), signal.SIGINT)      # StopSignals turns it into a request to stop
        return None                               # as _evaluate does when a stop is requested
    monkeypatch.setattr(session, "_evaluate", interrupted)
    train(tiny(corpus, tmp_path / "run", steps=None, time_budget=60.0), progress=False, verbose=True)
    err = capsys.readouterr().err
    assert "time budget 60s: not planned (stopped before a step could be timed)" in err, err
    assert "nan" not in err
