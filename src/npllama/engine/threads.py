"""npllama's thread count: one setting for its own threads and for the BLAS under NumPy.

The count comes from, in order: ``set_threads(n)`` (``npllama.set_threads``, what ``--threads N``
calls), the environment variable ``NPLLAMA_THREADS``, or the cores this process may run on.  It
sizes npllama's helper threads (engine/pool.py: a step's kernels and split matmuls run on that
many threads) and the BLAS that NumPy's products run on, whichever it is (OpenBLAS, MKL, BLIS,
Accelerate): ``threadpoolctl`` sets its count once NumPy is loaded.  Inside the engine's passes
the BLAS runs on one thread per call and npllama shares the products out itself (engine/matmul.py).

Numba's own thread pool is not used (no kernel is ``parallel=True``), so its count does not matter.
The tokenizers library's pool (Rust's rayon) reads ``RAYON_NUM_THREADS`` at its first parallel
call; ``set_threads`` sets that variable too, the one way to reach it.

This module imports neither NumPy nor Numba at its top: ``import npllama`` and the command line
load it first.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading

ENV_VAR = "NPLLAMA_THREADS"
TOKENIZERS_ENV_VAR = "RAYON_NUM_THREADS"

_setting = {"threads": None}     # set_threads's count; None: NPLLAMA_THREADS or the cores
_this_thread = threading.local()  # .alone: this thread runs its work by itself (a batch part)
_blas = {"controller": None, "modules": 0}


@functools.cache
def available_cores() -> int:
    """The cores this process may run on (asked once)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # (macOS, Windows)
        return os.cpu_count() or 1


def check_threads(value, source="threads") -> int:
    """``value`` as a thread count, or a ValueError naming ``source``."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} expects an integer, got {str(value)[:50]!r}") from None
    if n < 1 or (not isinstance(value, str) and n != value):
        raise ValueError(f"{source} must be a whole number >= 1, got {value!r}")
    return n


def get_threads() -> int:
    """How many threads npllama's work runs on (1 on a thread running a batch part by itself)."""
    if getattr(_this_thread, "alone", False):
        return 1
    n = _setting["threads"]
    if n is None:
        env = os.environ.get(ENV_VAR)
        n = check_threads(env, ENV_VAR) if env else available_cores()
    return n


def set_threads(n: int) -> None:
    """Run npllama on ``n`` threads: its helper threads, and the BLAS under NumPy (now if NumPy is
    loaded, else as soon as npllama's engine loads it)."""
    _setting["threads"] = check_threads(n)
    os.environ[TOKENIZERS_ENV_VAR] = str(_setting["threads"])
    if "numpy" in sys.modules:
        forget_blas_libraries()   # (look again: another BLAS may have been loaded since)
        set_blas_threads(_setting["threads"])


@contextlib.contextmanager
def thread_limit(n: int):
    """``set_threads(n)`` inside the block; the previous setting afterwards."""
    before, rayon = _setting["threads"], os.environ.get(TOKENIZERS_ENV_VAR)
    set_threads(n)
    try:
        yield
    finally:
        _setting["threads"] = before
        if rayon is None:
            os.environ.pop(TOKENIZERS_ENV_VAR, None)
        else:
            os.environ[TOKENIZERS_ENV_VAR] = rayon
        if "numpy" in sys.modules:
            forget_blas_libraries()
            set_blas_threads(get_threads())


@contextlib.contextmanager
def alone():
    """Inside the block, this thread's work runs on this thread only (``get_threads() == 1``): a
    batch part's kernels, while the other threads run the other parts (engine/batch.py)."""
    before = getattr(_this_thread, "alone", False)
    _this_thread.alone = True
    try:
        yield
    finally:
        _this_thread.alone = before


# ---- the BLAS under NumPy, through threadpoolctl ------------------------------------------------
def _blas_libraries():
    """threadpoolctl's controllers of the BLAS libraries loaded: found anew (~1 ms) whenever more
    Python modules are loaded than at the last look (a BLAS comes with the module that loads it:
    NumPy's, the optional MKL of engine/blas.py, SciPy's), else the ones found then."""
    if _blas["controller"] is None or _blas["modules"] != len(sys.modules):
        import numpy  # noqa: F401  (not at the top: see the module docstring; loads NumPy's BLAS)
        from threadpoolctl import ThreadpoolController   # (ditto)
        _blas["controller"] = ThreadpoolController().select(user_api="blas").lib_controllers
        _blas["modules"] = len(sys.modules)
    return _blas["controller"]


def forget_blas_libraries() -> None:
    """Find the BLAS libraries anew at the next call."""
    _blas["controller"] = None


def set_blas_threads(n: int) -> None:
    """Every loaded BLAS to ``n`` threads."""
    for lib in _blas_libraries():
        lib.set_num_threads(n)       # (a few microseconds: a call into the library)


def blas_threads() -> list[dict]:
    """What threadpoolctl sees now: one {"blas", "version", "threads", "threading"} per BLAS library
    loaded ("threading": its threading layer; MKL's "sequential", as engine/blas.py loads it, has 1)."""
    from threadpoolctl import threadpool_info   # (see _blas_libraries)
    return [{"blas": lib["internal_api"], "version": lib.get("version"), "threads": lib["num_threads"],
             "threading": lib.get("threading_layer")} for lib in threadpool_info() if lib["user_api"] == "blas"]


def thread_report() -> dict:
    """{"threads": npllama's count, "blas": blas_threads()}: what a run records."""
    return {"threads": get_threads(), "blas": blas_threads()}
