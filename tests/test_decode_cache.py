"""The key/value cache kept between calls (a chat's turns).

* npllama.reference: a continuation over a ``KVCache`` (a sequence run in pieces, each piece's
  queries attending to the kept keys and values) gives the logits of the whole sequence run at once
  (float64, 1e-13), for MHA/GQA/MQA, tied or not, LoRA adapters too;
* ``Llama.last_hidden_state(kv_cache=...)``, the fast engine's continuation, gives the reference's
  continuation at every new position, and fills the cache with the keys and values of a prefill of
  the whole sequence;
* ``KVCacheDecoder.resume`` runs only the tokens after those the cache holds (as one batch) and
  gives the logits a fresh prefill of the whole prompt gives: float64 1e-12, float32 within 2e-5
  of the largest logit (float32 rounding of the same sums in another order); quantized weights and
  LoRA adapters too;
* ``grown`` at least doubles the capacity (at most max_seq_len), keeping the positions;
* ``stream(cache=...)`` keeps the decoder between calls and the tokens are those of calls without
  it, past the context too (the sliding window).
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import npllama
from npllama import reference
from npllama.config import LlamaConfig
from npllama.errors import InputError
from npllama.generate.decoding import KVCacheDecoder, generate
from npllama.gradcheck import relative_error

CFG = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=40)
HEADS = [(4, 4), (4, 2), (6, 3), (4, 1), (2, 2)]      # (n_heads, n_kv_heads): MHA, GQA, MQA


@st.composite
def configs(draw, max_seq_len=32):
    H, K = draw(st.sampled_from(HEADS))
    hd = draw(st.sampled_from([2, 4, 6, 8]))
    return LlamaConfig(vocab_size=draw(st.integers(5, 40)), dim=H * hd, n_layers=draw(st.integers(1, 3)), n_heads=H,
                       n_kv_heads=K, hidden_dim=draw(st.integers(4, 24)), max_seq_len=max_seq_len,
                       tie_embeddings=draw(st.booleans()))


def random_model(cfg, seed, dtype=np.float64):
    model = npllama.Llama(cfg, dtype=dtype, seed=seed)
    # away from the init (norm gains 1, tiny weights) so every term matters and logits spread out
    model.flat_params[...] += np.random.default_rng(seed).normal(0.0, 0.3, model.flat_params.shape)
    return model.eval()


def cuts(draw, T):
    """0 < c_1 < ... < T: the pieces a sequence of T tokens is run in."""
    inner = draw(st.lists(st.integers(1, T - 1), max_size=3, unique=True)) if T > 1 else []
    return [0, *sorted(inner), T]


# ---- the reference ---------------------------------------------------------------------------------
@given(cfg=configs(), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_reference_continuation_equals_the_whole_sequence(cfg, data, seed):
    model = random_model(cfg, seed % 1000)
    rng = np.random.default_rng(seed)
    B, T = data.draw(st.integers(1, 2)), data.draw(st.integers(1, cfg.max_seq_len))
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    whole = reference.forward(model.params, cfg, tokens)
    cache = reference.KVCache(cfg)
    bounds = cuts(data.draw, T)
    pieces = [reference.forward(model.params, cfg, tokens[:, a:b], kv_cache=cache) for a, b in zip(bounds, bounds[1:])]
    assert cache.length == T
    assert relative_error(np.concatenate(pieces, axis=1), whole) <= 1e-13


def test_reference_continuation_with_lora_adapters():
    model = random_model(CFG, 1).add_lora(3, 6.0)
    rng = np.random.default_rng(1)
    for p in model.lora_params.values():
        p[...] = rng.normal(0.0, 0.3, p.shape)
    lora = {k.removesuffix(".lora_A.weight"): (p, model.lora_params[k.replace(".lora_A.", ".lora_B.")], 2.0)
            for k, p in model.lora_params.items() if k.endswith(".lora_A.weight")}
    tokens = rng.integers(0, CFG.vocab_size, (1, 15))
    whole = reference.forward(model.params, CFG, tokens, lora=lora)
    cache = reference.KVCache(CFG)
    pieces = [reference.forward(model.params, CFG, tokens[:, a:b], lora=lora, kv_cache=cache)
              for a, b in ((0, 6), (6, 7), (7, 15))]
    assert relative_error(np.concatenate(pieces, axis=1), whole) <= 1e-13


def test_reference_continuation_refuses_bad_input():
    model = random_model(CFG, 2)
    cache = reference.KVCache(CFG)
    reference.forward(model.params, CFG, np.ones((1, 30), dtype=np.int64), kv_cache=cache)
    with pytest.raises(InputError, match="longer than max_seq_len"):
        reference.forward(model.params, CFG, np.ones((1, 11), dtype=np.int64), kv_cache=cache)
    with pytest.raises(InputError, match="holds 1 sequences"):
        reference.forward(model.params, CFG, np.ones((2, 3), dtype=np.int64), kv_cache=cache)
    with pytest.raises(InputError, match="position_ids"):
        reference.forward(model.params, CFG, np.ones((1, 3), dtype=np.int64), kv_cache=cache, position_ids=[0, 1, 2])
    with pytest.raises(InputError, match="KVCache"):
        reference.forward(model.params, CFG, np.ones((1, 3), dtype=np.int64), kv_cache={})


# ---- the fast engine's continuation ----------------------------------------------------------------
@given(cfg=configs(), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_continuation_hidden_states_equal_the_references(cfg, data, seed):
    """Llama.last_hidden_state(kv_cache=) at every new position = the reference's final norm output
    over the whole sequence there; the cache then holds a prefill's keys and values of it all."""
    model = random_model(cfg, seed % 1000)
    T = data.draw(st.integers(2, cfg.max_seq_len))
    start = data.draw(st.integers(1, T - 1))
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, T))
    decoder = KVCacheDecoder(model, capacity=min(T + data.draw(st.integers(0, 3)), cfg.max_seq_len))
    decoder.prefill(tokens[0, :start])
    kept = (decoder.k_cache_t, decoder.v_cache, start)
    hidden = model.last_hidden_state(tokens[:, start:], kv_cache=kept).copy()
    run = reference.run_with_cache(model.params, cfg, tokens)
    assert relative_error(hidden, run["model.norm"][:, start:]) <= 1e-12
    whole = KVCacheDecoder(model, capacity=T)
    whole.prefill(tokens[0])
    assert relative_error(decoder.k_cache_t[..., :T], whole.k_cache_t) <= 1e-12
    assert relative_error(decoder.v_cache[:, :, :T], whole.v_cache) <= 1e-12


def test_continuation_refuses_a_cache_that_does_not_fit():
    model = random_model(CFG, 3)
    decoder = KVCacheDecoder(model, capacity=10)
    decoder.prefill([1, 2, 3])
    kept = decoder.k_cache_t, decoder.v_cache
    with pytest.raises(InputError, match="do not fit"):
        model.last_hidden_state(np.ones((1, 8), dtype=np.int64), kv_cache=(*kept, 3))
    with pytest.raises(InputError, match="one sequence"):
        model.last_hidden_state(np.ones((2, 2), dtype=np.int64), kv_cache=(*kept, 3))
    with pytest.raises(InputError, match="v_cache"):
        model.last_hidden_state(np.ones((1, 2), dtype=np.int64), kv_cache=(kept[0], kept[1][:1], 3))
    with pytest.raises(InputError, match="k_cache_t"):
        model.last_hidden_state(np.ones((1, 2), dtype=np.int64), kv_cache=(kept[0].astype(np.float32), kept[1], 3))


# ---- resume -----------------------------------------------------------------------------------------
def test_resume_equals_a_fresh_prefill():
    model = npllama.Llama(CFG, dtype=np.float64, seed=3).eval()
    rng = np.random.default_rng(0)
    first, more = rng.integers(0, 61, 9), rng.integers(0, 61, 6)
    decoder = KVCacheDecoder(model, capacity=12)
    decoder.prefill(first)
    decoder.step(int(more[0]))
    decoder = decoder.grown(20)
    prompt = np.concatenate([first, [more[0] + 1], more[1:]])      # differs after 9 tokens: those are kept
    logits = decoder.resume(prompt).copy()
    fresh = KVCacheDecoder(model, capacity=20).prefill(prompt)
    assert relative_error(logits, fresh) <= 1e-12
    assert decoder.tokens == [int(t) for t in prompt] and decoder.length == len(prompt)


@given(cfg=configs(max_seq_len=40), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_turns_resumed_equal_the_whole_conversation(cfg, data, seed):
    """Turns of drawn lengths, each resumed over the cache the turns before left (a turn may also
    rewrite the end of the last one), each one's logits a fresh prefill's of the conversation so far
    and the reference's; then decoding steps go on from there."""
    model = random_model(cfg, seed % 1000)
    rng = np.random.default_rng(seed)
    conversation = list(rng.integers(0, cfg.vocab_size, data.draw(st.integers(1, 8))))
    decoder = KVCacheDecoder(model, capacity=len(conversation))
    decoder.prefill(conversation)
    for _ in range(data.draw(st.integers(1, 3))):
        keep = data.draw(st.integers(1, len(conversation)))             # the turn rewrites what follows
        turn = list(rng.integers(0, cfg.vocab_size, data.draw(st.integers(1, 10))))
        conversation = conversation[:keep] + turn
        if len(conversation) > cfg.max_seq_len - 1:
            break
        decoder = decoder.grown(len(conversation) + 1)
        logits = decoder.resume(conversation).copy()
        assert decoder.length == len(conversation) and decoder.tokens == [int(t) for t in conversation]
        fresh = KVCacheDecoder(model, capacity=len(conversation)).prefill(conversation)
        assert relative_error(logits, fresh) <= 1e-12
        whole = reference.forward(model.params, cfg, np.array([conversation]))[0]
        assert relative_error(logits, whole[-1]) <= 1e-12
        step = decoder.step(int(rng.integers(cfg.vocab_size)))         # decoding goes on over the cache
        conversation.append(decoder.tokens[-1])
        assert relative_error(step, reference.forward(model.params, cfg, np.array([conversation]))[0, -1]) <= 1e-12


@pytest.mark.parametrize("start, new", [(1, 2), (5, 9), (12, 20), (30, 3)])
def test_resume_in_float32_is_within_rounding_of_float64(start, new):
    """float32: the logits of the resumed turn within 2e-5 of the largest, against float64's."""
    m64, m32 = random_model(CFG, 4), random_model(CFG, 4, np.float32)
    tokens = np.random.default_rng(start).integers(0, CFG.vocab_size, start + new)
    want = reference.forward(m64.params, CFG, tokens[None])[0, -1]
    decoder = KVCacheDecoder(m32, capacity=start + new)
    decoder.prefill(tokens[:start])
    got = decoder.resume(tokens)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.max(np.abs(want)))


QUANTIZED = LlamaConfig(vocab_size=53, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=24)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("lora", [False, True])
def test_resume_with_quantized_weights_and_lora_adapters(qtype, lora):
    """Quantized weights (the batched products of quantized_linear), and LoRA adapters on them (the
    rows path adds them itself, no merged copy): resume = the reference on the dequantized weights."""
    model = npllama.Llama(QUANTIZED, dtype=np.float64, seed=5)
    for p in model.params.values():
        if p.ndim == 2:
            p *= 20.0       # weights of the size real models have, so every code is used
    model.quantize(qtype)
    lora_weights = None
    if lora:
        model.add_lora(2, 4.0)
        rng = np.random.default_rng(5)
        for p in model.lora_params.values():
            p[...] = rng.normal(0.0, 0.2, p.shape)
        lora_weights = {k.removesuffix(".lora_A.weight"): (p, model.lora_params[k.replace(".lora_A.", ".lora_B.")],
                                                            2.0) for k, p in model.lora_params.items()
                        if k.endswith(".lora_A.weight")}
    model.eval()
    tokens = np.random.default_rng(6).integers(0, QUANTIZED.vocab_size, 20)
    want = reference.forward(model.params, QUANTIZED, tokens[None], lora=lora_weights)[0]
    decoder = KVCacheDecoder(model, capacity=8)
    assert relative_error(decoder.prefill(tokens[:7]), want[6]) <= 1e-12
    decoder = decoder.grown(20)
    assert relative_error(decoder.resume(tokens[:19]), want[18]) <= 1e-12
    assert relative_error(decoder.step(int(tokens[19])), want[19]) <= 1e-12


# ---- grown ------------------------------------------------------------------------------------------
def test_grown_at_least_doubles_up_to_the_context():
    model = random_model(CFG, 7)
    decoder = KVCacheDecoder(model, capacity=5)
    tokens = np.random.default_rng(7).integers(0, CFG.vocab_size, 40)
    decoder.prefill(tokens[:5])
    assert decoder.grown(5) is decoder and decoder.grown(3) is decoder
    bigger = decoder.grown(6)
    assert bigger.capacity == 10 and bigger.length == 5 and bigger.tokens == decoder.tokens
    np.testing.assert_array_equal(bigger.k_cache_t[..., :5], decoder.k_cache_t)
    np.testing.assert_array_equal(bigger.v_cache[:, :, :5], decoder.v_cache)
    assert bigger.grown(23).capacity == 23                          # more than twice: what is asked
    assert bigger.grown(23).grown(24).capacity == CFG.max_seq_len   # twice 23, at most max_seq_len
    copies, decoder = 0, KVCacheDecoder(model, capacity=2)          # a chat: every turn 2 tokens longer
    decoder.prefill(tokens[:2])
    for n in range(4, 41, 2):
        bigger = decoder.grown(n)
        copies += bigger is not decoder
        decoder = bigger
        decoder.resume(tokens[:n])
    assert copies == 5                                              # 2 -> 4 -> 8 -> 16 -> 32 -> 40
    assert relative_error(decoder.logits, reference.forward(model.params, CFG, tokens[None])[0, -1]) <= 1e-12


# ---- stream with a kept cache -----------------------------------------------------------------------
def test_stream_with_a_kept_cache_gives_the_same_tokens():
    model = npllama.Llama(CFG, seed=4).eval()
    cache = {}
    first = generate(model, [1, 2, 3], 5, cache=cache, stop_ids=[])
    assert cache["decoder"].tokens[:3] == [1, 2, 3]
    second_prompt = [1, 2, 3, *first.tolist(), 7, 8]
    kept = generate(model, second_prompt, 6, cache=cache, stop_ids=[])
    np.testing.assert_array_equal(kept, generate(model, second_prompt, 6, stop_ids=[]))


def test_a_kept_cache_has_room_for_the_next_turn():
    """A decoder kept for later calls is made with twice the positions the first call needs (at most
    max_seq_len), so a next turn as long again runs in it: no copy."""
    model = random_model(CFG, 9)
    cache = {}
    first = generate(model, [1, 2, 3], 5, cache=cache, stop_ids=[])
    decoder = cache["decoder"]
    assert decoder.capacity == 2 * (3 + 5 - 1)
    generate(model, [1, 2, 3, *first.tolist(), 4], 5, cache=cache, stop_ids=[])   # 9 + 5 - 1 <= 14
    assert cache["decoder"] is decoder and decoder.length == 13
    generate(model, list(range(30)), 5, cache=cache, stop_ids=[])   # more than twice 14: 34
    assert cache["decoder"].capacity == 34
    generate(model, list(range(35)), 5, cache=cache, stop_ids=[])   # twice 34, at most 40
    assert cache["decoder"].capacity == CFG.max_seq_len
    generate(model, [1, 2], 1, cache=(fresh := {}), stop_ids=[])
    assert fresh["decoder"].capacity == 4


def test_a_kept_cache_slides_past_the_context():
    """slide=True: a kept turn that runs past max_seq_len slides as a call without the cache does,
    and the turn after it gives the tokens of a call without the cache too."""
    model = random_model(CFG, 8, np.float64)
    cache, stats = {}, {}
    first = generate(model, [1, 2, 3], 10, cache=cache, stop_ids=[])
    prompt = [1, 2, 3, *first.tolist(), 9, 10, 11, 12]                  # 17 tokens, 30 more: past 40
    kept = generate(model, prompt, 30, cache=cache, stop_ids=[], slide=True, stats=stats)
    assert stats["slides"] >= 1 and cache["decoder"].capacity == CFG.max_seq_len
    np.testing.assert_array_equal(kept, generate(model, prompt, 30, stop_ids=[], slide=True))
    prompt = [*prompt, *kept.tolist()][-20:] + [5, 6]
    again = generate(model, prompt, 5, cache=cache, stop_ids=[], slide=True)
    np.testing.assert_array_equal(again, generate(model, prompt, 5, stop_ids=[], slide=True))
