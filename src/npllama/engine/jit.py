"""How npllama's kernels are compiled: the jit decorators, the CPU features, the compile clock.

Every kernel is compiled once per argument types and cached on disk (``cache=True``: in npllama's
cache directory, npllama/caches.py), so only a first run pays the compile cost.  Every kernel of npllama
is compiled through one of these decorators:

* ``jit``: a plain kernel (the layers' small helpers, decoding's one-row kernels).
* ``jit_rows``: a kernel whose units of work the threads share (engine/pool.py ``run_on_threads``):
  ``nogil=True`` so the threads run it at once; ``error_model="numpy"``: a division by zero gives
  inf instead of raising, so Numba emits no check in the loops, which would keep LLVM from
  vectorising them (without it a SwiGLU loop ran 5x slower).
* ``jit_rows_reassoc``: the same with fastmath "reassoc" and "contract" only: LLVM may split a sum
  into vector lanes and fuse a*b + c into one FMA, which changes float64 results at the 1e-16 level
  (the tests hold kernels to their references at 1e-12) and never changes how inf or NaN behave.
* ``jit_reassoc``, ``jit_nnan``: ``jit`` with those fastmath flags; ``jit_with(**options)`` for a
  kernel with options of its own (attention's, which explains its flags).

fastmath is otherwise off (the float64 checks want IEEE results).

Each module of kernels also lists the versions of its kernels a training run calls, their argument
types written with ``array``, ``scalar``, ``INT``, ``BOOL`` and ``NONE`` (``kernel_versions(dtype)``),
so that npllama/warmup.py can compile them ahead, on two processes at once.
"""
import llvmlite.binding as llvm
import numba
import numpy as np
from numba.core import event as numba_events

from ..caches import numba_cache_dir

REASSOC = {"reassoc", "contract"}


# ---- the CPU features LLVM compiles for -----------------------------------------------------------
# Vectors of 512 bits.  On Intel's AVX-512 CPUs LLVM's tuning (the "prefer-256-bit" feature) keeps
# the loops it vectorises to 256-bit registers, since 512-bit ones used to lower the clock on the
# first of those CPUs; on this project's machines (Ice Lake and later Xeons) 512 bits are faster:
# float32 exp 0.35 -> 0.23 ns a number.  So unless the user chose features (NUMBA_CPU_FEATURES),
# Numba's setting is the host's features without that preference, before Numba compiles anything of
# npllama's: Numba reads it when it makes its code generator (at its first compilation), and its
# on-disk cache is keyed by it.  The setting is Numba's config attribute, not the environment
# (Numba re-reads its environment variables only when they change), so nothing leaks into the
# processes npllama starts.  If Numba compiled something before npllama was imported, its code
# generator is made already and keeps LLVM's default.
def _host_features():
    try:
        return llvm.get_host_cpu_features()
    except RuntimeError:        # (a CPU whose features LLVM cannot read)
        return None


HOST_FEATURES = _host_features()
HOST_HAS_AVX512 = HOST_FEATURES is not None and HOST_FEATURES.get("avx512f", False)
if (HOST_HAS_AVX512 and numba.core.config.CPU_FEATURES is None
        and HOST_FEATURES.get("prefer-256-bit", None) is not False):
    numba.core.config.CPU_FEATURES = HOST_FEATURES.flatten() + ",-prefer-256-bit"


# ---- the decorators ----------------------------------------------------------------------------
# cache=True writes the compiled machine code to disk, so only the very first run pays the compile
# cost: in npllama's cache directory (caches.numba_cache_dir), not next to the source as Numba would.
# Numba picks a kernel's cache directory when the kernel is decorated, and every module of kernels
# imports this one first; NUMBA_CACHE_DIR, when the user set it, is Numba's own setting already.
if not numba.core.config.CACHE_DIR:
    numba.core.config.CACHE_DIR = str(numba_cache_dir())
jit = numba.njit(cache=True)
jit_reassoc = numba.njit(cache=True, fastmath=REASSOC)
jit_rows = numba.njit(cache=True, nogil=True, error_model="numpy")
jit_rows_reassoc = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=REASSOC)
jit_nnan = numba.njit(cache=True, fastmath={"nnan"})   # (fastmath.array_max's alone: see there)


def jit_with(**options):
    """A decorator for a kernel with options of its own (attention's fastmath flags), cached too."""
    return numba.njit(cache=True, **options)


# ---- how long compiling takes ------------------------------------------------------------------
class _FirstCompile(numba_events.TimingListener):
    """Numba's timing listener that also calls ``on_first()`` when the first compilation starts."""

    def __init__(self, on_first):
        super().__init__()
        self.on_first = on_first

    def on_start(self, event):
        if self.on_first is not None:
            on_first, self.on_first = self.on_first, None
            on_first()
        super().on_start(event)


class CompileClock:
    """Seconds Numba spends compiling (not loading from its on-disk cache) while in the ``with``
    block; ``seconds`` may be read inside it.  Nested compilations count once.  ``on_first()``, if
    given, is called when the first compilation starts (to say why the first run waits).
    ``elsewhere``: seconds spent waiting for another process compiling kernels for this one
    (npllama/warmup.py adds them), counted in ``seconds`` too."""

    def __init__(self, on_first=None):
        self.on_first = on_first
        self.elsewhere = 0.0

    def __enter__(self):
        self._listener = _FirstCompile(self.on_first)
        numba_events.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc):
        numba_events.unregister("numba:compile", self._listener)
        return False

    @property
    def seconds(self) -> float:
        return (self._listener.duration if self._listener.done else 0.0) + self.elsewhere


# ---- the types of a kernel version ------------------------------------------------------------
# Numba compiles one version of a kernel per argument types: an array's dtype, number of dimensions
# and layout (C-contiguous, or any strides: "A"), a scalar's type, None.  A module's
# ``kernel_versions(dtype)`` writes the versions a training run calls in these.
INT, BOOL, NONE = numba.types.int64, numba.types.boolean, numba.types.none


def scalar(dtype):
    """The type of a number of ``dtype`` (np.float32, ...)."""
    return numba.from_dtype(np.dtype(dtype))


def array(dtype, ndim, contiguous=True):
    """The type of an ``ndim``-dimensional array of ``dtype``: C-contiguous, or (``contiguous=False``)
    of any strides, as a transposed or sliced view is."""
    return numba.types.Array(scalar(dtype), ndim, "C" if contiguous else "A")
