"""What a run may write into and what it removes (npllama/train/run_dir.py): a directory of the
user's files is refused unless --force; a run that fails or is interrupted before its first
checkpoint removes only what it created; a fine-tune never writes into its --init-from source;
`export --to hf` does not replace tokenizer files without --force; one process per run directory."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npllama import cli
from npllama.errors import CheckpointError, ConfigError
from npllama.train import TrainConfig, TrainingDiverged, train
from npllama.train import setup
from npllama.train.run_dir import MARKER, RunDirectory
from train_helpers import corpus_file  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ)
TINY = dict(preset="tiny", dim=32, n_layers=2, n_heads=2, vocab_size=300, seq_len=16, batch_size=4, steps=2,
            warmup_steps=1, eval_interval=0, eval_tokens=200, sample_tokens=0, checkpoint_interval=0)
USER_FILES = {"tokens/precious.dat": b"\x00years of work", "tokenizer.json": b'{"mine": 1}',
              "tokenizer_config.json": b'{"mine": 2}', "metrics.jsonl": b'{"step": 7, "mine": 3}\n',
              "notes.txt": b"keep me"}


def tiny(corpus_file, out_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(corpus_file), "out_dir": str(out_dir), **overrides})


def cli_args(corpus_file, out_dir, *extra) -> list[str]:
    args = ["train", "--data", str(corpus_file), "--out-dir", str(out_dir), "--no-progress"]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args + list(extra)


def user_folder(path: Path, files=USER_FILES) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def snapshot(path: Path) -> dict:
    """Every file and directory under ``path``, with the SHA-256 of each file's bytes (but the run
    marker's: the pid of the last process that locked it)."""
    return {str(p.relative_to(path)): "dir" if p.is_dir() else "marker" if p.name == MARKER
            else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))}


def test_a_folder_of_the_users_files_is_refused_before_any_work(corpus_file, tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    (folder / "config.json").write_text("{}")
    before = snapshot(folder)
    assert cli.main(cli_args(corpus_file, folder, "--lr", "1e30")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"npllama: error: --out-dir {folder}: not empty (")
    assert "not an npllama run directory" in err and "--force" in err
    assert snapshot(folder) == before
    # a file as --out-dir
    assert cli.main(cli_args(corpus_file, folder / "notes.txt")) == 1
    assert capsys.readouterr().err == f"npllama: error: --out-dir {folder / 'notes.txt'}: is a file, not a directory\n"
    assert snapshot(folder) == before


def test_a_forced_run_that_diverges_removes_only_what_it_created(corpus_file, tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    assert cli.main(cli_args(corpus_file, folder, "--force", "--lr", "1e30", "--grad-clip", "0")) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("npllama: error: training diverged at step")
    assert err.count("npllama: error:") == 1
    after = snapshot(folder)
    # what was there is there (the files of a run's names replaced, as --force says), nothing more
    assert sorted(after) == sorted(before)
    for name in ("tokens/precious.dat", "notes.txt"):
        assert after[name] == before[name]


def test_an_interrupt_during_setup_removes_only_what_it_created(corpus_file, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):   # Ctrl-C after the tokenizer and the tokens were written
        assert (folder / "tokens" / "train.tokens").is_file() and (folder / "tokenizer.json").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(setup, "BatchSampler", interrupted)
    # an npllama directory (marked) that a kill during setup left, where the user keeps a file
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / MARKER).write_text("{}")
    user_folder(folder, {"tokens/precious.dat": USER_FILES["tokens/precious.dat"]})
    before = snapshot(folder)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(corpus_file, folder), progress=False, verbose=False)
    assert snapshot(folder) == before
    # the user's folder, forced
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(corpus_file, folder, force=True), progress=False, verbose=False)
    after = snapshot(folder)
    assert sorted(after) == sorted(before) and after["tokens/precious.dat"] == before["tokens/precious.dat"]
    # a new directory: gone again, its parent as it was
    folder = tmp_path / "new" / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(corpus_file, folder), progress=False, verbose=False)
    assert not folder.exists() and (tmp_path / "new").is_dir()


def test_a_fine_tune_never_writes_into_its_source(corpus_file, tmp_path, capsys):
    source = tmp_path / "base"
    assert train(tiny(corpus_file, source, steps=1), progress=False, verbose=False).step == 1
    before = snapshot(source)
    assert cli.main(["train", "--init-from", str(source), "--out-dir", str(source), "--steps", "1",
                     "--lr", "1e30", "--force"]) == 1
    err = capsys.readouterr().err
    assert err == (f"npllama: error: --out-dir {source} is where --init-from {source} is: a fine-tune never writes "
                   "into the checkpoint it starts from; choose another --out-dir\n")
    assert snapshot(source) == before
    assert cli.main(["generate", str(source), "--prompt", "Th", "--max-new-tokens", "2", "--seed", "0"]) == 0


def test_export_to_hf_does_not_replace_tokenizer_files_without_force(corpus_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(tiny(corpus_file, run, steps=1), progress=False, verbose=False).step == 1
    for name in ("tokenizer.json", "tokenizer_config.json"):
        out = user_folder(tmp_path / f"out-{name}", {name: USER_FILES[name]})
        assert cli.main(["export", str(run), "--to", "hf", "--out", str(out)]) == 1
        assert capsys.readouterr().err == f"npllama: error: {out / name} exists; pass --force to replace it\n"
        assert (out / name).read_bytes() == USER_FILES[name]
        assert cli.main(["export", str(run), "--to", "hf", "--out", str(out), "--force"]) == 0
        assert (out / name).read_bytes() == (run / name).read_bytes()


# ---- one process per run directory -----------------------------------------------------------------
HOLD = """
import sys, time
from npllama.train.run_dir import RunDirectory
RunDirectory.claim(sys.argv[1], fresh=True)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_in_the_same_directory_is_refused_at_start_and_a_dead_ones_lock_is_not(corpus_file, tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, env=ENV)
    try:
        assert holder.stdout.readline() == b"locked\n"
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=rf"^{folder}: in use by another npllama process \(pid {holder.pid} on "):
            train(tiny(corpus_file, folder), progress=False, verbose=False)
        assert time.monotonic() - t0 < 5   # (refused at start, before the tokenizer)
        with pytest.raises(ConfigError, match="in use by another npllama process"):
            train(resume=folder, progress=False, verbose=False)
        assert sorted(p.name for p in folder.iterdir()) == [MARKER]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without cleaning up: its marker is left, its lock is not
    result = train(tiny(corpus_file, folder), progress=False, verbose=False)
    assert result.step == 2
    # released at the end of the session: the same process resumes it, and claims it again
    assert train(resume=folder, progress=False, verbose=False).step == 2
    directory = RunDirectory.claim(folder, fresh=False)
    directory.release()


def test_links_in_a_run_directory_are_refused_at_start(corpus_file, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name, resume in (("tokens", False), (".checkpoint-staging", False), ("tokens", True),
                         (".checkpoint-commit", True)):
        folder = tmp_path / f"run-{name}-{resume}"
        folder.mkdir()
        (folder / MARKER).write_text("{}")
        (folder / name).symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(ConfigError, match=rf"^{folder / name}: is a symbolic link; npllama writes"):
            if resume:
                train(resume=folder, progress=False, verbose=False)
            else:
                train(tiny(corpus_file, folder, force=True), progress=False, verbose=False)
        assert list(elsewhere.iterdir()) == []


# ---- --resume continues the same run only ----------------------------------------------------------
def test_resume_refuses_a_config_or_tokenizer_config_edited_since_the_checkpoint(corpus_file, tmp_path):
    import json
    run = tmp_path / "run"
    assert train(tiny(corpus_file, run, steps=1), progress=False, verbose=False).step == 1
    state = json.loads((run / "training_state.json").read_text())
    assert set(state["settings_sha256"]) == {"config.json", "tokenizer_config.json"}
    for name, key, value in (("config.json", "rope_theta", 5e5), ("config.json", "rms_norm_eps", 1e-6),
                             ("tokenizer_config.json", "add_bos_token", True)):
        original = (run / name).read_bytes()
        (run / name).write_text(json.dumps({**json.loads(original), key: value}))
        with pytest.raises(CheckpointError, match=rf"^{run / name}: does not match training_state.json .* would "
                                                  "not continue the same run"):
            train(resume=run, progress=False, verbose=False)
        (run / name).write_bytes(original)
    # a state saved before the settings were fingerprinted still resumes
    del state["settings_sha256"]
    (run / "training_state.json").write_text(json.dumps(state))
    assert train(resume=run, progress=False, verbose=False).step == 1


def test_an_unwritable_out_dir_is_reported_before_the_tokenizer_is_trained(corpus_file, tmp_path, monkeypatch, capsys):
    from npllama.tokenizer import Tokenizer

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("a tokenizer was trained for a run that cannot be written")

    monkeypatch.setattr(Tokenizer, "train", no_tokenizer)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"     # (the tests run as root: a directory's mode would not stop them)
    assert cli.main(cli_args(corpus_file, out)) == 1
    err = capsys.readouterr().err
    assert err == f"npllama: error: --out-dir {out}: cannot write there (Not a directory)\n"
