"""Training on your own data (issue 32): a folder of source files, a held-out set that represents the
corpus, overfitting seen and stopped (best/ and early stopping), runs extended, --dry-run, the
progress of short runs."""
import json
import re

import numpy as np
import pytest

import npllama
from npllama import cli
from npllama.data import load_text
from npllama.errors import ConfigError
from npllama.train import TrainConfig, evaluate, new_run, read_metrics, train
from npllama.train.best import BEST_DIR, read_best
from npllama.train.extend import tail_lr


def small(out_dir, data, **overrides) -> TrainConfig:
    values = dict(data=str(data), preset="tiny", dim=32, n_layers=2, n_heads=2, vocab_size=300, seq_len=32,
                  batch_size=8, steps=8, warmup_steps=2, lr=1e-2, eval_interval=4, sample_tokens=0,
                  checkpoint_interval=0, out_dir=str(out_dir))
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def pycode(tmp_path_factory):
    """A folder like a hobbyist's: Python files in packages, a compiled .pyc, an image, a hidden .git."""
    d = tmp_path_factory.mktemp("pycode")
    for pkg in ("alpha", "beta"):
        (d / pkg).mkdir()
        for i in range(3):
            body = "".join(f"def {pkg}_{i}_{k}(n):\n    return n * {k} + {i}\n\n\n" for k in range(40))
            (d / pkg / f"mod{i}.py").write_text(f'"""{pkg} module {i}."""\n' + body)
        (d / pkg / "__pycache__").mkdir()
        (d / pkg / "__pycache__" / "mod0.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00\x00\x00")
    (d / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return d


def test_a_folder_of_py_files_trains_and_the_log_says_what_was_read_and_held_out(pycode, tmp_path, capsys):
    result = train(small(tmp_path / "run", pycode), progress=False)
    assert result.step == 8
    err = capsys.readouterr().err
    sizes = {p.relative_to(pycode).as_posix(): p.stat().st_size for p in sorted(pycode.rglob("*.py"))}
    assert f"corpus: directory {pycode}: 6 files, {sum(sizes.values()):,} bytes: alpha/mod0.py " \
           f"({sizes['alpha/mod0.py']:,} B)" in err
    assert "corpus: left out 3 not matching the file patterns (.pyc 2, .png 1)" in err
    assert "held-out set: the last ~5% of each file, cut at a line (6 of 6 files" in err
    # the held-out text holds the end of every file: both packages' last functions
    val_text = npllama.Llama.from_pretrained(tmp_path / "run").tokenizer.decode(
        np.fromfile(tmp_path / "run" / "tokens" / "val.tokens", dtype=np.uint16))
    for pkg in ("alpha", "beta"):
        for i in range(3):
            assert f"def {pkg}_{i}_39(n)" in val_text
    assert re.search(r"8 steps = [\d.]+ passes over the [\d,]+ training tokens", err)


def test_include_documents_and_val_data_options(pycode, tmp_path, capsys):
    run = new_run(small(tmp_path / "a", pycode, include="alpha/*.py", val_split="documents",
                              val_fraction=0.3), verbose=True)
    err = capsys.readouterr().err
    assert "3 files" in err and "beta" not in err.split("held-out set")[0]
    assert re.search(r"held-out set: 1 of 3 whole files drawn at random \(seed 0\)", err)
    (tmp_path / "val.py").write_text("def held_out(n):\n    return n\n" * 20)
    run = new_run(small(tmp_path / "b", pycode, val_data=str(tmp_path / "val.py")), verbose=True)
    err = capsys.readouterr().err
    assert f"held-out set: file {tmp_path / 'val.py'} (600 bytes), given by --val-data; all of directory {pycode} trains" in err
    assert run.data.val_bytes == 600
    with pytest.raises(ConfigError, match="--val-split must be one of per-file, documents, tail"):
        small(tmp_path / "c", pycode, val_split="random")
    # the command line: --include and --val-split reach the run
    assert cli.main(["train", "--data", str(pycode), "--include", "*.md", "--out-dir", str(tmp_path / "d")]) == 1
    assert "no text files in directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """A tiny corpus trained far past where held-out loss turns (measured: lowest near step 40, ~4.4
    passes; 8 % above that by step 120, ~13 passes), at a constant rate so it goes on learning."""
    d = tmp_path_factory.mktemp("overfit")
    (d / "tiny.txt").write_text(load_text()[:4000], encoding="utf-8")
    cfg = small(d / "run", d / "tiny.txt", steps=120, eval_interval=10, val_fraction=0.2, checkpoint_interval=50,
                dim=128, hidden_dim=384, lr=3e-3, schedule="constant")
    return d / "run", cfg


def test_overfitting_is_warned_about_and_the_best_weights_are_kept(overfit_run, capsys):
    run_dir, cfg = overfit_run
    result = train(cfg, progress=False)
    err = capsys.readouterr().err
    assert "warning: held-out loss has risen for 3 evaluations" in err and "overfitting" in err
    best = read_best(run_dir)
    assert 0 < best["step"] < result.step
    assert f"the best held-out loss was at step {best['step']:,}" in err
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    assert min((r["val_loss"] for r in evals if r["step"] > 0 and not r.get("final")),
               default=None) == pytest.approx(best["val_loss"])
    assert max(r["passes"] for r in evals) > 10
    # the two weight sets, evaluated again on all held-out tokens: best/ is better than the last
    run = new_run(TrainConfig.from_dict({**cfg.to_dict(), "out_dir": str(run_dir.parent / "again")}), verbose=False)
    data = run.data

    def held_out_loss(path):
        model = npllama.Llama.from_pretrained(path)
        return evaluate(model, data.val_tokens, data.eval_context_token, data.val_bytes, 8, 32)["val_loss"]
    assert held_out_loss(run_dir / BEST_DIR) < held_out_loss(run_dir) - 0.05
    # generate uses best/ by default, and says so
    assert cli.main(["generate", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert f"{run_dir / BEST_DIR}: the weights of step {best['step']:,}" in capsys.readouterr().err
    assert cli.main(["generate", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "4", "--seed", "1",
                     "--last"]) == 0
    assert "the last weights of" in capsys.readouterr().err


def test_early_stopping_ends_the_run_like_a_finished_one(overfit_run, tmp_path, capsys):
    _, cfg = overfit_run
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "out_dir": str(tmp_path / "early"), "early_stop": 4})
    result = train(cfg, progress=False)
    err = capsys.readouterr().err
    best = read_best(tmp_path / "early")
    assert result.step == best["step"] + 4 * cfg.eval_interval < cfg.steps
    assert "early stop: 4 evaluations without a new best held-out loss" in err
    assert "final eval" in err
    state = json.loads((tmp_path / "early" / "training_state.json").read_text())
    assert state["step"] == state["total_steps"] == result.step and state["plan"]["early_stop_step"] == result.step
    assert "nothing to do" in _resume_output(tmp_path / "early", capsys)


def _resume_output(run_dir, capsys):
    train(resume=run_dir, progress=False)
    return capsys.readouterr().err


def test_a_finished_run_is_extended_by_steps_then_time_one_curve(pycode, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(small(run_dir, pycode, steps=20, eval_interval=10), progress=False)
    assert "--steps N, or --time-budget" in _resume_output(run_dir, capsys)
    assert cli.main(["train", "--resume", str(run_dir), "--steps", "10", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"extending {run_dir} (finished) by 10 steps: 20 -> 30; learning rate: stays at 0.001, the final rate" in err
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))          # one metrics file, one curve
    assert all(r["lr"] == pytest.approx(1e-3) for r in steps[20:])
    # about 4 more seconds: the steps that fit, planned from the run's own step times
    result = train(resume=run_dir, progress=False, more_seconds=4.0)
    err = capsys.readouterr().err
    assert "extending" in err and "time budget 4s" in err and result.step > 31
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, result.step + 1))
    with pytest.raises(ConfigError, match="not both"):
        cli_error(["train", "--resume", str(run_dir), "--steps", "5", "--time-budget", "9"])
    assert cli.main(["train", "--resume", str(run_dir), "--lr", "1"]) == 1
    assert "remove --lr" in capsys.readouterr().err
    # a damaged extension in the saved plan is named, not a traceback
    state_path = run_dir / "training_state.json"
    state = json.loads(state_path.read_text())
    state["plan"]["extension"] = {"from_step": "ten"}
    state_path.write_text(json.dumps(state))
    assert cli.main(["train", "--resume", str(run_dir), "--steps", "1"]) == 1
    assert "plan.extension must hold from_step" in capsys.readouterr().err


def cli_error(argv):
    from npllama.train.cli import run as run_train
    from npllama.cli import build_parser
    return run_train(build_parser().parse_args(argv))


def test_an_interrupted_run_extended_decays_from_its_current_rate(pycode, tmp_path):
    run_dir = tmp_path / "run"

    def stop_at_10(step, loss, run):
        if step == 10:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGINT)
    train(small(run_dir, pycode, steps=40, warmup_steps=2), progress=False, verbose=False, on_step=stop_at_10)
    lr_next = [r for r in read_metrics(run_dir) if "loss" in r][-1]["lr"]
    train(resume=run_dir, progress=False, verbose=False, more_steps=20)
    lrs = [r["lr"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(lrs) == 30
    assert lrs[9] == lr_next and 1e-3 < lrs[10] < lr_next                 # from near where it was ...
    assert lrs[-1] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))   # ... to the end
    ext = {"from_step": 10, "from_lr": lrs[10]}
    assert tail_lr(10, ext, 30, 1e-3, "cosine") == lrs[10]
    assert tail_lr(20, ext, 30, 1e-3, "linear") == pytest.approx(1e-3 + (lrs[10] - 1e-3) * (1 - 10 / 19))


def test_dry_run_says_size_tokens_steps_and_passes(pycode, tmp_path, capsys):
    assert cli.main(["train", "--dry-run", "--data", str(pycode), "--preset", "tiny", "--vocab-size", "300",
                     "--time-budget", "120", "--out-dir", str(tmp_path / "never")]) == 0
    out = capsys.readouterr().out
    params = npllama.train.model_config(TrainConfig(preset="tiny", vocab_size=300), 300).num_parameters()
    assert f"model: {params / 1e6:.2f}M parameters" in out and "16 x 1 x 128 = 2,048 tokens/step" in out
    m = re.search(r"--time-budget 120s: about ([\d,]+) steps, ([\d,]+) tokens = ([\d.]+) passes over the training "
                  r"tokens", out)
    train_tokens = int(re.search(r"([\d,]+) training and", out).group(1).replace(",", ""))
    steps = int(m.group(1).replace(",", ""))
    assert steps > 0 and float(m.group(3)) == pytest.approx(steps * 2048 / train_tokens, abs=0.06)
    assert re.search(r"this machine now: [\d.]+s a step", out)
    assert not (tmp_path / "never").exists()
    # --help shows the presets' sizes
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    from npllama.train.config import PRESETS
    for name, dims in PRESETS.items():
        params = npllama.train.model_config(TrainConfig(preset=name), 2048).num_parameters()
        assert f"{name} dim {dims['dim']}, {dims['n_layers']} layers, {dims['n_heads']} heads, " \
               f"{params / 1e6:.2f}M parameters" in help_text
    assert "--dry-run" in help_text


def test_progress_bar_of_a_short_run_and_the_first_line_after_resume():
    import io
    import time
    from npllama.train.progress import Progress, progress_text

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = Progress(True, term)
    for i in range(1, 11):     # a 2-second run after a long start: each step drawn (at most every 0.1 s)
        time.sleep(0.11)
        bar.update(0.5 + i / 20, progress_text(i, None, 3.0, 1000.0, 1.0))
    bar.close()
    drawn = [line for line in term.getvalue().split("\r") if "step" in line]
    assert len(drawn) >= 10 and "step 10 " in drawn[-1]
    # a session's first step gives no rate (it may load kernels), so no stale time left
    assert progress_text(61, 80, 2.5, None, None) == "step 61/80 loss 2.5000 timing..."
