"""The single-threaded BLAS call behind npllama's matrix products: out = a @ b.

NumPy's wheels ship OpenBLAS.  Intel's MKL (the PyPI package ``mkl``, which the ``[mkl]`` extra
installs on x86-64 Linux: ``pip install -e '.[mkl]'``) is the BLAS PyTorch's CPU build multiplies
with, and on the products of a small Llama's training step -- inner dimensions of 128-768, ~1000
rows -- it is faster (measured on one core of an AVX-512 Xeon, GFLOP/s, MKL / OpenBLAS: x W^T
165-188 / 145-160, dy W 154-174 / 146-155, dy^T x 150-153 / 135-142 at the default model's shapes;
a whole default training step 82 -> 75.5 ms and 15M-v4k's 424 -> 387 ms).  When that package is
installed npllama calls its ``cblas_sgemm`` and ``cblas_dgemm`` through ctypes, which, like NumPy's
matmul, releases the GIL, so npllama's helper threads run products side by side (matmul.py).  MKL
runs in its sequential threading layer: it starts no threads of its own (nor loads an OpenMP
runtime) -- npllama shares out the work.

``NPLLAMA_BLAS`` chooses: ``auto`` (the default: MKL when installed), ``numpy`` (never MKL),
``mkl`` (an error when MKL cannot be loaded).  ``BLAS`` names the one in use.  ``sgemm_gflops``
probes the machine's float32 matrix-multiply rate now (a training run's start-up line).
"""
import ctypes
import importlib.metadata
import math
import os
import re
import time

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SEQUENTIAL = 1          # MKL_THREADING_SEQUENTIAL
_MKL_EXTRA = "the [mkl] extra: pip install -e '.[mkl]'"


def _mkl_library_path():
    """Path of libmkl_rt from the installed ``mkl`` package, or None."""
    try:
        dist = importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name.startswith("libmkl_rt.so"):
            return str(dist.locate_file(f))
    return None


def _blas_choice():
    """NPLLAMA_BLAS: auto (the default), mkl or numpy."""
    choice = os.environ.get("NPLLAMA_BLAS", "auto").strip().lower()
    if choice not in ("auto", "mkl", "numpy"):
        raise ValueError(f"NPLLAMA_BLAS must be auto, mkl or numpy, got {choice!r}")
    return choice


def _load_mkl():
    """(libmkl_rt with its gemm signatures set, its version) or (None, None), by NPLLAMA_BLAS."""
    choice = _blas_choice()
    if choice == "numpy":
        return None, None
    path = _mkl_library_path()
    try:
        if path is None:
            raise OSError(f"the mkl package is not installed ({_MKL_EXTRA})")
        lib = ctypes.CDLL(path)
        if lib.MKL_Set_Threading_Layer(_SEQUENTIAL) != _SEQUENTIAL:   # (before any other MKL call)
            raise OSError(f"{path}: MKL would not take its sequential threading layer")
    except OSError as e:
        if choice == "mkl":
            raise ImportError(f"NPLLAMA_BLAS=mkl, but MKL cannot be loaded: {e}") from e
        return None, None
    c_int, p = ctypes.c_int, ctypes.c_void_p
    for name, scalar in (("cblas_sgemm", ctypes.c_float), ("cblas_dgemm", ctypes.c_double)):
        getattr(lib, name).argtypes = [c_int] * 6 + [scalar, p, c_int, p, c_int, scalar, p, c_int]
        getattr(lib, name).restype = None
    version = ctypes.create_string_buffer(256)
    lib.MKL_Get_Version_String(version, 256)
    return lib, version.value.decode(errors="replace")


_mkl, _mkl_version = _load_mkl()
_version = re.search(r"Version ([0-9.]+)", _mkl_version or "")
BLAS = ("NumPy's BLAS" if _mkl is None else f"MKL {_version.group(1)} (sequential)" if _version
        else "MKL (sequential)")


def _blas_operand(x):
    """(transpose flag, leading dimension) under which row-major BLAS reads the 2-D array x in
    place: its rows contiguous (as is), or its columns (a transpose, like W.T); None otherwise."""
    rows, cols = x.shape
    s0, s1 = x.strides
    item = x.itemsize
    if (s1 == item or cols == 1) and (rows == 1 or (s0 % item == 0 and s0 // item >= cols)):
        return _NO_TRANS, (s0 // item if rows > 1 else cols)
    if (s0 == item or rows == 1) and (cols == 1 or (s1 % item == 0 and s1 // item >= rows)):
        return _TRANS, (s1 // item if cols > 1 else rows)
    return None


def _mkl_gemm(a, b, out, alpha, beta) -> bool:
    """out = alpha a @ b + beta out by MKL's gemm, when MKL is loaded and reads the arrays in place
    (2-D, one float dtype, out's rows contiguous, no overlap); False (nothing done) otherwise."""
    if _mkl is None or not (a.ndim == 2 and b.ndim == 2 and out.ndim == 2 and min(a.shape + b.shape) > 0
                            and a.dtype == b.dtype == out.dtype and a.dtype in (np.float32, np.float64)):
        return False
    op_a, op_b, op_out = _blas_operand(a), _blas_operand(b), _blas_operand(out)
    if not (op_a and op_b and op_out and op_out[0] == _NO_TRANS and out.shape == (a.shape[0], b.shape[1])
            and a.shape[1] == b.shape[0] and not (np.may_share_memory(out, a) or np.may_share_memory(out, b))):
        return False
    gemm = _mkl.cblas_sgemm if a.dtype == np.float32 else _mkl.cblas_dgemm
    gemm(_ROW_MAJOR, op_a[0], op_b[0], a.shape[0], b.shape[1], a.shape[1], alpha, a.ctypes.data, op_a[1],
         b.ctypes.data, op_b[1], beta, out.ctypes.data, op_out[1])
    return True


def matmul_one_thread(a, b, out):
    """out = a @ b (2-D; out must not overlap a or b) on the calling thread, by MKL when it is loaded
    and can read the arrays in place, else by np.matmul (the caller keeps NumPy's BLAS at one thread
    where that matters: matmul.split_matmuls)."""
    if _mkl_gemm(a, b, out, 1.0, 0.0):
        return out
    return np.matmul(a, b, out=out)


def matmul_add_one_thread(a, b, out, alpha=1.0) -> bool:
    """out += alpha a @ b on the calling thread, by MKL's gemm (beta = 1) when it is loaded and can
    read the arrays in place; False (nothing done) otherwise: NumPy's matmul cannot add into its
    output, and the caller has a kernel of its own for that case."""
    return _mkl_gemm(a, b, out, float(alpha), 1.0)


def sgemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """The machine's float32 matrix-multiply rate now (best of ``repeats`` n x n @ n x n, 2 n^3 FLOP
    each), with the threads this process uses: the figure to compare training speeds across
    machines by (about 0.1 s; the benchmarks measure the same at n = 2048)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
