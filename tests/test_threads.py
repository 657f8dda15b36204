"""`--threads N` is really applied: `npllama train --threads 1` and `npllama generate --threads 1`, each
a real process whose Numba kernels compile mid-run (a fresh NUMBA_CACHE_DIR), run to the end; the
thread counts OpenBLAS and Numba report from inside the run are 1; and the process's CPU time
stays near its wall time.

The CPU bound: one thread busy at a time, plus what the OS and the idle threads cost, so CPU time /
wall time <= MAX_CPU_PER_WALL = 1.25 (two busy threads on two cores give ~1.7-2; a machine loaded
by other work only lowers the ratio, so the bound does not depend on it).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npllama.data import load_text
from npllama.threads import live_thread_counts, openblas_threads_api, thread_limit

ROOT = Path(__file__).resolve().parents[1]
MAX_CPU_PER_WALL = 1.25
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "RAYON_NUM_THREADS")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("threads")
    (d / "corpus.txt").write_text(load_text()[:30000], encoding="utf-8")
    return d


def npllama(args, cwd: Path, cache_dir: Path, name: str):
    """Run `npllama ARGS` with no thread variable inherited and an empty Numba cache; -> (exit code,
    stderr, CPU seconds, wall seconds) of that very process (os.wait4 gives its own rusage)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), NUMBA_CACHE_DIR=str(cache_dir))
    with open(cwd / f"{name}.out", "wb") as out, open(cwd / f"{name}.err", "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "npllama.cli", *args], cwd=cwd, env=env, stdout=out,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, (cwd / f"{name}.err").read_text(), usage.ru_utime + usage.ru_stime, wall


def compiled_files(cache_dir: Path) -> int:
    return sum(1 for _ in cache_dir.rglob("*.nbc"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_train_threads_1_runs_on_one_core(workdir, dtype):
    cache = workdir / f"numba-cache-{dtype}"
    run_dir = workdir / f"run-{dtype}"
    code, err, cpu, wall = npllama(
        ["train", "--threads", "1", "--dtype", dtype, "--preset", "tiny", "--data", "corpus.txt", "--vocab-size",
         "300", "--context", "32", "--batch-size", "4", "--steps", "12", "--eval-interval", "6", "--eval-tokens",
         "200", "--sample-tokens", "8", "--out-dir", str(run_dir), "--no-progress"], workdir, cache, f"train-{dtype}")
    assert code == 0, err
    assert "Traceback" not in err and "done: 12 steps" in err, err
    assert compiled_files(cache) > 0            # the kernels were compiled by this run, threads running
    state = json.loads((run_dir / "training_state.json").read_text())
    assert state["threads"] == {"openblas": 1, "numba": 1}
    assert "threads: OpenBLAS 1, Numba 1" in err
    print(f"train --threads 1 --dtype {dtype}: cpu {cpu:.1f} s / wall {wall:.1f} s = {cpu / wall:.2f}")
    assert cpu / wall <= MAX_CPU_PER_WALL, f"{cpu:.1f} s CPU in {wall:.1f} s wall"


@pytest.mark.slow
def test_generate_threads_1_runs_on_one_core(workdir):
    from npllama import Llama, LlamaConfig, Tokenizer

    model_dir = workdir / "model"
    tokenizer = Tokenizer.train((workdir / "corpus.txt").read_text(), 300)
    model = Llama(LlamaConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192,
                              max_seq_len=64), seed=0)
    model.tokenizer = tokenizer
    model.save_pretrained(model_dir)
    cache = workdir / "numba-cache-generate"
    code, err, cpu, wall = npllama(["generate", str(model_dir), "--threads", "1", "--prompt", "ROMEO:",
                                    "--max-new-tokens", "30", "--temperature", "0.8", "--seed", "1"],
                                   workdir, cache, "generate")
    assert code == 0, err
    assert "30 new tokens" in err, err
    assert compiled_files(cache) > 0
    print(f"generate --threads 1: cpu {cpu:.1f} s / wall {wall:.1f} s = {cpu / wall:.2f}")
    assert cpu / wall <= MAX_CPU_PER_WALL, f"{cpu:.1f} s CPU in {wall:.1f} s wall"


def test_thread_limit_in_a_running_process_sets_and_restores_the_live_counts():
    """`cli.main(["train", "--threads", "1", ...])` from Python, after NumPy and Numba started: the
    environment can no longer reach them (and NUMBA_NUM_THREADS must not change), so the live counts
    are set for the command and put back after."""
    if openblas_threads_api() is None:
        pytest.skip("NumPy is not on OpenBLAS here")
    np.ones((2, 2)) @ np.ones((2, 2))
    before = live_thread_counts()
    env_before = {var: os.environ.get(var) for var in THREAD_VARS}
    with thread_limit(1):
        assert live_thread_counts() == {"openblas": 1, "numba": 1}
        assert os.environ.get("NUMBA_NUM_THREADS") == env_before["NUMBA_NUM_THREADS"]
        assert os.environ["RAYON_NUM_THREADS"] == "1"        # the tokenizers' pool may not have started
    assert live_thread_counts() == before
    assert {var: os.environ.get(var) for var in THREAD_VARS} == env_before


THREADING_LAYER_PROBE = """
import ctypes, sys
if sys.argv[1] == "gomp-first":
    ctypes.CDLL("libgomp.so.1")            # as `import torch` does: an OpenMP runtime already loaded
import numpy as np
import numba
from npllama.layers.rmsnorm import rmsnorm_forward_kernel
x = np.ones((4, 8))
rmsnorm_forward_kernel(x, np.ones(8), 1e-5, np.empty_like(x), np.empty(4))
print(numba.threading_layer())
"""


def _tbb_layer_available() -> bool:
    """Whether Numba can load its TBB threading layer here (the ``tbb`` package, a version it takes)."""
    probe = ("from numba.np.ufunc.parallel import _check_tbb_version_compatible as check; check(); "
             "from numba.np.ufunc import tbbpool")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.parametrize("order", ["gomp-first", "npllama-alone"])
def test_numba_avoids_an_openmp_runtime_started_before_npllama(tmp_path, order):
    """An OpenMP runtime loaded before npllama has read OMP_WAIT_POLICY without npllama's PASSIVE;
    Numba must then not share it (its spinning workers made a step 1.7x slower beside torch), and
    takes TBB's pool when it can (Numba's own workqueue otherwise: slower by a few %)."""
    try:
        import ctypes
        ctypes.CDLL("libgomp.so.1")
    except OSError:
        pytest.skip("no libgomp.so.1 on this machine to stand in for torch's OpenMP runtime")
    if order == "npllama-alone":
        layer = "omp"
    else:
        layer = "tbb" if _tbb_layer_available() else "workqueue"
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY", "OMP_WAIT_POLICY")}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", THREADING_LAYER_PROBE, order], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == layer


FORK_PROBE = """
import os, sys, time
import numpy as np
from npllama import Llama, LlamaConfig
cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=48, max_seq_len=128)
model = Llama(cfg, dtype=np.float32, seed=0).train()
x = np.random.default_rng(0).integers(0, 64, size=(4, 128))
loss, _ = model.loss_and_grad(x, x, copy=False)      # starts the matmul and attention thread pools
pid = os.fork()
if pid == 0:
    again, _ = model.loss_and_grad(x, x, copy=False)
    os._exit(0 if again == loss else 3)
for _ in range(600):
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.1)
os.kill(pid, 9)
sys.exit("the forked child hung")
"""


def test_a_forked_child_trains_with_new_thread_pools(tmp_path):
    # A child made by fork() inherits npllama's thread pools without their threads: it must start
    # new ones, not wait forever on work handed to a thread that does not exist.  (Numba's OpenMP
    # layer refuses fork() once it has run; TBB's, which Numba takes beside torch, allows it.)
    if not _tbb_layer_available():
        pytest.skip("Numba's TBB threading layer is not available (the tbb package)")
    env = dict(os.environ, NUMBA_THREADING_LAYER="tbb", NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", FORK_PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
