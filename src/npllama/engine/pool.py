"""npllama's helper threads, and work the threads share without a parallel loop.

``run_on_threads(kernel, *args)`` runs a ``jit_rows`` kernel (engine/jit.py) on the calling thread
and on ``get_threads() - 1`` helper threads at once; the kernel claims its units of work one at a
time (``claim_unit``, an atomic add on a shared counter) until none is left.  The helper threads
(``HelperThreads``) are npllama's own, sized by its thread count (engine/threads.py); the same
threads run the split matmuls (engine/matmul.py) and the batch parts of a training step
(engine/batch.py), so one pool serves the whole step and no two pools take turns on the cores.
No kernel is a Numba ``parallel=True`` one: Numba's own thread pool runs nothing of npllama's.
(It used to run the kernels on an OpenMP pool, with OpenBLAS's pool running the matmuls; an OpenMP
runtime started by torch before npllama, with its busy-waiting workers, then made a step 1.7x
slower.  tests/test_threads.py checks that no kernel uses Numba's pool.)
"""
import os
import platform
import sys
import threading
import time

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import INT, array, jit, jit_rows
from .threads import get_threads

# ---- work shared among threads without a parallel loop ---------------------------------------------
# A ``prange`` kernel is compiled twice over (Numba outlines the loop body into a function of its own,
# then optimises and emits it again inside the kernel): the two attention kernels took ~10 s of a
# first run's ~20 s of compiling with prange, ~4 s without.  ``run_on_threads`` gets the same
# parallelism from a plain kernel: the kernel, compiled with nogil=True, loops taking the next unit of
# work from a shared counter (``claim_unit``, an atomic add) until none is left, and runs on the
# calling thread and on get_threads() - 1 helper threads at once.  A thread that starts late
# (waking a pool thread and passing the GIL costs ~20-100 us) simply takes fewer units.
def _atomic_add_one_ordered(ordering):
    @intrinsic
    def atomic_add_one(typingctx, counter):
        """counter[0] += 1 as one atomic instruction; returns the value before."""
        sig = types.int64(counter)

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            return builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), ordering)
        return sig, codegen
    return atomic_add_one


_atomic_add_one = _atomic_add_one_ordered("monotonic")   # (a claim: orders nothing else)
_atomic_arrive = _atomic_add_one_ordered("acq_rel")      # (a meeting: what a thread wrote before it is seen after)


@jit
def claim_unit(next_unit):
    """The next unit of work for this thread (next_unit: a 1-element int64 array all threads share)."""
    return _atomic_add_one(next_unit)


# Row kernels (RMSNorm, RoPE, SwiGLU, cross-entropy, ...): one unit of work = ROWS_PER_UNIT rows.
# They were ``prange`` loops, compiled twice over like attention's (~0.25 s more per kernel, and
# ~0.3 s to set up Numba's parallel compiler in each process); as plain kernels they run as fast
# (measured: SwiGLU forward after a matmul, 2048 x 352, 2.21 vs 2.24 ms with the matmul).
# A kernel's unit u is its rows u * ROWS_PER_UNIT .. (u + 1) * ROWS_PER_UNIT - 1 (``claim_unit``
# gives u; the kernel multiplies, so that one compiled kernel holds the one value it uses).
ROWS_PER_UNIT = 16


def row_units(n_rows, rows_per_unit=ROWS_PER_UNIT):
    """Units of work of a row kernel over ``n_rows`` rows."""
    return -(-n_rows // rows_per_unit)


UNIT_COUNTER = array(np.int64, 1)   # the type of ``next_unit`` (in the kernels' kernel_versions)
NO_UNIT_LEFT = 1 << 40   # a counter past every kernel's last unit (times its rows per unit: no overflow)


def run_on_threads(kernel, *args, n_units=None):
    """kernel(*args, next_unit) on get_threads() threads at once (the calling thread and
    npllama's helper threads), or on fewer when there are only ``n_units`` units of work (one unit:
    on the calling thread alone, as in a decoding step); the kernel claims its units with
    ``claim_unit(next_unit)``."""
    n = get_threads() if n_units is None else min(get_threads(), n_units)
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
# How often the threads meet depends on the regime (engine/batch.py chooses it):
# * row split -- a forward, an evaluation, a prompt's prefill: every matmul's row blocks
#   (engine/matmul.py) and the units of every attention and row kernel (``run_on_threads``) are
#   handed to the threads, ~100 times per pass of the default model, each a few hundred
#   microseconds of work;
# * batch parts -- a training step's loss_and_grad: each thread runs a whole part of the batch, so
#   they meet once for the parts and once to add their gradients, then a few times for clipping and
#   AdamW (optim.py).
# Waking a sleeping thread costs ~40 us on these virtual machines (the idle vCPU halts; a semaphore
# handoff measured 75 us there and back), and the woken thread then waits for the GIL too: too much
# ~100 times a pass.  So a helper that has finished a job keeps watching for the next one for a
# while (SPIN_CHECKS reads of a counter, ~0.35 ms here, in a nogil loop that holds no GIL) before it
# sleeps on a semaphore, and the calling thread waits for its helpers the same way.  Between steps
# (evaluation, a checkpoint) they sleep, so an idle run takes no CPU.
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


@jit_rows
def _spin_until_changed(counter, seen, checks):
    """Whether counter[0] differs from ``seen`` within ``checks`` reads."""
    for _ in range(checks):
        if _atomic_load(counter) != seen:
            return True
    return False


@jit_rows
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


# ---- one kernel on every thread at once, meeting between its phases ------------------------------
# A decoding step is ~150 products of 25-120 us each, in a chain (q/k/v -> attention -> o -> ...):
# handing each to the threads (``run_on_threads``) makes the helper take the GIL and call Numba's
# dispatcher every time, which costs more than a second thread saves.  Instead the whole step is one
# nogil kernel that every thread runs at once (``run_on_each_thread``: one hand-over a token), each
# taking units of each phase's work (``claim_unit``) and waiting for the others where a phase needs
# all of the previous one's results (``meet``: a counter every thread adds one to, and then watches).
# A thread that waits spins with the CPU's pause instruction (cheap for the other core and, with
# hyper-threads, for its twin) for about MEET_SPINS of them (~20-60 us), then gives its core away
# (sched_yield) between looks: with more threads than free cores (a shared machine, or a test on
# three threads), the thread it waits for may need that core.
MEET_SPINS = 1000
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_HAS_SCHED_YIELD = sys.platform.startswith("linux") or sys.platform == "darwin"


def _emit_pause(builder):
    """x86's pause instruction at the builder's position (nothing elsewhere)."""
    if _X86:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
        builder.call(fn, [])


@intrinsic
def _pause(typingctx):
    """The spin-wait hint (x86's pause; nothing elsewhere)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        _emit_pause(builder)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _give_core_away(typingctx):
    """sched_yield(): let another runnable thread have this core (a pause where there is none)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _HAS_SCHED_YIELD:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        else:
            _emit_pause(builder)
        return context.get_dummy_value()
    return sig, codegen


@jit
def meet(arrived, meeting, n_threads):
    """The ``meeting``-th meeting (1, 2, ...) of a kernel's ``n_threads`` threads: returns once all
    have arrived.  arrived: a 1-element int64 array they share, 0 before the first meeting (each
    arrival adds one, so meeting m is complete at m * n_threads; it needs no reset between meetings)."""
    target = meeting * n_threads
    if _atomic_arrive(arrived) + 1 >= target:
        return
    spins = 0
    while _atomic_load(arrived) < target:
        if spins < MEET_SPINS:
            _pause()
            spins += 1
        else:
            _give_core_away()


def run_on_each_thread(kernel, *args, n_threads):
    """kernel(*args, thread, n_threads) on ``n_threads`` threads at once, thread = 0 (this one) ..
    n_threads - 1 (npllama's helper threads); returns when all are done.  The kernel must return at
    once when thread >= n_threads: a first such call on this thread compiles (or loads) it before
    any helper asks Numba for it."""
    if n_threads <= 1:
        kernel(*args, 0, 1)
        return
    kernel(*args, n_threads, n_threads)
    helper_threads(n_threads - 1).run([(kernel, args + (t, n_threads)) for t in range(n_threads)])


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


def kernel_versions(dtype):
    """The versions of this module's kernels a training run calls (npllama/warmup.py): the helper
    threads' waits, whatever the dtype."""
    return [(_finish_then_watch, (UNIT_COUNTER, UNIT_COUNTER, INT, INT)),
            (_spin_until_changed, (UNIT_COUNTER, INT, INT))]
