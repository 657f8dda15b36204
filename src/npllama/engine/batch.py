"""Which threads do what: the two regimes of the engine's passes.

* **Row split** -- ``Llama.forward``, ``loss`` (evaluation), ``last_hidden_state`` (a prompt's
  prefill): the pass runs once over the whole batch; every matmul is cut into row blocks, one per
  thread (engine/matmul.py), and every kernel's units of work are shared by the threads
  (engine/pool.py).  The threads meet ~100 times per pass of the default model.
* **Batch parts** -- ``Llama.loss_and_grad`` with more than one thread and more than one sequence:
  the batch is cut into one part per thread (``batch_parts``), each thread runs a whole
  forward and backward of its part by itself, with its own buffers (``run_parts``), and the parts'
  gradients are summed (``add_into``).  The threads meet once per step instead of at every matmul
  and kernel, and each works on its own rows only (measured on 2 threads, loss_and_grad alone: the
  default model 97 -> 89 ms, 15M-v4k 443 -> 413, 260K 144 -> 129).  Each part's gradient is
  weighed by its share of the batch's targets, so they add up to the batch's.

The regime depends on the kind of work and on npllama's thread count (engine/threads.py), never
on which BLAS NumPy has: inside both, the BLAS runs one thread per call (threadpoolctl).
"""
import numpy as np

from .matmul import one_thread_per_matmul
from .pool import helper_threads
from .threads import alone, get_threads


def batch_parts(n_sequences):
    """[lo, hi) sequences of each part of a training batch: one per thread (as many as there are
    sequences); a single part means the row split."""
    n = min(get_threads(), n_sequences)
    return [(k * n_sequences // n, (k + 1) * n_sequences // n) for k in range(n)]


def run_parts(run_part, parts, compiled=True):
    """``run_part(k, lo, hi)`` for every part, each on one thread by itself (its kernels and
    products on it alone), all at once.  ``compiled=False`` (the first step of a shape) runs them
    one after the other on the calling thread, so that every kernel compiles there (see
    engine/pool.py ``run_on_threads``); the arithmetic is the same either way (each part runs on
    one thread)."""
    def run_alone(k):
        with alone():
            run_part(k, *parts[k])
    with one_thread_per_matmul():
        if compiled:
            helper_threads(len(parts) - 1).run([(run_alone, (k,)) for k in range(len(parts))])
        else:
            for k in range(len(parts)):
                run_alone(k)


def add_into(total, others):
    """total += each of ``others`` (arrays of total's shape), on 1 + len(others) threads, each
    adding one slice of the buffers in the same order (the same sums whatever the thread count).
    Memory-bound: for 15M-v4k's 7.7M gradients, from memory, 3.4 ms on one thread, 2.1 ms on two."""
    n = len(others) + 1
    bounds = np.linspace(0, total.size, n + 1).astype(np.int64) // 16 * 16   # (whole vectors)
    bounds[-1] = total.size

    def add_slice(lo, hi):
        for g in others:
            np.add(total[lo:hi], g[lo:hi], out=total[lo:hi])
    helper_threads(n - 1).run([(add_slice, (bounds[i], bounds[i + 1])) for i in range(n)])
