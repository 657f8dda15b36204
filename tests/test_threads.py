"""npllama owns its thread count (engine/threads.py).  `--threads N` is really applied: `npllama train
--threads 1` and `npllama generate --threads 1`, each a real process whose Numba kernels compile
mid-run (a fresh NUMBA_CACHE_DIR), run to the end; the counts recorded from inside the run (npllama's,
and the BLAS's as threadpoolctl sees it) are 1; and the process's CPU time stays near its wall time.
The regime of each kind of work (engine/batch.py) does not depend on which BLAS NumPy has.

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
from npllama.engine.threads import ENV_VAR, blas_threads, get_threads, set_threads, thread_limit

ROOT = Path(__file__).resolve().parents[1]
MAX_CPU_PER_WALL = 1.25
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "RAYON_NUM_THREADS", "NPLLAMA_THREADS")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("threads")
    (d / "corpus.txt").write_text(load_text()[:30000], encoding="utf-8")
    return d


def npllama(args, cwd: Path, cache_dir: Path, name: str):
    """Run `npllama ARGS` with no thread variable inherited and an empty Numba cache; -> (exit code,
    stderr, CPU seconds, wall seconds) of that very process (os.wait4 gives its own rusage)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(NUMBA_CACHE_DIR=str(cache_dir))
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
    assert "compiling kernels (first run only)\n" in err          # said as compiling starts
    state = json.loads((run_dir / "training_state.json").read_text())
    assert state["threads"]["threads"] == 1
    assert state["threads"]["blas"] and all(lib["threads"] == 1 for lib in state["threads"]["blas"])
    assert "threads: 1;" in err and "OpenBLAS" not in err and "[mkl]" not in err
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


def test_thread_limit_in_a_running_process_sets_and_restores_the_counts():
    """`cli.main(["train", "--threads", "1", ...])` from Python, after NumPy started: npllama's count
    and the BLAS's (through threadpoolctl) are set for the command and put back after; no Numba
    variable is touched."""
    np.ones((2, 2)) @ np.ones((2, 2))
    before, blas_before = get_threads(), blas_threads()
    env_before = {var: os.environ.get(var) for var in THREAD_VARS}
    with thread_limit(1):
        assert get_threads() == 1
        assert blas_threads() and all(lib["threads"] == 1 for lib in blas_threads())   # (MKL's sequential: 1 anyway)
        assert os.environ["RAYON_NUM_THREADS"] == "1"        # the tokenizers' pool may not have started
        assert os.environ.get("NUMBA_NUM_THREADS") == env_before["NUMBA_NUM_THREADS"]
    assert get_threads() == before and blas_threads() == blas_before
    assert {var: os.environ.get(var) for var in THREAD_VARS} == env_before


def test_the_thread_count_comes_from_set_threads_then_the_environment(monkeypatch):
    from npllama.engine import threads
    monkeypatch.setitem(threads._setting, "threads", None)
    monkeypatch.setenv(ENV_VAR, "3")
    assert get_threads() == 3
    monkeypatch.setenv(ENV_VAR, "none")
    with pytest.raises(ValueError, match="NPLLAMA_THREADS expects an integer"):
        get_threads()
    monkeypatch.delenv(ENV_VAR)
    assert get_threads() == threads.available_cores()
    with thread_limit(2):
        assert get_threads() == 2
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError):
            set_threads(bad)


def test_npllama_set_threads_is_the_public_name():
    import npllama
    from npllama.engine import threads
    assert npllama.set_threads is threads.set_threads and npllama.get_threads is threads.get_threads


def test_no_kernel_runs_on_numbas_thread_pool():
    """Every npllama kernel shares its work among npllama's own helper threads (run_on_threads), none
    is a Numba parallel kernel: Numba's pool -- an OpenMP runtime that torch may have started before
    npllama with busy-waiting workers (it made a step 1.7x slower) -- runs nothing of npllama's."""
    import importlib
    import pkgutil

    from numba.core.registry import CPUDispatcher

    import npllama
    kernels = {}
    for info in pkgutil.walk_packages(npllama.__path__, "npllama."):
        module = importlib.import_module(info.name)
        kernels.update({f"{info.name}.{name}": value for name, value in vars(module).items()
                        if isinstance(value, CPUDispatcher)})
    assert len(kernels) >= 20, sorted(kernels)   # (the search finds them: attention's, the rows kernels, ...)
    parallel = sorted(name for name, kernel in kernels.items() if kernel.targetoptions.get("parallel"))
    assert not parallel, f"Numba parallel kernels: {parallel}"


def test_a_step_shares_its_work_with_a_helper_thread(monkeypatch):
    """With two threads a training step runs half the batch on npllama's helper thread (from the
    second step of a shape on: the first runs the halves one after the other on the calling thread,
    where the kernels compile); a batch of one sequence instead shares out each matmul's halves and
    each kernel's units (the settings in effect, whatever was imported first)."""
    import threading

    from npllama import Llama, LlamaConfig
    from npllama.engine import pool
    jobs, part_threads = [], []
    original = pool.HelperThreads.run
    monkeypatch.setattr(pool.HelperThreads, "run", lambda self, js: (jobs.append(len(js)), original(self, js))[1])
    part = Llama._loss_and_grad_rows
    monkeypatch.setattr(Llama, "_loss_and_grad_rows",
                        lambda self, *a, **k: (part_threads.append(threading.get_ident()), part(self, *a, **k))[1])
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=48, max_seq_len=128)
    model = Llama(cfg, dtype=np.float32, seed=0).train()
    x = np.random.default_rng(0).integers(0, 64, size=(4, 128))
    with thread_limit(2):
        first, _ = model.loss_and_grad(x, x)
        # one after the other (then the parts' gradients added, a slice on each thread)
        assert jobs == [2] and len(part_threads) == 2 and len(set(part_threads)) == 1
        jobs.clear(), part_threads.clear()
        again, _ = model.loss_and_grad(x, x)
        assert jobs == [2, 2] and len(set(part_threads)) == 2 and threading.get_ident() in part_threads
        assert again == first
        jobs.clear()
        model.loss_and_grad(x[:1], x[:1], copy=False)
    assert len(jobs) >= 10 and all(n == 2 for n in jobs), jobs


@pytest.mark.parametrize("blas", ["as loaded", "one threadpoolctl does not know"])
def test_the_regime_is_the_engines_whatever_the_blas(monkeypatch, blas):
    """A training step runs as batch parts, a forward as a row split, whichever BLAS NumPy has: inside
    both the BLAS runs on one thread per call (threadpoolctl's view), after them on npllama's count.
    With a BLAS threadpoolctl cannot see (none of its libraries found), the regimes are the same."""
    from npllama import Llama, LlamaConfig
    from npllama.engine import batch, matmul, threads
    if blas != "as loaded":
        monkeypatch.setattr(threads, "_blas_libraries", lambda: [])
    seen = []
    original_run_parts = batch.run_parts

    def run_parts(run_part, parts, compiled=True):
        seen.append(("parts", len(parts), [lib["threads"] for lib in blas_threads()] if blas == "as loaded" else None))
        return original_run_parts(run_part, parts, compiled)
    monkeypatch.setattr("npllama.model.run_parts", run_parts)
    original_matmuls = matmul.matmuls

    def matmuls(*products):
        seen.append(("split", matmul.split_threads()))
        return original_matmuls(*products)
    monkeypatch.setattr("npllama.model.matmuls", matmuls)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=48, max_seq_len=64)
    model = Llama(cfg, dtype=np.float32, seed=0)
    x = np.random.default_rng(0).integers(0, 64, size=(4, 64))
    with thread_limit(2):
        model.loss_and_grad(x, x, copy=False)
        kind, n_parts, blas_counts = seen[0]
        assert (kind, n_parts) == ("parts", 2), seen
        if blas == "as loaded":
            assert blas_counts and set(blas_counts) == {1}, seen
        seen.clear()
        model.forward(x)
        assert seen == [("split", 2)]                    # the output projection: row blocks on 2 threads
        if blas == "as loaded":
            assert blas_threads() and all(lib["threads"] == 2 or lib["threading"] == "sequential"
                                          for lib in blas_threads())


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
    # A child made by fork() inherits npllama's helper threads' pool without its threads: it must
    # start a new one, not wait forever on work handed to a thread that does not exist.
    env = dict(os.environ, NPLLAMA_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", FORK_PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_kernels_compile_for_512_bit_vectors_unless_the_cpu_features_are_set():
    # On an AVX-512 CPU npllama drops LLVM's preference for 256-bit vectors (engine/jit.py) in
    # Numba's setting, not in the environment; a NUMBA_CPU_FEATURES set by the user is left as it is.
    import llvmlite.binding as llvm
    probe = ("import os, numba; import npllama.engine.jit; "
             "from numba.core.registry import cpu_target; "
             "print(cpu_target.target_context.codegen()._tm_features); print(os.environ.get('NUMBA_CPU_FEATURES'))")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"}
    features, seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                    check=True).stdout.splitlines()
    assert seen == "None"                        # (the processes npllama starts inherit nothing)
    host = llvm.get_host_cpu_features()
    if host.get("avx512f", False):
        assert features == host.flatten() + ",-prefer-256-bit"
    else:
        assert features == host.flatten()
    mine = "+sse2,+avx"
    features, seen = subprocess.run([sys.executable, "-c", probe], env=dict(env, NUMBA_CPU_FEATURES=mine),
                                    capture_output=True, text=True, check=True).stdout.splitlines()
    assert features == seen == mine
