"""Shared Numba settings and helpers: every kernel is compiled once per dtype and cached on disk.

Thread count: Numba's.  Numba reads NUMBA_NUM_THREADS when it is first imported (``npllama
--threads N`` sets it, with the BLAS variables, before NumPy is imported); ``numba.set_num_threads``
lowers it later.

Threads: npllama's own (``HelperThreads`` below), as many as Numba's thread count says.  Every
matmul of a step is split into single-threaded BLAS calls (layers/linear.py) and every kernel --
attention's, the row kernels of RMSNorm, RoPE, SwiGLU, cross-entropy and LoRA, a decoding step's
large matrix-vector products -- shares its units of work out among the same threads
(``run_on_threads``), so one pool serves the whole step and no two pools take turns on the cores.
No kernel is a Numba ``parallel=True`` one: Numba's own thread pool runs nothing of npllama's.
(It used to run the kernels on an OpenMP pool, with OpenBLAS's pool running the matmuls; an OpenMP
runtime started by torch before npllama, with its busy-waiting workers, then made a step 1.7x
slower.  tests/test_threads.py checks that no kernel uses Numba's pool.)

fastmath: off by default (the float64 checks want IEEE results).  ``jit_rows_reassoc`` allows
only "reassoc" and "contract": LLVM may then split a sum into vector lanes and fuse a*b + c into one
FMA, which changes float64 results at the 1e-16 level (the tests hold kernels to their references at
1e-12) and never changes how inf or NaN behave.
"""
import os
import threading
import time

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, event as numba_events
from numba.extending import intrinsic, overload

from ..caches import numba_cache_dir

# Vectors of 512 bits.  On Intel's AVX-512 CPUs LLVM's tuning (the "prefer-256-bit" feature) keeps
# the loops it vectorises to 256-bit registers, since 512-bit ones used to lower the clock on the
# first of those CPUs; on this project's machines (Ice Lake and later Xeons) 512 bits are faster:
# float32 exp 0.35 -> 0.23 ns a number.  So unless NUMBA_CPU_FEATURES is set already, it is set to
# the host's features without that preference, before Numba compiles anything of npllama's (Numba
# reads it when it first compiles; it is part of the key of its on-disk cache).  It applies to the
# whole process, and to the processes it starts (precompile's).
def _host_features():
    try:
        return llvm.get_host_cpu_features()
    except RuntimeError:        # (a CPU whose features LLVM cannot read)
        return None


HOST_FEATURES = _host_features()
HOST_HAS_AVX512 = HOST_FEATURES is not None and HOST_FEATURES.get("avx512f", False)
if (HOST_HAS_AVX512 and not os.environ.get("NUMBA_CPU_FEATURES")
        and HOST_FEATURES.get("prefer-256-bit", None) is not False):
    os.environ["NUMBA_CPU_FEATURES"] = HOST_FEATURES.flatten() + ",-prefer-256-bit"
    numba.core.config.reload_config()


# cache=True writes the compiled machine code to disk, so only the very first run pays the compile
# cost: in npllama's cache directory (caches.numba_cache_dir), not next to the source as Numba would.
# Numba picks a kernel's cache directory when the kernel is decorated, and every module of kernels
# imports this one first; NUMBA_CACHE_DIR, when the user set it, is Numba's own setting already.
if not numba.core.config.CACHE_DIR:
    numba.core.config.CACHE_DIR = str(numba_cache_dir())
REASSOC = {"reassoc", "contract"}
jit = numba.njit(cache=True)


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


# Row kernels (RMSNorm, RoPE, SwiGLU, cross-entropy, ...): one unit of work = ROWS_PER_UNIT rows.
# They were ``prange`` loops, compiled twice over like attention's (~0.25 s more per kernel, and
# ~0.3 s to set up Numba's parallel compiler in each process); as plain kernels they run as fast
# (measured: SwiGLU forward after a matmul, 2048 x 352, 2.21 vs 2.24 ms with the matmul).
# error_model="numpy": a division by zero gives inf instead of raising, so Numba emits no check
# in the loops, which would keep LLVM from vectorising them (a parallel loop's body is compiled
# that way already; without it the same SwiGLU loop ran 5x slower).
# A kernel's unit u is its rows u * ROWS_PER_UNIT .. (u + 1) * ROWS_PER_UNIT - 1 (``claim_unit``
# gives u; the kernel multiplies, so that one compiled kernel holds the one value it uses).
ROWS_PER_UNIT = 16
jit_rows = numba.njit(cache=True, nogil=True, error_model="numpy")
jit_rows_reassoc = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=REASSOC)


def row_units(n_rows, rows_per_unit=ROWS_PER_UNIT):
    """Units of work of a row kernel over ``n_rows`` rows."""
    return -(-n_rows // rows_per_unit)


NO_UNIT_LEFT = 1 << 40   # a counter past every kernel's last unit (times its rows per unit: no overflow)


def run_on_threads(kernel, *args, n_units=None):
    """kernel(*args, next_unit) on numba.get_num_threads() threads at once (the calling thread and
    npllama's helper threads), or on fewer when there are only ``n_units`` units of work (one unit:
    on the calling thread alone, as in a decoding step); the kernel claims its units with
    ``claim_unit(next_unit)``."""
    n = numba.get_num_threads() if n_units is None else min(numba.get_num_threads(), n_units)
    if n <= 1:
        kernel(*args, np.zeros(1, dtype=np.int64))
        return
    # First a call with no unit left, on this thread: a kernel not compiled yet for these types is
    # compiled (or loaded) here, once, before a helper thread can ask for it and wait on Numba's
    # compiler lock.  Afterwards it costs one dispatch, ~1 us.  (A float32 gradient 6.3e-05 from
    # PyTorch's instead of ~9e-07, once put down to which thread compiled first, was PyTorch's own:
    # its first backward in a process varies, benchmarks/README.md; npllama's is bit-identical from
    # process to process.)
    kernel(*args, np.full(1, NO_UNIT_LEFT, dtype=np.int64))
    helper_threads(n - 1).run([(kernel, args + (np.zeros(1, dtype=np.int64),))] * n)


# ---- npllama's helper threads -----------------------------------------------------------------------
# A step hands work to threads of its own many times: the halves of each split matmul
# (layers/linear.py) and the units of each attention and row kernel (``run_on_threads``), ~100
# times per step of the default model, each a few hundred microseconds of work.  Waking a sleeping
# thread for each costs ~40 us on these virtual machines (the idle vCPU halts; a semaphore handoff
# measured 75 us there and back), and the woken thread then waits for the GIL too.  So a helper
# that has finished a job keeps watching for the next one for a while (SPIN_CHECKS reads of a
# counter, ~0.35 ms here, in a nogil loop that holds no GIL) before it sleeps on a semaphore, and the
# calling thread waits for its helpers the same way.  Between steps (evaluation, a checkpoint) they
# sleep, so an idle run takes no CPU.
SPIN_CHECKS = 1_000_000
SETTLE_CHECKS = 10_000


@intrinsic
def _atomic_load(typingctx, counter):
    """counter[0], read anew each time (a plain load in a loop that stores nothing would be hoisted
    out of it)."""
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.load_atomic(data, "acquire", 8)
    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _spin_until_changed(counter, seen, checks):
    """Whether counter[0] differs from ``seen`` within ``checks`` reads."""
    for _ in range(checks):
        if _atomic_load(counter) != seen:
            return True
    return False


@numba.njit(cache=True, nogil=True)
def _finish_then_watch(finished, posted, seen, checks):
    """finished[0] += 1, then ``_spin_until_changed(posted, seen, checks)``: a helper says its job
    is done only once it holds no GIL, so the caller, who needs the GIL next, never waits for it.
    A new job seen, it waits SETTLE_CHECKS more reads before it takes the GIL: by then the caller,
    who posted the job holding the GIL, is in its own share of the work and holds none (a thread
    that finds the GIL taken sleeps until it is released, and waking costs ~40 us here)."""
    _atomic_add_one(finished)
    if not _spin_until_changed(posted, seen, checks):
        return False
    _spin_until_changed(posted, seen + 1, SETTLE_CHECKS)
    return True


class HelperThreads:
    """``n`` helper threads; ``run(jobs)`` runs the first job on the calling thread and the others
    on helpers at once, and returns when all are done (raising the first error)."""

    def __init__(self, n):
        self.n = n
        self.jobs = [None] * n
        self.errors = [None] * n
        self.posted = [np.zeros(1, dtype=np.int64) for _ in range(n)]     # jobs given to helper i
        self.finished = [np.zeros(1, dtype=np.int64) for _ in range(n)]   # jobs it has done, + 1
        self.sleeping = [False] * n
        self.wake = [threading.Semaphore(0) for _ in range(n)]
        for i in range(n):
            threading.Thread(target=self._serve, args=(i,), daemon=True, name=f"npllama-helper-{i}").start()
        for i in range(n):   # (each says it is ready with its first "finished")
            self._wait_finished(i, 0)

    def _serve(self, i):
        seen, posted = 0, self.posted[i]
        changed = _finish_then_watch(self.finished[i], posted, seen, SPIN_CHECKS)
        while True:
            while not changed:                    # asleep until run() posts a job
                self.sleeping[i] = True
                if posted[0] == seen:             # (checked after saying so: a post in between wakes it)
                    self.wake[i].acquire()        # (a stale wake-up only makes one more round)
                self.sleeping[i] = False
                changed = _spin_until_changed(posted, seen, 1)
            seen += 1
            fn, args = self.jobs[i]
            try:
                fn(*args)
            except BaseException as error:   # (handed to the caller)
                self.errors[i] = error
            self.jobs[i] = None
            changed = _finish_then_watch(self.finished[i], posted, seen, SPIN_CHECKS)

    def _wait_finished(self, i, seen):
        while not _spin_until_changed(self.finished[i], seen, SPIN_CHECKS):
            time.sleep(50e-6)   # (a long job: look again now and then)

    def run(self, jobs):
        jobs = list(jobs)
        if len(jobs) - 1 > self.n:
            raise ValueError(f"{len(jobs)} jobs for {self.n} helper threads and the calling thread")
        helpers = range(len(jobs) - 1)
        seen = [int(self.finished[i][0]) for i in helpers]
        for i in helpers:
            self.jobs[i] = jobs[i + 1]
            self.posted[i][0] += 1
            if self.sleeping[i]:
                self.wake[i].release()
        try:
            fn, args = jobs[0]
            fn(*args)
        finally:
            for i in helpers:
                self._wait_finished(i, seen[i])
            errors = [self.errors[i] for i in helpers if self.errors[i] is not None]
            for i in helpers:   # (all of this call's errors go: none is left to a later call)
                self.errors[i] = None
        if errors:
            raise errors[0]


_helpers = {"pool": None}
# A child made by fork() inherits the pool object but not its threads: it starts a new pool.
os.register_at_fork(after_in_child=lambda: _helpers.update(pool=None))


def helper_threads(n):
    """The shared HelperThreads, with at least ``n`` threads."""
    pool = _helpers["pool"]
    if pool is None or pool.n < n:
        pool = _helpers["pool"] = HelperThreads(n)   # (the old one's threads sleep for good)
    return pool


# ---- a register tile of a matrix product ----------------------------------------------------------
# Attention multiplies many small tiles (128 x 128 x head_dim).  Written as loops, LLVM vectorises
# the innermost one but keeps the output in memory: every multiply-add loads and stores C, and each
# short row pays for its loop set-up and alias checks (~55-80 GFLOP/s on one AVX-512 core).
# ``tile_update`` is the micro-kernel of a BLAS instead, written in LLVM IR: an MR x (width
# vectors) block of C stays in registers while the sum runs over k, each step loading `width`
# vectors of a row of B and MR numbers of a column of A (each broadcast to a vector) for MR * width
# fused multiply-adds (~150 GFLOP/s for float32 on the same core).
VECTOR_BYTES = 64 if HOST_HAS_AVX512 else 32
# Rows of C per tile: 8 x 2 vectors are 16 accumulators, half of AVX-512's 32 registers (each step
# of the sum then loads 2 vectors and 8 numbers for 16 multiply-adds); AVX2 has 16 registers: 4 rows.
MR = 8 if VECTOR_BYTES == 64 else 4


def _splat(builder, value, vector_type):
    """A vector of ``vector_type`` holding ``value`` in every lane (LLVM IR)."""
    undef = ir.Constant(vector_type, ir.Undefined)
    lane0 = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(lane0, undef, ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count),
                                                            [0] * vector_type.count))


def _element_address(builder, data, strides, indices):
    """The byte address (i8*) of the element at ``indices`` of an array with ``data`` and byte
    ``strides`` (LLVM IR; as many indices as leading strides used)."""
    offset = builder.mul(indices[0], strides[0])
    for index, stride in zip(indices[1:], strides[1:]):
        offset = builder.add(offset, builder.mul(index, stride))
    return builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [offset])


def _tile_update(width, vector_bytes=VECTOR_BYTES, pairs=False):
    @intrinsic
    def tile_update(typingctx, A, a_row, a_col, B, b_row, b_col, C, c_row, c_col, k, accumulate):
        """C[c_row + i, c_col + j] (+)= sum_{d < k} A[a_row + i, a_col + d] B[b_row + d, b_col + j]
        for i < MR, j < width * lanes (lanes = vector_bytes / itemsize).  A: any strides; the rows of
        B and C must be contiguous.  accumulate=False: C = the product.

        pairs=True (``tile_update_pairs``): the sum runs over 2k columns of A, two at a time:
        C[c_row + i, c_col + j] (+)= sum_{d < k} A[a_row + i, a_col + 2d + j % 2] B[b_row + d, b_col + j],
        the two numbers of A one 64-bit load broadcast to every pair of lanes (A's rows must then be
        contiguous too)."""
        i = types.intp
        sig = types.void(A, i, i, B, i, i, C, i, i, i, types.boolean)

        def codegen(context, builder, signature, args):
            A_, a_row, a_col, B_, b_row, b_col, C_, c_row, c_col, k, accumulate = args
            elt = context.get_value_type(signature.args[0].dtype)
            itemsize = context.get_abi_sizeof(elt)
            lanes = vector_bytes // itemsize
            vec, i64 = ir.VectorType(elt, lanes), ir.IntType(64)
            pair = ir.VectorType(elt, 2)
            pair_lanes = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [j % 2 for j in range(lanes)])

            def origin(index, value, row, col):      # (byte address of element [row, col], row stride)
                arr = context.make_array(signature.args[index])(context, builder, value)
                s0, s1 = cgutils.unpack_tuple(builder, arr.strides, 2)
                return _element_address(builder, arr.data, (s0, s1), (row, col)), s0, s1

            def at(base, offset, ty):                # ty* at base + offset bytes
                return builder.bitcast(builder.gep(base, [offset]), ty.as_pointer())

            a0, a_s0, a_s1 = origin(0, A_, a_row, a_col)
            b0, b_s0, _ = origin(3, B_, b_row, b_col)
            c0, c_s0, _ = origin(6, C_, c_row, c_col)
            row_offset = lambda stride, r: builder.mul(stride, ir.Constant(i64, r))  # noqa: E731
            vector_offset = lambda v: ir.Constant(i64, v * vector_bytes)           # noqa: E731
            c_vectors = [[at(builder.gep(c0, [row_offset(c_s0, r)]), vector_offset(v), vec) for v in range(width)]
                         for r in range(MR)]
            acc = [[cgutils.alloca_once(builder, vec) for _ in range(width)] for _ in range(MR)]
            for r in range(MR):
                for v in range(width):
                    start = builder.select(accumulate, builder.load(c_vectors[r][v], align=itemsize),
                                           ir.Constant(vec, None))
                    builder.store(start, acc[r][v])
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                                 f"llvm.fma.v{lanes}f{itemsize * 8}")
            with cgutils.for_range(builder, k) as loop:
                d = loop.index
                b_row_d = builder.gep(b0, [builder.mul(d, b_s0)])
                b_vectors = [builder.load(at(b_row_d, vector_offset(v), vec), align=itemsize) for v in range(width)]
                a_column_d = builder.gep(a0, [builder.mul(builder.shl(d, ir.Constant(i64, 1)) if pairs else d, a_s1)])
                for r in range(MR):
                    if pairs:
                        two = builder.load(at(a_column_d, row_offset(a_s0, r), pair), align=itemsize)
                        a = builder.shuffle_vector(two, ir.Constant(pair, ir.Undefined), pair_lanes)
                    else:
                        a = _splat(builder, builder.load(at(a_column_d, row_offset(a_s0, r), elt)), vec)
                    for v in range(width):
                        builder.store(builder.call(fma, [a, b_vectors[v], builder.load(acc[r][v])]), acc[r][v])
            for r in range(MR):
                for v in range(width):
                    builder.store(builder.load(acc[r][v]), c_vectors[r][v], align=itemsize)
            return context.get_dummy_value()
        return sig, codegen
    return tile_update


tile_update_1 = _tile_update(1)       # MR x one vector
tile_update_2 = _tile_update(2)       # MR x two vectors
tile_update_3 = _tile_update(3)       # MR x three vectors (with AVX-512 only: 24 accumulators of 32 registers)
tile_update_half = _tile_update(1, VECTOR_BYTES // 2)   # MR x half a vector (the last of head_dim 24, 40, ... in float32)
# MR x one vector of interleaved pairs: a product whose C is half a vector wide (attention's P V and
# dS K at head_dim <= 8 in float32) as one of full vectors over half as many steps (attention.py, above
# _add_lower_times)
tile_update_pairs = _tile_update(1, pairs=True)


@intrinsic
def contiguous_row(typingctx, x, i, j, k):
    """x[i, j, k, :] of a 4-D array as a C-contiguous 1-D view (x's last axis must be contiguous:
    the caller checks).  Attention's inputs are strided views of the model's row buffers, which
    Numba types as of any layout: the loops over their rows then compute every address from the
    strides and stay scalar; over this view they are vector loops."""
    if not (isinstance(x, types.Array) and x.ndim == 4):
        return None
    row_type = types.Array(x.dtype, 1, "C")
    sig = row_type(x, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        from numba.core.imputils import impl_ret_borrowed
        from numba.np.arrayobj import populate_array
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        strides = cgutils.unpack_tuple(builder, arr.strides, 4)
        shape = cgutils.unpack_tuple(builder, arr.shape, 4)
        data = builder.bitcast(_element_address(builder, arr.data, strides[:3], args[1:4]), arr.data.type)
        row = context.make_array(row_type)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(x.dtype)))
        populate_array(row, data=data, shape=[shape[3]], strides=[itemsize], itemsize=itemsize,
                       meminfo=arr.meminfo, parent=arr.parent)
        return impl_ret_borrowed(context, builder, row_type, row._getvalue())
    return sig, codegen


@intrinsic
def vector_max(typingctx, x, n):
    """max(x[:n]) (n >= 1) in whole vectors: x, contiguous, must have room up to n rounded up to whole
    vectors (lanes = VECTOR_BYTES / itemsize); what lies past n there is read but ignored.  With
    "nnan" on the maxima, as ``array_max`` has: a NaN in x may be skipped or returned (callers
    exponentiate x afterwards, and the exp of that element carries the NaN into their result).
    In attention's softmax ``array_max`` ran as one scalar chain of maxima (~4 cycles a number: a
    quarter of the forward's time at the default model's shape)."""
    sig = x.dtype(x, types.intp)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        n = args[1]
        elt = context.get_value_type(signature.args[0].dtype)
        itemsize = context.get_abi_sizeof(elt)
        lanes = VECTOR_BYTES // itemsize
        vec, i64 = ir.VectorType(elt, lanes), ir.IntType(64)
        index_vec = ir.VectorType(i64, lanes)
        lowest = ir.Constant(vec, [float("-inf")] * lanes)
        maxnum = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec]),
                                                f"llvm.maxnum.v{lanes}f{itemsize * 8}")
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(elt, [vec]),
                                                f"llvm.vector.reduce.fmax.v{lanes}f{itemsize * 8}")
        offsets, limit = ir.Constant(index_vec, list(range(lanes))), _splat(builder, n, index_vec)
        acc = cgutils.alloca_once_value(builder, lowest)
        n_vectors = builder.sdiv(builder.add(n, ir.Constant(i64, lanes - 1)), ir.Constant(i64, lanes))
        data = builder.bitcast(arr.data, vec.as_pointer())
        with cgutils.for_range(builder, n_vectors) as loop:
            values = builder.load(builder.gep(data, [loop.index]), align=itemsize)
            index = builder.add(_splat(builder, builder.mul(loop.index, ir.Constant(i64, lanes)), index_vec), offsets)
            values = builder.select(builder.icmp_signed("<", index, limit), values, lowest)
            builder.store(builder.call(maxnum, [builder.load(acc), values], fastmath=("nnan",)), acc)
        return builder.call(reduce, [builder.load(acc)], fastmath=("nnan",))
    return sig, codegen


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
