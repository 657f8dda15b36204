"""Compiling a training run's kernels ahead, on two processes at once: ``npllama warmup``, and a
first training run by itself.

Numba compiles a version of a kernel (one per argument types) on its first call, one at a time in a
process (its compiler lock), and saves it in its on-disk cache (engine/jit.py), where any process
that asks for it later loads it instead.  A training run calls ~20 versions; compiling them is most
of a first run's start-up (benchmarks/README.md).  Each module of kernels lists the versions a
training run calls, ``kernel_versions(dtype)`` (the modules: ``KERNEL_MODULES``;
tests/test_warmup.py fails when a default training run calls one that is not listed), so they can
be compiled before the run needs them, by several processes at once:

* ``npllama warmup`` compiles them on ``--jobs`` processes (default: npllama's thread count), for
  instance once after installing;
* a first training run (``first_run_warm_up``: no marker for its dtype yet, two threads or more, one
  process) starts a second process that compiles them from the start of the list while the run
  reads and tokenizes its corpus; then the run compiles them from the end itself until the two meet
  (``WarmUp.finish``), and its evaluations and steps load them from the cache.

Each kernel is compiled by one process: the first that creates the file named after the kernel's
place in the list, in a directory the processes share (``compile_claimed``); all versions of a
kernel go to the same process (two processes saving versions of one kernel at once could each
write its cache index without the other's).  A marker in Numba's cache directory (``marker_path``)
says that a warm-up finished for this dtype, npllama source, Numba, Python and CPU features; with
it a run starts no second process.  ``NPLLAMA_WARMUP=0`` switches a first run's warm-up off.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba

from . import optim
from .caches import numba_cache_dir
from .engine import pool
from .engine.jit import CompileClock
from .engine.threads import get_threads
from .layers import attention, cross_entropy, decode_step, embedding, kv_cache, rmsnorm, rope, swiglu

# The modules whose kernels a training run calls, the longest to compile first (a first run's
# second process, which starts before the run compiles anything, takes them from the start).
KERNEL_MODULES = (attention, optim, cross_entropy, decode_step, kv_cache, rmsnorm, rope, swiglu, embedding, pool)
PACKAGE_DIR = Path(__file__).resolve().parent
ENV_SWITCH = "NPLLAMA_WARMUP"


def kernel_units(dtypes) -> list[tuple[object, list[tuple]]]:
    """(kernel, its versions' argument types) for every kernel a training run of ``dtypes`` calls,
    in KERNEL_MODULES' order."""
    units = {}
    for dtype in dtypes:
        for module in KERNEL_MODULES:
            for kernel, signature in module.kernel_versions(dtype):
                versions = units.setdefault(kernel, [])
                if signature not in versions:
                    versions.append(signature)
    return list(units.items())


def compile_claimed(units, claims: Path, from_end: bool = False) -> int:
    """Compile (or load from Numba's cache) the versions of every kernel of ``units`` that no other
    process sharing the directory ``claims`` has claimed, in the list's order or ``from_end``;
    returns how many kernels this process took."""
    taken = 0
    for i in (reversed(range(len(units))) if from_end else range(len(units))):
        try:
            os.close(os.open(claims / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        kernel, signatures = units[i]
        for signature in signatures:
            kernel.compile(signature)
        taken += 1
    return taken


def marker_path(dtype) -> Path:
    """The file that says a warm-up of ``dtype`` finished, in Numba's cache directory, named by what
    the cached versions depend on: npllama's source files, Numba, Python, the CPU features."""
    stamps = sorted((str(p.relative_to(PACKAGE_DIR)), p.stat().st_mtime_ns, p.stat().st_size)
                    for p in PACKAGE_DIR.rglob("*.py"))
    key = json.dumps([str(dtype), stamps, str(PACKAGE_DIR), numba.__version__, sys.version,
                      numba.core.config.CPU_FEATURES or ""])
    return numba_cache_dir() / f"npllama-warm-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class WarmUp:
    """A warm-up under way: ``jobs - 1`` second processes compiling from the start of the list
    (started here), this process from the end (``finish``).  As a context manager: on leaving, a
    second process still running is stopped and the claims removed."""

    def __init__(self, dtypes, jobs: int):
        self.dtypes = tuple(str(d) for d in dtypes)
        self.units = kernel_units(self.dtypes)
        self.claims = Path(tempfile.mkdtemp(prefix="npllama-warmup-"))
        env = dict(os.environ, NPLLAMA_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_DIR.parent), *filter(None, [env.get("PYTHONPATH")])])
        self.helpers = [subprocess.Popen([sys.executable, "-m", "npllama.warmup", str(self.claims), *self.dtypes],
                                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
                        for _ in range(jobs - 1)]

    def finish(self, compiling: CompileClock | None = None, timeout: float = 600.0) -> bool:
        """Compile from the end of the list until the other processes' claims are reached, wait for
        them (the seconds waited count as ``compiling.elsewhere``), and leave the marker; returns
        whether every process did its part.  What did not get compiled compiles when it is called."""
        compile_claimed(self.units, self.claims, from_end=True)
        t0, ok = time.monotonic(), True
        for helper in self.helpers:
            try:
                ok = helper.wait(timeout) == 0 and ok
            except subprocess.TimeoutExpired:
                ok = False
        self.__exit__()
        if compiling is not None:
            compiling.elsewhere += time.monotonic() - t0
        if ok:
            for dtype in self.dtypes:
                try:
                    marker = marker_path(dtype)
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(json.dumps({"dtype": dtype, "kernels": len(self.units)}) + "\n")
                except OSError:
                    pass   # (no marker: the next run warms up again, and finds everything cached)
        return ok

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for helper in self.helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
        shutil.rmtree(self.claims, ignore_errors=True)
        return False


class NoWarmUp:
    """What ``first_run_warm_up`` gives when there is nothing to do."""

    def finish(self, compiling=None, timeout=None) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def first_run_warm_up(dtype, fresh: bool, processes: int) -> WarmUp | NoWarmUp:
    """A second process compiling the kernels of a run of ``dtype`` when it helps: a fresh run
    (``fresh``) in one process (``processes``; MPI's ranks each compile on a core of their own
    anyway), two threads or more (``--threads 1`` asks for one core), no marker for ``dtype`` yet,
    and not switched off (NPLLAMA_WARMUP=0)."""
    if (not fresh or processes > 1 or get_threads() < 2 or os.environ.get(ENV_SWITCH, "1") == "0"
            or marker_path(dtype).exists()):
        return NoWarmUp()
    return WarmUp([dtype], jobs=2)


# ---- npllama warmup -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float64"), default=["float32"],
                        help="the dtypes of the runs to compile for (default: float32, what npllama train uses)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="processes compiling at once (default: npllama's thread count, --threads)")


def run(args: argparse.Namespace) -> int:
    jobs = max(1, args.jobs if args.jobs is not None else get_threads())
    t0 = time.monotonic()
    with CompileClock() as compiling, WarmUp(args.dtype, jobs) as warm_up:
        ok = warm_up.finish(compiling)
    versions = sum(len(signatures) for _, signatures in warm_up.units)
    print(f"warm-up: {versions} versions of {len(warm_up.units)} kernels for {', '.join(warm_up.dtypes)} in "
          f"{time.monotonic() - t0:.1f}s on {jobs} process{'es' if jobs > 1 else ''} (compiling here "
          f"{compiling.seconds - compiling.elsewhere:.1f}s, waiting for the others {compiling.elsewhere:.1f}s); "
          f"Numba's cache: {numba_cache_dir()}")
    if not ok:
        print("npllama: warning: a compiling process failed: what it did not compile compiles on first use",
              file=sys.stderr)
    return 0


if __name__ == "__main__":   # a second process of a warm-up: python -m npllama.warmup CLAIMS DTYPE...
    compile_claimed(kernel_units(sys.argv[2:]), Path(sys.argv[1]))
