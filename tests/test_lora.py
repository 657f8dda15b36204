"""LoRA layer (npllama/layers/lora.py): the reference backward equals central finite differences in
float64; the fast path equals the reference (float64 to 1e-12, float32 to 1e-5, both max-normalised);
PEFT's init reproduces the base layer exactly; the merged weight computes the adapter form; inside
npllama.reference's model the adapters' gradients equal finite differences."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npllama import reference
from npllama.config import LlamaConfig
from npllama.gradcheck import (lora_backward, lora_forward, numerical_gradient, random_params, relative_error,
                               richardson_gradient)
from npllama.layers.dropout import dropout_forward
from npllama.layers.lora import (lora_adapter_backward, lora_adapter_forward, lora_backward_reference,
                                 lora_forward_reference, lora_init, merge_lora)

GRAD_TOL = 1e-6
FAST_TOL = {np.float64: 1e-12, np.float32: 1e-5}
seeds = st.integers(0, 2**31 - 1)
leading = st.sampled_from([(1,), (5,), (2, 3)])
widths = st.integers(1, 9)
ranks = st.integers(1, 4)
scales = st.sampled_from([0.5, 2.0, 16.0])


def random_layer(r, lead, d_in, d_out, rank, dropout_p, dtype=np.float64):
    """x (..., in), W, A, B (all nonzero, so every term of the backward matters), mask or None, dy."""
    x = r.normal(size=(*lead, d_in))
    w, a, b = r.normal(size=(d_out, d_in)), r.normal(size=(rank, d_in)), r.normal(size=(d_out, rank))
    mask = dropout_forward(x, dropout_p, r, training=True)[1]
    dy = r.normal(size=(*lead, d_out))
    cast = lambda v: None if v is None else v.astype(dtype)
    return cast(x), cast(w), cast(a), cast(b), cast(mask), cast(dy)


@given(seed=seeds, lead=leading, d_in=widths, d_out=widths, rank=ranks, scale=scales,
       dropout_p=st.sampled_from([0.0, 0.3]))
def test_lora_reference_gradients(seed, lead, d_in, d_out, rank, scale, dropout_p):
    r = np.random.default_rng(seed)
    x, w, a, b, mask, dy = random_layer(r, lead, d_in, d_out, rank, dropout_p)
    _, cache = lora_forward_reference(x, w, a, b, scale, mask)
    dx, da, db = lora_backward_reference(dy, cache)
    assert (dx.shape, da.shape, db.shape) == (x.shape, a.shape, b.shape)
    loss = lambda: float(np.sum(dy * lora_forward_reference(x, w, a, b, scale, mask)[0]))
    for name, value, grad in (("x", x, dx), ("A", a, da), ("B", b, db)):
        err = relative_error(grad, numerical_gradient(loss, value))
        assert err < GRAD_TOL, f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(seed=seeds, lead=leading, d_in=widths, d_out=widths, rank=ranks, scale=scales,
       dropout_p=st.sampled_from([0.0, 0.3]))
def test_lora_fast_equals_reference(dtype, seed, lead, d_in, d_out, rank, scale, dropout_p):
    r = np.random.default_rng(seed)
    x, w, a, b, mask, dy = random_layer(r, lead, d_in, d_out, rank, dropout_p, dtype)
    y_ref, cache_ref = lora_forward_reference(x, w, a, b, scale, mask)
    y, cache = lora_forward(x, w, a, b, scale, mask)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert relative_error(y, y_ref) <= FAST_TOL[dtype]
    got, want = lora_backward(dy, cache), lora_backward_reference(dy, cache_ref)
    for name, g, g_ref in zip(("dx", "dA", "dB"), got, want):
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        assert relative_error(g, g_ref) <= FAST_TOL[dtype], name


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_lora_fast_writes_into_given_buffers_and_keeps_its_cache(rng, dropout_p):
    N, d_in, d_out, rank = 7, 6, 5, 3
    x, w, a, b, mask, dy = random_layer(rng, (N,), d_in, d_out, rank, dropout_p)
    out, z, x_drop = np.empty((N, d_out)), np.empty((N, rank)), np.empty((N, d_in))
    dx, da, db, dz = np.empty((N, d_in)), np.empty((rank, d_in)), np.empty((d_out, rank)), np.empty((N, rank))
    x_before = x.copy()
    y, cache = lora_forward(x, w, a, b, 2.0, mask, out=out, z=z, x_drop=x_drop)
    assert y is out or np.shares_memory(y, out)
    np.testing.assert_array_equal(z, (x if mask is None else x * mask) @ a.T)
    grads = lora_backward(dy, cache, dx=dx, da=da, db=db, dz=dz)
    for g, buf in zip(grads, (dx, da, db)):
        assert np.shares_memory(g, buf)
    grads = [g.copy() for g in grads]
    again = lora_backward(dy, cache)              # the first backward left the cache intact
    for g, g2 in zip(grads, again):
        np.testing.assert_array_equal(g, g2)
    np.testing.assert_array_equal(x, x_before)
    want = lora_backward_reference(dy, lora_forward_reference(x, w, a, b, 2.0, mask)[1])
    for g, g_ref in zip(grads, want):
        assert relative_error(g, g_ref) <= 1e-12


def test_lora_adapter_on_a_column_block_of_a_fused_product(rng):
    """A block computes q, k, v with one stacked matmul; an adapter on k alone is added into k's
    columns (a strided view) and its backward adds into the shared dx: the same as LoRA on k."""
    N, D, rank, scale = 6, 8, 2, 4.0
    wq, wk, wv = rng.normal(size=(8, D)), rng.normal(size=(4, D)), rng.normal(size=(4, D))
    a, b = rng.normal(size=(rank, D)), rng.normal(size=(4, rank))
    x, dqkv = rng.normal(size=(N, D)), rng.normal(size=(N, 16))
    mask = dropout_forward(x, 0.5, rng, training=True)[1]
    qkv = x @ np.concatenate([wq, wk, wv]).T                  # (N, 16), k in columns 8:12
    cache = lora_adapter_forward(x, a, b, scale, qkv[:, 8:12], mask)
    k_ref, cache_ref = lora_forward_reference(x, wk, a, b, scale, mask)
    assert relative_error(qkv[:, 8:12], k_ref) <= 1e-12
    np.testing.assert_array_equal(qkv[:, :8], x @ wq.T)       # the other columns are untouched
    np.testing.assert_array_equal(qkv[:, 12:], x @ wv.T)

    dx = dqkv @ np.concatenate([wq, wk, wv])                  # the fused base backward
    da, db = lora_adapter_backward(dqkv[:, 8:12], cache, dx)
    dxk_ref, da_ref, db_ref = lora_backward_reference(dqkv[:, 8:12], cache_ref)
    dx_ref = dqkv[:, :8] @ wq + dxk_ref + dqkv[:, 12:] @ wv
    for got, want in ((dx, dx_ref), (da, da_ref), (db, db_ref)):
        assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_peft_init_reproduces_the_base_layer_exactly(rng, dtype):
    d_in, d_out, rank = 64, 24, 8
    a, b = lora_init(rng, d_in, d_out, rank, dtype)
    assert a.shape == (rank, d_in) and b.shape == (d_out, rank) and a.dtype == b.dtype == dtype
    assert not b.any()
    # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in)); 512 draws reach near both ends
    bound = 1 / np.sqrt(d_in)
    assert np.abs(a).max() <= bound and a.max() > 0.95 * bound and a.min() < -0.95 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound
    x, w = rng.normal(size=(5, d_in)).astype(dtype), rng.normal(size=(d_out, d_in)).astype(dtype)
    mask = dropout_forward(x, 0.1, rng, training=True)[1]
    y, cache = lora_forward(x, w, a, b, 2.0, mask)
    np.testing.assert_array_equal(y, x @ w.T)
    np.testing.assert_array_equal(lora_forward_reference(x, w, a, b, 2.0, mask)[0], x @ w.T)
    # with B = 0 only B moves at the first step: dA = (s dy B)^T xd = 0, dB = s dy^T z is not
    dx, da, db = lora_backward(rng.normal(size=(5, d_out)).astype(dtype), cache)
    assert not da.any() and np.abs(db).min() > 0


@given(seed=seeds, lead=leading, d_in=widths, d_out=widths, rank=ranks, scale=scales)
def test_merged_weight_computes_the_adapter_form(seed, lead, d_in, d_out, rank, scale):
    r = np.random.default_rng(seed)
    x, w, a, b, _, _ = random_layer(r, lead, d_in, d_out, rank, 0.0)
    merged = merge_lora(w, a, b, scale)
    assert merged.shape == w.shape
    y, _ = lora_forward_reference(x, w, a, b, scale)
    assert relative_error(x @ merged.T, y) <= 1e-12


# ---- LoRA inside the reference model ------------------------------------------------------------
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@settings(max_examples=10)
@given(seed=seeds, rank=st.integers(1, 2), dropout_p=st.sampled_from([0.0, 0.3]), tied=st.booleans(),
       adapted=st.sets(st.sampled_from([f"model.layers.{i}.{m}" for i in range(2) for m in PROJECTIONS]),
                       min_size=1))
def test_reference_model_lora_gradients(seed, rank, dropout_p, tied, adapted):
    """npllama.reference.loss_and_grad(..., lora=, lora_masks=): the adapters' gradients equal
    finite differences (some projections adapted, the others frozen), and only they are returned."""
    r = np.random.default_rng(seed)
    cfg = LlamaConfig(vocab_size=7, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=6, max_seq_len=8,
                      tie_embeddings=tied)
    params = random_params(cfg, r)
    lora, masks = {}, {}
    for name in sorted(adapted):
        d_out, d_in = params[name + ".weight"].shape
        # s B A about as large as W (N(0, 1/in) entries): the adapter matters without dominating
        lora[name] = (r.normal(size=(rank, d_in)) / np.sqrt(d_in), 0.5 * r.normal(size=(d_out, rank)) / np.sqrt(rank),
                      2.0)
        if dropout_p:
            masks[name] = dropout_forward(np.ones((2, 5, d_in)), dropout_p, r, training=True)[1]
    tokens, targets = r.integers(0, 7, size=(2, 5)), r.integers(0, 7, size=(2, 5))
    loss, grads = reference.loss_and_grad(params, cfg, tokens, targets, lora=lora, lora_masks=masks)
    assert set(grads) == {f"{name}.lora_{m}.weight" for name in lora for m in "AB"}
    loss_fn = lambda: reference.loss_and_grad(params, cfg, tokens, targets, lora=lora, lora_masks=masks)[0]
    # Central differences carry two errors here: rounding, eps |L| / h, is ~1e-6 of an adapter
    # gradient ~1e-4 (against a loss ~2) at h = 1e-6, and truncation, ~h^2 times the third
    # derivative, reached 1.1e-6 at h = 1e-5 (seed 134873, a v_proj adapter; 1e-4 at h = 1e-4, 1e-8
    # at h = 1e-6: the error goes as h^2, the analytic gradient is right).  Richardson's
    # extrapolation of two steps, (4 D(h/2) - D(h)) / 3, cancels the h^2 term: at h = 1e-4 that
    # draw's error is 9.5e-9, and rounding stays ~1e-11.
    for name, (a, b, _) in lora.items():
        for m, value in (("A", a), ("B", b)):
            err = relative_error(grads[f"{name}.lora_{m}.weight"], richardson_gradient(loss_fn, value, h=1e-4))
            assert err < GRAD_TOL, f"{name}.lora_{m}: relative error {err:.2e}"
