"""Decoding with a key/value cache: prefill, one step per new token, and generate / stream.

    new_ids = generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                       seed=None, stop_ids=None, slide=False)   # 1-D int64 array of the new tokens only
    for token in stream(model, prompt_ids, ...): ...            # the same tokens, one at a time

Prefill.  The prompt goes through the model's own blocks in one pass over a (1, P) batch
(``Llama.last_hidden_state``, the rows path of layers/block.py that training runs), which hands
each layer's rotated keys and its values to the cache as it goes.

A step.  Each new token then costs one step: its own embedding row through each layer, with the
same RMSNorm, RoPE and SwiGLU kernels as training on one row, attention as a single query against
the cache (``layers.kv_cache``), and the projections as matrix-vector products (a Numba kernel,
faster than BLAS's gemv at this shape).  The whole step is one compiled kernel that every thread
runs at once, sharing each product's rows (``layers.decode_step``: one hand-over to the threads a
token instead of ~5 a layer), adding LoRA adapters to its projections as they are (no merged
copy); ``_step_of_kernels`` runs the same kernels a call at a time (for weights the one kernel does
not take: not C-contiguous, or not of the model's dtype).  A token's keys and
values depend only on the tokens before it, so the logits of a step equal those of a full forward
pass over the whole sequence (tests/test_generate.py holds them equal to ~1e-12 in float64).  The
cache, the RoPE tables of every position and the step's work buffers are made once per generation; a step
allocates only small array views.

A chat's next turn (``stream(cache=...)``, ``KVCacheDecoder.resume``).  The cache is kept between
calls: a prompt that starts with the tokens it holds runs only the rest, as one batch through the
same blocks as a prefill, at positions start, start+1, ... (``Llama.last_hidden_state`` with
``kv_cache``: each row's attention is a step's over the cache and the rows before it,
``layers.kv_cache.cached_attention``), so that the turn costs a prefill of its new tokens whatever
came before.  A kept cache starts with room for twice the first call's positions, and a turn that
needs more positions than it has gets a cache of at least twice the size (``grown``; both at most
``max_seq_len``): a conversation of n tokens copies its cache O(log n) times, and the second turn
never (the pages of a cache's unused positions are never touched, so they take no memory).

How to choose each token is npllama/generate/sampling.py.

Stopping.  Generation ends after ``max_new_tokens`` tokens, after a token in ``stop_ids`` (which
is returned as the last token, as Hugging Face does, so the caller sees why it stopped; default:
the ``stop_ids`` of the model's tokenizer, eos and end-of-turn tokens, else none), or at the
context limit: prompt plus new tokens never exceed ``max_seq_len``, so a prompt of exactly
``max_seq_len`` tokens gives no new token, and only a prompt longer than that is an error.

Past the context (``slide=True``, the default of `npllama generate`).  When the cache is full, the
last ``max_seq_len // 2`` tokens of the text so far (``slide_window``) are prefilled again as a
fresh context, at positions 0, 1, ..., and decoding goes on from there; so the logits after a slide
are those of a full forward pass over that window, and the model sees at most ``max_seq_len``
tokens back, as in training.  Half the context is kept so that a prefill (which costs about as much
as the steps it replaces) comes every ``max_seq_len // 2`` tokens, not at every token.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import CheckpointError, InputError
from ..layers.block import projection_columns
from ..layers.decode_step import DecodeStep, runs as decode_step_runs
from ..layers.quantized_linear import embedding_rows
from ..layers.kv_cache import decode_attention_kernel, kv_cache_store_kernel, matvec_for
from ..layers.rmsnorm import rmsnorm_forward_kernel as rmsnorm_row
from ..layers.rope import rope_cos_sin, rope_kernel as rope_row
from ..layers.swiglu import swiglu_forward_kernel as swiglu_row
from .sampling import check_prompt, check_sampling, check_stop_ids, greedy_token, sample_token


class NonFiniteLogits(CheckpointError):
    """The model computed NaN or infinite logits: no distribution to sample, no argmax to trust."""


class KVCacheDecoder:
    """The decoding state of one sequence (batch 1) of a Llama: cache, RoPE tables, work buffers.

    ``prefill(prompt)`` runs the prompt and returns the logits at its last position; each
    ``step(token)`` appends one token and returns the logits at its position; ``resume(prompt)``
    runs only what follows the tokens the cache holds (a chat's next turn).  The returned array
    is a buffer that the next call overwrites.

    capacity: positions the cache can hold (at most ``max_seq_len``).  A generation of n new
    tokens after a prompt of P needs P + n - 1: the last token is returned, never fed back.
    Keys are stored transposed, (n_layers, K, hd, capacity), values as (n_layers, K, capacity, hd),
    in the model's dtype (see layers/kv_cache.py for why).
    """

    def __init__(self, model, capacity: int):
        cfg = model.config
        if not 1 <= capacity <= cfg.max_seq_len:
            raise InputError(f"cache capacity must be in [1, max_seq_len={cfg.max_seq_len}], got {capacity}")
        dt = model.dtype
        L, H, K, hd, D, F = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.hidden_dim
        self.model, self.config, self.capacity = model, cfg, capacity
        self.k_cache_t = np.empty((L, K, hd, capacity), dtype=dt)
        self.v_cache = np.empty((L, K, capacity, hd), dtype=dt)
        self.cos, self.sin = rope_cos_sin(np.arange(capacity), model.rope_freqs, dt)
        self.eps = dt.type(cfg.norm_eps)  # the same rounded eps as in training
        self.one = dt.type(1.0)
        # per layer: weights, its cache, and the matvec kernel of each matrix (all looked up once)
        self.layers = [(w, self.k_cache_t[i], self.v_cache[i], matvec_for(w["wqkv"]), matvec_for(w["wo"]),
                        matvec_for(w["w_gate_up"]), matvec_for(w["w_down"])) for i, w in enumerate(model.layers)]
        self.embed = model.params["model.embed_tokens.weight"]       # (an array or a QuantizedMatrix)
        self.token_ids = np.arange(cfg.vocab_size, dtype=np.int64)  # (a step's id as a 1-element view)
        # LoRA: per layer {target: (A, B)}, added by the step itself into its projections' columns
        self.adapters = [{}] * L if model.lora is None else model.lora_layers
        self.lora_scale = None if model.lora is None else dt.type(model.lora.scale)
        self.columns = projection_columns(cfg)
        self.norm_w = model.params["model.norm.weight"]
        self.lm_head = model.lm_head
        self.lm_head_matvec = matvec_for(self.lm_head)
        # work buffers of a step: one row (1, width) for the row kernels, with 1-D views for matvec
        e = lambda *shape: np.empty(shape, dtype=dt)  # noqa: E731
        self.x = e(1, D)                                     # the residual stream
        self.xn, self.r = e(1, D), e(1)                      # its RMSNorm and 1/rms
        self.delta = e(1, D)                                 # what a branch adds to x
        self.qkv = e(1, (H + 2 * K) * hd)
        self.q = self.qkv[0, :H * hd].reshape(H, hd)         # view: rotated in place
        self.attn = e(H, hd)
        self.gate_up = e(1, 2 * F)
        self.hidden = e(1, F)
        self.scores = e(capacity)
        self.logits = e(cfg.vocab_size)
        self.rows = (self.x[0], self.xn[0], self.delta[0], self.qkv[0], self.attn.reshape(H * hd),
                     self.gate_up[0], self.hidden[0])         # 1-D views of the buffers above
        self.length = 0                                      # positions filled
        self.tokens = []                                     # the tokens at those positions
        # the whole step as one kernel on every thread, LoRA adapters too (layers/decode_step.py)
        self.fused = DecodeStep(model, self.k_cache_t, self.v_cache, self.cos, self.sin, self.eps) \
            if decode_step_runs(model) else None

    def prefill(self, tokens) -> np.ndarray:
        """tokens: int (P,), 1 <= P <= capacity -> logits (V,) at position P-1.

        The model's own blocks over the P positions (``Llama.last_hidden_state``), each layer's
        rotated keys and values stored in the cache as its block finishes; one token is a step."""
        P = len(tokens)
        if not 1 <= P <= self.capacity:
            raise InputError(f"prefill needs 1 to {self.capacity} tokens, got {P}")
        if P == 1:   # the same as a step at position 0 (and no one-row compilation of the batch kernels)
            self.length = 0
            return self.step(int(tokens[0]))
        H = self.config.n_heads

        def store(layer, qkv):           # qkv: (P, (H + 2K) hd), q and k rotated
            kv_cache_store_kernel(qkv, 0, H, self.k_cache_t[layer], self.v_cache[layer])

        hidden = self.model.last_hidden_state(np.asarray(tokens).reshape(1, P), after_block=store)
        self.lm_head_matvec(self.lm_head, hidden[0, -1], self.logits)   # only the last position's logits
        self.length = P
        self.tokens = [int(t) for t in tokens]
        return self.logits

    def resume(self, tokens) -> np.ndarray:
        """Like ``prefill(tokens)``, but the positions whose tokens the cache already holds (the
        longest common start of ``tokens`` and ``self.tokens``) are kept and only the rest is run:
        a chat's next turn costs its own new tokens, not the whole conversation.  The new tokens
        run as one batch through the model's own blocks at their positions (``Llama.last_hidden_state``
        with ``kv_cache``): one matrix product per projection for all of them, each row's attention
        over the cache and the rows before it, their keys and values stored into the cache; one new
        token is a step."""
        P = len(tokens)
        if not 1 <= P <= self.capacity:
            raise InputError(f"prefill needs 1 to {self.capacity} tokens, got {P}")
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != int(b):
                break
            common += 1
        common = min(common, P - 1)          # (at least one new token: its logits are the answer)
        if common == 0:
            return self.prefill(tokens)
        self.length = common
        del self.tokens[common:]
        new = np.asarray(tokens[common:], dtype=np.int64)
        if new.size == 1:
            return self.step(int(new[0]))
        hidden = self.model.last_hidden_state(new.reshape(1, -1), kv_cache=(self.k_cache_t, self.v_cache, common))
        self.lm_head_matvec(self.lm_head, hidden[0, -1], self.logits)   # only the last position's logits
        self.length = P
        self.tokens += [int(t) for t in new]
        return self.logits

    def grown(self, capacity: int) -> "KVCacheDecoder":
        """A decoder that can hold ``capacity`` positions and holds this one's cache and tokens:
        this one when it can, else a new one of at least twice this capacity (at most max_seq_len),
        so that a chat whose every turn is longer copies its cache O(log n) times, not every turn."""
        if capacity <= self.capacity:
            return self
        capacity = min(max(capacity, 2 * self.capacity), self.config.max_seq_len)
        bigger = KVCacheDecoder(self.model, capacity)
        n = self.length
        bigger.k_cache_t[..., :n] = self.k_cache_t[..., :n]
        bigger.v_cache[:, :, :n] = self.v_cache[:, :, :n]
        bigger.length, bigger.tokens = n, list(self.tokens)
        return bigger

    def _add_adapters(self, adapters, targets, x_row, y_row):
        """y += s B (A x) in each LoRA target's columns of the projection's output (layers/lora.py,
        without dropout): the adapters as they are, no merged copy of the weights."""
        for target in targets:
            if target in adapters:
                a, b = adapters[target]
                y = y_row[self.columns[target]]
                y += self.lora_scale * (b @ (a @ x_row))

    def step(self, token: int) -> np.ndarray:
        """Append one token (at position ``length``) -> logits (V,) at that position."""
        pos = self.length
        if pos >= self.capacity:
            raise InputError(f"the cache is full ({self.capacity} positions)")
        embedding_rows(self.embed, self.token_ids[token:token + 1], self.x)
        if self.fused is not None:
            self.fused.step(self.x[0], pos, self.logits)
        else:
            self._step_of_kernels(pos)
        self.length = pos + 1
        del self.tokens[pos:]
        self.tokens.append(int(token))
        return self.logits

    def _step_of_kernels(self, pos):
        """The step on the embedding in ``self.x``, a kernel call at a time (each product on the
        threads by itself): what ``DecodeStep`` runs as one kernel."""
        H, K, hd = self.config.n_heads, self.config.n_kv_heads, self.config.head_dim
        x, xn, r, delta, qkv, gate_up, hidden = self.x, self.xn, self.r, self.delta, self.qkv, self.gate_up, self.hidden
        x_row, xn_row, delta_row, qkv_row, attn_row, gate_up_row, hidden_row = self.rows
        eps, one, cos, sin = self.eps, self.one, self.cos, self.sin
        for (w, k_cache_t, v_cache, matvec_qkv, matvec_o, matvec_gate_up, matvec_down), adapters in zip(
                self.layers, self.adapters):
            # h = x + W_o attention(rope(q), rope(k), v) over the cache,  n1 = RMSNorm(x)
            rmsnorm_row(x, w["attn_norm"], eps, xn, r)
            matvec_qkv(w["wqkv"], xn_row, qkv_row)
            if adapters:
                self._add_adapters(adapters, ("q_proj", "k_proj", "v_proj"), xn_row, qkv_row)
            rope_row(qkv, H + K, hd, cos, sin, one, pos, 1)
            kv_cache_store_kernel(qkv, pos, H, k_cache_t, v_cache)
            decode_attention_kernel(self.q, k_cache_t, v_cache, pos + 1, self.scores, self.attn)
            matvec_o(w["wo"], attn_row, delta_row)
            if adapters:
                self._add_adapters(adapters, ("o_proj",), attn_row, delta_row)
            # out = h + W_down swiglu(W_gate_up n2),  n2 = RMSNorm(h), h written over x
            rmsnorm_row(x, w["ffn_norm"], eps, xn, r, delta, x)   # h = x + delta over x
            matvec_gate_up(w["w_gate_up"], xn_row, gate_up_row)
            if adapters:
                self._add_adapters(adapters, ("gate_proj", "up_proj"), xn_row, gate_up_row)
            swiglu_row(gate_up, hidden)
            matvec_down(w["w_down"], hidden_row, delta_row)
            if adapters:
                self._add_adapters(adapters, ("down_proj",), hidden_row, delta_row)
            np.add(x, delta, out=x)
        rmsnorm_row(x, self.norm_w, eps, xn, r)
        self.lm_head_matvec(self.lm_head, xn_row, self.logits)


# ---- generate / stream ------------------------------------------------------------------------------
def stream(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
           stop_ids=None, stats=None, slide=False, healing=None, cache=None):
    """Yield the new token ids (Python ints) one at a time; see the module docstring.

    The arguments are checked here, before the first token is asked for.  ``slide``: at the context
    limit go on over a sliding window instead of stopping.  ``stats``, when a dict, receives
    timings: prompt_tokens, prefill_s (prefill and choosing the first token), prefill_cpu_s (the
    process's CPU time over it), decode_steps, decode_s
    (time inside the steps and the slides' prefills and choosing their tokens, not the consumer's),
    decode_cpu_s (the process's CPU time over the same spans: on a shared machine, the work),
    new_tokens, slides (how many times the window slid) and stop ("stop_id", "max_new_tokens" or
    "context").  ``healing``: a ``healing.TokenHealing`` of the prompt (whose healed tokens are
    already cut off ``prompt_ids``), which constrains the first tokens to spell them again.  A model
    with LoRA adapters decodes with them as they are: the prompt through the model's own blocks, each
    step adding s B (A x) to its projections (no merged copy).  ``cache``: a dict the caller keeps
    between calls (a chat): the key/value cache is kept in it, and a prompt that starts with the
    tokens it holds runs only the rest (``KVCacheDecoder.resume``); the weights must not change
    between such calls."""
    prompt = check_prompt(model, prompt_ids)
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    stops = check_stop_ids(model, stop_ids)
    if not isinstance(slide, bool):
        raise InputError(f"slide must be True or False, got {slide!r}")
    temperature = float(temperature)
    top_p = None if top_p is None else float(top_p)
    top_k = None if top_k is None else int(top_k)
    return _token_stream(model, prompt, int(max_new_tokens), temperature, top_k, top_p, seed, stops, stats, slide,
                         healing, cache)


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
             stop_ids=None, stats=None, slide=False, healing=None, cache=None) -> np.ndarray:
    """The new tokens only, as a 1-D int64 array (the tokens ``stream`` yields)."""
    tokens = stream(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop_ids=stop_ids, stats=stats, slide=slide, healing=healing, cache=cache)
    return np.fromiter(tokens, dtype=np.int64)


def slide_window(max_seq_len: int) -> int:
    """Tokens a full cache is cut back to (the end of the text so far): half the context."""
    return max(1, max_seq_len // 2)


def _token_stream(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stops, stats, slide, healing,
                  cache=None):
    stats = {} if stats is None else stats
    P, context = prompt.size, model.config.max_seq_len
    n_new = max_new_tokens if slide else min(max_new_tokens, context - P)
    stats.update(prompt_tokens=P, prefill_s=0.0, prefill_cpu_s=0.0, decode_steps=0, decode_s=0.0, decode_cpu_s=0.0, new_tokens=0, slides=0,
                 stop="context" if n_new < max_new_tokens else "max_new_tokens")
    if n_new == 0:
        return
    if temperature == 0.0:
        choose_from = greedy_token
    else:
        rng = np.random.default_rng(seed)

        def choose_from(logits):
            return sample_token(logits, temperature, top_k, top_p, rng)

    def choose(logits):
        if not np.isfinite(logits).all():   # (no distribution to sample from, no argmax to trust)
            raise NonFiniteLogits(f"the model's logits are NaN or infinite after {P + stats['new_tokens']} tokens: "
                                  "its weights (or an adapter's scale) are corrupt; generation stopped")
        if healing is None or not healing.active:
            return choose_from(logits)
        token = choose_from(healing.mask(logits))
        healing.advance(token)
        return token

    t0, c0 = time.perf_counter(), time.process_time()
    capacity = min(P + n_new - 1, context)
    kept = None if cache is None or cache.get("model") is not model else cache.get("decoder")
    if kept is None:            # (a decoder kept for a chat's next turns starts with room for as much again)
        decoder = KVCacheDecoder(model, capacity=capacity if cache is None else min(2 * capacity, context))
        token = choose(decoder.prefill(prompt))
    else:                       # (a chat's next turn: the cache holds the conversation so far)
        decoder = kept.grown(capacity)
        token = choose(decoder.resume(prompt))
    if cache is not None:
        cache.update(model=model, decoder=decoder)
    stats["prefill_s"], stats["prefill_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    text = list(prompt) if slide else None      # what a slide keeps the end of
    for i in range(n_new):
        if i > 0:
            t0, c0 = time.perf_counter(), time.process_time()
            if decoder.length < decoder.capacity:
                logits = decoder.step(token)
            else:   # the cache is full (only with slide): go on over the end of the text
                logits = decoder.prefill(text[-slide_window(context):])
                stats["slides"] += 1
            token = choose(logits)
            stats["decode_s"] += time.perf_counter() - t0
            stats["decode_cpu_s"] += time.process_time() - c0
            stats["decode_steps"] += 1
        stats["new_tokens"] = i + 1
        if text is not None:
            text.append(token)
        if token in stops:
            stats["stop"] = "stop_id"   # before the yield: the consumer may stop reading at this token
            yield token
            return
        yield token
