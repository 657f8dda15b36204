"""The warm-up (npllama/warmup.py): its list of kernel versions is complete -- after a warm-up, a
default training run (step-0 evaluation and sample, steps, final evaluation and sample) calls no
kernel version that is not listed -- each kernel is compiled by one process only, a first run
starts its second process only when it helps, and `npllama warmup` fills an empty cache."""
import json
import os
import subprocess
import sys
import threading
import time
import pytest

from npllama import warmup
from npllama.engine import threads

ENV = dict(os.environ)   # (conftest puts this checkout's src/ on the subprocesses' PYTHONPATH)

# In a process of its own (a process that ran other tests holds versions they compiled): every
# version of every npllama kernel after a warm-up in this process, then after a training run.
VERSIONS_AFTER_A_RUN = """
import json, sys, tempfile
from numba.core.dispatcher import Dispatcher
from npllama import warmup
from npllama.train import TrainConfig, train

def versions():
    found = set()
    for name, module in list(sys.modules.items()):
        if name.startswith("npllama"):
            for kernel in vars(module).values():
                if isinstance(kernel, Dispatcher):
                    where = kernel.py_func.__module__ + "." + kernel.py_func.__qualname__
                    found.update((where, str(s)) for s in kernel.signatures)
    return found

dtype = sys.argv[1]
warmup.compile_claimed(warmup.kernel_units([dtype]), __import__("pathlib").Path(tempfile.mkdtemp()))
listed = versions()
with tempfile.TemporaryDirectory() as tmp:
    train(TrainConfig(steps=2, dtype=dtype, out_dir=tmp + "/run", eval_tokens=2048, final_eval_tokens=2048,
                      sample_tokens=8), progress=False, verbose=False)
print(json.dumps({"listed": len(listed), "not_listed": sorted(versions() - listed)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_default_training_run_calls_only_listed_kernel_versions(dtype):
    proc = subprocess.run([sys.executable, "-c", VERSIONS_AFTER_A_RUN, dtype], env={**ENV, "NPLLAMA_THREADS": "2"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["listed"] >= 20
    assert not result["not_listed"], (
        "a training run called kernel versions that no module's kernel_versions() lists (add them there, "
        "so that npllama warmup and a first run compile them ahead):\n" +
        "\n".join(" ".join(v) for v in result["not_listed"]))


class FakeKernel:
    """Stands for a Numba kernel: records which thread compiled which versions."""

    def __init__(self, log):
        self.log = log

    def compile(self, signature):
        time.sleep(0.002)
        self.log.append((threading.current_thread().name, self, signature))


def test_each_kernel_is_compiled_by_one_process_with_all_its_versions(tmp_path):
    log = []
    units = [(FakeKernel(log), [("a",), ("b",)]) for _ in range(40)]
    workers = [threading.Thread(target=warmup.compile_claimed, args=(units, tmp_path, from_end), name=str(from_end))
               for from_end in (False, True)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    by_kernel = {}
    for who, kernel, signature in log:
        by_kernel.setdefault(kernel, []).append((who, signature))
    assert set(by_kernel) == {k for k, _ in units}
    for compiled in by_kernel.values():
        assert sorted(s for _, s in compiled) == [("a",), ("b",)] and len({who for who, _ in compiled}) == 1
    assert {who for who, _, _ in log} == {"False", "True"}   # both took some
    # the one from the start took a prefix of the list, the other the rest
    first = [units.index(next(u for u in units if u[0] is k)) for who, k, s in log if who == "False" and s == ("a",)]
    assert first == list(range(len(first)))


def test_the_registry_lists_every_kernel_module_with_versions():
    units = warmup.kernel_units(["float32", "float64"])
    kernels = {kernel for kernel, _ in units}
    assert len(kernels) == len(units)
    for module in warmup.KERNEL_MODULES:
        assert module.kernel_versions("float32"), module.__name__
    versions = {(kernel, sig) for kernel, sigs in units for sig in sigs}
    assert len(versions) == sum(len(sigs) for _, sigs in units)   # no version twice
    # float32 and float64 differ, the helper threads' waits do not
    assert {str(s[0]) for k, sigs in units if k.py_func.__name__ == "swiglu_forward_rows" for s in sigs} == {
        "array(float32, 2d, C)", "array(float64, 2d, C)"}


def test_a_first_run_starts_a_second_process_only_when_it_helps(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(warmup.ENV_SWITCH, "1")
    with threads.thread_limit(2):
        assert isinstance(warmup.first_run_warm_up("float32", fresh=False, processes=1), warmup.NoWarmUp)
        assert isinstance(warmup.first_run_warm_up("float32", fresh=True, processes=2), warmup.NoWarmUp)
        monkeypatch.setenv(warmup.ENV_SWITCH, "0")
        assert isinstance(warmup.first_run_warm_up("float32", fresh=True, processes=1), warmup.NoWarmUp)
        monkeypatch.setenv(warmup.ENV_SWITCH, "1")
        warmup.marker_path("float32").write_text("{}")
        assert isinstance(warmup.first_run_warm_up("float32", fresh=True, processes=1), warmup.NoWarmUp)
        assert not warmup.marker_path("float64").exists()   # (markers are per dtype)
    with threads.thread_limit(1):
        assert isinstance(warmup.first_run_warm_up("float64", fresh=True, processes=1), warmup.NoWarmUp)


@pytest.mark.slow
def test_warmup_command_fills_an_empty_cache(tmp_path):
    """`npllama warmup` on two processes compiles every listed version into an empty Numba cache:
    a second one finds them all there (no compiling)."""
    env = {**ENV, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    cmd = [sys.executable, "-m", "npllama.cli", "warmup", "--jobs", "2"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "for float32" in first.stdout and "on 2 processes" in first.stdout, first.stdout
    marker = [p.name for p in (tmp_path / "numba").iterdir() if p.name.startswith("npllama-warm-")]
    assert len(marker) == 1
    again = subprocess.run(cmd[:-2] + ["--jobs", "1"], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "compiling here 0.0s" in again.stdout, again.stdout
