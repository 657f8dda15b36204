"""The key/value cache kept between calls (a chat's turns): ``KVCacheDecoder.resume`` runs only the
tokens after those the cache already holds, and gives the logits a fresh prefill of the whole prompt
gives (float64, 1e-12); a grown cache keeps its positions; ``stream(cache=...)`` keeps the decoder
between calls and the tokens are those of calls without it."""
import numpy as np

import npllama
from npllama.config import LlamaConfig
from npllama.generate.decoding import KVCacheDecoder, generate
from npllama.gradcheck import relative_error

CFG = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=40)


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


def test_stream_with_a_kept_cache_gives_the_same_tokens():
    model = npllama.Llama(CFG, seed=4).eval()
    cache = {}
    first = generate(model, [1, 2, 3], 5, cache=cache, stop_ids=[])
    assert cache["decoder"].tokens[:3] == [1, 2, 3]
    second_prompt = [1, 2, 3, *first.tolist(), 7, 8]
    kept = generate(model, second_prompt, 6, cache=cache, stop_ids=[])
    np.testing.assert_array_equal(kept, generate(model, second_prompt, 6, stop_ids=[]))
