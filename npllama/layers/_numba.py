"""Shared Numba settings and helpers: every kernel is compiled once per dtype and cached on disk.

Threads: Numba reads NUMBA_NUM_THREADS when it is first imported (``npllama --threads N`` sets it,
with the BLAS variables, before NumPy is imported); ``numba.set_num_threads`` lowers it later.

A training step alternates BLAS calls (OpenBLAS's own thread pool) and Numba kernels (an OpenMP
pool): two pools on the same cores.  By default an OpenMP worker busy-waits after each parallel
loop, stealing the core from the BLAS thread that runs next (and OpenBLAS's workers do the same to
Numba's).  So, unless the user chose otherwise, OMP_WAIT_POLICY=PASSIVE: idle OpenMP workers sleep
at once (a wake-up costs ~10-50 us, against ~1-10 ms per kernel here).  It must be set before the
OpenMP runtime loads, i.e. before the first parallel kernel runs, which is after this import.  The
OpenBLAS counterpart, OPENBLAS_THREAD_TIMEOUT (log2 of the cycles a worker spins, 4..30), is read
when NumPy loads OpenBLAS, so only a launcher can set it (before importing NumPy).

fastmath: off by default (the float64 checks want IEEE results).  ``jit_parallel_reassoc`` allows
only "reassoc" and "contract": LLVM may then split a sum into vector lanes and fuse a*b + c into one
FMA, which changes float64 results at the 1e-16 level (the tests hold kernels to their references at
1e-12) and never changes how inf or NaN behave.
"""
import os
import types as pytypes

from ..threads import helper_threads

OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def openmp_runtime_loaded() -> bool:
    """Whether an OpenMP runtime is already mapped into this process (e.g. torch's libgomp, loaded
    by ``import torch``).  A runtime reads OMP_WAIT_POLICY once, when it loads: one loaded before
    npllama never sees the PASSIVE below, and its busy-waiting workers then fight OpenBLAS's threads
    for the cores (measured: ``import torch`` first made a training step 1.7x slower)."""
    try:
        with open("/proc/self/maps") as f:
            return any(name in line for line in f for name in OPENMP_RUNTIMES)
    except OSError:
        return False


# Numba's parallel kernels run on an OpenMP pool ("omp" threading layer; with the PASSIVE policy
# below), also when TBB is installed (Numba's own default would then prefer TBB).  If another library
# has already started an OpenMP runtime with its own wait policy, Numba would share it; take another
# pool instead: TBB's when the ``tbb`` package is installed (the ``[torch]`` extra brings it; as fast
# as the OpenMP pool here), else Numba's own pthread pool ("workqueue", whose idle workers sleep; it
# wakes two threads per kernel where OpenMP wakes one: measured 3-13% slower per training step on
# an AVX-512 Xeon).  Numba takes the first layer of its priority list that loads.  A user's own
# NUMBA_THREADING_LAYER or NUMBA_THREADING_LAYER_PRIORITY is left alone.
USER_CHOSE_LAYER = "NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
AVOID_SHARED_OPENMP = openmp_runtime_loaded() and not USER_CHOSE_LAYER
LAYER_PRIORITY = ["tbb", "workqueue", "omp"] if AVOID_SHARED_OPENMP else ["omp", "tbb", "workqueue"]
if not USER_CHOSE_LAYER:   # (in the environment: Numba reads it again at each compilation)
    os.environ["NUMBA_THREADING_LAYER_PRIORITY"] = " ".join(LAYER_PRIORITY)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402

if not USER_CHOSE_LAYER:   # Numba may have been imported (and configured) before
    numba.config.THREADING_LAYER = "default"
    numba.config.THREADING_LAYER_PRIORITY = list(LAYER_PRIORITY)
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.core import event as numba_events  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

# cache=True writes the compiled machine code next to the source (__pycache__), so only the very
# first run pays the compile cost.
REASSOC = {"reassoc", "contract"}
jit = numba.njit(cache=True)
jit_parallel = numba.njit(cache=True, parallel=True)
jit_parallel_reassoc = numba.njit(cache=True, parallel=True, fastmath=REASSOC)
prange = numba.prange


def serial(kernel):
    """The same Python function as ``kernel``, compiled without ``parallel=True`` (prange runs as a
    plain range): for calls on one row, as in a decoding step, where waking the thread pool costs
    more than the work (measured: ~1 ms per call to a parallel kernel on a busy 2-core machine, ~1 us
    serial).  It is a copy of the function object under the name ``<name>_serial`` so that Numba's
    on-disk cache, keyed by the function's name, keeps the two compilations apart."""
    f = kernel.py_func
    twin = pytypes.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__module__, twin.__doc__ = f.__module__, f.__doc__
    return numba.njit(cache=True, fastmath=kernel.targetoptions.get("fastmath", False))(twin)


# ---- exp: exact for float64, vectorisable for float32 -----------------------------------------
# libm's expf is a scalar call (~5-10 ns) that keeps LLVM from vectorising the loop around it, and
# softmax cross-entropy and SwiGLU take tens of millions of them per training step.  For float32,
# Cephes' expf instead:  exp(x) = 2^n exp(r),  n = round(x log2 e),  r = x - n ln2 (ln2 split in a
# high part exact in float32 and a low part, so r is exact),  exp(r) by a degree-7 polynomial on
# |r| <= ln2/2, and 2^n built from its exponent bits.  Relative error < 0.71 * 2^-23 (measured,
# with FMA, over [-87, 88]; numpy's float32 exp: 1.7).  fastmath is "reassoc" and "contract" only:
# adding "nsz" lets LLVM fold the two-part ln2 back into one product and the error grows with |x|
# (2.5 * 2^-23 near -87).  x is clamped to [-88, 88], so n stays in [-127, 127]: below x = -87.68
# n = -127 gives exponent bits 0 and the result is exactly 0 (exp(-inf) = 0, as masked scores
# need); from there up to -87.34 it is subnormal.  At the top it saturates at exp(88) = 1.65e38
# (never inf, also for x = +inf); NaN stays NaN.  float64 keeps np.exp, exact to the last bit.
# Used, through ``fast_exp``, by attention (training and decoding), cross-entropy and SwiGLU.
@intrinsic
def _pow2_float32(typingctx, n):
    """2**n as float32 for a float32 n holding an integer in [-127, 127], by building the bits."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())
    return sig, codegen


_F = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _F(1.4426950408889634), _F(0.693359375), _F(-2.12194440e-4)
_P0, _P1, _P2, _P3, _P4, _P5 = (_F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3),
                                _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1))
_XMIN, _XMAX, _HALF, _ONE = _F(-88.0), _F(88.0), _F(0.5), _F(1.0)


@numba.njit(cache=True, fastmath=REASSOC)
def exp_float32(x):
    x = min(max(x, _XMIN), _XMAX)
    n = np.floor(x * _LOG2E + _HALF)
    r = x - n * _LN2_HI - n * _LN2_LO
    exp_r = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r + _ONE
    return exp_r * _pow2_float32(n)


def fast_exp(x):
    """exp(x): np.exp for float64; the vectorisable ``exp_float32`` for float32 (inside kernels)."""
    return np.exp(x)


@overload(fast_exp, jit_options={"fastmath": REASSOC})
def _fast_exp_overload(x):
    if x == types.float32:
        return lambda x: exp_float32(x)
    return lambda x: np.exp(x)


@jit
def exp_float32_array(x):
    """``exp_float32`` over a float32 array (for the tests)."""
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = exp_float32(x[i])
    return out


# ---- max: vectorisable ----------------------------------------------------------------------------
@intrinsic
def _maxnum(typingctx, a, b):
    """LLVM's maxnum: a max that LLVM knows how to vectorise as a reduction (Python's max is a
    compare and branch it leaves scalar: 20x slower in attention's and cross-entropy's row maxima)."""
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        t = args[0].type
        return builder.call(builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t])), args)
    return sig, codegen


@numba.njit(cache=True, fastmath={"nnan"})
def array_max(x, n):
    """max(x[:n]), n >= 1.  fastmath "nnan" is what lets LLVM vectorise the reduction (infinities
    are handled exactly).  Callers use it only to shift values before an exp: a NaN in x may be
    skipped here, but the exp of that element is NaN and carries it into their result (a row's
    softmax, a loss)."""
    m = x[0]
    for j in range(1, n):
        m = _maxnum(m, x[j])
    return m


# ---- work shared among threads without a parallel loop ---------------------------------------------
# A ``prange`` kernel is compiled twice over (Numba outlines the loop body into a function of its own,
# then optimises and emits it again inside the kernel): the two attention kernels took ~10 s of a
# first run's ~20 s of compiling with prange, ~4 s without.  ``run_on_threads`` gets the same
# parallelism from a plain kernel: the kernel, compiled with nogil=True, loops taking the next unit of
# work from a shared counter (``claim_unit``, an atomic add) until none is left, and runs on the
# calling thread and on numba.get_num_threads() - 1 pool threads at once.  A thread that starts late
# (waking a pool thread and passing the GIL costs ~20-100 us) simply takes fewer units.
@intrinsic
def _atomic_add_one(typingctx, counter):
    """counter[0] += 1 as one atomic instruction; returns the value before."""
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), "monotonic")
    return sig, codegen


@numba.njit(cache=True)
def claim_unit(next_unit):
    """The next unit of work for this thread (next_unit: a 1-element int64 array all threads share)."""
    return _atomic_add_one(next_unit)


def run_on_threads(kernel, *args):
    """kernel(*args, next_unit) on numba.get_num_threads() threads at once (the calling thread and
    npllama's helper threads); the kernel claims its units of work with ``claim_unit(next_unit)``."""
    n = numba.get_num_threads()
    next_unit = np.zeros(1, dtype=np.int64)
    if n <= 1:
        kernel(*args, next_unit)
        return
    pool = helper_threads(n - 1)
    helpers = [pool.submit(kernel, *args, next_unit) for _ in range(n - 1)]
    kernel(*args, next_unit)
    for helper in helpers:
        helper.result()


# ---- how long compiling takes ------------------------------------------------------------------
class CompileClock:
    """Seconds Numba spends compiling (not loading from its on-disk cache) while in the ``with``
    block; ``seconds`` may be read inside it.  Nested compilations count once."""

    def __enter__(self):
        self._listener = numba_events.TimingListener()
        numba_events.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc):
        numba_events.unregister("numba:compile", self._listener)
        return False

    @property
    def seconds(self) -> float:
        return self._listener.duration if self._listener.done else 0.0
