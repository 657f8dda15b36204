"""Text generation with a key/value cache.

    new_ids = generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                       seed=None, stop_ids=None, slide=False)   # 1-D int64 array of the new tokens only
    for token in stream(model, prompt_ids, ...): ...            # the same tokens, one at a time

(slide=True: past the context, go on over a sliding window; see decoding.py)

decoding.py: the cache, prefill through the model's own blocks, one step per token, generate and
stream;  sampling.py: greedy, temperature, top-k and top-p, and the checks of the arguments;
cli.py: the `npllama generate` command (imported on its own: it needs npllama.model, which imports
this package).
"""
from .decoding import KVCacheDecoder, generate, stream
from .sampling import sample_token, sampling_distribution, top_k_ids, top_p_ids

__all__ = ["KVCacheDecoder", "generate", "stream", "sample_token", "sampling_distribution", "top_k_ids",
           "top_p_ids"]
