"""Thread counts of the libraries that do the work: OpenBLAS (NumPy's matrix products), Numba's
parallel kernels, and the tokenizers library (Rust's rayon pool, used to train and encode).

Each library takes its count from the environment once, as it starts: OpenBLAS when NumPy is
imported, rayon at its first parallel call, Numba when it is imported -- and Numba re-reads the
environment at every compilation, refusing a NUMBA_NUM_THREADS that differs from the count its
threads were launched with.  So ``npllama --threads N`` (``thread_limit``) sets the variables before
anything imports NumPy or Numba (``import npllama`` and ``npllama.cli`` load neither), and sets
the live counts instead when a library is already running (``cli.main`` called from Python).
``live_thread_counts`` asks the libraries what they really use; training records it.

This module must not import NumPy or Numba at its top: the command line imports it first.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from typing import Callable, NamedTuple

BLAS_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
NUMBA_ENV_VAR = "NUMBA_NUM_THREADS"
TOKENIZERS_ENV_VAR = "RAYON_NUM_THREADS"


class BlasThreads(NamedTuple):
    get: Callable[[], int]
    set: Callable[[int], None]


@functools.cache
def openblas_threads_api() -> BlasThreads | None:
    """The get/set thread-count calls of the OpenBLAS loaded in this process, or None (NumPy built
    on another BLAS).  Call it only once NumPy is imported: the library is found among the files
    mapped into the process, and the answer is cached."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "", "_64"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype, get.argtypes, put.argtypes = ctypes.c_int, [], [ctypes.c_int]
                    return BlasThreads(get, put)
    return None


@contextlib.contextmanager
def thread_limit(n: int):
    """At most ``n`` threads for each library inside the block: through its own call for a library
    already running (put back at the end), through the environment for one not started yet (which
    then keeps ``n`` threads for good; the variables themselves are put back, except
    NUMBA_NUM_THREADS once Numba has started, since changing it then breaks the next compilation)."""
    restore = []
    env = [TOKENIZERS_ENV_VAR]
    if "numpy" in sys.modules:
        api = openblas_threads_api()
        if api is not None:
            restore.append((api.set, api.get()))
            api.set(n)
    else:
        env += BLAS_ENV_VARS
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        restore.append((numba.set_num_threads, numba.get_num_threads()))
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    else:
        env.append(NUMBA_ENV_VAR)
    saved_env = {var: os.environ.get(var) for var in env}
    os.environ.update({var: str(n) for var in env})
    try:
        yield
    finally:
        for set_threads, count in reversed(restore):
            set_threads(count)
        for var, value in saved_env.items():
            if var == NUMBA_ENV_VAR and "numba" in sys.modules:
                continue
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def live_thread_counts() -> dict:
    """{"openblas": threads OpenBLAS uses now (None if NumPy is not on OpenBLAS), "numba": threads
    Numba's parallel kernels use now}.  Starts Numba's threads if they were not yet."""
    import numba   # not at the top: the command line imports this module before NumPy/Numba start
    import numpy   # noqa: F401  (loads OpenBLAS, which openblas_threads_api looks for)

    api = openblas_threads_api()
    return {"openblas": api.get() if api is not None else None, "numba": numba.get_num_threads()}
