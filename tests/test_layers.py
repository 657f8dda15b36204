"""Each layer: the backward equals central finite differences in float64 (relative error <= 1e-6;
see npllama/gradcheck.py for why), and every Numba kernel that training or generation calls equals
the NumPy reference in each way it is called: in place or not, accumulating or not, on many rows
(training, prefill) and on one row through its serial compilation (a decoding step).

Tolerances of kernel against reference: float64 1e-12; float32 2e-5 relative and absolute, on
inputs of order 1 (float32's epsilon is 1.2e-7, and the references are evaluated in float64)."""
import numba
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npllama.errors import InputError
from npllama.gradcheck import numerical_gradient, relative_error
from npllama.engine import fastmath, pool
from npllama import gradcheck
from npllama.engine.threads import thread_limit
from npllama.layers import attention, cross_entropy, dropout, embedding, linear, rmsnorm, rope, swiglu

GRAD_TOL = 1e-6
seeds = st.integers(0, 2**31 - 1)


def fd_check(forward, inputs, analytic, dout):
    """Finite-difference check of sum(dout * forward()) against the analytic gradients.  A gradient
    that is zero in exact arithmetic (attention's dq with one key) comes out at the 1e-16 level,
    below what finite differences resolve (~1e-10, see npllama/gradcheck.py): scales under 1e-8
    are held to an absolute error of GRAD_TOL * 1e-8 instead."""
    loss = lambda: float(np.sum(dout * forward()))
    for name, x in inputs.items():
        err = relative_error(analytic[name], numerical_gradient(loss, x), smallest_scale=1e-8)
        assert err < GRAD_TOL, f"{name}: relative error {err:.2e}"


def assert_kernel_equals_reference(kernel, reference, dtype):
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert np.asarray(kernel).dtype == dtype
    np.testing.assert_allclose(kernel, reference, rtol=tol, atol=tol)


dtypes = pytest.mark.parametrize("dtype", [np.float32, np.float64])


def normal(r, shape, dtype, scale=1.0):
    return r.normal(scale=scale, size=shape).astype(dtype)


def f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


# ---- RMSNorm -----------------------------------------------------------------------------------
# d >= 2: at d = 1 the output is w * sign(x) and its derivative is O(eps), too small for finite
# differences to resolve relative to the function's O(1) rounding noise.
@given(seed=seeds, n=st.integers(1, 6), d=st.integers(2, 9), eps=st.sampled_from([1e-5, 1e-6, 0.1]))
def test_rmsnorm_gradients(seed, n, d, eps):
    r = np.random.default_rng(seed)
    x, w, dy = r.normal(size=(n, d)), r.normal(size=d), r.normal(size=(n, d))
    y, cache = gradcheck.rmsnorm_forward(x, w, eps)
    dx, dw = gradcheck.rmsnorm_backward(dy, cache)
    fd_check(lambda: gradcheck.rmsnorm_forward(x, w, eps)[0], {"x": x, "w": w}, {"x": dx, "w": dw}, dy)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(seed=seeds, shape=st.sampled_from([(1, 1), (3, 7), (2, 5, 16), (33, 64)]))
def test_rmsnorm_kernel_equals_reference(dtype, seed, shape):
    r = np.random.default_rng(seed)
    x, w, dy = (r.normal(size=s).astype(dtype) for s in (shape, shape[-1], shape))
    y, cache = gradcheck.rmsnorm_forward(x, w, 1e-5)
    y_ref, cache_ref = rmsnorm.rmsnorm_forward_reference(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    assert_kernel_equals_reference(y, y_ref, dtype)
    for got, want in zip(gradcheck.rmsnorm_backward(dy, cache), rmsnorm.rmsnorm_backward_reference(dy, cache_ref)):
        assert_kernel_equals_reference(got, want, dtype)


@dtypes
@given(seed=seeds, n=st.integers(1, 9), d=st.integers(1, 40), in_place=st.booleans())
def test_rmsnorm_forward_kernel_with_residual(dtype, seed, n, d, in_place):
    """h = x + a, y = RMSNorm(h): h into its own buffer (training and inference), or over x (h=x:
    the residual stream of a decoding step)."""
    r = np.random.default_rng(seed)
    x, a, w = normal(r, (n, d), dtype), normal(r, (n, d), dtype), normal(r, d, dtype)
    x_before = x.copy()
    y, rr = np.empty_like(x), np.empty(n, dtype=dtype)
    if in_place:
        rmsnorm.rmsnorm_forward_kernel(x, w, dtype(1e-5), y, rr, a, x)
    else:
        h = np.full_like(x, np.nan)
        rmsnorm.rmsnorm_forward_kernel(x, w, dtype(1e-5), y, rr, a, h)
    h_ref = x_before.astype(np.float64) + a
    y_ref, (_, _, r_ref) = rmsnorm.rmsnorm_forward_reference(h_ref, *f64(w), 1e-5)
    assert_kernel_equals_reference(x if in_place else h, h_ref, dtype)
    if not in_place:
        np.testing.assert_array_equal(x, x_before)
    assert_kernel_equals_reference(y, y_ref, dtype)
    assert_kernel_equals_reference(rr, r_ref, dtype)


@dtypes
@given(seed=seeds, n=st.integers(1, 20), d=st.integers(1, 40), accumulate=st.booleans())
def test_rmsnorm_backward_kernel_accumulates(dtype, seed, n, d, accumulate):
    """accumulate=True adds dx into the residual stream's gradient (the block's backward);
    the gain's gradient is the sum of the per-chunk partial rows."""
    r = np.random.default_rng(seed)
    x, w, dy, dres = normal(r, (n, d), dtype), normal(r, d, dtype), normal(r, (n, d), dtype), normal(r, (n, d), dtype)
    _, cache = rmsnorm.rmsnorm_forward_reference(*f64(x, w), 1e-5)
    dx_ref, dw_ref = rmsnorm.rmsnorm_backward_reference(*f64(dy), cache)
    rr = cache[2].astype(dtype)
    dx = dres.copy()
    dw_partial = np.full((rmsnorm.rmsnorm_dw_chunks(n), d), np.nan, dtype=dtype)
    rmsnorm.rmsnorm_backward_kernel(dy, x, w, rr, dx, dw_partial, accumulate)
    assert_kernel_equals_reference(dx, dx_ref + (dres if accumulate else 0.0), dtype)
    assert_kernel_equals_reference(dw_partial.sum(axis=0), dw_ref, dtype)


@dtypes
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_one_row_equals_its_row_in_a_batch(dtype, residual, rng):
    """A decoding step's norm (one row: one unit of work, on the calling thread, h over x) is the
    arithmetic of the same row among 40 spread over the threads, bit for bit, and the reference's."""
    x, a, w = normal(rng, (40, 288), dtype), normal(rng, (40, 288), dtype), normal(rng, 288, dtype)
    y, rr, h = np.empty_like(x), np.empty(40, dtype=dtype), np.empty_like(x)
    rmsnorm.rmsnorm_forward_kernel(x, w, dtype(1e-5), y, rr, *((a, h) if residual else ()))
    for n in (0, 17, 39):
        xn, yn, rn = x[n:n + 1].copy(), np.empty((1, 288), dtype=dtype), np.empty(1, dtype=dtype)
        rmsnorm.rmsnorm_forward_kernel(xn, w, dtype(1e-5), yn, rn, *((a[n:n + 1], xn) if residual else ()))
        np.testing.assert_array_equal(yn[0], y[n])
        np.testing.assert_array_equal(rn[0], rr[n])
        if residual:
            np.testing.assert_array_equal(xn[0], h[n])
    want = x.astype(np.float64) + (a if residual else 0.0)
    assert_kernel_equals_reference(y, rmsnorm.rmsnorm_forward_reference(want, *f64(w), 1e-5)[0], dtype)


# ---- RoPE --------------------------------------------------------------------------------------
def _rope_inputs(r, b, h, t, half, theta=10000.0, scaling=None):
    freqs = rope.rope_frequencies(2 * half, theta, scaling)
    cos, sin = rope.rope_cos_sin(np.arange(t), freqs, np.float64)
    return r.normal(size=(b, h, t, 2 * half)), cos, sin


@given(seed=seeds, b=st.integers(1, 2), h=st.integers(1, 3), t=st.integers(1, 6), half=st.integers(1, 4))
def test_rope_gradients(seed, b, h, t, half):
    r = np.random.default_rng(seed)
    x, cos, sin = _rope_inputs(r, b, h, t, half)
    dy = r.normal(size=x.shape)
    y, cache = gradcheck.rope_forward(x, cos, sin)
    dx = gradcheck.rope_backward(dy, cache)
    fd_check(lambda: gradcheck.rope_forward(x, cos, sin)[0], {"x": x}, {"x": dx}, dy)
    assert_kernel_equals_reference(y, rope.rope_forward_reference(x, cos, sin)[0], np.float64)
    assert_kernel_equals_reference(dx, rope.rope_backward_reference(dy, cache), np.float64)


def test_rope_preserves_norm_and_relative_position(rng):
    # A rotation keeps each pair's length, and q.k after RoPE depends only on the position gap.
    freqs = rope.rope_frequencies(8, 10000.0)
    cos, sin = rope.rope_cos_sin(np.arange(12), freqs, np.float64)
    q, k = rng.normal(size=8), rng.normal(size=8)
    rot = lambda v, t: rope.rope_forward_reference(v[None, None, None], cos[t:t + 1], sin[t:t + 1])[0].ravel()
    np.testing.assert_allclose(np.linalg.norm(rot(q, 5)), np.linalg.norm(q), rtol=1e-14)
    np.testing.assert_allclose(rot(q, 7) @ rot(k, 3), rot(q, 4) @ rot(k, 0), rtol=1e-12)


def test_llama3_scaling_frequencies():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    base = rope.rope_frequencies(128, 500000.0)
    scaled = rope.rope_frequencies(128, 500000.0, scaling)
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4        # short wavelengths: unchanged
    low = wavelen > 8192 / 1         # long wavelengths: divided by the factor
    np.testing.assert_array_equal(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-15)
    mid = ~high & ~low               # in between: strictly between the two
    assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rope_kernel_strided_input(dtype, rng):
    # The model feeds RoPE views into the fused qkv activations (non-contiguous).
    qkv = rng.normal(size=(2, 5, 3 * 8)).astype(dtype)
    x = qkv[..., :16].reshape(2, 5, 2, 8).transpose(0, 2, 1, 3)
    cos, sin = rope.rope_cos_sin(np.arange(5), rope.rope_frequencies(8, 10000.0), dtype)
    assert_kernel_equals_reference(gradcheck.rope_forward(x, cos, sin)[0], rope.rope_forward_reference(x, cos, sin)[0], dtype)


@dtypes
@given(seed=seeds, b=st.integers(1, 3), t=st.integers(1, 7), heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
       half=st.integers(1, 4))
def test_rope_kernel_on_qkv_rows(dtype, seed, b, t, heads, half):
    """One call rotates q's and k's heads in the (B*T, (H+2K)*hd) rows of the q/k/v projection, row
    n at position n % T, and leaves v alone; sign -1 is the backward."""
    H, K = heads
    hd = 2 * half
    r = np.random.default_rng(seed)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4}
    cos, sin = rope.rope_cos_sin(np.arange(t), rope.rope_frequencies(hd, 500000.0, scaling), dtype)
    qkv = normal(r, (b * t, (H + 2 * K) * hd), dtype)

    def as_heads(rows, n_heads):   # (b*t, n_heads*hd) -> (b, n_heads, t, hd)
        return rows.reshape(b, t, n_heads, hd).transpose(0, 2, 1, 3)

    for sign, reference in ((1.0, lambda x: rope.rope_forward_reference(x, *f64(cos, sin))[0]),
                            (-1.0, lambda x: rope.rope_backward_reference(x, tuple(f64(cos, sin))))):
        rows = qkv.copy()
        rope.rope_kernel(rows, H + K, hd, cos, sin, dtype(sign), 0, t)
        assert_kernel_equals_reference(as_heads(rows[:, :(H + K) * hd], H + K),
                                       reference(as_heads(qkv[:, :(H + K) * hd].astype(np.float64), H + K)), dtype)
        np.testing.assert_array_equal(rows[:, (H + K) * hd:], qkv[:, (H + K) * hd:])


@dtypes
@pytest.mark.parametrize("pos", [0, 5, 11])
def test_rope_kernel_one_row_at_a_start_position(dtype, pos, rng):
    """A decoding step: one q/k/v row at position ``pos`` (start=pos), on the calling thread, the
    same numbers as that position's row among 12 spread over the threads, and as the reference."""
    H, K, hd = 4, 2, 8
    cos, sin = rope.rope_cos_sin(np.arange(12), rope.rope_frequencies(hd, 10000.0), dtype)
    rows = normal(rng, (12, (H + 2 * K) * hd), dtype)
    one, batch = rows[pos:pos + 1].copy(), rows.copy()
    rope.rope_kernel(one, H + K, hd, cos, sin, dtype(1.0), pos, 1)
    rope.rope_kernel(batch, H + K, hd, cos, sin, dtype(1.0), 0, 12)
    np.testing.assert_array_equal(one[0], batch[pos])
    x = rows[pos, :(H + K) * hd].astype(np.float64).reshape(H + K, hd)
    want = rope.rope_forward_reference(x, *f64(cos[pos], sin[pos]))[0]
    assert_kernel_equals_reference(one[0, :(H + K) * hd].reshape(H + K, hd), want, dtype)


# ---- attention ---------------------------------------------------------------------------------
attn_shapes = st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 3), (6, 2)]),
                        st.integers(1, 6), st.integers(1, 4))


@given(seed=seeds, shape=attn_shapes)
def test_attention_gradients(seed, shape):
    b, (h, kv), t, hd = shape
    r = np.random.default_rng(seed)
    q, k, v = r.normal(size=(b, h, t, hd)), r.normal(size=(b, kv, t, hd)), r.normal(size=(b, kv, t, hd))
    do = r.normal(size=(b, h, t, hd))
    o, cache = attention.attention_forward(q, k, v)
    dq, dk, dv = attention.attention_backward(do, cache)
    fd_check(lambda: attention.attention_forward(q, k, v)[0], {"q": q, "k": k, "v": v},
             {"q": dq, "k": dk, "v": dv}, do)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(seed=seeds, shape=attn_shapes)
def test_attention_kernel_equals_reference(dtype, seed, shape):
    b, (h, kv), t, hd = shape
    r = np.random.default_rng(seed)
    q, k, v, do = (r.normal(size=s).astype(dtype) for s in ((b, h, t, hd), (b, kv, t, hd), (b, kv, t, hd), (b, h, t, hd)))
    o, cache = attention.attention_forward(q, k, v)
    o_ref, cache_ref = attention.attention_forward_reference(q, k, v)
    assert o.dtype == dtype
    assert_kernel_equals_reference(o, o_ref, dtype)
    for got, want in zip(attention.attention_backward(do, cache), attention.attention_backward_reference(do, cache_ref)):
        assert_kernel_equals_reference(got, want, dtype)


def test_attention_is_causal(rng):
    # Changing a later key or value never changes an earlier output.
    q, k, v = rng.normal(size=(1, 2, 6, 4)), rng.normal(size=(1, 1, 6, 4)), rng.normal(size=(1, 1, 6, 4))
    o1, _ = attention.attention_forward(q, k, v)
    k[:, :, 4:], v[:, :, 4:] = 100.0, -100.0
    o2, _ = attention.attention_forward(q, k, v)
    np.testing.assert_array_equal(o1[:, :, :4], o2[:, :, :4])
    assert not np.allclose(o1[:, :, 4:], o2[:, :, 4:])


# ---- SwiGLU ------------------------------------------------------------------------------------
@given(seed=seeds, n=st.integers(1, 5), d=st.integers(1, 6), f=st.integers(1, 7))
def test_feedforward_gradients(seed, n, d, f):
    r = np.random.default_rng(seed)
    x, w_gu, w_down, dy = r.normal(size=(n, d)), r.normal(size=(2 * f, d)), r.normal(size=(d, f)), r.normal(size=(n, d))
    y, cache = gradcheck.feedforward_forward(x, w_gu, w_down)
    dx, dw_gu, dw_down = gradcheck.feedforward_backward(dy, cache)
    for again, first in zip(gradcheck.feedforward_backward(dy, cache), (dx, dw_gu, dw_down)):
        np.testing.assert_array_equal(again, first)           # a backward leaves its cache intact
    fd_check(lambda: gradcheck.feedforward_forward(x, w_gu, w_down)[0], {"x": x, "w_gate_up": w_gu, "w_down": w_down},
             {"x": dx, "w_gate_up": dw_gu, "w_down": dw_down}, dy)
    # the definition: W_down (silu(W_gate x) * W_up x)
    a, u = x @ w_gu[:f].T, x @ w_gu[f:].T
    np.testing.assert_allclose(y, (a / (1 + np.exp(-a)) * u) @ w_down.T, rtol=1e-12, atol=1e-12)


@dtypes
@given(seed=seeds, n=st.integers(1, 9), f=st.integers(1, 9))
def test_swiglu_kernels_equal_reference(dtype, seed, n, f):
    """On the [g | u] rows of the gate/up projection; the backward writes [dg | du] over them."""
    r = np.random.default_rng(seed)
    gate_up, ds = normal(r, (n, 2 * f), dtype, scale=3.0), normal(r, (n, f), dtype, scale=3.0)
    g, u = f64(gate_up[:, :f], gate_up[:, f:])
    s = np.empty((n, f), dtype=dtype)
    swiglu.swiglu_forward_kernel(gate_up, s)
    assert_kernel_equals_reference(s, swiglu.swiglu_forward_reference(g, u)[0], dtype)
    dgate_up = gate_up.copy()
    swiglu.swiglu_backward_kernel(ds, dgate_up)
    dg, du = swiglu.swiglu_backward_reference(*f64(ds), (g, u))
    assert_kernel_equals_reference(dgate_up[:, :f], dg, dtype)
    assert_kernel_equals_reference(dgate_up[:, f:], du, dtype)
    # the layer functions: the same numbers, and the backward leaves its cache as it was
    s2, cache = gradcheck.swiglu_forward(gate_up)
    np.testing.assert_array_equal(s2, s)
    np.testing.assert_array_equal(gradcheck.swiglu_backward(ds, cache), dgate_up)
    np.testing.assert_array_equal(cache, gate_up)


@dtypes
def test_swiglu_one_row_equals_its_row_in_a_batch(dtype, rng):
    """A decoding step's SwiGLU (one row, on the calling thread) is the arithmetic of the same row
    among 40 spread over the threads, bit for bit, and the reference's."""
    gate_up = normal(rng, (40, 2 * 768), dtype, scale=3.0)
    batch = np.empty((40, 768), dtype=dtype)
    swiglu.swiglu_forward_kernel(gate_up, batch)
    for n in (0, 21, 39):
        one = np.empty((1, 768), dtype=dtype)
        swiglu.swiglu_forward_kernel(gate_up[n:n + 1], one)
        np.testing.assert_array_equal(one[0], batch[n])
    assert_kernel_equals_reference(batch, swiglu.swiglu_forward_reference(*f64(gate_up[:, :768], gate_up[:, 768:]))[0], dtype)


@given(seed=seeds, n=st.integers(1, 5), f=st.integers(1, 5))
def test_swiglu_reference_gradients(seed, n, f):
    r = np.random.default_rng(seed)
    a, u, dh = r.normal(size=(n, f)), r.normal(size=(n, f)), r.normal(size=(n, f))
    da, du = swiglu.swiglu_backward_reference(dh, (a, u))
    fd_check(lambda: swiglu.swiglu_forward_reference(a, u)[0], {"a": a, "u": u}, {"a": da, "u": du}, dh)


# ---- linear, embedding, dropout ----------------------------------------------------------------
@given(seed=seeds, n=st.integers(1, 5), i=st.integers(1, 6), o=st.integers(1, 6))
def test_linear_gradients(seed, n, i, o):
    r = np.random.default_rng(seed)
    x, w, dy = r.normal(size=(n, i)), r.normal(size=(o, i)), r.normal(size=(n, o))
    y, cache = linear.linear_forward(x, w)
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-14)
    dx, dw = linear.linear_backward(dy, cache)
    fd_check(lambda: linear.linear_forward(x, w)[0], {"x": x, "w": w}, {"x": dx, "w": dw}, dy)


@given(seed=seeds, b=st.integers(1, 3), t=st.integers(1, 6), v=st.integers(1, 8), d=st.integers(1, 5))
def test_embedding_gradients(seed, b, t, v, d):
    r = np.random.default_rng(seed)
    ids, w, dout = r.integers(0, v, size=(b, t)), r.normal(size=(v, d)), r.normal(size=(b, t, d))
    out, cache = embedding.embedding_forward(ids, w)
    np.testing.assert_array_equal(out, w[ids])
    dw = embedding.embedding_backward(dout, cache, np.zeros_like(w))
    fd_check(lambda: embedding.embedding_forward(ids, w)[0], {"w": w}, {"w": dw}, dout)
    ref = np.zeros_like(w)
    embedding.scatter_add_rows_reference(ids.reshape(-1), dout.reshape(-1, d), ref)
    np.testing.assert_allclose(dw, ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("ids, match", [
    (np.array([[0, 7]]), "outside \\[0, 7\\)"), (np.array([[-1, 2]]), "-1 is outside"),
    (np.array([[0.0, 1.0]]), "integers"), (np.array([[0, 1, 2]]), "shape"),
])
def test_embedding_backward_checks_ids(ids, match):
    dweight = np.zeros((7, 3))
    with pytest.raises(InputError, match=match):
        embedding.embedding_backward(np.ones((1, 2, 3)), ids, dweight)
    assert not dweight.any()


@given(seed=seeds, p=st.sampled_from([0.1, 0.5, 0.9]))
def test_dropout(seed, p):
    r = np.random.default_rng(seed)
    x, dy = r.normal(size=(50, 40)), r.normal(size=(50, 40))
    y, mask = dropout.dropout_forward(x, p, np.random.default_rng(seed), training=True)
    y2, _ = dropout.dropout_forward(x, p, np.random.default_rng(seed), training=True)
    np.testing.assert_array_equal(y, y2)                              # seeded
    kept = mask != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-14)  # inverted scaling
    assert abs(kept.mean() - (1 - p)) < 0.05                         # keep rate ~ 1 - p
    np.testing.assert_array_equal(dropout.dropout_backward(dy, mask), dy * mask)
    y_eval, m_eval = dropout.dropout_forward(x, p, r, training=False)
    assert m_eval is None and y_eval is x


# ---- cross-entropy -----------------------------------------------------------------------------
@given(seed=seeds, n=st.integers(1, 6), v=st.integers(2, 9), n_ignored=st.integers(0, 3))
def test_cross_entropy_gradients(seed, n, v, n_ignored):
    r = np.random.default_rng(seed)
    logits, targets = r.normal(scale=2.0, size=(n, v)), r.integers(0, v, size=n)
    targets[r.permutation(n)[:min(n_ignored, n - 1)]] = -100
    loss, cache = gradcheck.cross_entropy_forward(logits, targets)
    dlogits = gradcheck.cross_entropy_backward(1.0, cache)
    fd_check(lambda: gradcheck.cross_entropy_forward(logits, targets)[0], {"logits": logits}, {"logits": dlogits}, 1.0)
    keep = targets != -100
    by_hand = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, targets[i]] for i in np.flatnonzero(keep)])
    np.testing.assert_allclose(loss, by_hand, rtol=1e-13)
    assert np.all(dlogits[~keep] == 0)


@dtypes
@given(seed=seeds, n=st.integers(1, 9), v=st.integers(2, 40))
def test_cross_entropy_kernel_equals_reference(dtype, seed, n, v):
    """Losses alone (evaluation: the logits untouched), and losses with the gradient written over
    the logits (training)."""
    r = np.random.default_rng(seed)
    logits, targets = normal(r, (n, v), dtype, scale=5.0), r.integers(0, v, size=n)
    targets[r.random(n) < 0.3] = -100
    loss_ref, cache_ref = cross_entropy.cross_entropy_forward_reference(*f64(logits), targets)
    dlogits_ref = cross_entropy.cross_entropy_backward_reference(0.7, cache_ref)
    keep = targets != -100
    losses_ref = np.where(keep, cache_ref[2] - f64(logits)[0][np.arange(n), np.where(keep, targets, 0)], 0.0)

    z, losses = logits.copy(), np.full(n, np.nan)
    cross_entropy.cross_entropy_kernel(z, targets, -100, losses, dtype(0.0))
    np.testing.assert_array_equal(z, logits)
    assert_kernel_equals_reference(losses.astype(dtype), losses_ref, dtype)

    count = cross_entropy.count_targets(targets)
    z, losses = logits.copy(), np.full(n, np.nan)
    cross_entropy.cross_entropy_kernel(z, targets, -100, losses, dtype(0.7 / count))
    assert_kernel_equals_reference(losses.astype(dtype), losses_ref, dtype)
    assert_kernel_equals_reference(z, dlogits_ref, dtype)
    # the layer functions and the model's fused call give the same numbers
    loss, cache = gradcheck.cross_entropy_forward(logits, targets)
    assert_kernel_equals_reference(dtype(loss), loss_ref, dtype)
    np.testing.assert_array_equal(gradcheck.cross_entropy_backward(0.7, cache), z)
    z2 = logits.copy()
    loss2, _ = cross_entropy.cross_entropy_forward_backward(z2, targets, dloss=0.7)
    assert loss2 == loss
    np.testing.assert_array_equal(z2, z)


@dtypes
@given(seed=seeds, n=st.integers(1, 70), special=st.sampled_from([None, np.inf, -np.inf]))
def test_array_max_equals_numpy(dtype, seed, n, special):
    """The vectorised row max (attention, cross-entropy) is exactly NumPy's, infinities included."""
    r = np.random.default_rng(seed)
    x = normal(r, (n + 5,), dtype, scale=10.0)
    if special is not None:
        x[r.integers(0, n)] = special
    assert fastmath.array_max(x, n) == np.max(x[:n])


@dtypes
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_cross_entropy_kernel_non_finite_logit_gives_non_finite_loss(dtype, bad):
    """A +inf or NaN logit makes that row's loss NaN (what the training NaN guard looks for), not a
    finite number; a -inf logit is a token of probability 0, left out of the sum exactly."""
    logits = np.linspace(-2, 2, 3 * 40).reshape(3, 40).astype(dtype)
    targets = np.array([1, 2, 3])
    z, losses = logits.copy(), np.empty(3)
    z[1, 17] = bad
    cross_entropy.cross_entropy_kernel(z, targets, -100, losses, dtype(0.0))
    assert np.isnan(losses[1]) and np.all(np.isfinite(losses[[0, 2]]))
    z, losses = logits.copy(), np.empty(3)
    z[1, 17] = -np.inf
    cross_entropy.cross_entropy_kernel(z, targets, -100, losses, dtype(0.0))
    rest = np.delete(logits[1].astype(np.float64), 17)
    expected = np.log(np.exp(rest).sum()) - logits[1, 2]
    np.testing.assert_allclose(losses[1], expected, rtol=1e-6 if dtype == np.float32 else 1e-14)


def test_cross_entropy_in_place_gradient(rng):
    logits, targets = rng.normal(size=(4, 7)), np.array([1, -100, 6, 0])
    loss, cache = gradcheck.cross_entropy_forward(logits, targets)
    expected = gradcheck.cross_entropy_backward(1.0, cache)
    got = gradcheck.cross_entropy_backward(1.0, cache, out=logits)
    assert got is logits
    np.testing.assert_array_equal(got, expected)


# ---- units of work shared among threads (run_on_threads, claim_unit) ------------------------------
@numba.njit(nogil=True)
def _count_claims(counts, who, thread_ids, next_unit):
    me = thread_ids[pool.claim_unit(thread_ids[-1:])]     # a number of its own for each thread
    while True:
        unit = pool.claim_unit(next_unit)
        if unit >= counts.shape[0]:
            break
        counts[unit] += 1
        who[unit] = me


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_run_on_threads_runs_every_unit_exactly_once(threads):
    # Every unit is claimed by exactly one thread (the counter is one atomic add), whatever the thread
    # count; with more than one thread the work really is shared (all the units on one thread
    # would mean the pool never started).  On a loaded machine a helper can miss a few calls whole
    # (descheduled while the calling thread claims every unit), so up to 400 calls, stopping at the
    # 20th after the first shared one.
    with thread_limit(threads):
        shared = 0
        for call in range(400):
            if call >= 20 and (shared or threads == 1):
                break
            n = 200_000
            counts, who = np.zeros(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
            # an id per call of the kernel (with threads, the first call is run_on_threads's own on the
            # calling thread with no unit left, which compiles it there); last: the ids' counter
            thread_ids = np.append(np.arange(threads + 1, dtype=np.int64), 0)
            pool.run_on_threads(_count_claims, counts, who, thread_ids)
            assert (counts == 1).all()
            assert set(np.unique(who)) <= set(range(threads + 1))
            shared += len(np.unique(who)) > 1
        assert shared > 0 if threads > 1 else shared == 0


def test_helper_threads_run_every_job_once_and_hand_back_errors():
    # HelperThreads.run: the first job on the calling thread, one job per helper, all done on return
    # (also when the helpers slept in between), and a helper's error raised in the caller, after
    # which the pool still works.
    import threading
    import time
    helpers = pool.HelperThreads(3)
    for pause in (0.0, 0.01):   # (a pause lets the helpers stop watching and fall asleep)
        time.sleep(pause)
        ran = []
        helpers.run([(lambda i=i: ran.append((i, threading.get_ident())), ()) for i in range(4)])
        assert sorted(i for i, _ in ran) == [0, 1, 2, 3]
        assert len({ident for _, ident in ran}) == 4                      # each on a thread of its own
        assert dict(ran)[0] == threading.get_ident()                      # the first one here

    def fail():
        raise ValueError("from a helper")
    with pytest.raises(ValueError, match="from a helper"):
        helpers.run([(lambda: None, ()), (fail, ())])
    ran = []
    helpers.run([(ran.append, (1,)), (ran.append, (2,))])
    assert sorted(ran) == [1, 2]
    # several errors in one call (the caller's own too): one is raised, none is left for a later call
    with pytest.raises(ValueError):
        helpers.run([(fail, ()), (fail, ()), (fail, ())])
    helpers.run([(lambda: None, ())] * 4)
    with pytest.raises(ValueError, match="5 jobs for 3 helper threads"):
        helpers.run([(lambda: None, ())] * 5)

