"""Data-parallel training under `mpiexec -n 2` (npllama/train/distributed.py): the same numbers as
one process, resume, faults, and rank-0-only outputs.  Skipped when mpi4py or mpiexec is missing
(`pip install -e ".[mpi]"` brings both)."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npllama.data import load_text
from npllama.formats.safetensors import read_safetensors
from npllama.train import read_metrics
from npllama.train.distributed import GradientReduction, World

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mpi_worker.py"
MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
                               reason="mpi4py and mpiexec are not installed (pip install -e '.[mpi]')")
ENV = {**os.environ, "NPLLAMA_THREADS": "1", "RAYON_NUM_THREADS": "1"}
for _var in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
    ENV.pop(_var, None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(load_text(None)[:60_000], encoding="utf-8")
    return path


def options(corpus, out_dir, **over):
    opts = dict(data=corpus, preset="tiny", vocab_size=300, seq_len=32, batch_size=8, steps=6, dtype="float64",
                eval_interval=0, final_eval_tokens=200, sample_tokens=0, checkpoint_interval=2, out_dir=out_dir)
    opts.update(over)
    return ["--no-progress", "--threads", "1"] + [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]


def run(ranks, args, fault=("none", 0, 0), timeout=240):
    """`npllama train ARGS` on ``ranks`` processes (1: no mpiexec); returns the CompletedProcess."""
    train = [sys.executable, str(WORKER), *map(str, fault), "--", *args]
    cmd = train if ranks == 1 else [MPIEXEC, "-n", str(ranks), *train]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def losses(run_dir):
    return np.array([r["loss"] for r in read_metrics(run_dir) if "loss" in r])


def weights(run_dir):
    tensors = read_safetensors(Path(run_dir) / "model.safetensors")
    return np.concatenate([a.ravel() for _, (_, a) in sorted(tensors.items())])


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- the model's hooks and the reduction, in one process ----------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_backward_reports_each_gradient_range_once_final_and_scales_by_dloss(rng, tie):
    import npllama
    cfg = npllama.LlamaConfig(vocab_size=40, dim=16, n_layers=3, n_heads=2, hidden_dim=32, max_seq_len=8,
                              tie_embeddings=tie)
    model = npllama.Llama(cfg, seed=1, dtype=np.float64)
    x, y = rng.integers(0, 40, (2, 8)), rng.integers(0, 40, (2, 8))
    y[0, :3] = -100
    loss, _ = model.loss_and_grad(x, y)
    full = model.flat_grads.copy()
    reported = []
    scaled_loss, _ = model.loss_and_grad(
        x, y, dloss=0.25, on_grads_ready=lambda lo, hi: reported.append((lo, hi, model.flat_grads[lo:hi].copy())))
    assert scaled_loss == loss
    assert [hi for _, hi, _ in reported] == [model.flat_grads.size] + [lo for lo, _, _ in reported[:-1]]
    assert reported[-1][0] == 0 and len(reported) == cfg.n_layers + 2
    for lo, hi, at_report in reported:   # final when reported: what the end of the backward holds
        np.testing.assert_array_equal(at_report, model.flat_grads[lo:hi])
    np.testing.assert_allclose(model.flat_grads, 0.25 * full, rtol=1e-14, atol=1e-18)


def test_gradient_reduction_of_one_process_accumulates_ranges_in_backward_order(rng):
    grads, micro = rng.normal(size=10), rng.normal(size=10)
    expected = grads + micro
    reduction = GradientReduction(World(), grads, accumulate_from=micro)
    for lo, hi in [(7, 10), (3, 7), (0, 3)]:
        reduction.ready(lo, hi)
    reduction.finish()
    np.testing.assert_array_equal(grads, expected)
    with pytest.raises(ValueError, match="out of order"):
        GradientReduction(World(), grads).ready(0, 3)


def test_one_process_never_loads_mpi(corpus, tmp_path):
    argv = ["train", *options(corpus, tmp_path / "run", steps=1)]
    code = ("import sys, npllama.cli\n"
            f"assert npllama.cli.main({argv!r}) == 0\n"
            "assert not any(m.startswith('mpi4py') for m in sys.modules), 'mpi4py was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# ---- under mpiexec ------------------------------------------------------------------------------
@needs_mpi
def test_two_ranks_equal_one_process_in_float64_and_only_rank_0_speaks(corpus, tmp_path):
    one = run(1, options(corpus, tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = run(2, options(corpus, tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    # per-step losses and final weights equal one process's to rounding
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-12, atol=0)
    assert relative(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-12
    # rank 0 alone prints and writes: each line once, one record per step, communication recorded
    for line in ("model:", "data parallel over 2 MPI ranks", "done:"):
        assert two.stderr.count(line) == 1, two.stderr
    steps = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    n_params = weights(tmp_path / "two").size
    assert all(r["comm_bytes"] == 8 * n_params and r["comm_wait_seconds"] >= 0 for r in steps)
    state = json.loads((tmp_path / "two" / "training_state.json").read_text())
    assert state["ranks"]["size"] == 2 and len(state["ranks"]["dropout_rngs"]) == 2


@needs_mpi
@pytest.mark.slow
def test_four_ranks_with_accumulation_equal_one_process(corpus, tmp_path):
    # global batch 8 windows: one process 2 x 4; four ranks take 2 windows each
    one = run(1, options(corpus, tmp_path / "one", batch_size=4, grad_accum=2, steps=4))
    four = run(4, options(corpus, tmp_path / "four", batch_size=4, grad_accum=2, steps=4))
    assert one.returncode == 0 and four.returncode == 0, one.stderr + four.stderr
    np.testing.assert_allclose(losses(tmp_path / "four"), losses(tmp_path / "one"), rtol=1e-12, atol=0)
    assert relative(weights(tmp_path / "four"), weights(tmp_path / "one")) <= 1e-12


@needs_mpi
@pytest.mark.slow
def test_two_ranks_equal_one_process_in_float32_to_rounding(corpus, tmp_path):
    # the same sums in another order: measured 5e-9 (losses, summed in float64) and 2e-7 (weights)
    one = run(1, options(corpus, tmp_path / "one", dtype="float32", steps=10))
    two = run(2, options(corpus, tmp_path / "two", dtype="float32", steps=10))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-6, atol=0)
    assert relative(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-5


@needs_mpi
@pytest.mark.slow
def test_lora_on_two_ranks_equals_one_process(corpus, tmp_path):
    base = run(1, options(corpus, tmp_path / "base", steps=1, checkpoint_interval=0))
    assert base.returncode == 0, base.stderr
    lora = dict(init_from=tmp_path / "base", lora_rank=4, steps=4)
    one = run(1, options(corpus, tmp_path / "one", **lora))
    two = run(2, options(corpus, tmp_path / "two", **lora))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-12, atol=0)
    adapters = [np.concatenate([a.ravel() for _, (_, a) in sorted(read_safetensors(d / "adapter_model.safetensors")
                                                                 .items())]) for d in (tmp_path / "two", tmp_path / "one")]
    assert relative(*adapters) <= 1e-12


@needs_mpi
def test_too_small_a_batch_for_the_ranks_is_one_line(corpus, tmp_path):
    proc = run(2, options(corpus, tmp_path / "run", batch_size=1))
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [
        "npllama: error: a global batch of 1 windows (batch_size x grad_accum) cannot feed 2 ranks; give every "
        "rank at least one window"]


@needs_mpi
def test_killed_rank_ends_the_job_and_the_checkpoint_resumes_bit_for_bit(corpus, tmp_path):
    unbroken = run(2, options(corpus, tmp_path / "unbroken"))
    assert unbroken.returncode == 0, unbroken.stderr
    t0 = time.monotonic()
    killed = run(2, options(corpus, tmp_path / "run"), fault=("kill", 1, 3))
    assert killed.returncode != 0 and time.monotonic() - t0 < 60
    assert "signal 9" in killed.stdout + killed.stderr
    assert json.loads((tmp_path / "run" / "training_state.json").read_text())["step"] == 2
    shutil.copytree(tmp_path / "run", tmp_path / "run_on_one")
    # the same number of ranks: bit for bit
    resumed = run(2, ["--no-progress", "--threads", "1", "--resume", str(tmp_path / "run")])
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(losses(tmp_path / "run"), losses(tmp_path / "unbroken"))
    np.testing.assert_array_equal(weights(tmp_path / "run"), weights(tmp_path / "unbroken"))
    # one process: the same data order, so the same numbers to rounding
    resumed = run(1, ["--no-progress", "--threads", "1", "--resume", str(tmp_path / "run_on_one")])
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_allclose(losses(tmp_path / "run_on_one"), losses(tmp_path / "unbroken"), rtol=1e-12, atol=0)
    assert relative(weights(tmp_path / "run_on_one"), weights(tmp_path / "unbroken")) <= 1e-12


@needs_mpi
def test_raising_rank_ends_the_job_with_one_message(corpus, tmp_path):
    t0 = time.monotonic()
    proc = run(2, options(corpus, tmp_path / "run"), fault=("raise", 1, 3))
    assert proc.returncode == 1 and time.monotonic() - t0 < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("npllama: error:")]
    assert errors == ["npllama: error: rank 1 of 2: RuntimeError: injected fault after step 3"], proc.stderr
    assert json.loads((tmp_path / "run" / "training_state.json").read_text())["step"] == 2


@needs_mpi
def test_stuck_rank_ends_the_job_after_the_timeout(corpus, tmp_path):
    ENV["NPLLAMA_MPI_TIMEOUT"] = "3"
    try:
        proc = run(2, options(corpus, tmp_path / "run"), fault=("stall", 1, 2), timeout=120)
    finally:
        del ENV["NPLLAMA_MPI_TIMEOUT"]
    assert proc.returncode == 1
    assert "npllama: error: rank 0 of 2: no answer from the other ranks for 3s" in proc.stderr


@needs_mpi
def test_ranks_with_different_settings_are_refused(corpus, tmp_path):
    train = [sys.executable, "-m", "npllama.cli", "train"]
    args = options(corpus, tmp_path / "run")
    proc = subprocess.run([MPIEXEC, "-n", "1", *train, *args, ":", "-n", "1", *train, *args, "--dtype=float32"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("npllama: error: rank 1 differs from rank 0 in --dtype (float32 "
                                                    "instead of float64); every rank must run the same npllama code "
                                                    "and command")
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_ctrl_c_on_mpiexec_saves_and_exits(corpus, tmp_path):
    args = options(corpus, tmp_path / "run", steps=2000, checkpoint_interval=0)
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "npllama.cli", "train", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    step = json.loads((tmp_path / "run" / "training_state.json").read_text())["step"]
    assert 3 <= step < 2000 and stderr.count("SIGINT: stopped at step") == 1
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, step + 1))
