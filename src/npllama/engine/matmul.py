"""The matrix products of the engine's passes, split across npllama's threads by npllama itself.

A multi-threaded BLAS splits one product between its threads, which then wait for each other
(spinning) several times per call.  When the machine has other work those waits can cost a whole
scheduler slice each; products with a small output and a long inner dimension, like
dW = dy^T x with dy: (N, D), suffer most (measured here: 80 ms instead of 4 ms).  So inside a pass
(``split_matmuls``) the BLAS runs on one thread per call (threadpoolctl sets its count, whichever
BLAS NumPy has) and npllama hands each of its n threads (engine/threads.py) whole, independent
single-threaded BLAS calls: a row block of a forward product (a column block when it has few rows,
as a prompt's: each thread then reads half of the weights, not all of them), or, in a backward,
dx = dy W on one thread and dW = dy^T x on the other (the same FLOPs).  The threads meet once per call.  NumPy
releases the GIL inside matmul, so npllama's helper threads (engine/pool.py) run them in parallel.
The calls are ``matmul_one_thread``: MKL's when it is installed (engine/blas.py), else NumPy's.
After the pass the BLAS is back to n threads, for products outside npllama's passes.

In a training step's batch parts (engine/batch.py) each thread already has work of its own:
``one_thread_per_matmul`` makes every product one call on the calling thread.
"""
import numpy as np

from . import quantized
from .blas import matmul_one_thread
from .pool import helper_threads
from .threads import get_threads, set_blas_threads

MIN_SPLIT_ROWS = 64     # no row block smaller than this
# Products with fewer rows than this (and more columns) are cut into column blocks: a prompt's
# projections, 128 rows of SmolLM2 (576-3072 columns), took ~7 % less CPU time and ~8 % less wall
# time a prefill than in row blocks of 64 (benchmarks/README.md, 2026-12-07).
COLUMN_SPLIT_BELOW_ROWS = 256
_split = {"threads": 1, "one_thread": False}
set_blas_threads(get_threads())   # (NPLLAMA_THREADS or set_threads before NumPy loaded: its BLAS sized now)


def _row_blocks(n_rows, n_blocks):
    n_blocks = max(1, min(n_blocks, n_rows // MIN_SPLIT_ROWS))
    return [(i * n_rows // n_blocks, (i + 1) * n_rows // n_blocks) for i in range(n_blocks)]


def _blocks(a, b, out, n_blocks):
    """(a, b, out) of each block of out = a @ b: row blocks, or, for a product of few rows and more
    columns (a prompt's projections: 128 rows, 576-3072 columns), column blocks."""
    rows, cols = out.shape
    if rows < COLUMN_SPLIT_BELOW_ROWS and cols > rows:
        return [(a, b[:, s:e], out[:, s:e]) for s, e in _row_blocks(cols, n_blocks)]
    return [(a[s:e], b, out[s:e]) for s, e in _row_blocks(rows, n_blocks)]


def _matmul_task(a, b, out):
    matmul_one_thread(a, b, out)


def matmuls(*products):
    """out = a @ b for each (a, b, out) in ``products`` (the products must be independent).

    Outside ``split_matmuls``: in order, one BLAS call each.  Inside, with n threads: n tasks (each
    product's rows cut into n / len(products) blocks) run concurrently, one on the calling thread."""
    n = _split["threads"]
    if any(getattr(b, "quantized", False) for _, b, _ in products):   # (weights kept in GGUF's blocks)
        for a, b, out in products:
            if not getattr(b, "quantized", False):
                matmuls((a, b, out))
            elif hasattr(b, "matrix"):     # W^T of a quantized W (layers/quantized_linear.py): a forward
                quantized.quantized_matmul(a, b.matrix, out, n)
            else:                          # W itself: a frozen weight's backward
                quantized.quantized_matmul_backward(a, b, out, n)
        return
    if n <= 1:
        matmul = matmul_one_thread if _split["one_thread"] else np.matmul
        for a, b, out in products:
            matmul(a, b, out)
        return
    per_product = max(1, n // len(products))
    tasks = [block for a, b, out in products for block in _blocks(a, b, out, per_product)]
    helper_threads(n - 1).run([(_matmul_task, t) for t in tasks])


def split_threads():
    """How many threads ``matmuls`` splits products among (1 outside ``split_matmuls``)."""
    return _split["threads"]


class one_thread_per_matmul:
    """Context manager: inside ``split_matmuls``, every product one BLAS call on the calling thread
    (for work already spread over the threads: a training step's batch parts, engine/batch.py)."""

    def __enter__(self):
        self.threads, _split["threads"] = _split["threads"], 1
        return self

    def __exit__(self, *exc):
        _split["threads"] = self.threads
        return False


class split_matmuls:
    """Context manager: inside, ``matmuls`` splits products across npllama's threads, each product
    a single-threaded BLAS call (nested: the outermost decides)."""

    def __enter__(self):
        self.outermost = not _split["one_thread"]
        if self.outermost:
            n = get_threads()
            set_blas_threads(1)
            _split.update(threads=n, one_thread=True)
        return self

    def __exit__(self, *exc):
        if self.outermost:
            _split.update(threads=1, one_thread=False)
            set_blas_threads(get_threads())
        return False
