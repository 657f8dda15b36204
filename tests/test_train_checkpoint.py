"""Checkpoints: exact resume after Ctrl-C, SIGTERM or a crash, a finished run, torn or changed
files refused, a crash inside a save (tests/test_crash_resume.py kills real processes)."""
import json
import signal

import pytest

from npllama.errors import CheckpointError
from npllama.train import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, read_metrics, train

from train_helpers import corpus, file_bytes, interrupt_at, step_losses, tiny  # noqa: F401  (corpus: a fixture)


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
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    result = train(tiny(corpus, d), progress=False, verbose=False, on_step=interrupt_at(2, signal.SIGTERM))
    assert result.interrupted and result.signal_name == "SIGTERM" and result.exit_code == 143
    assert json.loads((d / STATE_FILE).read_text())["step"] == 2
    assert "Resume with:" in capsys.readouterr().err
    # the handlers are put back afterwards: those of before the run (not always Python's default:
    # a process started in the background by a shell without job control ignores SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


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
