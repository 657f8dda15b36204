"""Linear layer without bias, weights in the Hugging Face layout (out_features, in_features).

Forward:   y = x W^T                      x: (N, in), W: (out, in), y: (N, out)
Backward:  dx = dy W                      (N, out) @ (out, in) -> (N, in)
           dW = dy^T x                    (out, N) @ (N, in)   -> (out, in)
Leading dimensions of x are flattened into N.
"""
import os

import numpy as np

from ..threads import openblas_threads_api
from ._blas import matmul_one_thread
from ._numba import helper_threads


def linear_forward(x, weight, out=None):
    """x: (..., in), weight: (out, in) -> y: (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = np.matmul(x2, weight.T, out=out)
    cache = (x, weight)
    return y.reshape(*x.shape[:-1], weight.shape[0]), cache


def linear_backward(dy, cache, dweight=None):
    """Returns (dx, dW). dW is written into ``dweight`` when given (a view of the flat grad buffer)."""
    x, weight = cache
    dy2 = dy.reshape(-1, weight.shape[0])
    x2 = x.reshape(-1, weight.shape[1])
    dw = np.matmul(dy2.T, x2, out=dweight)
    dx = (dy2 @ weight).reshape(x.shape)
    return dx, dw


# ---- matmuls of the training step, split across threads by npllama itself ----------------------
# A multi-threaded BLAS splits one product between its threads, which then wait for each other
# (spinning) several times per call.  When the machine has other work those waits can cost a whole
# scheduler slice each; products with a small output and a long inner dimension, like
# dW = dy^T x with dy: (N, D), suffer most (measured here: 80 ms instead of 4 ms).  So during a
# step (``split_matmuls``) BLAS is set to one thread and npllama hands each of its n threads whole,
# independent single-threaded BLAS calls: a row block of a forward product, or, in a backward,
# dx = dy W on one thread and dW = dy^T x on the other (the same FLOPs).  The threads meet once
# per call.  NumPy releases the GIL inside matmul, so npllama's helper threads (layers/_numba.py:
# ``HelperThreads``, the same that run the kernels' units) run them in parallel.
# n is the thread count BLAS had (OPENBLAS_NUM_THREADS, i.e. ``--threads``), restored after the
# step.  Without a BLAS whose thread count can be set (found: OpenBLAS on Linux, as NumPy's wheels
# ship it), or with NPLLAMA_SPLIT_MATMULS=0, every product is one ordinary BLAS call.
# Where BLAS runs on one thread per call (inside ``split_matmuls``), the calls are
# ``matmul_one_thread``: MKL's when it is installed (layers/_blas.py), else NumPy's.
MIN_SPLIT_ROWS = 64     # no row block smaller than this
_split = {"threads": 1, "one_thread": False}


def _row_blocks(n_rows, n_blocks):
    n_blocks = max(1, min(n_blocks, n_rows // MIN_SPLIT_ROWS))
    return [(i * n_rows // n_blocks, (i + 1) * n_rows // n_blocks) for i in range(n_blocks)]


def _matmul_task(a, b, out):
    matmul_one_thread(a, b, out)


def matmuls(*products):
    """out = a @ b for each (a, b, out) in ``products`` (the products must be independent).

    Outside ``split_matmuls``: in order, one BLAS call each.  Inside, with n threads: n tasks (each
    product's rows cut into n / len(products) blocks) run concurrently, one on the calling thread."""
    n = _split["threads"]
    if any(getattr(b, "quantized", False) for _, b, _ in products):   # (layers/quantized_linear.py)
        from .quantized_linear import quantized_product
        for a, b, out in products:
            if getattr(b, "quantized", False):
                quantized_product(a, b, out, threads=n)
            else:
                matmuls((a, b, out))
        return
    if n <= 1:
        matmul = matmul_one_thread if _split["one_thread"] else np.matmul
        for a, b, out in products:
            matmul(a, b, out)
        return
    per_product = max(1, n // len(products))
    tasks = [(a[s:e], b, out[s:e]) for a, b, out in products for s, e in _row_blocks(a.shape[0], per_product)]
    helper_threads(n - 1).run([(_matmul_task, t) for t in tasks])


def split_threads():
    """How many threads ``matmuls`` splits products among (1 outside ``split_matmuls``)."""
    return _split["threads"]


class one_thread_per_matmul:
    """Context manager: inside ``split_matmuls``, every product one BLAS call on the calling thread
    (for work already spread over the threads: the model's batch parts, model.py)."""

    def __enter__(self):
        self.threads, _split["threads"] = _split["threads"], 1
        return self

    def __exit__(self, *exc):
        _split["threads"] = self.threads
        return False


class split_matmuls:
    """Context manager: inside, ``matmuls`` splits products across the BLAS thread budget."""

    def __enter__(self):
        self.restore = None
        if _split["one_thread"] or os.environ.get("NPLLAMA_SPLIT_MATMULS", "1") == "0":
            return self
        api = openblas_threads_api()
        if api is None:
            return self
        n = api[0]()
        if n > 1:
            api[1](1)
        self.restore = (api[1], n)
        _split.update(threads=n, one_thread=True)
        return self

    def __exit__(self, *exc):
        if self.restore is not None:
            _split.update(threads=1, one_thread=False)
            if self.restore[1] > 1:
                self.restore[0](self.restore[1])
        return False
