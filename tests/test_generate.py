"""Generation: the key/value cache gives the logits of a full forward pass, greedy decoding is the
argmax of those logits, sampling draws from the right distribution reproducibly, stops are
honoured, bad arguments are refused, and `npllama generate` prints what generate() produces."""
import io
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama import generate as gen
from npllama.generate.cli import IncrementalText
from npllama.errors import InputError
from npllama.layers import kv_cache
from npllama.layers.rope import rope_cos_sin, rope_forward_reference

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 4}

CONFIGS = {
    "mha": dict(n_heads=4, n_kv_heads=4, dim=32),
    "gqa": dict(n_heads=6, n_kv_heads=2, dim=48),
    "mqa_tied": dict(n_heads=4, n_kv_heads=1, dim=32, tie_embeddings=True),
    "llama3_gqa": dict(n_heads=4, n_kv_heads=2, dim=32, rope_scaling=LLAMA3, rope_theta=500000.0),
}


def make_model(name="gqa", dtype=np.float64, seed=0, max_seq_len=20, vocab_size=50, noise=0.3):
    cfg = npllama.LlamaConfig(vocab_size=vocab_size, n_layers=2, hidden_dim=40, max_seq_len=max_seq_len,
                              **CONFIGS[name])
    model = npllama.Llama(cfg, seed=seed, dtype=dtype)
    # away from the init (norm gains 1, tiny weights) so every term matters and logits spread out
    model.flat_params[...] += np.random.default_rng(seed).normal(0.0, noise, model.flat_params.shape)
    return model.eval()


# ---- the cache --------------------------------------------------------------------------------

@pytest.mark.parametrize("prefill_len", [1, 7])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_logits_equal_full_forward_at_every_step(name, prefill_len):
    model = make_model(name)
    T = model.config.max_seq_len
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, size=T)
    full = model.forward(tokens[None])[0]
    scale = np.max(np.abs(full))
    decoder = gen.KVCacheDecoder(model, capacity=T)     # filled to the last position
    errors = [np.max(np.abs(decoder.prefill(tokens[:prefill_len]) - full[prefill_len - 1]))]
    for t in range(prefill_len, T):
        errors.append(np.max(np.abs(decoder.step(int(tokens[t])) - full[t])))
    assert decoder.length == T
    assert max(errors) <= 1e-12 * scale, f"{name}: max error {max(errors):.2e} (logit scale {scale:.2f})"


def test_cache_logits_float32_close_to_float64():
    m64 = make_model("gqa", np.float64)
    m32 = make_model("gqa", np.float32)
    tokens = np.random.default_rng(2).integers(0, 50, size=20)
    full = m64.forward(tokens[None])[0]
    decoder = gen.KVCacheDecoder(m32, capacity=20)
    got = [decoder.prefill(tokens[:3]).copy()] + [decoder.step(int(t)).copy() for t in tokens[3:]]
    assert all(g.dtype == np.float32 for g in got)
    np.testing.assert_allclose(np.array(got), full[2:], atol=2e-5 * np.max(np.abs(full)))


def test_decoder_refuses_overflow():
    model = make_model("gqa")
    decoder = gen.KVCacheDecoder(model, capacity=3)
    decoder.prefill([1, 2])
    decoder.step(3)
    with pytest.raises(InputError, match="full"):
        decoder.step(4)
    with pytest.raises(InputError):
        gen.KVCacheDecoder(model, capacity=model.config.max_seq_len + 1)


# ---- kernels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("H, K", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("length", [1, 5, 16])
def test_decode_attention_kernel_equals_reference(H, K, length, dtype, rtol):
    rng = np.random.default_rng(H * 100 + K * 10 + length)
    hd, S = 8, 16
    q = rng.normal(size=(H, hd)).astype(dtype)
    k_t = rng.normal(size=(K, hd, S)).astype(dtype)
    v = rng.normal(size=(K, S, hd)).astype(dtype)
    k_t[:, :, length:] = np.nan      # positions past `length` must never be read
    v[:, length:] = np.nan
    out = np.empty((H, hd), dtype=dtype)
    kv_cache.decode_attention_kernel(q, k_t, v, length, np.empty(S, dtype=dtype), out)
    ref = kv_cache.decode_attention_reference(q.astype(np.float64), k_t.astype(np.float64),
                                              v.astype(np.float64), length)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol)


def test_decode_attention_reference_is_attention():
    """The reference itself against the plain formula for one head: softmax(q.k_j / sqrt(hd)) v."""
    rng = np.random.default_rng(3)
    q, k_t, v = rng.normal(size=(2, 4)), rng.normal(size=(1, 4, 5)), rng.normal(size=(1, 5, 4))
    ref = kv_cache.decode_attention_reference(q, k_t, v, 3)
    for h in range(2):
        s = np.array([q[h] @ k_t[0, :, j] for j in range(3)]) / 2.0
        p = np.exp(s) / np.exp(s).sum()
        np.testing.assert_allclose(ref[h], p @ v[0, :3], rtol=1e-13)


@pytest.mark.parametrize("start, n_rows", [(0, 7), (5, 1), (3, 2)])
def test_kv_cache_store_kernel_writes_its_positions_only(start, n_rows):
    """Prefill stores all P rows at positions 0.., a step one row at its position."""
    rng = np.random.default_rng(4)
    H, K, hd, S = 4, 2, 6, 9
    qkv = rng.normal(size=(n_rows, (H + 2 * K) * hd))
    k_t, v = np.zeros((K, hd, S)), np.zeros((K, S, hd))
    kv_cache.kv_cache_store_kernel(qkv, start, H, k_t, v)
    stop = start + n_rows
    k_rows = qkv[:, H * hd:(H + K) * hd].reshape(n_rows, K, hd)
    v_rows = qkv[:, (H + K) * hd:].reshape(n_rows, K, hd)
    np.testing.assert_array_equal(k_t[:, :, start:stop], k_rows.transpose(1, 2, 0))
    np.testing.assert_array_equal(v[:, start:stop], v_rows.transpose(1, 0, 2))
    assert not k_t[:, :, :start].any() and not k_t[:, :, stop:].any()    # nothing else written
    assert not v[:, :start].any() and not v[:, stop:].any()


@pytest.mark.parametrize("kernel", [kv_cache.matvec_kernel, kv_cache.matvec_parallel_kernel])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (300, 37), (513, 288)])
def test_matvec_kernels_equal_matmul(kernel, shape):
    rng = np.random.default_rng(shape[0])
    w, x = rng.normal(size=shape), rng.normal(size=shape[1])
    y = np.empty(shape[0])
    kernel(w, x, y)
    np.testing.assert_allclose(y, w @ x, rtol=1e-12, atol=1e-12 * np.abs(w).sum(axis=1).max())
    w32, x32, y32 = w.astype(np.float32), x.astype(np.float32), np.empty(shape[0], np.float32)
    kernel(w32, x32, y32)
    np.testing.assert_allclose(y32, w @ x, atol=1e-5 * np.abs(w).sum(axis=1).max())


def test_prefill_fills_the_cache_with_the_models_rotated_keys_and_values():
    """After prefill, the cache holds RoPE(W_k n1) and W_v n1 of every layer and position, as plain
    NumPy formulas of the block give them (float64, 1e-12)."""
    model = make_model("llama3_gqa")
    cfg = model.config
    H, K, hd, P = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 6
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, size=P)
    decoder = gen.KVCacheDecoder(model, capacity=P + 2)
    decoder.prefill(tokens)
    cos, sin = rope_cos_sin(np.arange(P), model.rope_freqs, np.float64)
    p = model.params

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

    def heads(x, n):     # (P, n*hd) -> (n, P, hd)
        return x.reshape(P, n, hd).transpose(1, 0, 2)

    x = p["model.embed_tokens.weight"][tokens]
    for i in range(cfg.n_layers):
        L = f"model.layers.{i}."
        n1 = norm(x, p[L + "input_layernorm.weight"])
        q, _ = rope_forward_reference(heads(n1 @ p[L + "self_attn.q_proj.weight"].T, H), cos, sin)
        k, _ = rope_forward_reference(heads(n1 @ p[L + "self_attn.k_proj.weight"].T, K), cos, sin)
        v = heads(n1 @ p[L + "self_attn.v_proj.weight"].T, K)
        np.testing.assert_allclose(decoder.k_cache_t[i, :, :, :P].transpose(0, 2, 1), k, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(decoder.v_cache[i, :, :P], v, rtol=1e-12, atol=1e-12)
        s = np.repeat(k, H // K, 0) @ q.transpose(0, 2, 1)   # (H, keys, queries)
        s = s.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((P, P), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        o = (a / a.sum(-1, keepdims=True)) @ np.repeat(v, H // K, 0)           # (H, P, hd)
        x = x + o.transpose(1, 0, 2).reshape(P, H * hd) @ p[L + "self_attn.o_proj.weight"].T
        n2 = norm(x, p[L + "post_attention_layernorm.weight"])
        g, u = n2 @ p[L + "mlp.gate_proj.weight"].T, n2 @ p[L + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ p[L + "mlp.down_proj.weight"].T


# ---- greedy --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa", "mqa_tied"])
def test_greedy_is_repeated_argmax_of_full_forward(name):
    model = make_model(name)
    prompt = [3, 14, 15, 9]
    new = model.generate(prompt, 12)
    assert new.dtype == np.int64 and new.shape == (12,)
    seq = list(prompt)
    for token in new:
        assert token == np.argmax(model.forward(np.array([seq]))[0, -1])
        seq.append(int(token))
    assert len(set(new.tolist())) > 1     # the check covered more than one repeated token


def test_greedy_tie_takes_lowest_id():
    model = make_model("gqa")
    head = model.params["lm_head.weight"]
    head[9] = head[5] = 10.0 * model.params["model.norm.weight"]   # two equal, largest rows
    logits = model.forward(np.array([[1, 2, 3]]))[0, -1]
    assert logits[5] == logits[9] == logits.max()
    assert model.generate([1, 2, 3], 1)[0] == 5


def test_greedy_ignores_top_k_top_p_and_seed():
    model = make_model("gqa")
    a = model.generate([1, 2], 8)
    b = model.generate([1, 2], 8, temperature=0.0, top_k=3, top_p=0.5, seed=11)
    np.testing.assert_array_equal(a, b)


# ---- sampling ---------------------------------------------------------------------------------------

def reference_distribution(logits, temperature, top_k=None, top_p=None):
    """Plain-Python statement of the rules: (V,) probabilities, zero outside the kept set."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    kept = list(range(len(p)))
    if top_k is not None:
        kept = sorted(kept, key=lambda i: (-p[i], i))[:top_k]
        mass = p[kept].sum()
        p = np.array([p[i] / mass if i in kept else 0.0 for i in range(len(p))])
    if top_p is not None:
        chosen, cumulative = [], 0.0
        for i in sorted(kept, key=lambda i: (-p[i], i)):
            chosen.append(i)
            cumulative += p[i]
            if cumulative >= top_p:
                break
        kept = chosen
        mass = p[kept].sum()
        p = np.array([p[i] / mass if i in kept else 0.0 for i in range(len(p))])
    return p


LOGITS = np.array([2.0, 1.5, 1.5, 0.3, -0.2, 1.0, 0.0, -1.0, 0.7, 0.2])
SAMPLING_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5, top_k=3),
    dict(temperature=1.0, top_k=2),               # tie at the boundary (ids 1, 2): id 1 kept
    dict(temperature=1.5, top_p=0.6),
    dict(temperature=0.8, top_k=6, top_p=0.75),
    dict(temperature=2.0, top_p=1.0, top_k=10),   # no filtering at all
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=str)
def test_sampling_distribution_matches_rules(case):
    expected = reference_distribution(LOGITS, **case)
    ids, p = gen.sampling_distribution(LOGITS, case["temperature"], case.get("top_k"), case.get("top_p"))
    got = np.zeros(LOGITS.size)
    got[np.arange(LOGITS.size) if ids is None else ids] = p
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-16)
    assert abs(p.sum() - 1.0) < 1e-14


def test_top_k_boundary_tie_keeps_lowest_id():
    ids, p = gen.sampling_distribution(LOGITS, 1.0, top_k=2)
    assert ids.tolist() == [0, 1]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=str)
def test_sampled_frequencies_match_distribution(case):
    """Chi-square of 20000 draws against the renormalised probabilities; dropped ids never drawn."""
    n = 20000
    expected = reference_distribution(LOGITS, **case)
    rng = np.random.default_rng(2024)
    draws = [gen.sample_token(LOGITS, case["temperature"], case.get("top_k"), case.get("top_p"), rng)
             for _ in range(n)]
    counts = np.bincount(draws, minlength=LOGITS.size)
    assert np.all(counts[expected == 0] == 0), "a token outside the kept set was drawn"
    kept = expected > 0
    chi2 = np.sum((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept]))
    # df <= 9; P(chi2_9 > 40) ~ 7e-6. A wrong renormalisation or kept set gives hundreds or more.
    assert chi2 < 40, f"chi-square {chi2:.1f} with {kept.sum() - 1} degrees of freedom"


def test_top_p_large_vocab_equals_full_sort():
    """The candidate search (64, 512, 4096, ... most likely ids) gives the full sort's answer, ties included."""
    rng = np.random.default_rng(6)
    for flatness, top_p in [(0.1, 0.9), (1.0, 0.5), (3.0, 0.99), (0.5, 0.999999)]:
        p = rng.dirichlet(np.full(20000, flatness))
        p = np.round(p, 7)          # many exact ties
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = min(int(np.argmax(cumulative >= top_p)) + 1 if cumulative[-1] >= top_p else p.size, p.size)
        np.testing.assert_array_equal(gen.top_p_ids(p, top_p), order[:keep])


def test_top_p_keeps_at_least_one():
    ids, p = gen.sampling_distribution(LOGITS, 1.0, top_p=1e-9)
    assert ids.tolist() == [0] and p.tolist() == [1.0]


def test_sampling_seed_reproducible_and_seed_dependent():
    model = make_model("gqa", noise=0.1)
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.95)
    a = model.generate([1, 2, 3], 15, seed=7, **kwargs)
    b = model.generate([1, 2, 3], 15, seed=7, **kwargs)
    c = model.generate([1, 2, 3], 15, seed=8, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generate_samples_from_the_model_logits():
    """The first sampled token is sample_token on the full forward's last logits with rng(seed)."""
    model = make_model("gqa", noise=0.1)
    prompt = [4, 8, 15]
    logits = model.forward(np.array([prompt]))[0, -1]
    for seed in range(5):
        expected = gen.sample_token(logits, 0.9, 10, 0.9, np.random.default_rng(seed))
        assert model.generate(prompt, 1, temperature=0.9, top_k=10, top_p=0.9, seed=seed)[0] == expected


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=1.2, top_k=5, seed=3)], ids=["greedy", "sampled"])
def test_stream_equals_generate(kwargs):
    model = make_model("mqa_tied")
    it = model.stream([5, 6], 10, **kwargs)
    assert isinstance(it, types.GeneratorType)
    streamed = list(it)
    assert all(type(t) is int for t in streamed)
    np.testing.assert_array_equal(streamed, model.generate([5, 6], 10, **kwargs))


# ---- stopping --------------------------------------------------------------------------------------

def test_stop_ids_end_generation_and_are_returned():
    model = make_model("gqa")
    prompt = [1, 2, 3]
    free = model.generate(prompt, 12).tolist()
    stop = free[4]
    first = free.index(stop)
    np.testing.assert_array_equal(model.generate(prompt, 12, stop_ids=[stop]), free[:first + 1])
    np.testing.assert_array_equal(model.generate(prompt, 12, stop_ids=stop), free[:first + 1])
    stats = {}
    list(gen.stream(model, prompt, 12, stop_ids=[stop], stats=stats))
    assert stats["stop"] == "stop_id" and stats["new_tokens"] == first + 1


def test_default_stops_are_the_tokenizers_stop_ids():
    model = make_model("gqa")
    free = model.generate([1, 2, 3], 12).tolist()   # no tokenizer: no stop
    assert len(free) == 12
    model.tokenizer = types.SimpleNamespace(stop_ids=(free[5], free[3]))   # eos and an end-of-turn token
    first = min(free.index(free[3]), free.index(free[5]))
    np.testing.assert_array_equal(model.generate([1, 2, 3], 12), free[:first + 1])
    np.testing.assert_array_equal(model.generate([1, 2, 3], 12, stop_ids=[]), free)   # [] = never stop


def test_context_limit():
    model = make_model("gqa", max_seq_len=12)
    stats = {}
    new = gen.generate(model, np.arange(5), 100, stats=stats)
    assert new.shape == (7,) and stats["stop"] == "context"          # prompt + new = max_seq_len
    full = model.forward(np.concatenate([np.arange(5), new[:-1]])[None])[0]
    np.testing.assert_array_equal(new, np.argmax(full[4:], axis=-1))
    empty = model.generate(np.arange(12), 5)
    assert empty.shape == (0,) and empty.dtype == np.int64
    assert model.generate(np.arange(5), 0).shape == (0,)
    with pytest.raises(InputError, match="max_seq_len=12"):
        model.generate(np.arange(13) % 50, 1)


# ---- past the context: a sliding window -------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa", "llama3_gqa"])
def test_cache_after_a_slide_equals_full_forward_over_the_window(name):
    """A slide re-prefills a full cache with the end of the text: its logits, and those of every step
    after it, are those of a full forward pass over the window (float64, to 1e-12)."""
    model = make_model(name, max_seq_len=12)
    tokens = np.random.default_rng(4).integers(0, 50, size=24)
    decoder = gen.KVCacheDecoder(model, capacity=12)
    decoder.prefill(tokens[:12])                        # the cache is full
    keep = gen.decoding.slide_window(12)
    assert keep == 6
    start = 12 - keep
    full = model.forward(tokens[start:start + 12][None])[0]    # the window, growing to a full context again
    scale = np.max(np.abs(full))
    errors = [np.max(np.abs(decoder.prefill(tokens[start:12]) - full[keep - 1]))]
    for t in range(12, start + 12):
        errors.append(np.max(np.abs(decoder.step(int(tokens[t])) - full[t - start])))
    assert decoder.length == 12
    assert max(errors) <= 1e-12 * scale, f"max error {max(errors):.2e} (logit scale {scale:.2f})"


def test_generation_slides_past_the_context():
    model = make_model("gqa", max_seq_len=12)
    prompt = [3, 1, 4, 1, 5]
    stats = {}
    new = gen.generate(model, prompt, 40, slide=True, stats=stats)
    assert new.shape == (40,) and stats["stop"] == "max_new_tokens" and stats["new_tokens"] == 40
    # greedy: each token is the argmax of a full forward pass over what the cache held, which is the
    # whole text until it fills 12 positions, then its last 6 tokens, growing again to 12, ...
    text = prompt + new.tolist()
    start, slides = 0, 0
    for j in range(len(prompt), len(text)):
        if j - start > 12:                   # the cache held text[start:j-1], full: slide
            start, slides = j - 6, slides + 1
        logits = model.forward(np.array(text[start:j])[None])[0, -1]
        assert text[j] == int(np.argmax(logits)), f"token {j} (window {start}:{j})"
    assert stats["slides"] == slides >= 5
    # without slide (the API's default) it stops at the context; the tokens up to there agree
    stats = {}
    assert gen.generate(model, prompt, 40, stats=stats).tolist() == new[:7].tolist()
    assert stats["stop"] == "context" and stats["slides"] == 0
    # sampling slides as well, reproducibly; stream gives the same tokens
    sampled = model.generate(prompt, 30, temperature=1.0, seed=3, slide=True)
    assert sampled.shape == (30,)
    assert list(model.stream(prompt, 30, temperature=1.0, seed=3, slide=True)) == sampled.tolist()
    # a prompt that fills the context: the first token from it, then a slide
    assert model.generate(np.arange(12), 8, slide=True).shape == (8,)
    with pytest.raises(InputError, match="slide"):
        model.generate(prompt, 3, slide="yes")


# ---- bad arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, match", [
    ([], "empty"), ([[1, 2]], "1-D"), (np.array([1.0, 2.0]), "integer"), ([1, 50], "outside"),
    ([-1], "outside"), ([[1], [2, 3]], "1-D sequence"), (5, "1-D"),
])
def test_bad_prompt_raises(prompt, match):
    with pytest.raises(InputError, match=match):
        make_model("gqa").generate(prompt, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.5), "top_p"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(stop_ids=[50]), "stop_ids"), (dict(stop_ids=["a"]), "stop_ids"), (dict(stop_ids=3.0), "stop_ids"),
])
def test_bad_arguments_raise_before_iteration(kwargs, match):
    model = make_model("gqa")
    args = dict(max_new_tokens=3, temperature=1.0)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        model.stream([1, 2], **args)          # raised by the call, not by the first next()
    with pytest.raises(InputError, match=match):
        model.generate([1, 2], **args)


# ---- command line ------------------------------------------------------------------------------------

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from npllama.tokenizer import Tokenizer
    tok = Tokenizer.train(TEXT, vocab_size=300)
    cfg = npllama.LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              hidden_dim=40, max_seq_len=64)
    model = npllama.Llama(cfg, seed=3)
    model.flat_params[...] += np.random.default_rng(3).normal(0.0, 0.2, model.flat_params.shape).astype(np.float32)
    model.tokenizer = tok
    path = tmp_path_factory.mktemp("run")
    model.save_pretrained(path)
    return path


def run_cli(argv):
    from npllama.cli import main
    return main(["generate", *map(str, argv)])


def test_cli_greedy_prints_prompt_and_continuation(run_dir, capsys):
    rc = run_cli([run_dir, "--prompt", "To be", "--max-new-tokens", 10, "--temperature", 0])
    out, err = capsys.readouterr()
    assert rc == 0
    model = npllama.Llama.from_pretrained(run_dir)
    tok = model.tokenizer
    new = model.generate(tok.encode("To be"), 10).tolist()
    if new and new[-1] == tok.eos_id:
        new = new[:-1]                         # the end-of-text token is not printed
    assert out == "To be" + tok.decode(new)
    assert len(new) > 0
    n_prompt = len(tok.encode("To be"))
    assert f"prompt {n_prompt} tokens" in err and "tok/s" in err and err.count("\n") == 1


def test_cli_reads_prompt_from_stdin(run_dir, capsys, monkeypatch):
    run_cli([run_dir, "--prompt", "the question", "--max-new-tokens", 6, "--temperature", 0])
    direct = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("the question\n"))
    assert run_cli([run_dir, "--prompt", "-", "--max-new-tokens", 6, "--temperature", 0]) == 0
    assert capsys.readouterr().out == direct


def test_cli_sampling_reproducible_by_seed(run_dir, capsys):
    args = [run_dir, "--prompt", "Whether", "--max-new-tokens", 12, "--temperature", 1.0, "--top-k", 50]
    run_cli(args + ["--seed", 5])
    first = capsys.readouterr()
    run_cli(args + ["--seed", 5])
    second = capsys.readouterr()
    assert first.out == second.out and "seed 5" in first.err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run_cli([tmp_path / "nope", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("npllama: error:") and "no such file or directory" in err and err.count("\n") == 1
    model = npllama.Llama(npllama.LlamaConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2, hidden_dim=8))
    model.save_pretrained(tmp_path / "no_tok")
    assert run_cli([tmp_path / "no_tok", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and err.count("\n") == 1


def test_cli_generates_past_the_context(run_dir, capsys):
    """The model's context is 64 tokens: 150 new ones slide the window twice or more, greedy output
    is what generate(slide=True) gives, and the report says so."""
    rc = run_cli([run_dir, "--prompt", "Whether", "--max-new-tokens", 150, "--temperature", 0])
    out, err = capsys.readouterr()
    assert rc == 0, err
    model = npllama.Llama.from_pretrained(run_dir)
    tok = model.tokenizer
    new = model.generate(tok.encode("Whether"), 150, slide=True, stop_ids=[]).tolist()
    assert tok.eos_id not in new, "the fixture's model stops early; pick another prompt"
    assert out == "Whether" + tok.decode(new)
    prompt_len = len(tok.encode("Whether"))
    assert f"prompt {prompt_len} token{'s' if prompt_len != 1 else ''}," in err
    assert "150 new tokens" in err and "stopped at --max-new-tokens" in err
    assert re.search(r"the 64-token context was full [2-9] times, each time generation went on over its last 32 "
                     r"tokens", err), err
    # --no-slide stops at the context, as generate() does by default
    assert run_cli([run_dir, "--prompt", "Whether", "--max-new-tokens", 150, "--temperature", 0, "--no-slide"]) == 0
    out, err = capsys.readouterr()
    assert f"{64 - prompt_len} new tokens" in err and "stopped at context limit" in err
    assert out == "Whether" + tok.decode(new[:64 - prompt_len])


def test_cli_messages_name_the_options(run_dir, capsys):
    assert run_cli([run_dir, "--top-p", 1.5]) == 1
    assert capsys.readouterr().err == "npllama: error: --top-p must be a number in (0, 1], got 1.5\n"
    assert run_cli([run_dir, "--max-new-tokens", -1]) == 1
    assert capsys.readouterr().err == "npllama: error: --max-new-tokens must be an integer >= 0, got -1\n"
    assert run_cli([run_dir, "--top-k", 0]) == 1
    assert capsys.readouterr().err == "npllama: error: --top-k must be an integer >= 1, got 0\n"
    # one prompt token (no BOS: the end-of-text token starts an empty prompt): "1 token", singular
    assert run_cli([run_dir, "--max-new-tokens", 1, "--temperature", 0]) == 0
    assert "npllama: prompt 1 token, " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli([run_dir, "--help"])
    assert "sliding window" in capsys.readouterr().out


def test_incremental_text_never_shows_half_characters():
    from npllama.tokenizer import Tokenizer
    tok = Tokenizer.train(TEXT, vocab_size=280)
    text = " naïve café — 🎉 done"
    ids = tok.encode(text).tolist()
    assert len(ids) > len(text.split())      # multi-byte characters span several byte tokens
    pieces = IncrementalText(tok, context_ids=tok.encode("To be").tolist())
    shown = [pieces.push(t) for t in ids]
    assert not any("\ufffd" in s for s in shown)
    assert "".join(shown) + pieces.flush() == text


def test_report_on_a_line_of_its_own_when_stdout_and_stderr_share_a_file(run_dir, tmp_path):
    """`npllama generate ... > out 2>&1`: the statistics line starts a line of its own after the text
    (which, not on a terminal, gets no newline of its own)."""
    import subprocess
    both = tmp_path / "both.txt"
    with open(both, "w") as f:
        subprocess.run([sys.executable, "-m", "npllama.cli", "generate", str(run_dir), "--prompt", "To be",
                        "--max-new-tokens", "5", "--temperature", "0"], stdout=f, stderr=subprocess.STDOUT,
                       check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")})
    lines = both.read_text().split("\n")
    assert lines[0].startswith("To be") and "npllama: prompt" not in lines[0]
    assert lines[1].startswith("npllama: prompt 2 tokens") and lines[2] == ""
    with open(both, "w") as out:   # stdout to a file, stderr elsewhere: the text exactly as generated
        subprocess.run([sys.executable, "-m", "npllama.cli", "generate", str(run_dir), "--prompt", "To be",
                        "--max-new-tokens", "5", "--temperature", "0"], stdout=out, stderr=subprocess.PIPE,
                       check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")})
    assert both.read_text() == lines[0]


def test_token_healing_respells_a_trailing_indent():
    """The issue's case: code trains as 'ĊĠĠĠ' + 'Ġreturn', so a prompt ending in four spaces of
    indent ends in a token ('ĊĠĠĠĠ') the model saw only before more spaces.  Healing backs up over it
    and lets the model spell the indent again: the healed prompt's continuation is the text's own."""
    from npllama.generate.healing import TokenHealing
    from npllama.tokenizer import Tokenizer
    code = "".join(f"def f{i}(n):\n    return n + {i}\n\n\ndef g{i}(n):\n        pass\n\n" for i in range(200))
    tok = Tokenizer.train(code, vocab_size=300)
    prompt = "def f7(n):\n    "
    ids = tok.encode(prompt).tolist()
    assert tok.decode(ids[-1:]).strip() == ""
    healing = TokenHealing.of(tok, ids)
    assert healing.removed_text == "\n    " and healing.active
    allowed = {tok.id_to_token(i) for i in healing.allowed_ids()}
    assert tok.id_to_token(ids[-healing.n_removed]) in allowed    # the prompt's own spelling stays possible
    assert all(t.startswith(healing.remaining) or healing.remaining.startswith(t) for t in allowed)
    assert "<|endoftext|>" not in allowed
    # train a tiny model on the code: healed, greedy decoding writes "return" at the trained indent
    cfg = npllama.LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              max_seq_len=32)
    model = npllama.Llama(cfg, seed=0)
    from npllama.data import BatchSampler
    from npllama.optim import AdamW
    data = tok.encode(code)
    sampler, opt = BatchSampler(data, 16, 32, seed=0), AdamW(model.params, lr=1e-2, flat_params=model.flat_params)
    for _ in range(60):
        x, y = sampler.next_batch()
        model.loss_and_grad(x, y)
        opt.step(flat_grads=model.flat_grads)
    plain = tok.decode(ids + gen.generate(model, ids, 3).tolist())
    healed = TokenHealing.of(tok, ids)
    new = gen.generate(model, ids[:-healed.n_removed], 3, healing=healed)
    text = tok.decode(ids[:-healed.n_removed] + new.tolist())
    assert text.startswith("def f7(n):\n    return"), (text, plain)
    assert not plain.startswith("def f7(n):\n    return"), plain      # what the issue saw
    assert TokenHealing.of(tok, tok.encode("def f7(n):").tolist()) is None   # nothing to heal


def test_cli_heals_a_prompt_ending_in_whitespace_and_says_so(run_dir, capsys):
    model = npllama.Llama.from_pretrained(run_dir)
    tok = model.tokenizer
    prompt = "To be, or not to be:\n  "
    assert run_cli([run_dir, "--prompt", prompt, "--max-new-tokens", 8, "--temperature", 0]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt)
    assert "npllama: token healing: the prompt's last" in err and "--no-token-healing" in err
    from npllama.generate.healing import TokenHealing
    ids = tok.encode(prompt).tolist()
    healing = TokenHealing.of(tok, ids)
    new = gen.generate(model, ids[:-healing.n_removed], 8, healing=healing).tolist()
    if new and new[-1] == tok.eos_id:
        new = new[:-1]
    full = tok.decode(ids[:-healing.n_removed] + new)
    assert full.startswith(prompt) and out == full
    # turned off: the prompt's own tokens, and a warning
    assert run_cli([run_dir, "--prompt", prompt, "--max-new-tokens", 8, "--temperature", 0,
                    "--no-token-healing"]) == 0
    out, err = capsys.readouterr()
    plain = model.generate(ids, 8).tolist()
    assert out == prompt + tok.decode([t for t in plain if t != tok.eos_id])
    assert "warning: the prompt ends in whitespace" in err and "token healing:" not in err
    # a prompt not ending in whitespace is left alone unless asked
    assert run_cli([run_dir, "--prompt", "To be", "--max-new-tokens", 3, "--temperature", 0]) == 0
    assert "token healing" not in capsys.readouterr().err
    assert run_cli([run_dir, "--prompt", "To be", "--max-new-tokens", 3, "--temperature", 0, "--token-healing"]) == 0
    assert "token healing: the prompt's last 1 token (' be')" in capsys.readouterr().err
