"""The single-threaded BLAS call (engine/blas.py): MKL's gemm when the ``mkl`` package is installed,
else np.matmul.  Whichever runs, ``matmul_one_thread`` must give NumPy's product for every layout
the model hands it (rows as they are, transposes, row blocks, single rows and columns) and fall back
to NumPy for the layouts BLAS cannot read in place."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllama.engine import blas as _blas
from npllama.engine.blas import matmul_add_one_thread, matmul_one_thread


def _layout(rng, rows, cols, dtype, how):
    """A (rows, cols) array of the given memory layout."""
    if how == "rows":
        return rng.standard_normal((rows, cols)).astype(dtype)
    if how == "transposed":                                   # like W.T
        return rng.standard_normal((cols, rows)).astype(dtype).T
    if how == "row block":                                    # like a[s:e] of a wider buffer's columns
        return rng.standard_normal((rows + 3, cols + 5)).astype(dtype)[2:2 + rows, 1:1 + cols]
    if how == "strided":                                      # every other column: no BLAS layout
        return rng.standard_normal((rows, 2 * cols)).astype(dtype)[:, ::2]
    raise ValueError(how)


LAYOUTS = ("rows", "transposed", "row block", "strided")


@settings(max_examples=300, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 40), n=st.integers(1, 40),
       a_how=st.sampled_from(LAYOUTS), b_how=st.sampled_from(LAYOUTS),
       out_how=st.sampled_from(("rows", "row block", "transposed")),
       dtype=st.sampled_from((np.float32, np.float64)), seed=st.integers(0, 2**16))
def test_matmul_one_thread_equals_numpy_for_every_layout(m, k, n, a_how, b_how, out_how, dtype, seed):
    rng = np.random.default_rng(seed)
    a, b = _layout(rng, m, k, dtype, a_how), _layout(rng, k, n, dtype, b_how)
    out = _layout(rng, m, n, dtype, out_how)
    returned = matmul_one_thread(a, b, out)
    assert returned is out
    expected = a.astype(np.float64) @ b.astype(np.float64)
    # the rounding of a sum of k products: float64 to ~1e-15, float32 to ~1e-7, relative to the sizes
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    tol = 1e-13 if dtype == np.float64 else 1e-5
    assert np.all(np.abs(out - expected) <= tol * scale + 1e-30)


def test_matmul_one_thread_agrees_with_numpy_at_a_training_steps_shapes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 128))
    w = rng.standard_normal((352, 128))
    dy = rng.standard_normal((256, 352))
    for a, b in ((x, w.T), (dy, w), (dy.T, x)):
        out = np.empty((a.shape[0], b.shape[1]))
        matmul_one_thread(a, b, out)
        np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 30), k=st.integers(1, 30), n=st.integers(1, 30), a_how=st.sampled_from(LAYOUTS),
       out_how=st.sampled_from(("rows", "row block", "transposed")), dtype=st.sampled_from((np.float32, np.float64)),
       seed=st.integers(0, 2**16))
def test_matmul_add_one_thread_adds_into_its_output_or_says_it_did_not(m, k, n, a_how, out_how, dtype, seed):
    # out += alpha a @ b by MKL's gemm (beta = 1) where MKL reads the arrays in place; else False and
    # out untouched (LoRA's low-rank update then runs its own kernel)
    rng = np.random.default_rng(seed)
    a, b = _layout(rng, m, k, dtype, a_how), _layout(rng, k, n, dtype, "transposed")
    out = _layout(rng, m, n, dtype, out_how)
    before = out.astype(np.float64)
    done = matmul_add_one_thread(a, b, out, 0.75)
    if not done:
        np.testing.assert_array_equal(out, before)
        assert _blas._mkl is None or a_how == "strided" or out_how == "transposed"
        return
    expected = before + 0.75 * (a.astype(np.float64) @ b.astype(np.float64))
    scale = np.abs(before) + np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    tol = 1e-13 if dtype == np.float64 else 1e-5
    assert np.all(np.abs(out - expected) <= tol * scale + 1e-30)


def test_an_output_overlapping_an_input_is_left_to_numpy():
    a = np.arange(16.0).reshape(4, 4)
    expected = a @ a
    matmul_one_thread(a, a, a)          # NumPy copies what overlaps; BLAS would read what it wrote
    np.testing.assert_array_equal(a, expected)


def test_the_blas_setting(monkeypatch):
    monkeypatch.setenv("NPLLAMA_BLAS", "numpy")
    assert _blas._load_mkl() == (None, None)
    monkeypatch.setenv("NPLLAMA_BLAS", "openblas")
    with pytest.raises(ValueError, match="NPLLAMA_BLAS must be auto, mkl or numpy"):
        _blas._load_mkl()
    monkeypatch.setattr(_blas, "_mkl_library_path", lambda: None)      # as without the mkl package
    monkeypatch.setenv("NPLLAMA_BLAS", "mkl")
    with pytest.raises(ImportError, match="NPLLAMA_BLAS=mkl.*not installed"):
        _blas._load_mkl()
    monkeypatch.setenv("NPLLAMA_BLAS", "auto")
    assert _blas._load_mkl() == (None, None)


def test_mkl_when_installed_runs_sequentially():
    if _blas._mkl is None:
        pytest.skip("MKL is not installed (the [mkl] extra)")
    assert _blas.BLAS.startswith("MKL ") and _blas.BLAS.endswith("(sequential)")
    assert _blas._mkl.MKL_Get_Max_Threads() == 1       # the sequential layer: no threads of its own


MKL_BESIDE_TORCH = """
import os, sys
import torch                                       # first, as a notebook comparing with PyTorch does
import numpy as np
from npllama.engine import blas as _blas
if _blas._mkl is None:
    print("no mkl"); sys.exit(0)
threads = lambda: len(os.listdir("/proc/self/task"))
a, b = np.random.default_rng(0).standard_normal((2, 300, 300)).astype(np.float32)
out = np.empty_like(a)
before = threads()
_blas.matmul_one_thread(a, b, out)
assert np.allclose(out, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-4, atol=1e-3)
assert threads() == before, (before, threads())      # MKL started no thread of its own
assert _blas._mkl.MKL_Get_Max_Threads() == 1 and _blas.BLAS.endswith("(sequential)")
print("ok", _blas.BLAS)
"""


def test_mkl_stays_sequential_beside_torch():
    """PyTorch's CPU build carries its own MKL and OpenMP runtime; imported first, it must not
    change the MKL npllama loads: sequential, no threads of its own, the right products."""
    import subprocess
    import sys
    pytest.importorskip("torch")
    if _blas._mkl is None:
        pytest.skip("MKL is not installed (the [mkl] extra)")
    result = subprocess.run([sys.executable, "-c", MKL_BESIDE_TORCH], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok MKL"), result.stdout


def test_a_training_steps_products_go_through_the_one_thread_blas_call(monkeypatch):
    """Inside ``split_matmuls`` (every model pass) each product is a ``matmul_one_thread`` call --
    MKL's when installed -- on whichever thread runs it; outside, NumPy's own (threaded) matmul."""
    import threading

    from npllama import Llama, LlamaConfig
    from npllama.engine import matmul as linear
    calls = []
    original = linear.matmul_one_thread
    monkeypatch.setattr(linear, "matmul_one_thread",
                        lambda a, b, out: (calls.append(threading.get_ident()), original(a, b, out))[1])
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=48, max_seq_len=16)
    model = Llama(cfg, dtype=np.float32, seed=0).train()
    x = np.random.default_rng(0).integers(0, 64, size=(4, 16))
    model.loss_and_grad(x, x)
    # at least one call per product: per layer 4 forward ones (qkv, o, gate/up, down) and 8 backward
    # ones (dW and dx of each), plus the output projection's 3 (more when products are split, or
    # the batch runs in parts, one per thread)
    assert len(calls) >= 2 * (4 + 8) + 3
    calls.clear()
    linear.matmuls((np.ones((3, 4), np.float32), np.ones((4, 5), np.float32), np.empty((3, 5), np.float32)))
    assert calls == []                                   # outside split_matmuls: NumPy's matmul


@pytest.mark.parametrize("rows, blocks", [(128, (128, 150)), (512, (256, 300))])
def test_split_products_cut_the_rows_or_for_few_rows_the_columns(monkeypatch, rows, blocks):
    """Inside ``split_matmuls`` on two threads a product is two single-threaded calls: row blocks,
    or, for fewer rows than COLUMN_SPLIT_BELOW_ROWS (a prompt's projections), column blocks -- each
    thread then reads half of W instead of all of it -- and either way the product is NumPy's."""
    from npllama.engine import matmul as linear
    from npllama.engine.threads import thread_limit
    shapes = []
    original = linear.matmul_one_thread
    monkeypatch.setattr(linear, "matmul_one_thread", lambda a, b, out: (shapes.append(out.shape), original(a, b, out))[1])
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((rows, 64)), rng.standard_normal((300, 64))   # y = x W^T, W (out, in)
    y = np.full((rows, 300), np.nan)
    with thread_limit(2), linear.split_matmuls():
        linear.matmuls((x, w.T, y))
    assert shapes == [blocks, blocks]
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-12, atol=1e-12)
