"""Quantized weights kept in GGUF's blocks (layers/quantized_linear.py, engine/quantized.py).

Kernels against the reference (the gguf package's dequantize, then a matmul), on random shapes:
  * dequantizing rows: bit for bit the gguf package's numbers, float32 and float64;
  * matrix-vector (decoding): within the dot-product rounding bound (cols + 64) eps M_i, where M_i
    sums the magnitudes of every product the kernel adds, |x_j| (|d c_j| + |offset|), and eps is the
    unit roundoff of the dtype (2^-24 float32, 2^-53 float64);
  * matrix-matrix forward (prompt) and backward (dx = dy W): BLAS on exactly dequantized panels, so
    within cols eps |x| |deq W|^T (rows eps |dy| |deq W| for dx).
The model: a float64 Llama quantized by the gguf package (Llama.quantize) equals npllama.reference
on the same QuantizedMatrix weights (dequantized there) to 1e-12 -- logits, the decoding step's
logits, and QLoRA's adapter gradients, which are LoRA's on the dequantized base.
"""
import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npllama
from npllama import reference
from npllama.config import LlamaConfig
from npllama.engine import quantized as engine
from npllama.errors import ConfigError, InputError
from npllama.generate.decoding import KVCacheDecoder
from npllama.gradcheck import relative_error
from npllama.layers.quantized_linear import (QuantizedMatrix, embedding_rows, quantized_linear_backward_reference,
                                             quantized_linear_forward_reference, quantized_matvec, quantized_product)

FORMATS = ("Q8_0", "Q4_0", "Q4_1")
EPS = {np.float32: 2.0 ** -24, np.float64: 2.0 ** -53}


def random_matrix(qtype, rows, blocks, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0, (rows, blocks * 32)).astype(np.float32)
    w[:, :32] += rng.normal(0.0, 3.0, (rows, 1)).astype(np.float32)   # (blocks with an offset: Q4_1's m)
    return QuantizedMatrix.from_float(w, qtype)


def parts(w: QuantizedMatrix):
    """(scaled codes d c, offset) per weight as float64, decoded here by hand from the bytes."""
    rows, cols = w.shape
    b = w.blocks.reshape(rows, cols // 32, -1)
    d = b[:, :, :2].copy().view(np.float16).astype(np.float64)            # (rows, nb, 1)
    if w.qtype == "Q8_0":
        codes = b[:, :, 2:].view(np.int8).astype(np.float64)
        offset = np.zeros_like(codes)
    else:
        n = b[:, :, 4:] if w.qtype == "Q4_1" else b[:, :, 2:]
        codes = np.concatenate([n & 15, n >> 4], axis=2).astype(np.float64)
        offset = (b[:, :, 2:4].copy().view(np.float16).astype(np.float64) if w.qtype == "Q4_1" else -8 * d) \
            * np.ones_like(codes)
    return (d * codes).reshape(rows, cols), offset.reshape(rows, cols)


def test_parts_decode_as_gguf_does():
    for qtype in FORMATS:
        w = random_matrix(qtype, 5, 3, 0)
        scaled, offset = parts(w)
        np.testing.assert_array_equal(scaled + offset, w.dequantize(np.float64))


@settings(max_examples=20, deadline=None)
@given(qtype=st.sampled_from(FORMATS), rows=st.integers(1, 40), blocks=st.integers(1, 5),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2 ** 16))
def test_dequantize_rows_bit_equal(qtype, rows, blocks, dtype, seed):
    w = random_matrix(qtype, rows, blocks, seed)
    ids = np.random.default_rng(seed).integers(0, rows, 7)
    out = np.empty((7, blocks * 32), dtype=dtype)
    engine.dequantize_rows(w, ids, out)
    np.testing.assert_array_equal(out, w.dequantize(np.float32)[ids].astype(dtype))
    np.testing.assert_array_equal(embedding_rows(w, ids, np.empty_like(out)), out)


@settings(max_examples=30, deadline=None)
@given(qtype=st.sampled_from(FORMATS), rows=st.integers(1, 300), blocks=st.integers(1, 6),
       dtype=st.sampled_from([np.float32, np.float64]), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_matvec_within_rounding_bound(qtype, rows, blocks, dtype, threads, seed):
    from npllama.engine.threads import thread_limit
    w = random_matrix(qtype, rows, blocks, seed)
    x = np.random.default_rng(seed + 1).normal(0.0, 1.0, blocks * 32).astype(dtype)
    y = np.full(rows, np.nan, dtype=dtype)
    with thread_limit(threads):
        quantized_matvec(w, x, y)
    scaled, offset = parts(w)
    exact = (scaled + offset) @ x.astype(np.float64)
    magnitude = (np.abs(scaled) + np.abs(offset)) @ np.abs(x.astype(np.float64))
    bound = (blocks * 32 + 64) * EPS[dtype] * magnitude
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) / bound)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matvec_on_threads_within_rounding_bound(qtype, dtype):
    """Rows enough for the threads' units (each walked STREAMS rows at a time, a tail one by one)."""
    from npllama.engine.threads import thread_limit
    rows, blocks = 1000 + engine.STREAMS - 1, 3
    w = random_matrix(qtype, rows, blocks, 7)
    x = np.random.default_rng(8).normal(0.0, 1.0, blocks * 32).astype(dtype)
    scaled, offset = parts(w)
    exact = (scaled + offset) @ x.astype(np.float64)
    bound = (blocks * 32 + 64) * EPS[dtype] * ((np.abs(scaled) + np.abs(offset)) @ np.abs(x.astype(np.float64)))
    for threads in (1, 2):
        y = np.full(rows, np.nan, dtype=dtype)
        with thread_limit(threads):
            quantized_matvec(w, x, y)
        assert np.all(np.abs(y - exact) <= bound), (threads, np.max(np.abs(y - exact) / bound))


@settings(max_examples=20, deadline=None)
@given(qtype=st.sampled_from(FORMATS), rows=st.integers(1, 200), blocks=st.integers(1, 5), n=st.integers(1, 9),
       dtype=st.sampled_from([np.float32, np.float64]), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_matmul_forward_and_backward_within_rounding_bound(qtype, rows, blocks, n, dtype, threads, seed):
    w = random_matrix(qtype, rows, blocks, seed)
    rng = np.random.default_rng(seed + 2)
    x = rng.normal(0.0, 1.0, (n, blocks * 32)).astype(dtype)
    dy = rng.normal(0.0, 1.0, (n, rows)).astype(dtype)
    deq = w.dequantize(np.float64)
    y = quantized_product(x, w.T, np.empty((n, rows), dtype=dtype), threads=threads)
    ref, cache = quantized_linear_forward_reference(x.astype(np.float64), w)
    assert np.all(np.abs(y - ref) <= blocks * 32 * EPS[dtype] * (np.abs(x) @ np.abs(deq).T) + 1e-300)
    dx = quantized_product(dy, w, np.empty((n, blocks * 32), dtype=dtype), threads=threads)
    dx_ref = quantized_linear_backward_reference(dy.astype(np.float64), cache)
    assert np.all(np.abs(dx - dx_ref) <= (rows + 1) * EPS[dtype] * (np.abs(dy) @ np.abs(deq)) + 1e-300)


@pytest.mark.parametrize("qtype", FORMATS)
def test_matmul_in_many_panels_within_rounding_bound(qtype, monkeypatch):
    """Panels of 16 rows (the smallest), several per thread: each thread's products summed into dx."""
    import npllama.engine.quantized as engine
    monkeypatch.setattr(engine, "PANEL_ELEMENTS", 16 * 64)
    w = random_matrix(qtype, 100, 2, 5)
    rng = np.random.default_rng(6)
    x, dy = rng.normal(0.0, 1.0, (7, 64)).astype(np.float32), rng.normal(0.0, 1.0, (7, 100)).astype(np.float32)
    deq = w.dequantize(np.float64)
    for threads in (1, 2):
        assert len(engine._panels(w, threads)) == 7
        y = quantized_product(x, w.T, np.empty((7, 100), dtype=np.float32), threads=threads)
        assert np.all(np.abs(y - x.astype(np.float64) @ deq.T) <= 64 * EPS[np.float32] * (np.abs(x) @ np.abs(deq).T))
        dx = quantized_product(dy, w, np.empty((7, 64), dtype=np.float32), threads=threads)
        assert np.all(np.abs(dx - dy.astype(np.float64) @ deq) <= 101 * EPS[np.float32] * (np.abs(dy) @ np.abs(deq)))


def test_bad_blocks_are_refused():
    with pytest.raises(InputError, match="Q5_0"):
        QuantizedMatrix("Q5_0", np.zeros((2, 34), np.uint8), 32)
    with pytest.raises(InputError, match="do not hold rows of 64"):
        QuantizedMatrix("Q8_0", np.zeros((2, 34), np.uint8), 64)


# ---- the model -------------------------------------------------------------------------------------
CONFIGS = {   # every projection's input width a multiple of 32 (whole blocks)
    "gqa": LlamaConfig(vocab_size=53, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=16),
    "tied": LlamaConfig(vocab_size=41, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=16,
                        tie_embeddings=True),
}


def quantized_model(cfg, qtype, seed=0):
    model = npllama.Llama(cfg, dtype=np.float64, seed=seed)
    for name, p in model.params.items():     # weights of the size real models have, so every code is used
        if p.ndim == 2:
            p *= 20.0
    return model.quantize(qtype)


def tokens_for(cfg, seed, B=2, T=7):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :2] = -100
    return rng.integers(0, cfg.vocab_size, (B, T)), targets


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_quantized_model_equals_reference(config, qtype):
    cfg = CONFIGS[config]
    model = quantized_model(cfg, qtype)
    assert model.quantized and all(isinstance(model.params[n], QuantizedMatrix) for n in model.params
                                   if n.endswith("proj.weight"))
    tokens, _ = tokens_for(cfg, 1)
    logits = model.forward(tokens)
    assert relative_error(logits, reference.forward(model.params, cfg, tokens)) <= 1e-12
    dense = {n: p.dequantize(np.float64) if isinstance(p, QuantizedMatrix) else p for n, p in model.params.items()}
    assert relative_error(logits, reference.forward(dense, cfg, tokens)) <= 1e-12
    # the decoding step (matrix-vector kernels, the embedding row from the quantized table)
    decoder = KVCacheDecoder(model, capacity=7)
    step_logits = [decoder.prefill(tokens[0, :3]).copy()] + [decoder.step(int(t)).copy() for t in tokens[0, 3:]]
    assert relative_error(np.array(step_logits), logits[0, 2:]) <= 1e-12


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_qlora_gradients_are_lora_gradients_on_the_dequantized_base(config, qtype):
    cfg = CONFIGS[config]
    model = quantized_model(cfg, qtype).add_lora(3, 5.0)
    rng = np.random.default_rng(7)
    for p in model.lora_params.values():
        p[...] = rng.normal(0.0, 0.2, size=p.shape)
    lora = {k.removesuffix(".lora_A.weight"): (p, model.lora_params[k.replace(".lora_A.", ".lora_B.")], 5.0 / 3)
            for k, p in model.lora_params.items() if k.endswith(".lora_A.weight")}
    tokens, targets = tokens_for(cfg, 2)
    loss, grads = model.loss_and_grad(tokens, targets)
    dense = {n: p.dequantize(np.float64) if isinstance(p, QuantizedMatrix) else p for n, p in model.params.items()}
    ref_loss, ref_grads = reference.loss_and_grad(dense, cfg, tokens, targets, lora=lora)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert set(grads) == set(ref_grads)
    assert max(relative_error(grads[k], ref_grads[k]) for k in ref_grads) <= 1e-12
    # decoding adds the adapters itself in each step (no merged copy): the forward's logits
    model.eval()
    logits = model.forward(tokens)
    decoder = KVCacheDecoder(model, capacity=7)
    steps = [decoder.prefill(tokens[1, :2]).copy()] + [decoder.step(int(t)).copy() for t in tokens[1, 2:]]
    assert relative_error(np.array(steps), logits[1, 1:]) <= 1e-12


def test_quantized_model_trains_only_adapters():
    cfg = CONFIGS["gqa"]
    model = quantized_model(cfg, "Q8_0")
    tokens, targets = tokens_for(cfg, 3)
    with pytest.raises(ConfigError, match="quantized"):
        model.loss_and_grad(tokens, targets)
    with pytest.raises(ConfigError, match="float model"):
        model.quantize("Q4_0")
