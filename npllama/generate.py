"""Text generation: key/value-cache decoding, greedy and sampled, and the `npllama generate` command.

    new_ids = generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                       seed=None, stop_ids=None)        # 1-D int64 array of the new tokens only
    for token in stream(model, prompt_ids, ...): ...    # the same tokens, one at a time

Decoding.  The prompt goes through the layers in one forward pass (prefill), using the same layer
functions as training, and each layer's rotated keys and its values are stored in a cache.  Every
new token then costs one step: its own embedding row through each layer, where attention is a
single query against the cache (``layers.kv_cache``), and the projections are matrix-vector products
(a Numba kernel there, faster than BLAS's gemv at this shape).  A token's keys and values depend only on
the tokens before it, so the logits of a step equal those of a full forward pass over the whole
sequence (tests/test_generate.py holds them equal to ~1e-12 in float64).  A step allocates nothing:
the cache, the RoPE cos/sin tables of every position and all work buffers are made once per
generation.

Choosing a token from the logits z (V,) at the last position:

* temperature T = 0: greedy, argmax z (on a tie the lowest id, as numpy.argmax and torch.argmax);
  top_k / top_p are then ignored.
* T > 0: p = softmax(z / T) in float64, then
    top-k: keep the k largest p.  On a tie at the boundary (the k-th largest value shared by
           several ids) the lowest ids are kept, so exactly min(k, V) ids remain;
    renormalise;
    top-p: sort the kept ids by decreasing probability (ties: lowest id first) and keep the
           shortest prefix whose cumulative probability reaches top_p (at least one id; all of
           them when rounding keeps the sum just under top_p);
    renormalise, and draw one id by inverting the cumulative distribution at u ~ U[0, 1) from
    ``numpy.random.default_rng(seed)``.  The same seed gives the same tokens.
  This is the order of Hugging Face's warpers (temperature, top-k, top-p), and as there top-p
  works on the distribution renormalised after top-k.

Stopping.  Generation ends after ``max_new_tokens`` tokens, after a token in ``stop_ids`` (which
is returned as the last token, as Hugging Face does, so the caller sees why it stopped; default:
the tokenizer's end-of-text id when the model has a tokenizer with one, else none), or at the
context limit: prompt plus new tokens never exceed ``max_seq_len``, so a prompt of exactly
``max_seq_len`` tokens gives no new token, and only a prompt longer than that is an error.
"""
from __future__ import annotations

import math
import numbers
import sys
import time
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError, InputError
from .layers.attention import attention_forward
from .layers.block import merge_heads, split_heads
from .layers.embedding import embedding_forward
from .layers.kv_cache import add_rmsnorm_kernel, decode_attention_step_kernel, matvec_for, swiglu_row_kernel
from .layers.linear import linear_forward
from .layers.rmsnorm import rmsnorm_forward
from .layers.rope import rope_cos_sin, rope_forward
from .layers.swiglu import feedforward_forward

# top-p looks for its prefix among the m most likely ids, m = 64, 512, 4096, ... (np.partition,
# O(V)) and sorts only those; a full sort of a 32000-word distribution per token would cost more
# than a decoding step of a small model.
TOP_P_FIRST_CANDIDATES = 64


# ================================================================================================
# the cache and one decoding step
# ================================================================================================

class KVCacheDecoder:
    """The decoding state of one sequence (batch 1) of a Llama: cache, RoPE tables, work buffers.

    ``prefill(prompt)`` runs the prompt and returns the logits at its last position; each
    ``step(token)`` appends one token and returns the logits at its position.  The returned array
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
        self.eps = dt.type(cfg.norm_eps)  # the same rounded eps as the training kernel
        # per layer: weights, its cache, and the matvec kernel of each matrix (all looked up once)
        self.layers = [(w, self.k_cache_t[i], self.v_cache[i], matvec_for(w["wqkv"]), matvec_for(w["wo"]),
                        matvec_for(w["w_gate_up"]), matvec_for(w["w_down"])) for i, w in enumerate(model._layers)]
        self.embed = model.params["model.embed_tokens.weight"]
        self.norm_w = model.params["model.norm.weight"]
        self.lm_head = model.lm_head
        self.lm_head_matvec = matvec_for(self.lm_head)
        # work buffers of a step
        self.x = np.zeros(D, dtype=dt)                       # the residual stream
        self.xn = np.empty(D, dtype=dt)                      # its normalised copy
        self.delta = np.empty(D, dtype=dt)                   # what a branch adds to x
        self.qkv = np.empty((H + 2 * K) * hd, dtype=dt)
        self.q = self.qkv[:H * hd].reshape(H, hd)            # view: rotated in place
        self.attn = np.empty((H, hd), dtype=dt)
        self.attn_flat = self.attn.reshape(H * hd)
        self.scores = np.empty(capacity, dtype=dt)
        self.gate_up = np.empty(2 * F, dtype=dt)
        self.hidden = np.empty(F, dtype=dt)
        self.logits = np.empty(cfg.vocab_size, dtype=dt)
        self.length = 0                                      # positions filled

    def prefill(self, tokens) -> np.ndarray:
        """tokens: int (P,), 1 <= P <= capacity -> logits (V,) at position P-1.

        One forward pass of the layer functions over the P positions (as decoder_block_forward,
        without dropout), storing each layer's rotated keys and values in the cache."""
        cfg = self.config
        P = len(tokens)
        if not 1 <= P <= self.capacity:
            raise InputError(f"prefill needs 1 to {self.capacity} tokens, got {P}")
        H, K, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
        cos, sin = self.cos[:P], self.sin[:P]
        x, _ = embedding_forward(np.asarray(tokens, dtype=np.int64).reshape(1, P), self.embed)
        for layer, (w, *_) in enumerate(self.layers):
            n1, _ = rmsnorm_forward(x, w["attn_norm"], cfg.norm_eps)
            qkv, _ = linear_forward(n1, w["wqkv"])
            q, k, v = split_heads(qkv, H, K, hd)
            q, _ = rope_forward(q, cos, sin)
            k, _ = rope_forward(k, cos, sin)
            o, _ = attention_forward(q, k, v)
            self.k_cache_t[layer, :, :, :P] = k[0].transpose(0, 2, 1)
            self.v_cache[layer, :, :P] = v[0]
            a, _ = linear_forward(merge_heads(o), w["wo"])
            h = x + a
            n2, _ = rmsnorm_forward(h, w["ffn_norm"], cfg.norm_eps)
            f, _ = feedforward_forward(n2.reshape(P, D), w["w_gate_up"], w["w_down"])
            x = h + f.reshape(1, P, D)
        # only the last position's logits are wanted
        xn, _ = rmsnorm_forward(x[0, -1:], self.norm_w, cfg.norm_eps)
        np.matmul(self.lm_head, xn[0], out=self.logits)
        self.length = P
        return self.logits

    def step(self, token: int) -> np.ndarray:
        """Append one token (at position ``length``) -> logits (V,) at that position."""
        pos = self.length
        if pos >= self.capacity:
            raise InputError(f"the cache is full ({self.capacity} positions)")
        x, xn, delta, qkv, attn, hidden, gate_up = (self.x, self.xn, self.delta, self.qkv, self.attn,
                                                    self.hidden, self.gate_up)
        eps, cos, sin, scores = self.eps, self.cos, self.sin, self.scores
        x.fill(0.0)
        residual = self.embed[token]      # x = 0 + embedding row, exactly
        for w, k_cache_t, v_cache, matvec_qkv, matvec_o, matvec_gate_up, matvec_down in self.layers:
            add_rmsnorm_kernel(x, residual, w["attn_norm"], eps, xn)
            matvec_qkv(w["wqkv"], xn, qkv)
            decode_attention_step_kernel(qkv, self.q, cos, sin, pos, k_cache_t, v_cache, scores, attn)
            matvec_o(w["wo"], self.attn_flat, delta)
            add_rmsnorm_kernel(x, delta, w["ffn_norm"], eps, xn)
            matvec_gate_up(w["w_gate_up"], xn, gate_up)
            swiglu_row_kernel(gate_up, hidden)
            matvec_down(w["w_down"], hidden, delta)
            residual = delta
        add_rmsnorm_kernel(x, residual, self.norm_w, eps, xn)
        self.lm_head_matvec(self.lm_head, xn, self.logits)
        self.length = pos + 1
        return self.logits


# ================================================================================================
# choosing a token
# ================================================================================================

def softmax_probabilities(logits, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) in float64, temperature > 0."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max()
    p = np.exp(z, out=z)
    p /= p.sum()
    return p


def top_k_ids(p, k: int) -> np.ndarray:
    """Ids (ascending) of the k largest entries of p; at a tie on the k-th value the lowest ids."""
    n = p.size
    if k >= n:
        return np.arange(n)
    threshold = np.partition(p, n - k)[n - k]          # the k-th largest value
    above = np.flatnonzero(p > threshold)
    at = np.flatnonzero(p == threshold)[:k - above.size]
    return np.sort(np.concatenate([above, at]))


def top_p_ids(p, top_p: float) -> np.ndarray:
    """The shortest prefix, in decreasing probability (ties: lowest index first), of the indices of
    p (a distribution) whose cumulative probability reaches top_p; at least one index.

    Only the m most likely entries are sorted, m growing until they hold mass >= top_p.  They are
    all entries >= the m-th largest value, which is exactly a prefix of the full order, and the
    cumulative sum over them is computed in the same order as over the full sort, so the answer is
    that of sorting everything."""
    n = p.size
    m = TOP_P_FIRST_CANDIDATES
    while True:
        if m >= n:
            candidates = np.arange(n)
        else:
            candidates = np.flatnonzero(p >= np.partition(p, n - m)[n - m])
        order = candidates[np.argsort(-p[candidates], kind="stable")]
        cumulative = np.cumsum(p[order])
        if cumulative[-1] >= top_p or candidates.size == n:
            keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1
            return order[:min(keep, order.size)]
        m *= 8


def sampling_distribution(logits, temperature: float, top_k=None, top_p=None):
    """The distribution a token is drawn from when temperature > 0: (ids, probabilities).

    ids: int64 ids of the kept tokens, or None for all V ids in order; probabilities: float64,
    summing to 1, aligned with ids.  See the module docstring for the rules."""
    p = softmax_probabilities(logits, temperature)
    ids = None
    if top_k is not None and top_k < p.size:
        ids = top_k_ids(p, top_k)
        p = p[ids]
        p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = top_p_ids(p, top_p)
        ids = order if ids is None else ids[order]
        p = p[order]
        p /= p.sum()
    return ids, p


def sample_token(logits, temperature: float, top_k, top_p, rng: np.random.Generator) -> int:
    """One id drawn from sampling_distribution with one uniform number from rng."""
    ids, p = sampling_distribution(logits, temperature, top_k, top_p)
    cumulative = np.cumsum(p)
    i = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    i = min(i, p.size - 1)           # u * total rounds up to total: the last id
    return i if ids is None else int(ids[i])


# ================================================================================================
# arguments
# ================================================================================================

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_prompt(model, prompt_ids) -> np.ndarray:
    """prompt_ids -> contiguous int64 (P,), or InputError."""
    cfg = model.config
    try:
        arr = np.asarray(prompt_ids)
    except (ValueError, TypeError) as e:  # ragged lists, objects NumPy cannot convert
        raise InputError(f"prompt_ids must be a 1-D sequence of token ids ({e})") from None
    if arr.ndim != 1:
        hint = " (for a batch of one, pass prompt_ids[0])" if arr.ndim == 2 and arr.shape[0] == 1 else ""
        raise InputError(f"prompt_ids must be a 1-D sequence of token ids, got shape {arr.shape}{hint}")
    if arr.size == 0:
        raise InputError("prompt_ids is empty: generation needs at least one token to start from "
                         "(e.g. the tokenizer's BOS or end-of-text id)")
    if arr.dtype.kind not in "iu":
        raise InputError(f"prompt_ids must be integer token ids, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= cfg.vocab_size)
    if bad.any():
        raise InputError(f"prompt_ids has id {int(arr[bad][0])} outside [0, {cfg.vocab_size})")
    if arr.size > cfg.max_seq_len:
        raise InputError(f"the prompt has {arr.size} tokens, more than the model's context "
                         f"max_seq_len={cfg.max_seq_len}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_sampling(max_new_tokens, temperature, top_k, top_p, seed):
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise InputError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise InputError(f"seed must be an integer >= 0 or None, got {seed!r}")


def check_stop_ids(model, stop_ids) -> frozenset:
    """None -> the tokenizer's end-of-text id (when there is one); an int or a sequence of ints."""
    V = model.config.vocab_size
    if stop_ids is None:
        tokenizer = getattr(model, "tokenizer", None)
        eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        return frozenset() if eos is None or not 0 <= eos < V else frozenset([int(eos)])
    if _is_int(stop_ids):
        stop_ids = [stop_ids]
    try:
        values = list(stop_ids)
    except TypeError:
        raise InputError(f"stop_ids must be None, an id or a sequence of ids, got {stop_ids!r}") from None
    for s in values:
        if not _is_int(s) or not 0 <= s < V:
            raise InputError(f"stop_ids has {s!r}, not a token id in [0, {V})")
    return frozenset(int(s) for s in values)


# ================================================================================================
# generate / stream
# ================================================================================================

def stream(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
           stop_ids=None, stats=None):
    """Yield the new token ids (Python ints) one at a time; see the module docstring.

    The arguments are checked here, before the first token is asked for.  ``stats``, when a dict,
    receives timings: prompt_tokens, prefill_s (prefill and choosing the first token),
    decode_steps, decode_s (time inside the steps and choosing their tokens, not the consumer's),
    new_tokens and stop ("stop_id", "max_new_tokens" or "context")."""
    prompt = check_prompt(model, prompt_ids)
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    stops = check_stop_ids(model, stop_ids)
    temperature = float(temperature)
    top_p = None if top_p is None else float(top_p)
    top_k = None if top_k is None else int(top_k)
    return _token_stream(model, prompt, int(max_new_tokens), temperature, top_k, top_p, seed, stops, stats)


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
             stop_ids=None, stats=None) -> np.ndarray:
    """The new tokens only, as a 1-D int64 array (the tokens ``stream`` yields)."""
    tokens = stream(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop_ids=stop_ids, stats=stats)
    return np.fromiter(tokens, dtype=np.int64)


def _token_stream(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stops, stats):
    stats = {} if stats is None else stats
    P = prompt.size
    room = model.config.max_seq_len - P
    n_new = min(max_new_tokens, room)
    stats.update(prompt_tokens=P, prefill_s=0.0, decode_steps=0, decode_s=0.0, new_tokens=0,
                 stop="context" if room < max_new_tokens else "max_new_tokens")
    if n_new == 0:
        return
    if temperature == 0.0:
        choose = _argmax
    else:
        rng = np.random.default_rng(seed)

        def choose(logits):
            return sample_token(logits, temperature, top_k, top_p, rng)

    t0 = time.perf_counter()
    decoder = KVCacheDecoder(model, capacity=P + n_new - 1)
    token = choose(decoder.prefill(prompt))
    stats["prefill_s"] = time.perf_counter() - t0
    for i in range(n_new):
        if i > 0:
            t0 = time.perf_counter()
            token = choose(decoder.step(token))
            stats["decode_s"] += time.perf_counter() - t0
            stats["decode_steps"] += 1
        stats["new_tokens"] = i + 1
        yield token
        if token in stops:
            stats["stop"] = "stop_id"
            return


def _argmax(logits) -> int:
    return int(np.argmax(logits))


# ================================================================================================
# command line: npllama generate
# ================================================================================================

def add_arguments(parser):
    parser.add_argument("path", metavar="RUN_OR_HF_DIR",
                        help="a run directory of `npllama train`, or a Hugging Face Llama directory "
                             "(config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", default="",
                        help='text to continue ("-" reads it from stdin, dropping one trailing newline); '
                             "default: start from the BOS / end-of-text token")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default 256")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="0 = greedy (then --top-k/--top-p are ignored); default 0.8")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P",
                        help="keep the most likely tokens up to cumulative probability P (1 = off); default 0.95")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="sampling seed (default: a random one, printed at the end)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads for BLAS and Numba (default: their own defaults)")


class IncrementalText:
    """The text of a growing list of token ids, handed out piece by piece as it becomes final.

    Each push decodes the whole list again (a token can be half of a UTF-8 character, and
    decoders such as SentencePiece's treat the first token specially), preceded by a few context
    ids (the end of the prompt) whose own text is cut off, so a leading space is kept.  Text
    ending in U+FFFD (an incomplete UTF-8 sequence) is held back until later tokens complete it
    or the generation ends."""

    def __init__(self, tokenizer, context_ids=()):
        self.tokenizer = tokenizer
        self.context = [int(t) for t in context_ids]
        self.base = tokenizer.decode(self.context) if self.context else ""
        self.ids: list[int] = []
        self.emitted = ""

    def _text(self) -> str:
        text = self.tokenizer.decode(self.context + self.ids)
        if text.startswith(self.base):
            return text[len(self.base):]
        return self.tokenizer.decode(self.ids)

    def _release(self, text: str) -> str:
        if not text.startswith(self.emitted):
            return ""  # the decoder rewrote text already shown: nothing sensible to add
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._release(self._text().rstrip("\ufffd"))

    def flush(self) -> str:
        return self._release(self._text()) if self.ids else ""


def _read_prompt(arg: str) -> str:
    if arg != "-":
        return arg
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


def run(args) -> int:
    import secrets

    from .model import Llama   # at call time: model imports this module (the generate package split ends it)

    path = Path(args.path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (give a run directory or a Hugging Face model directory)")
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json; `npllama generate` needs it to encode the prompt and "
                              "decode the output (a run directory of `npllama train` has one; for a Hugging Face "
                              "model, put its tokenizer.json beside config.json)")
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    text = _read_prompt(args.prompt)
    model = Llama.from_pretrained(path, dtype=np.float64 if args.dtype == "float64" else np.float32)
    model.eval()
    tokenizer = model.tokenizer
    if tokenizer is None:  # from_pretrained found no tokenizer after all
        raise CheckpointError(f"{path}: no tokenizer was loaded from tokenizer.json")
    ids = [int(t) for t in tokenizer.encode(text)]
    # Llama checkpoints are trained with a BOS first; npllama's own tokenizers have none.
    start = tokenizer.bos_id if tokenizer.bos_id is not None else (None if ids else tokenizer.eos_id)
    if start is not None:
        ids = [start] + ids
    if not ids:
        raise InputError("the prompt is empty and the tokenizer has no BOS or end-of-text token to start "
                         "from: give a --prompt")
    seed = args.seed
    if seed is None and args.temperature > 0:
        seed = secrets.randbelow(2 ** 31)
    warm_up(model.dtype)
    stats: dict = {}
    tokens = stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=seed, stats=stats)
    stops = check_stop_ids(model, None)
    out = sys.stdout
    pieces = IncrementalText(tokenizer, context_ids=ids[-4:])
    try:
        out.write(text)
        out.flush()
        for token in tokens:
            if token in stops:
                break     # the end-of-text token itself is not printed
            piece = pieces.push(token)
            if piece:
                out.write(piece)
                out.flush()
        out.write(pieces.flush() + ("\n" if out.isatty() else ""))
        out.flush()
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, and keep Python from complaining at exit
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        return 0
    _report(stats, seed if args.temperature > 0 else None)
    return 0


def warm_up(dtype) -> None:
    """Run every kernel of a generation once on a tiny model of the same dtype, so that Numba's
    one-off start (loading its compiled-code cache, ~1 s) is not counted as prefill time."""
    from .model import Llama   # at call time: model imports this module (the generate package split ends it)
    tiny = Llama(LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8,
                             max_seq_len=4), dtype=dtype)
    generate(tiny, [1, 2], 2)
    generate(tiny, [1], 1, temperature=1.0, top_k=4, top_p=0.9, seed=0)


def _report(stats: dict, seed) -> None:
    def rate(n, s):
        return f"{n / s:,.1f} tok/s" if s > 0 and n > 0 else "-"

    reason = {"stop_id": "end-of-text", "max_new_tokens": "--max-new-tokens", "context": "context limit"}[stats["stop"]]
    line = (f"npllama: prompt {stats['prompt_tokens']} tokens, prefill {stats['prefill_s']:.3f} s "
            f"({rate(stats['prompt_tokens'], stats['prefill_s'])}); {stats['new_tokens']} new tokens, "
            f"decode {rate(stats['decode_steps'], stats['decode_s'])}; stopped at {reason}")
    if seed is not None:
        line += f"; seed {seed}"
    print(line, file=sys.stderr)
