"""The session of a run -- what `npllama train` shows and leaves behind: samples escaped for the
terminal, a bar within 80 columns whose progress never goes back, plain lines without a terminal,
the final evaluation on the periodic evaluations' tokens too, one clock in metrics.jsonl, options
checked before any work and no half-made run directory."""
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama import cli
from npllama.data import TokenDataset, load_text
from npllama.errors import CheckpointError, ConfigError
from npllama.plot import held_out_curves
from npllama.tokenizer import Tokenizer
from npllama.train import TrainConfig, TrainingDiverged, evaluate, read_metrics, train
from npllama.train.progress import Progress, printable, progress_text, sample_lines
from train_helpers import corpus_file  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def tiny(corpus_file, out_dir, **overrides) -> TrainConfig:
    values = dict(data=str(corpus_file), preset="tiny", dim=32, n_layers=2, n_heads=2, vocab_size=300, seq_len=16,
                  batch_size=4, steps=4, warmup_steps=1, eval_interval=2, eval_tokens=200, sample_tokens=8,
                  sample_interval=0, checkpoint_interval=0, out_dir=str(out_dir))
    values.update(overrides)
    return TrainConfig(**values)


# ---- samples on the terminal ---------------------------------------------------------------------
def test_printable_escapes_control_characters_but_newline_and_tab():
    assert printable("a\rb\x0ec\x1b[2J\x7f\x9b\n\tok é ✓") == "a\\rb\\x0ec\\x1b[2J\\x7f\\x9b\n\tok é ✓"
    assert sample_lines("\n\nLEONATO.\r\n\nCall her\x00\nthree\nfour\nfive\n", 4) == [
        "LEONATO.\\r", "Call her\\x00", "three", "four"]
    long = sample_lines("x" * 200, 4)
    assert long == ["x" * 73 + "..."]


def test_training_samples_reach_the_terminal_escaped(corpus_file, tmp_path, capsys):
    # the prompt is part of each sample, so its control characters must come out escaped
    train(tiny(corpus_file, tmp_path / "run", sample_prompt="\rTo\x0e"), progress=False)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x0e" not in err
    assert re.search(r"^step 0: sample:\n  \\rTo\\x0e", err, re.M), err
    assert re.search(r"^step 4: sample:\n  \\rTo\\x0e", err, re.M), err
    samples = [r for r in read_metrics(tmp_path / "run") if r.get("kind") == "sample"]
    assert [r["step"] for r in samples] == [0, 4]
    assert all(r["text"].startswith("\rTo\x0e") for r in samples)    # metrics.jsonl keeps them exact


# ---- the bar and the plain lines -------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_fits_80_columns_with_speed_and_time_left(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = FakeTerminal()
    bar = Progress(True, out)
    # the longest a line gets: a long, fast run with hours left; then the planner shrinks the total
    bar.update(0.5, progress_text(1_234_567, 2_000_000, 10.12345, 1_234_567.0, 99 * 3600 + 59 * 60))
    bar.update(0.3, progress_text(1_234_568, None, 2.5, 17_747.0, 171))    # a fraction that went back
    bar.close()
    lines = [line for line in re.split(r"[\r\n]", out.getvalue()) if line.strip()]
    assert lines and all(len(line) <= 80 for line in lines), lines
    assert "tok/s" in lines[-1] and "left" in lines[-1] and "step 1,234,568 loss" in lines[-1], lines
    percents = [int(m) for m in re.findall(r"^\s*(\d+)%", "\n".join(lines), re.M)]
    assert percents == sorted(percents) and percents[-1] == 50, lines   # never backwards
    assert progress_text(820, None, 2.34121, 17747.4, 171) == "step 820 loss 2.3412 17,747 tok/s 02:51 left"


def test_without_a_terminal_progress_is_plain_lines_every_tenth():
    out = io.StringIO()
    bar = Progress(True, out)
    for step in range(1, 21):
        bar.update(step / 20, f"step {step}")
    bar.close()
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [f"{10 * k:3d}% step {2 * k}" for k in range(1, 11)]


@pytest.mark.slow
def test_train_to_a_pipe_prints_plain_periodic_lines(corpus_file, tmp_path):
    """A real `npllama train` whose stderr is a pipe: no carriage return anywhere, a progress line
    at each tenth of the run, and the setup line says where the time went."""
    env = dict(os.environ)
    args = ["--data", str(corpus_file), "--preset", "tiny", "--vocab-size", "300", "--context", "16", "--batch-size", "4",
            "--steps", "10", "--eval-interval", "5", "--eval-tokens", "200", "--sample-tokens", "8",
            "--threads", "1", "--out-dir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "npllama.cli", "train", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    progress = re.findall(r"^ *(\d+)% step (\d+)/10 loss \d+\.\d{4} [\d,]+ tok/s \d\d:\d\d left$", proc.stderr, re.M)
    assert [int(p) for p, _ in progress] == list(range(20, 101, 10)), proc.stderr
    # (the first step may load kernels: its line gives no rate, rather than a wrong one)
    assert re.search(r"^ *10% step 1/10 loss \d+\.\d{4} timing\.\.\.$", proc.stderr, re.M), proc.stderr
    assert re.search(r"^setup [\d.]+s: tokenizer [\d.]+s, tokenizing [\d.]+s, (compiling Numba kernels [\d.]+s "
                     r"\(first run only\), )?the rest [\d.]+s\nthis machine multiplies float32 matrices at \d+ "
                     r"GFLOP/s now", proc.stderr, re.M), proc.stderr
    lines = proc.stderr.splitlines()
    assert all(len(line) <= 100 for line in lines if not line.startswith(("run dir ", "model saved in "))), proc.stderr
    assert len(lines) < 40, proc.stderr


# ---- evaluations -----------------------------------------------------------------------------------
def test_final_eval_also_reports_the_periodic_tokens(corpus_file, tmp_path, capsys):
    d = tmp_path / "run"
    result = train(tiny(corpus_file, d, steps=3, final_eval_tokens=None), progress=False)
    err = capsys.readouterr().err
    model = npllama.Llama.from_pretrained(d)
    data = TokenDataset.from_text(load_text(corpus_file), model.tokenizer, val_fraction=TrainConfig().val_fraction)
    ev, sub = result.final_eval, result.final_eval["subset"]
    assert ev["val_tokens"] == len(data.val_tokens) > sub["val_tokens"] == 200
    again = evaluate(model, data.val_tokens[:200], data.eval_context_token, sub["val_bytes"], 4, 16)
    assert again["val_loss"] == pytest.approx(sub["val_loss"], rel=1e-6)
    assert sub["val_bytes"] == len(model.tokenizer.decode(data.val_tokens[:200]).encode())
    final_lines = [line for line in err.splitlines() if line.startswith("step 3: final eval")]
    assert final_lines == [
        f"step 3: final eval on all {len(data.val_tokens):,} held-out tokens: {ev['val_bpb']:.4f} bits/byte, "
        f"loss {ev['val_loss']:.4f}; train loss {ev['train_loss']:.4f}",
        f"step 3: final eval on the periodic evals' first 200: {sub['val_bpb']:.4f} bits/byte, "
        f"loss {sub['val_loss']:.4f}"], err
    assert re.search(r"^step 0: held-out [\d.]+ bits/byte, loss [\d.]+ \(first 200 held-out tokens, as every "
                     r"periodic eval\)$", err, re.M), err
    assert re.search(r"^step 2: held-out [\d.]+ bits/byte, loss [\d.]+; train loss [\d.]+; [\d.]+ passes$", err, re.M), err

    # the plot: the periodic curve ends with the final figure on its tokens; all held-out is its own point
    evals = [r for r in read_metrics(d) if r.get("kind") == "eval"]
    periodic, final = held_out_curves(evals)
    assert periodic["label"] == "held-out, first 200 tokens (periodic)" and not periodic["final"]
    assert periodic["steps"] == [0, 2, 3] and periodic["val_bpb"][-1] == sub["val_bpb"]
    assert final["label"] == f"held-out, all {len(data.val_tokens):,} tokens (final)" and final["final"]
    assert final["steps"] == [3] and final["val_bpb"] == [ev["val_bpb"]]

    # one clock: every row's elapsed is training time, in the order the rows were written
    elapsed = [r["elapsed"] for r in read_metrics(d)]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0
    assert read_metrics(d)[0]["kind"] == "eval" and read_metrics(d)[0]["step"] == 0


# ---- options checked first, no debris --------------------------------------------------------------
def test_bad_model_shape_fails_before_any_work_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def no_tokenizer(*args, **kwargs):
        raise AssertionError("a tokenizer was trained for a configuration that cannot run")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Tokenizer, "train", no_tokenizer)
    assert cli.main(["train", "--n-heads", "5", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == ("npllama: error: --n-heads 5 must divide dim 128 (from --preset small): each head gets "
                   "dim / n_heads channels\n")
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["train", "--n-kv-heads", "3", "--out-dir", "run"]) == 1
    assert "--n-kv-heads 3 must divide n_heads 4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


class Boom(RuntimeError):
    pass


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(corpus_file, tmp_path, monkeypatch):
    from npllama.train import setup

    def no_model(*args, **kwargs):   # fails after the tokenizer and the tokens were written
        raise Boom("no memory for the model")

    with monkeypatch.context() as m:
        m.setattr(setup, "Llama", no_model)
        with pytest.raises(Boom):
            train(tiny(corpus_file, tmp_path / "new"), progress=False, verbose=False)
        assert not (tmp_path / "new").exists()
        mine = tmp_path / "mine"          # a directory the user made: emptied of the run's files, not removed
        mine.mkdir()
        (mine / "notes.txt").write_text("keep me")
        with pytest.raises(Boom):
            train(tiny(corpus_file, mine, force=True), progress=False, verbose=False)
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    def poison(step, loss, run):   # diverges at step 2, before any checkpoint
        run.model.params["model.embed_tokens.weight"][:] = np.inf

    with pytest.raises(TrainingDiverged, match="no checkpoint had been saved yet"):
        train(tiny(corpus_file, tmp_path / "nan"), progress=False, verbose=False, on_step=poison)
    assert not (tmp_path / "nan").exists()

    # what a SIGKILL during setup leaves: --resume says to start again, not to --init-from
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".npllama-run").write_text("{}")
    (killed / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="killed before its first checkpoint; start it again"):
        train(resume=killed, progress=False, verbose=False)
    # and starting it again in the same directory works
    assert train(tiny(corpus_file, killed, steps=1), progress=False, verbose=False).step == 1


def test_config_errors_name_the_flags():
    with pytest.raises(ConfigError, match=r"^--sample-top-k must be a positive integer, got 0$"):
        TrainConfig(sample_top_k=0)
    with pytest.raises(ConfigError, match=r"^config\.toml: --lr must be a number > 0, got -1$"):
        TrainConfig.from_dict({"lr": -1}, source="config.toml")
    with pytest.raises(ConfigError, match=r"unknown option 'bogus'.*see npllama train --help"):
        TrainConfig.from_dict({"bogus": 1}, source="config.toml")
    assert math.isclose(TrainConfig(time_budget=60).time_budget, 60.0)
