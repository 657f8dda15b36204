"""The decoding step as one kernel on every thread (layers/decode_step.py): its logits equal those of
the step of kernels (``KVCacheDecoder._step_of_kernels``, a kernel call at a time) and of a full
forward pass, on 1, 2 and 3 threads, MHA/GQA/MQA, float and quantized weights, at every position of
a sequence, on shapes drawn by hypothesis.

Bounds.  float64: the two steps differ only in the summation order inside the float matrices'
units of rows (units are cut by thread count), ~1e-16 relative per product: 1e-13 of the logits'
scale between them, 1e-12 against the full forward pass (tests/test_generate.py's bound).  float32:
against the float64 model on the same weights, 2e-5 of the logits' scale (test_generate.py's bound for
the step of kernels; both float32 steps sum the same products in float32).  Quantized (float64): the
step against the full forward pass on the same blocks, 1e-12 (test_quantized.py's bound)."""
import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import npllama
from npllama.engine.pool import meet, run_on_each_thread
from npllama.engine.threads import thread_limit
from npllama.generate.decoding import KVCacheDecoder
from npllama.layers import decode_step


@pytest.fixture(autouse=True)
def threads_even_for_small_models(monkeypatch):
    """The tests' models are tiny: let them run on several threads anyway."""
    monkeypatch.setattr(decode_step, "THREADS_MIN_WEIGHT_BYTES", 0)


def make_model(n_heads, n_kv_heads, head_dim, n_layers, hidden_dim, vocab_size, tie, dtype, seed, max_seq_len=12,
               dim=None):
    cfg = npllama.LlamaConfig(vocab_size=vocab_size, dim=dim or n_heads * head_dim, head_dim=head_dim,
                              n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim,
                              max_seq_len=max_seq_len, tie_embeddings=tie)
    model = npllama.Llama(cfg, seed=seed, dtype=dtype)
    model.flat_params[...] += np.random.default_rng(seed).normal(0.0, 0.3, model.flat_params.shape)
    return model.eval()


def steps(model, tokens, prefill, fused=True):
    """The logits at positions prefill-1 .. len(tokens)-1: a prefill, then a step a token."""
    decoder = KVCacheDecoder(model, capacity=len(tokens))
    assert decoder.fused is not None
    if not fused:
        decoder.fused = None           # (the step of kernels)
    out = [decoder.prefill(tokens[:prefill]).copy()]
    out += [decoder.step(int(t)).copy() for t in tokens[prefill:]]
    return np.array(out)


def assert_step_equals_kernels_and_forward(model, tokens, prefill, threads):
    """The one-kernel step on ``threads`` threads against the step of kernels (1e-13 of the logits'
    scale) and the full forward pass (1e-12), at positions prefill-1 .. len(tokens)-1 (float64)."""
    full = model.forward(tokens[None])[0][prefill - 1:]
    scale = np.max(np.abs(full))
    with thread_limit(threads):
        got = steps(model, tokens, prefill)
    kernels = steps(model, tokens, prefill, fused=False)
    assert np.max(np.abs(got - kernels)) <= 1e-13 * scale
    assert np.max(np.abs(got - full)) <= 1e-12 * scale


ATTENTION = st.sampled_from([(4, 4), (6, 2), (4, 1), (3, 3), (2, 1)])   # (H, K): MHA, GQA, MQA


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=ATTENTION, head_dim=st.sampled_from([2, 4, 8]), dim=st.sampled_from([None, 8, 12]),
       n_layers=st.integers(1, 3), hidden_dim=st.integers(3, 40), vocab_size=st.integers(5, 60), tie=st.booleans(),
       threads=st.integers(1, 3), prefill=st.integers(1, 5), seed=st.integers(0, 1000))
def test_float64_step_equals_the_step_of_kernels_and_the_forward_pass(heads, head_dim, dim, n_layers, hidden_dim,
                                                                       vocab_size, tie, threads, prefill, seed):
    H, K = heads
    model = make_model(H, K, head_dim, n_layers, hidden_dim, vocab_size, tie, np.float64, seed, dim=dim)
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=model.config.max_seq_len)
    assert_step_equals_kernels_and_forward(model, tokens, prefill, threads)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)])
def test_float32_step_is_within_float32_rounding_of_the_float64_model(heads, threads):
    H, K = heads
    m64 = make_model(H, K, 8, 2, 40, 50, False, np.float64, 3)
    m32 = make_model(H, K, 8, 2, 40, 50, False, np.float32, 3)
    tokens = np.random.default_rng(4).integers(0, 50, size=12)
    full = m64.forward(tokens[None])[0][2:]
    with thread_limit(threads):
        got = steps(m32, tokens, 3)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, full, atol=2e-5 * np.max(np.abs(full)))


QUANTIZED_SHAPES = {   # every product's input width a multiple of 32 (whole blocks)
    "mha": dict(n_heads=4, n_kv_heads=4, head_dim=8, hidden_dim=64),
    "gqa": dict(n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96),
    "mqa": dict(n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=32),
}


def quantized_model(cfg, qtype):
    """A float64 model of ``cfg`` with its matrices in ``qtype``'s blocks, its weights scaled to the
    size real models have, so that every code is used."""
    model = npllama.Llama(cfg, dtype=np.float64, seed=1)
    for p in model.params.values():
        if p.ndim == 2:
            p *= 20.0
    return model.quantize(qtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("shape", list(QUANTIZED_SHAPES))
def test_quantized_step_equals_the_forward_pass_on_the_same_blocks(shape, qtype, threads):
    s = QUANTIZED_SHAPES[shape]
    cfg = npllama.LlamaConfig(vocab_size=45, dim=s["n_heads"] * s["head_dim"], n_layers=2, n_heads=s["n_heads"],
                              n_kv_heads=s["n_kv_heads"], hidden_dim=s["hidden_dim"], max_seq_len=10,
                              tie_embeddings=shape == "mqa")
    model = quantized_model(cfg, qtype).eval()
    tokens = np.random.default_rng(5).integers(0, 45, size=10)
    assert_step_equals_kernels_and_forward(model, tokens, 2, threads)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("base", ["float64", "Q4_1"])
def test_lora_adapters_are_added_by_the_step(base, threads):
    """s B (A x) on every target (q, k, v together on W_qkv, o, gate and up together, down): the
    forward pass's logits (1e-12 of their scale) and the step of kernels' (1e-13)."""
    if base == "float64":
        model = make_model(4, 2, 8, 2, 40, 50, False, np.float64, 0)
    else:
        cfg = npllama.LlamaConfig(vocab_size=50, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                  max_seq_len=12)
        model = quantized_model(cfg, "Q4_1")
    model = model.add_lora(3, 4.0).eval()
    for p in model.lora_params.values():
        p[...] = np.random.default_rng(1).normal(0.0, 0.3, p.shape)
    tokens = np.random.default_rng(2).integers(0, 50, size=12)
    assert_step_equals_kernels_and_forward(model, tokens, 3, threads)


# ---- the meeting of the threads (engine/pool.py) ---------------------------------------------------
@numba.njit(nogil=True)
def _rounds(values, seen, arrived, rounds, thread, n_threads):
    """Each round every thread writes its value, meets the others, reads all of theirs, meets again."""
    if thread >= n_threads:
        return
    meeting = 0
    for r in range(rounds):
        values[thread] = r * 10 + thread
        meeting += 1
        meet(arrived, meeting, n_threads)
        total = 0
        for t in range(n_threads):
            total += values[t]
        seen[thread, r] = total
        meeting += 1
        meet(arrived, meeting, n_threads)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_threads_that_meet_see_what_the_others_wrote_before(n_threads):
    rounds = 300
    values, seen = np.zeros(n_threads, np.int64), np.zeros((n_threads, rounds), np.int64)
    with thread_limit(n_threads):
        run_on_each_thread(_rounds, values, seen, np.zeros(1, np.int64), rounds, n_threads=n_threads)
    expected = np.array([r * 10 * n_threads + n_threads * (n_threads - 1) // 2 for r in range(rounds)])
    assert (seen == expected).all()
