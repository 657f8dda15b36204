"""Faults during training, caused for real: `npllama train` processes killed with SIGKILL at random
moments (during steps, during checkpoint writes, during start-up), interrupted with SIGINT and
SIGTERM, a disk that fills up or turns read-only while saving, a loss that turns NaN.

The promise checked: after any of these the run directory holds a checkpoint that loads, and
`--resume` ends with the same weights, optimizer state and losses, bit for bit, as a run that was
never interrupted (same seed, one thread).

NPLLAMA_KILL_CYCLES sets the number of interruptions of the kill test (default 8).
"""
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama.errors import NpllamaError, WriteError
from npllama.files import COMMIT_DIR, STAGING_DIR
from npllama.formats.safetensors import read_safetensors

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ)
STEPS = 24
# A tiny model (each step takes milliseconds) with dropout and gradient accumulation, so that the
# dropout generator, the data sampler and the accumulation all have to resume exactly.
TINY = ["--dim", "16", "--n-layers", "1", "--n-heads", "2", "--vocab-size", "300", "--context", "16",
        "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.1", "--eval-interval", "0", "--sample-tokens", "0",
        "--warmup-steps", "4", "--threads", "1", "--no-progress", "--seed", "7"]
N_CYCLES = int(os.environ.get("NPLLAMA_KILL_CYCLES", "8"))


# ---- helpers -----------------------------------------------------------------------------------
def start_train(args, cwd, log: Path):
    """A real `npllama train` process; its stderr goes to ``log`` (a pipe could fill and block it)."""
    err = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "npllama.cli", "train", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=err)
    proc.log, proc.log_file = log, err
    return proc


def finish(proc, timeout=120) -> str:
    proc.wait(timeout=timeout)
    proc.log_file.close()
    return proc.log.read_text()


def saved_step(run_dir: Path) -> int:
    """Step of the checkpoint in ``run_dir`` (0 when there is none yet)."""
    try:
        return json.loads((run_dir / "training_state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def wait_until(condition, proc, timeout=120.0, poll=0.005):
    """Wait for ``condition()`` or for ``proc`` to exit; True if the condition came first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(poll)
    raise AssertionError(f"timed out; log:\n{proc.log.read_text()}")


def started_at(proc) -> float:
    """The step ``proc`` began training from (0 for a new run), once its log says so; else infinity."""
    log = proc.log.read_text()
    resumed = re.search(r"resuming .* at step (\d+) of", log)
    if resumed:
        return int(resumed.group(1))
    return 0 if "model:" in log else math.inf


def tensors(path: Path) -> dict:
    return {k: v for k, (_, v) in read_safetensors(path).items()}


def step_losses(run_dir: Path) -> list:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def assert_same_run(run_dir: Path, reference: Path):
    """Bit for bit: weights, optimizer moments, and every step's loss."""
    a, b = tensors(run_dir / "model.safetensors"), tensors(reference / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    a, b = tensors(run_dir / "optimizer.safetensors"), tensors(reference / "optimizer.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert step_losses(run_dir) == step_losses(reference)
    assert saved_step(run_dir) == saved_step(reference) == STEPS


def assert_checkpoint_loads(run_dir: Path) -> int:
    """The run directory holds a model that loads, finite, and a training state; -> its step."""
    model = npllama.Llama.from_pretrained(run_dir)
    assert np.all(np.isfinite(model.flat_params))
    step = saved_step(run_dir)
    assert step >= 1
    return step


def no_traceback(log: str):
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from npllama.data import load_text
    d = tmp_path_factory.mktemp("corpus")
    (d / "corpus.txt").write_text(load_text()[:20000])
    return d


@pytest.fixture(scope="module")
def reference(corpus):
    """An uninterrupted run with a checkpoint every step (checkpoints must not change the run).
    It starts at once and runs alongside the test that uses it; ``reference()`` waits for it."""
    proc = start_train(["--data", "corpus.txt", *TINY, "--steps", str(STEPS), "--checkpoint-interval", "1",
                        "--out-dir", "reference"], corpus, corpus / "reference.log")

    def wait():
        if proc.returncode is None:
            out = finish(proc)
            assert proc.returncode == 0, out
        return corpus / "reference"
    yield wait
    if proc.poll() is None:
        proc.kill()
        finish(proc)


# ---- the staged write, crashed at each point -----------------------------------------------------
def _write_set(directory: Path, tag: str, crash_after=None):
    """Write files a, b, training_state.json = tag through a staged write; ``crash_after`` stops it
    (as a SIGKILL would) after 'stage' (files staged, not committed), 'commit' (committed, nothing
    moved) or 'one-moved'."""
    from npllama.files import atomic_write_bytes, begin_staged_write, commit_staged_write
    stage = begin_staged_write(directory)
    for name in ("a", "b", "training_state.json"):
        atomic_write_bytes(stage / name, [tag.encode()])
    if crash_after == "stage":
        return
    if crash_after is None:
        commit_staged_write(directory, stage)
        return
    os.replace(stage, directory / COMMIT_DIR)
    if crash_after == "one-moved":
        os.replace(directory / COMMIT_DIR / "a", directory / "a")


@pytest.mark.parametrize("crash_after, expected", [("stage", "old"), ("commit", "new"), ("one-moved", "new")])
def test_staged_write_recovers_to_one_whole_set(tmp_path, crash_after, expected):
    from npllama.files import recover_staged_write
    _write_set(tmp_path, "old")
    _write_set(tmp_path, "new", crash_after=crash_after)
    recover_staged_write(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "a": expected, "b": expected, "training_state.json": expected}
    _write_set(tmp_path, "newer")      # and the next write works as usual
    assert {p.read_text() for p in tmp_path.iterdir()} == {"newer"}


# ---- SIGKILL / SIGINT / SIGTERM, many times over ------------------------------------------------
@pytest.mark.slow
def test_killed_and_resumed_many_times_ends_bit_identical(corpus, reference):
    rng = random.Random(20240601)
    run_dir = corpus / "killed"
    # SIGKILL at a random moment, or just as a checkpoint write starts, or during start-up (loading,
    # recovering an interrupted save); one SIGINT and one SIGTERM, which must save a checkpoint and
    # say how to resume.
    plan = ["kill", "write-kill", "int", "write-kill", "startup-kill", "kill", "term", "write-kill"]
    plan = (plan * (N_CYCLES // len(plan) + 1))[:N_CYCLES]
    args = ["--data", "corpus.txt", *TINY, "--steps", str(STEPS), "--checkpoint-interval", "1",
            "--out-dir", "killed"]
    proc = start_train(args, corpus, corpus / "cycle-0.log")
    during_write = kills = 0
    for cycle, action in enumerate(plan, 1):
        before = saved_step(run_dir)
        if action == "startup-kill":
            time.sleep(rng.uniform(0.0, 1.5))
        elif action == "write-kill":
            # a checkpoint write is under way once its staging directory exists
            in_write = lambda: (run_dir / STAGING_DIR).exists() or (run_dir / COMMIT_DIR).exists()
            if not wait_until(lambda: saved_step(run_dir) > before and in_write(), proc, poll=0.0005):
                break
            time.sleep(rng.uniform(0.0, 0.01))
        else:
            # let it make progress (a checkpoint of its own: one a start-up recovery rolled forward
            # comes before the signal handlers exist), then strike a little later
            progressed = wait_until(lambda: saved_step(run_dir) > max(before, started_at(proc)), proc)
            if not progressed:
                break  # finished already
            time.sleep(rng.uniform(0.0, 0.08))
        if proc.poll() is not None:
            break
        if action.endswith("kill"):
            proc.send_signal(signal.SIGKILL)
            finish(proc)
            kills += 1
            if any((run_dir / name).exists() for name in (STAGING_DIR, COMMIT_DIR)) or list(run_dir.glob(".*.tmp")):
                during_write += 1
        else:
            sig = signal.SIGINT if action == "int" else signal.SIGTERM
            proc.send_signal(sig)
            log = finish(proc)
            no_traceback(log)
            if f"done: {STEPS} steps" in log and saved_step(run_dir) == STEPS:
                # The run had finished and saved: the signal reached a process on its way out, after
                # the handlers were gone (seen at 40 cycles: killed by SIGTERM, i.e. 143 to a shell).
                assert proc.returncode in (0, -sig, 128 + sig), log
            else:
                assert proc.returncode == (0 if sig == signal.SIGINT else 128 + signal.SIGTERM), log
                assert f"--resume {run_dir}" in log, log
                # the checkpoint is of the very step it stopped at
                assert saved_step(run_dir) == step_losses(run_dir)[-1][0], log
        if saved_step(run_dir) == 0:   # killed before its first checkpoint: start over
            proc = start_train(args, corpus, corpus / f"cycle-{cycle}.log")
            continue
        assert_checkpoint_loads(run_dir)
        proc = start_train(["--resume", str(run_dir), "--threads", "1", "--no-progress"], corpus,
                           corpus / f"cycle-{cycle}.log")
    log = finish(proc)
    assert proc.returncode == 0, log
    no_traceback(log)
    assert not (run_dir / STAGING_DIR).exists() and not (run_dir / COMMIT_DIR).exists()
    assert_same_run(run_dir, reference())
    print(f"\n{len(plan)} interruptions ({kills} SIGKILL, {during_write} of them during a checkpoint write)")
    assert kills >= 1


# ---- a checkpoint write that fails --------------------------------------------------------------
def _can_mount_tmpfs(target: Path) -> bool:
    if os.geteuid() != 0 or sys.platform != "linux":
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_while_saving_keeps_previous_checkpoint(corpus, reference, tmp_path):
    """A real full disk (a small tmpfs, filled up once the run has a checkpoint): the process exits
    with one line naming the file, the previous checkpoint is intact and resumes to the same end."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if not _can_mount_tmpfs(mount):
        pytest.skip("needs root to mount a tmpfs (the in-process variant below always runs)")
    try:
        (mount / "corpus.txt").write_text((corpus / "corpus.txt").read_text())
        run_dir = mount / "run"
        for attempt in range(5):
            proc = start_train(["--data", "corpus.txt", *TINY, "--steps", str(STEPS), "--checkpoint-interval",
                                "1", "--out-dir", "run"], mount, tmp_path / "full.log")
            wait_until(lambda: saved_step(run_dir) >= 3, proc)
            # Freeze the run while the disk fills (its steps take milliseconds), between two saves: a
            # save under way when the disk fills could still finish (its last small files fit in the
            # pages left) and then free the previous checkpoint's space for the next one.
            while True:
                proc.send_signal(signal.SIGSTOP)
                if not ((run_dir / STAGING_DIR).exists() or (run_dir / COMMIT_DIR).exists()):
                    break
                proc.send_signal(signal.SIGCONT)
                time.sleep(0.001)
            if saved_step(run_dir) < STEPS:   # a save is still to come
                break
            # frozen after its last save (a loaded machine): start again
            proc.kill()
            proc.wait()
            proc.log_file.close()
            shutil.rmtree(run_dir)
        else:
            raise AssertionError("5 runs each reached their last step before they could be frozen")
        try:
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            left = max(0, free - 24 * 1024)
            with open(mount / "filler", "wb", buffering=0) as f:
                try:
                    while left > 0:
                        left -= f.write(b"\0" * min(left, 1 << 20))
                except OSError as e:   # (tmpfs overhead: the disk is only fuller)
                    if e.errno != errno.ENOSPC:
                        raise
        finally:
            proc.send_signal(signal.SIGCONT)
        log = finish(proc)
        assert proc.returncode == 1, log
        no_traceback(log)
        errors = [line for line in log.splitlines() if "error:" in line]
        assert len(errors) == 1 and "No space left on device" in errors[0], log
        step = assert_checkpoint_loads(run_dir)
        assert 3 <= step < STEPS
        (mount / "filler").unlink()
        proc = start_train(["--resume", str(run_dir), "--threads", "1", "--no-progress"], mount, tmp_path / "r.log")
        log = finish(proc)
        assert proc.returncode == 0, log
        assert_same_run(run_dir, reference())
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_failed_save_in_process_keeps_previous_checkpoint(tmp_path, corpus, monkeypatch, fault):
    """The same in-process, portable: from step 3 on, every write fails (ENOSPC on fsync, or EROFS
    when creating files); train() raises a WriteError naming the run directory, the step-2
    checkpoint is intact, and resuming it ends where an uninterrupted run ends."""
    import tempfile

    import npllama.files
    from npllama.train import TrainConfig, train

    config = dict(data=str(corpus / "corpus.txt"), dim=16, n_layers=1, n_heads=2, vocab_size=300, seq_len=16,
                  batch_size=2, dropout=0.1, eval_interval=0, sample_tokens=0, steps=6, checkpoint_interval=1,
                  seed=5)
    ref = train(TrainConfig(**config, out_dir=str(tmp_path / "ref")), progress=False, verbose=False)
    assert ref.step == 6

    real_fsync, real_mkstemp, real_mkdir = os.fsync, tempfile.mkstemp, Path.mkdir

    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def break_writes(step, loss, run):
        if step == 3:
            if fault == "disk full":
                monkeypatch.setattr(npllama.files.os, "fsync", enospc)
            else:
                monkeypatch.setattr(tempfile, "mkstemp", erofs)
                monkeypatch.setattr(Path, "mkdir", erofs)

    run_dir = tmp_path / "run"
    with pytest.raises(WriteError) as excinfo:
        train(TrainConfig(**config, out_dir=str(run_dir)), progress=False, verbose=False, on_step=break_writes)
    monkeypatch.setattr(npllama.files.os, "fsync", real_fsync)
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    message = str(excinfo.value)
    assert str(run_dir) in message and "unchanged" in message, message
    assert isinstance(excinfo.value, NpllamaError) and isinstance(excinfo.value, OSError)
    assert assert_checkpoint_loads(run_dir) == 2
    resumed = train(resume=run_dir, progress=False, verbose=False)
    assert resumed.step == 6
    np.testing.assert_array_equal(npllama.Llama.from_pretrained(run_dir).flat_params,
                                  npllama.Llama.from_pretrained(tmp_path / "ref").flat_params)
    assert step_losses(run_dir) == step_losses(tmp_path / "ref")


# ---- divergence ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_non_finite_weights_are_never_saved(tmp_path, corpus):
    """lr=1e300 overflows the float32 weights in the first step while its loss is still finite: the
    save must refuse them (a checkpoint that loads is one with finite weights)."""
    from npllama.train import TrainConfig, TrainingDiverged, train
    config = TrainConfig(data=str(corpus / "corpus.txt"), dim=16, n_layers=1, n_heads=2, vocab_size=300, seq_len=16,
                         batch_size=2, eval_interval=0, sample_tokens=0, steps=4, checkpoint_interval=1,
                         warmup_steps=0, lr=1e300, grad_clip=0.0, out_dir=str(tmp_path / "run"))
    with pytest.raises(TrainingDiverged, match="diverged at step 1: the weights are not finite.*no checkpoint"):
        train(config, progress=False, verbose=False)
    assert saved_step(tmp_path / "run") == 0


@pytest.mark.slow
def test_huge_lr_diverges_after_some_good_checkpoints(corpus):
    proc = start_train(["--data", "corpus.txt", *TINY, "--steps", "40", "--checkpoint-interval", "2",
                        "--warmup-steps", "0", "--lr", "50", "--grad-clip", "0", "--out-dir", "nan50"], corpus,
                       corpus / "nan50.log")
    log = finish(proc)
    assert proc.returncode == 1, log
    no_traceback(log)
    error = [line for line in log.splitlines() if "error:" in line][0]
    run_dir = corpus / "nan50"
    step = saved_step(run_dir)
    assert step >= 2, log
    bad_step = int(error.split("diverged at step ")[1].split(":")[0])
    assert bad_step > step and f"(step {step})" in error, error
    assert assert_checkpoint_loads(run_dir) == step
    state = json.loads((run_dir / "training_state.json").read_text())
    from npllama.train import file_sha256
    for name, digest in state["files_sha256"].items():
        assert file_sha256(run_dir / name) == digest   # the files are those of that checkpoint
