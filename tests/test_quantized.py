"""Quantized weights kept in GGUF's blocks (layers/quantized_linear.py, engine/quantized.py).

Every format the kernels read (Q8_0, Q4_0, Q4_1 quantized by the gguf package; Q5_0, Q5_1 and the
K-quants Q4_K, Q5_K, Q6_K as random bytes with finite float16 scales: the gguf package cannot make
K-quants).  Kernels against the reference (the gguf package's dequantize, then a matmul), on random shapes:
  * dequantizing rows: bit for bit the gguf package's numbers, float32 and float64;
  * matrix-vector (decoding): within the dot-product rounding bound (cols + 65) eps M_i of deq(W) x,
    where M_i sums the magnitudes of every product the kernel adds, |x_j| (|a c_j| + |offset|), and
    eps is the unit roundoff of the dtype (2^-24 float32, 2^-53 float64); the 65th eps is the one
    rounding of a c + o to float32 in deq(W) (Q4_1, Q5_1, Q4_K, Q5_K), which the float32 kernel
    never makes (it adds o s_b, s_b the sum of x's block);
  * matrix-matrix forward (prompt) and backward (dx = dy W): BLAS on exactly dequantized panels, so
    within cols eps |x| |deq W|^T (rows eps |dy| |deq W| for dx).
The model: a float64 Llama quantized by the gguf package (Llama.quantize) equals npllama.reference
on the same QuantizedMatrix weights (dequantized there) to 1e-12 -- logits, the decoding step's
logits, and QLoRA's adapter gradients, which are LoRA's on the dequantized base.
"""
from unittest import mock

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

FORMATS = engine.FORMATS        # Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
EPS = {np.float32: 2.0 ** -24, np.float64: 2.0 ** -53}
# Byte offsets of a block's float16 scale and minimum (the formats random bytes are made for)
SCALE_OFFSETS = {"Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype, rows, blocks, rng, scale=0.01):
    """``blocks`` random blocks a row of ``qtype``: random bytes (every code, every 6-bit or int8
    sub-block scale) with finite float16 scales and minima of either sign (the gguf package has no
    quantizer for the K-quants)."""
    raw = rng.integers(0, 256, (rows, blocks, engine.BLOCK_BYTES[qtype]), dtype=np.uint8)
    for at in SCALE_OFFSETS[qtype]:
        raw[:, :, at:at + 2] = rng.normal(0.0, scale, (rows, blocks, 1)).astype(np.float16).view(np.uint8)
    return QuantizedMatrix(qtype, raw.reshape(rows, -1), blocks * engine.block_weights(qtype))


def random_matrix(qtype, rows, blocks, seed):
    """``blocks`` blocks a row: the first three formats quantized from normal numbers by the gguf
    package (llama.cpp's rounding), the others random blocks (``random_blocks``)."""
    rng = np.random.default_rng(seed)
    if qtype in SCALE_OFFSETS:
        return random_blocks(qtype, rows, blocks, rng)
    w = rng.normal(0.0, 1.0, (rows, blocks * 32)).astype(np.float32)
    w[:, :32] += rng.normal(0.0, 3.0, (rows, 1)).astype(np.float32)   # (blocks with an offset: Q4_1's m)
    return QuantizedMatrix.from_float(w, qtype)


def parts(w: QuantizedMatrix):
    """(scaled codes a c, offset o) per weight as float64, decoded here by hand from the bytes (the
    codes c centred as the kernels use them: Q4_0's c - 8, Q5_0's c - 16, Q6_K's c - 32)."""
    rows, cols = w.shape
    q = w.qtype
    b = w.blocks.reshape(rows, cols // engine.block_weights(q), -1)   # (rows, blocks, bytes)

    def half(at):                                                       # (rows, blocks, 1)
        return b[:, :, at:at + 2].copy().view(np.float16).astype(np.float64)

    if q == "Q8_0":
        codes, scale, offset = b[:, :, 2:].view(np.int8), half(0), 0.0
    elif q in ("Q4_0", "Q4_1"):
        n = b[:, :, 4:] if q == "Q4_1" else b[:, :, 2:]
        codes = np.concatenate([n & 15, n >> 4], axis=2).astype(np.int64) - (8 if q == "Q4_0" else 0)
        scale, offset = half(0), (half(2) if q == "Q4_1" else 0.0)
    elif q in ("Q5_0", "Q5_1"):
        qh_at = 2 if q == "Q5_0" else 4
        n, qh = b[:, :, qh_at + 4:], b[:, :, qh_at:qh_at + 4].copy().view("<u4")
        high = (qh >> np.arange(32, dtype=np.uint32)) & 1                   # bit j: weight j's fifth bit
        codes = (np.concatenate([n & 15, n >> 4], axis=2) | (high << 4)).astype(np.int64) - (16 if q == "Q5_0" else 0)
        scale, offset = half(0), (half(2) if q == "Q5_1" else 0.0)
    elif q in ("Q4_K", "Q5_K"):
        s = b[:, :, 4:16].astype(np.int64)
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=2)
        mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=2)
        n = b[:, :, 16:144] if q == "Q4_K" else b[:, :, 48:176]
        n = n.reshape(rows, -1, 4, 1, 32) >> np.array([0, 4]).reshape(1, 1, 1, 2, 1)   # sub-blocks 2k, 2k + 1
        codes = (n & 15).reshape(rows, -1, 8, 32).astype(np.int64)
        if q == "Q5_K":
            codes |= ((b[:, :, None, 16:48] >> np.arange(8).reshape(1, 1, 8, 1)) & 1).astype(np.int64) << 4
        scale = (half(0) * sc)[..., None]                                  # (rows, blocks, 8, 1)
        offset = (-half(2) * mn)[..., None]
        codes = codes.reshape(rows, -1, 8, 32)
    else:   # Q6_K: weight 128 u + 64 v + 32 t + j from ql[64 u + 32 t + j] and qh[32 u + j]
        ql = b[:, :, :128].reshape(rows, -1, 2, 1, 2, 32).astype(np.int64)        # (u, -, t, j)
        qh = b[:, :, 128:192].reshape(rows, -1, 2, 1, 1, 32).astype(np.int64)     # (u, -, -, j)
        v = np.arange(2).reshape(1, 1, 1, 2, 1, 1)
        t = np.arange(2).reshape(1, 1, 1, 1, 2, 1)
        codes = (((ql >> (4 * v)) & 15) | (((qh >> (2 * (2 * v + t))) & 3) << 4)) - 32
        codes = codes.reshape(rows, -1, 16, 16)
        scale = (half(208) * b[:, :, 192:208].view(np.int8))[..., None]       # (rows, blocks, 16, 1)
        offset = 0.0
    scaled = scale * codes
    return scaled.reshape(rows, cols), (offset * np.ones_like(scaled)).reshape(rows, cols)


@pytest.mark.parametrize("qtype", FORMATS)
def test_parts_decode_as_gguf_does(qtype):
    """(parts, then one rounding to float32: the gguf package's numbers, which define deq(W))"""
    w = random_matrix(qtype, 5, 3, 0)
    scaled, offset = parts(w)
    np.testing.assert_array_equal((scaled + offset).astype(np.float32), w.dequantize(np.float32))
    if qtype not in ("Q5_1", "Q4_K", "Q5_K"):      # (a c is exact: no offset, no rounding at all)
        np.testing.assert_array_equal(scaled + offset, w.dequantize(np.float64))


@settings(max_examples=20, deadline=None)
@given(qtype=st.sampled_from(FORMATS), rows=st.integers(1, 40), blocks=st.integers(1, 5),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2 ** 16))
def test_dequantize_rows_bit_equal(qtype, rows, blocks, dtype, seed):
    w = random_matrix(qtype, rows, blocks, seed)
    ids = np.random.default_rng(seed).integers(0, rows, 7)
    out = np.empty((7, w.shape[1]), dtype=dtype)
    engine.dequantize_rows(w, ids, out)
    np.testing.assert_array_equal(out, w.dequantize(np.float32)[ids].astype(dtype))
    np.testing.assert_array_equal(embedding_rows(w, ids, np.empty_like(out)), out)


@settings(max_examples=30, deadline=None)
@given(qtype=st.sampled_from(FORMATS), rows=st.integers(1, 300), blocks=st.integers(1, 6),
       dtype=st.sampled_from([np.float32, np.float64]), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_matvec_within_rounding_bound(qtype, rows, blocks, dtype, threads, seed):
    from npllama.engine.threads import thread_limit
    w = random_matrix(qtype, rows, blocks, seed)
    x = np.random.default_rng(seed + 1).normal(0.0, 1.0, w.shape[1]).astype(dtype)
    y = np.full(rows, np.nan, dtype=dtype)
    with thread_limit(threads):
        quantized_matvec(w, x, y)
    scaled, offset = parts(w)
    exact = w.dequantize(np.float64) @ x.astype(np.float64)
    magnitude = (np.abs(scaled) + np.abs(offset)) @ np.abs(x.astype(np.float64))
    bound = (w.shape[1] + 65) * EPS[dtype] * magnitude
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) / bound)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matvec_on_threads_within_rounding_bound(qtype, dtype):
    """Rows enough for the threads' units (each walked STREAMS rows at a time, a tail one by one)."""
    from npllama.engine.threads import thread_limit
    rows, blocks = 1000 + engine.STREAMS - 1, 3
    w = random_matrix(qtype, rows, blocks, 7)
    x = np.random.default_rng(8).normal(0.0, 1.0, w.shape[1]).astype(dtype)
    scaled, offset = parts(w)
    exact = w.dequantize(np.float64) @ x.astype(np.float64)
    bound = (w.shape[1] + 65) * EPS[dtype] * ((np.abs(scaled) + np.abs(offset)) @ np.abs(x.astype(np.float64)))
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
    x = rng.normal(0.0, 1.0, (n, w.shape[1])).astype(dtype)
    dy = rng.normal(0.0, 1.0, (n, rows)).astype(dtype)
    deq = w.dequantize(np.float64)
    y = quantized_product(x, w.T, np.empty((n, rows), dtype=dtype), threads=threads)
    ref, cache = quantized_linear_forward_reference(x.astype(np.float64), w)
    assert np.all(np.abs(y - ref) <= w.shape[1] * EPS[dtype] * (np.abs(x) @ np.abs(deq).T) + 1e-300)
    dx = quantized_product(dy, w, np.empty((n, w.shape[1]), dtype=dtype), threads=threads)
    dx_ref = quantized_linear_backward_reference(dy.astype(np.float64), cache)
    assert np.all(np.abs(dx - dx_ref) <= (rows + 1) * EPS[dtype] * (np.abs(dy) @ np.abs(deq)) + 1e-300)


@pytest.mark.parametrize("qtype", FORMATS)
def test_matmul_in_many_panels_within_rounding_bound(qtype, monkeypatch):
    """Panels of 16 rows (the smallest), several per thread: each thread's products summed into dx."""
    import npllama.engine.quantized as engine
    w = random_matrix(qtype, 100, 2, 5)
    cols = w.shape[1]
    monkeypatch.setattr(engine, "PANEL_ELEMENTS", 16 * cols)
    monkeypatch.setattr(engine, "STRIP_MAX_ROWS", 0)      # (float32 prompts would take the strips)
    rng = np.random.default_rng(6)
    x, dy = rng.normal(0.0, 1.0, (7, cols)).astype(np.float32), rng.normal(0.0, 1.0, (7, 100)).astype(np.float32)
    deq = w.dequantize(np.float64)
    for threads in (1, 2):
        assert len(engine._panels(w, threads)) == 7
        y = quantized_product(x, w.T, np.empty((7, 100), dtype=np.float32), threads=threads)
        assert np.all(np.abs(y - x.astype(np.float64) @ deq.T) <= cols * EPS[np.float32] * (np.abs(x) @ np.abs(deq).T))
        dx = quantized_product(dy, w, np.empty((7, cols), dtype=np.float32), threads=threads)
        assert np.all(np.abs(dx - dy.astype(np.float64) @ deq) <= 101 * EPS[np.float32] * (np.abs(dy) @ np.abs(deq)))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
def test_q4_0_and_q5_0_blocks_are_q8_0_blocks_in_other_words(qtype):
    w = random_matrix(qtype, 9, 3, 4)
    q8 = w.as_q8_0()
    assert q8.qtype == "Q8_0" and q8.shape == w.shape and q8.nbytes == 9 * 3 * 34
    np.testing.assert_array_equal(q8.dequantize(np.float32), w.dequantize(np.float32))
    with pytest.raises(InputError, match="Q4_1 blocks are not Q8_0 blocks"):
        random_matrix("Q4_1", 2, 1, 0).as_q8_0()


def test_generation_warm_up_runs_for_every_format():
    """(was: the warm-up quantized a tiny model to the file's formats: a K-quant file failed there)"""
    from npllama.generate.cli import warm_up
    warm_up(np.float32, FORMATS)


@pytest.mark.parametrize("qtype", engine.FIRST_FORMATS)
def test_transposed_decoding_is_the_rows_decoding_transposed(qtype):
    """dequantize_transposed (a prompt's strips) gives dequantize_rows' numbers bit for bit, transposed;
    rows past the last repeat it."""
    import numba
    w = random_matrix(qtype, 21, 3, 7)

    @numba.njit
    def decode(blocks, fmt, i0, last_row, wt):
        engine.dequantize_transposed(blocks, wt, fmt, i0, last_row, 0)
        engine.dequantize_transposed(blocks, wt, fmt, i0 + 16, last_row, 16)
    wt = np.empty((96, 32), dtype=np.float32)
    decode(w.blocks, engine.FORMAT_CODE[qtype], 0, 20, wt)
    rows = engine.dequantize_rows(w, np.minimum(np.arange(32), 20).astype(np.int64), np.empty((32, 96), np.float32))
    assert np.array_equal(wt, rows.T)
    assert np.array_equal(rows[:21], w.dequantize(np.float32))


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("n", [130, 257])
def test_prompt_product_within_rounding_bound(qtype, n):
    """A prompt's rows (float32, <= STRIP_MAX_ROWS, the first three formats: the strips; 130 = 10
    tiles of 12 + 8 + 2 single rows) and more (257: the panels); W of 70 rows (two whole strips and a
    part) and 320 columns (the sum in two KC parts; K-quants 512), on one and two threads."""
    w = random_matrix(qtype, 70, 10 if engine.block_weights(qtype) == 32 else 2, n)
    cols = w.shape[1]
    x = np.random.default_rng(n).normal(0.0, 1.0, (n, cols)).astype(np.float32)
    deq = w.dequantize(np.float64)
    exact, bound = x.astype(np.float64) @ deq.T, cols * EPS[np.float32] * (np.abs(x) @ np.abs(deq).T)
    for threads in (1, 2):
        y = quantized_product(x, w.T, np.full((n, 70), np.nan, dtype=np.float32), threads=threads)
        assert np.all(np.abs(y - exact) <= bound), (threads, np.max(np.abs(y - exact) / bound))
    assert engine._strips_apply(x, w, y) == (n <= engine.STRIP_MAX_ROWS and engine.VECTOR_BYTES == 64
                                              and qtype in engine.FIRST_FORMATS)


def test_bad_blocks_are_refused():
    with pytest.raises(InputError, match="Q2_K"):
        QuantizedMatrix("Q2_K", np.zeros((2, 84), np.uint8), 256)
    with pytest.raises(InputError, match="do not hold rows of 64"):
        QuantizedMatrix("Q8_0", np.zeros((2, 34), np.uint8), 64)
    with pytest.raises(InputError, match="do not hold rows of 128"):    # (K-quants: 256 weights a block)
        QuantizedMatrix("Q4_K", np.zeros((2, 72), np.uint8), 128)
    with pytest.raises(InputError, match="cannot quantize to Q6_K"):
        QuantizedMatrix.from_float(np.zeros((2, 256)), "Q6_K")


# ---- the model -------------------------------------------------------------------------------------
CONFIGS = {   # every projection's input width a multiple of 32 (whole blocks; K-quants: of 256)
    "gqa": LlamaConfig(vocab_size=53, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=16),
    "tied": LlamaConfig(vocab_size=41, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=16,
                        tie_embeddings=True),
    "k256": LlamaConfig(vocab_size=37, dim=256, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=256, max_seq_len=16,
                        tie_embeddings=True),
}
MODEL_CASES = [(config, qtype) for config in ("gqa", "tied") for qtype in FORMATS if qtype not in K_QUANTS] \
    + [("k256", qtype) for qtype in K_QUANTS]


def quantized_model(cfg, qtype, seed=0):
    model = npllama.Llama(cfg, dtype=np.float64, seed=seed)
    for name, p in model.params.items():     # weights of the size real models have, so every code is used
        if p.ndim == 2:
            p *= 20.0
    if qtype not in K_QUANTS:
        return model.quantize(qtype)
    # the gguf package has no K-quant quantizer: random blocks of the same shapes, put in the same
    # places, scaled to weights of ~0.1-0.2 (larger ones saturate attention: its gradients vanish)
    rng, scale = np.random.default_rng(seed), 5e-5 if qtype == "Q6_K" else 2e-4
    blocks = classmethod(lambda cls, w, q: random_blocks(q, w.shape[0], w.shape[1] // 256, rng, scale))
    with mock.patch.object(QuantizedMatrix, "from_float", blocks):
        return model.quantize(qtype)


def tokens_for(cfg, seed, B=2, T=7):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :2] = -100
    return rng.integers(0, cfg.vocab_size, (B, T)), targets


@pytest.mark.parametrize("config, qtype", MODEL_CASES)
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


@pytest.mark.parametrize("config, qtype", MODEL_CASES)
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
