"""Training loop: accumulation, exact resume, interrupts, divergence, fine-tuning, config, CLI."""
import json
import re
import math
import os
import signal
import tomllib  # noqa: F401  (Python >= 3.11, which npllama requires)

import numpy as np
import pytest

import npllama
from npllama import cli
from npllama.data import TokenDataset, load_text
from npllama.errors import CheckpointError, ConfigError
from npllama.train import (
    MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, TrainConfig, TrainingDiverged, config_from_args, evaluate,
    forward_backward, llama_hidden_dim, model_config, new_run, plan_steps, read_metrics, train,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two small UTF-8 texts cut from the bundled Shakespeare (about 20 kB each)."""
    text = load_text(None)
    d = tmp_path_factory.mktemp("corpus")
    first, second = d / "first.txt", d / "second.txt"
    first.write_text(text[:20000], encoding="utf-8")
    second.write_text(text[100000:120000], encoding="utf-8")
    return first, second


def tiny(corpus, out_dir, **overrides) -> TrainConfig:
    values = dict(data=str(corpus[0]), preset="tiny", dim=32, n_layers=2, n_heads=2, vocab_size=300,
                  seq_len=16, batch_size=4, steps=8, warmup_steps=2, lr=3e-3, eval_interval=4,
                  eval_tokens=200, final_eval_tokens=400, sample_tokens=4, checkpoint_interval=0,
                  out_dir=str(out_dir))
    values.update(overrides)
    return TrainConfig(**values)


def step_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def file_bytes(run_dir):
    return {name: (run_dir / name).read_bytes() for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)}


def interrupt_at(step_to_stop, signum=signal.SIGINT):
    def on_step(step, loss, run):
        if step == step_to_stop:
            os.kill(os.getpid(), signum)
    return on_step


# ---------------------------------------------------------------------------------- accumulation

def test_accumulated_gradient_equals_one_big_batch():
    cfg = npllama.LlamaConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=48, max_seq_len=8)
    model = npllama.Llama(cfg, seed=3, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (6, 8))
    y = rng.integers(0, 50, (6, 8))
    big_loss, big_grads = model.loss_and_grad(x, y)
    big = big_grads["lm_head.weight"].copy(), model.flat_grads.copy()

    buffer = np.empty_like(model.flat_params)
    loss, grads = forward_backward(model, [(x[0:2], y[0:2]), (x[2:4], y[2:4]), (x[4:6], y[4:6])], buffer)
    assert grads is buffer
    assert loss == pytest.approx(big_loss, rel=1e-13)
    np.testing.assert_allclose(grads, big[1], rtol=1e-10, atol=1e-15)
    # one micro-batch: the model's own gradient buffer, no copy
    loss1, grads1 = forward_backward(model, [(x, y)], buffer)
    assert grads1 is model.flat_grads and loss1 == big_loss


def test_training_with_accumulation_matches_big_batches(corpus, tmp_path):
    # 2 micro-batches of 4 windows = 1 batch of 8: the sampler draws the same windows in the same
    # order, so every step's loss agrees (float64: to rounding).
    common = dict(dtype="float64", steps=5, eval_interval=0, final_eval_tokens=50, sample_tokens=0)
    train(tiny(corpus, tmp_path / "big", batch_size=8, **common), progress=False, verbose=False)
    train(tiny(corpus, tmp_path / "acc", batch_size=4, grad_accum=2, **common), progress=False, verbose=False)
    big, acc = step_losses(tmp_path / "big"), step_losses(tmp_path / "acc")
    assert len(big) == len(acc) == 5
    np.testing.assert_allclose(acc, big, rtol=1e-12)
    assert big[-1] < big[0] - 0.1   # it learns


# ---------------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def unbroken(corpus, tmp_path_factory):
    """An 8-step float32 run with dropout and accumulation, never stopped."""
    d = tmp_path_factory.mktemp("unbroken") / "run"
    result = train(tiny(corpus, d, dropout=0.1, grad_accum=2, checkpoint_interval=3), progress=False,
                   verbose=False)
    return d, result


def test_resume_after_ctrl_c_gives_identical_losses(corpus, tmp_path, unbroken, capsys):
    ref_dir, ref = unbroken
    d = tmp_path / "run"
    cfg = tiny(corpus, d, dropout=0.1, grad_accum=2, checkpoint_interval=3)
    first = train(cfg, progress=False, verbose=False, on_step=interrupt_at(5))
    assert first.interrupted and first.signal_name == "SIGINT" and first.exit_code == 0
    assert first.step == 5
    err = capsys.readouterr().err
    assert f"npllama train --resume {d}" in err and "step 5 of 8" in err
    state = json.loads((d / STATE_FILE).read_text())
    assert state["step"] == 5 and state["total_steps"] == 8

    second = train(resume=d, progress=False, verbose=False)
    assert not second.interrupted and second.step == 8
    assert step_losses(d) == step_losses(ref_dir)          # bit for bit
    assert [r["step"] for r in read_metrics(d) if "loss" in r] == list(range(1, 9))
    assert (d / MODEL_FILE).read_bytes() == (ref_dir / MODEL_FILE).read_bytes()
    assert (d / OPTIMIZER_FILE).read_bytes() == (ref_dir / OPTIMIZER_FILE).read_bytes()
    assert second.final_eval["val_loss"] == ref.final_eval["val_loss"]


def test_resume_after_crash_from_periodic_checkpoint(corpus, tmp_path, unbroken):
    # A crash (not a signal) at step 5: the step-3 checkpoint is what is left; metrics of steps 4-5
    # are dropped on resume and logged again.
    ref_dir, _ = unbroken
    d = tmp_path / "run"

    class Crash(Exception):
        pass

    def crash(step, loss, run):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(tiny(corpus, d, dropout=0.1, grad_accum=2, checkpoint_interval=3), progress=False,
              verbose=False, on_step=crash)
    assert json.loads((d / STATE_FILE).read_text())["step"] == 3
    train(resume=d, progress=False, verbose=False)
    assert step_losses(d) == step_losses(ref_dir)


def test_sigterm_saves_and_exits(corpus, tmp_path, capsys):
    d = tmp_path / "run"
    result = train(tiny(corpus, d), progress=False, verbose=False, on_step=interrupt_at(2, signal.SIGTERM))
    assert result.interrupted and result.signal_name == "SIGTERM" and result.exit_code == 143
    assert json.loads((d / STATE_FILE).read_text())["step"] == 2
    assert "Resume with:" in capsys.readouterr().err
    # the handlers are put back afterwards
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_of_finished_run_does_nothing(corpus, tmp_path):
    d = tmp_path / "run"
    train(tiny(corpus, d, steps=2, eval_interval=0), progress=False, verbose=False)
    before = file_bytes(d)
    result = train(resume=d, progress=False, verbose=False)
    assert result.step == 2 and not result.interrupted
    assert file_bytes(d) == before


def test_resume_refuses_torn_checkpoint_and_changed_corpus(corpus, tmp_path):
    d = tmp_path / "run"
    data = tmp_path / "data.txt"
    data.write_text(corpus[0].read_text())
    train(tiny(corpus, d, data=str(data), steps=2, eval_interval=0), progress=False, verbose=False)

    model = (d / MODEL_FILE).read_bytes()
    (d / MODEL_FILE).write_bytes(model[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="model.safetensors: does not match"):
        train(resume=d, progress=False, verbose=False)
    (d / MODEL_FILE).write_bytes(model)

    data.write_text(corpus[0].read_text() + "More text.\n")
    with pytest.raises(CheckpointError, match="changed since the run started"):
        train(resume=d, progress=False, verbose=False)
    with pytest.raises(CheckpointError, match="not a resumable npllama run"):
        train(resume=tmp_path, progress=False, verbose=False)


def test_new_run_refuses_a_directory_holding_a_run(corpus, tmp_path):
    d = tmp_path / "run"
    train(tiny(corpus, d, steps=1, eval_interval=0), progress=False, verbose=False)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(tiny(corpus, d, steps=1), progress=False, verbose=False)


# ---------------------------------------------------------------------------------- divergence

def test_nan_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    d = tmp_path / "run"
    snapshot = {}

    def poison(step, loss, run):
        if step == 5:   # after the step-4 checkpoint
            snapshot.update(file_bytes(d))
            run.model.params["model.norm.weight"][0] = np.nan

    with pytest.raises(TrainingDiverged, match=r"diverged at step 6: the loss is nan.*checkpoint \(step 4\)"):
        train(tiny(corpus, d, checkpoint_interval=4), progress=False, verbose=False, on_step=poison)
    assert file_bytes(d) == snapshot
    assert json.loads((d / STATE_FILE).read_text())["step"] == 4
    # and the run can go on from that checkpoint
    assert train(resume=d, progress=False, verbose=False).step == 8


def test_nan_before_any_checkpoint_says_so(corpus, tmp_path):
    def poison(step, loss, run):
        run.model.params["model.embed_tokens.weight"][:] = np.inf

    with pytest.raises(TrainingDiverged, match="step 2.*no checkpoint had been saved yet"):
        train(tiny(corpus, tmp_path / "run"), progress=False, verbose=False, on_step=poison)


# ---------------------------------------------------------------------------------- fine-tuning

def test_init_from_uses_checkpoint_weights_and_tokenizer(corpus, tmp_path):
    src = tmp_path / "src"
    train(tiny(corpus, src, steps=3, eval_interval=0), progress=False, verbose=False)
    source = npllama.Llama.from_pretrained(src)

    cfg = tiny(corpus, tmp_path / "ft", data=str(corpus[1]), init_from=str(src), dim=None, n_layers=None,
               n_heads=None, vocab_size=999, dropout=0.05, steps=2)
    run = new_run(cfg, verbose=False)
    np.testing.assert_array_equal(run.model.flat_params, source.flat_params)
    assert run.tokenizer.fingerprint == source.tokenizer.fingerprint
    assert run.config.vocab_size == source.config.vocab_size
    assert run.model.config.dropout == 0.05
    assert (tmp_path / "ft" / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()

    result = train(tiny(corpus, tmp_path / "ft2", data=str(corpus[1]), init_from=str(src), dim=None,
                        n_layers=None, n_heads=None, steps=2), progress=False, verbose=False)
    assert result.step == 2


def test_init_from_a_hugging_face_directory(corpus, tmp_path):
    src = tmp_path / "src"
    train(tiny(corpus, src, steps=1, eval_interval=0), progress=False, verbose=False)
    hf = tmp_path / "hf"
    npllama.Llama.from_pretrained(src).save_pretrained(hf)   # config.json, model.safetensors, tokenizer.json
    assert not (hf / STATE_FILE).exists()
    result = train(tiny(corpus, tmp_path / "ft", init_from=str(hf), dim=None, n_layers=None, n_heads=None,
                        steps=1), progress=False, verbose=False)
    assert result.step == 1

    (hf / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        new_run(tiny(corpus, tmp_path / "ft3", init_from=str(hf), dim=None, n_layers=None, n_heads=None),
                verbose=False)
    with pytest.raises(ConfigError, match="--dim"):
        new_run(tiny(corpus, tmp_path / "ft4", init_from=str(src), n_layers=None, n_heads=None), verbose=False)


# ---------------------------------------------------------------------------------- evaluation

def test_final_eval_is_bits_per_byte_of_all_held_out_text(corpus, tmp_path):
    d = tmp_path / "run"
    result = train(tiny(corpus, d, steps=3, final_eval_tokens=None, eval_interval=2), progress=False,
                   verbose=False)
    ev = result.final_eval
    model = npllama.Llama.from_pretrained(d)
    data = TokenDataset.from_text(load_text(corpus[0]), model.tokenizer, val_fraction=TrainConfig().val_fraction)
    assert ev["val_tokens"] == len(data.val_tokens)
    assert ev["val_bytes"] == data.val_bytes == len(load_text(corpus[0])[-data.val_bytes:].encode())
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] * ev["val_tokens"] / ev["val_bytes"] / math.log(2),
                                          rel=1e-12)
    again = evaluate(model, data.val_tokens, data.eval_context_token, data.val_bytes, 4, 16)
    assert again["val_loss"] == pytest.approx(ev["val_loss"], rel=1e-6)
    # the held-out loss is the sum over every held-out token: a plain loop over windows agrees
    evals = [r for r in read_metrics(d) if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3] and evals[-1]["final"]
    assert evals[0]["val_loss"] == pytest.approx(math.log(300), abs=0.1)   # untrained: ~uniform
    assert "train_loss" in evals[1]


# ---------------------------------------------------------------------------------- planning

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


# ---------------------------------------------------------------------------------- config

def test_model_config_from_preset_and_overrides():
    c = model_config(TrainConfig(preset="medium"), vocab_size=1000)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim) == (256, 6, 8, 8, 704)
    c = model_config(TrainConfig(preset="medium", dim=96, n_heads=4, n_kv_heads=2, seq_len=64), 1000)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.max_seq_len) == (96, 6, 4, 2, 256, 64)
    assert llama_hidden_dim(64) == 192 and llama_hidden_dim(128) == 352


@pytest.mark.parametrize("bad, match", [
    (dict(lr=0.0), "^--lr must be a number > 0, got 0.0$"), (dict(batch_size=0), "--batch-size"),
    (dict(preset="huge"), "--preset"), (dict(dropout=1.0), r"--dropout must be a number in \[0, 1\)"),
    (dict(dtype="float16"), "--dtype"), (dict(min_lr=1.0, lr=0.1), "--min-lr"), (dict(steps=2.5), "--steps"),
    (dict(schedule="exp"), "--schedule"), (dict(val_fraction=0.0), "--val-fraction"),
    (dict(time_budget=-1), "^--time-budget must be a number > 0, got -1$"),
    # the model's shape, before any tokenizer is trained
    (dict(n_heads=5), r"^--n-heads 5 must divide dim 128 \(from --preset small\)"),
    (dict(dim=100, n_heads=8), "^--n-heads 8 must divide --dim 100:"),
    (dict(dim=48, n_heads=16), "channels per head must be even"),
    (dict(n_kv_heads=3), r"^--n-kv-heads 3 must divide n_heads 4 \(from --preset small\)"),
    (dict(vocab_size=200), "--vocab-size must be at least 257"),
])
def test_bad_config_values_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_config_file_then_command_line(tmp_path):
    parser = cli.build_parser()
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 0.01\nbatch-size = 3\npreset = "tiny"\nsample_prompt = "ROMEO:"\n')
    args = parser.parse_args(["train", "--config", str(toml), "--lr", "0.02", "--context", "64"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.batch_size, cfg.preset, cfg.seq_len, cfg.sample_prompt) == (0.02, 3, "tiny", 64, "ROMEO:")
    assert cfg.weight_decay == TrainConfig().weight_decay

    js = tmp_path / "c.json"
    js.write_text(json.dumps({"grad_accum": 4, "tie_embeddings": True}))
    cfg = config_from_args(parser.parse_args(["train", "--config", str(js), "--no-tie-embeddings"]))
    assert cfg.grad_accum == 4 and cfg.tie_embeddings is False

    js.write_text(json.dumps({"learning_rate": 1.0}))
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        config_from_args(parser.parse_args(["train", "--config", str(js)]))
    js.write_text(json.dumps({"threads": 2}))
    with pytest.raises(ConfigError, match="--threads"):
        config_from_args(parser.parse_args(["train", "--config", str(js)]))
    toml.write_text("lr = [")
    with pytest.raises(ConfigError, match="cannot parse"):
        config_from_args(parser.parse_args(["train", "--config", str(toml)]))


def test_cli_train_then_resume_refuses_new_settings(corpus, tmp_path, capsys):
    d = tmp_path / "run"
    argv = ["train", "--data", str(corpus[0]), "--preset", "tiny", "--dim", "32", "--vocab-size", "300",
            "--context", "16", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--eval-interval", "2",
            "--eval-tokens", "100", "--final-eval-tokens", "200", "--sample-tokens", "5", "--out-dir", str(d),
            "--threads", "1", "--no-progress"]
    assert cli.main(argv) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", OPTIMIZER_FILE, STATE_FILE, "metrics.jsonl"):
        assert (d / name).is_file(), name
    err = capsys.readouterr().err
    assert "final eval on all held-out text" not in err and "bits/byte" in err and "done: 3 steps" in err
    model = npllama.Llama.from_pretrained(d)
    assert model.config.dim == 32 and model.tokenizer.vocab_size == 300
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n"
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text

    assert cli.main(["train", "--resume", str(d), "--lr", "0.1"]) == 1
    assert "remove --lr" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(d), "--threads", "1", "--no-progress"]) == 0


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


def test_crash_inside_a_checkpoint_save_leaves_the_previous_one(corpus, tmp_path, monkeypatch):
    from npllama.files import STAGING_DIR
    from npllama.train import checkpoint

    d = tmp_path / "run"
    cfg = tiny(corpus, d, steps=6, eval_interval=0, checkpoint_interval=2)
    calls = {"n": 0}
    real_commit = checkpoint.commit_staged_write

    def commit_then_crash(directory, stage, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:      # the step-4 save: its files are staged, the crash comes before the commit
            raise OSError("simulated crash")
        return real_commit(directory, stage, *a, **k)

    monkeypatch.setattr(checkpoint, "commit_staged_write", commit_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        train(cfg, progress=False, verbose=False)
    monkeypatch.setattr(checkpoint, "commit_staged_write", real_commit)
    assert json.loads((d / STATE_FILE).read_text())["step"] == 2
    assert (d / STAGING_DIR).is_dir()          # the torn save
    result = train(resume=d, progress=False, verbose=False)
    assert result.step == 6 and not (d / STAGING_DIR).exists()
    ref = tmp_path / "ref"
    train(tiny(corpus, ref, steps=6, eval_interval=0, checkpoint_interval=2), progress=False, verbose=False)
    assert step_losses(d) == step_losses(ref)


def test_train_help_says_what_the_presets_and_init_from_take(capsys):
    from npllama import cli
    from npllama.train.config import PRESETS
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ".gguf" in out.split("--init-from MODEL")[-1].split("--lora-rank N", 1)[0]   # (its help, not usage)
    for name, p in PRESETS.items():
        assert f"{name} dim {p['dim']}, {p['n_layers']} layers, {p['n_heads']} heads" in out


def test_ctrl_c_before_the_first_step_says_the_budget_was_not_planned(corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the step-0 evaluation: no step was timed, so no plan (it printed 'nans/step')."""
    import os
    import signal

    from npllama.train import loop

    def interrupted(run, tokens, stop):
        os.kill(os.getpid(), signal.SIGINT)      # StopSignals turns it into a request to stop
        return None                               # as _evaluate does when a stop is requested
    monkeypatch.setattr(loop, "_evaluate", interrupted)
    train(tiny(corpus, tmp_path / "run", steps=None, time_budget=60.0), progress=False, verbose=True)
    err = capsys.readouterr().err
    assert "time budget 60s: not planned (stopped before a step could be timed)" in err, err
    assert "nan" not in err
