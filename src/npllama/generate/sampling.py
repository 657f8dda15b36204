"""Choosing the next token from the logits, and the checks of generation's arguments.

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
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from ..files import read_json

# top-p looks for its prefix among the m most likely ids, m = 64, 512, 4096, ... (np.partition,
# O(V)) and sorts only those; a full sort of a 32000-word distribution per token would cost more
# than a decoding step of a small model.
TOP_P_FIRST_CANDIDATES = 64


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


def greedy_token(logits) -> int:
    """argmax of the logits (the lowest id on a tie)."""
    return int(np.argmax(logits))


# ---- argument checks ----------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_prompt(model, prompt_ids) -> np.ndarray:
    """prompt_ids -> contiguous int64 (P,), or InputError."""
    config = model.config
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
    bad = (arr < 0) | (arr >= config.vocab_size)
    if bad.any():
        raise InputError(f"prompt_ids has id {int(arr[bad][0])} outside [0, {config.vocab_size})")
    if arr.size > config.max_seq_len:
        raise InputError(f"the prompt has {arr.size} tokens, more than the model's context "
                         f"max_seq_len={config.max_seq_len}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_sampling(max_new_tokens, temperature, top_k, top_p, seed, flags: bool = False):
    """Raise InputError naming the first bad argument: as the Python keyword (``top_p ... or None``)
    or, with ``flags``, as the command-line option the user typed (``--top-p``)."""
    def name(keyword):
        return "--" + keyword.replace("_", "-") if flags else keyword

    unset = "" if flags else " or None"
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"{name('max_new_tokens')} must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise InputError(f"{name('top_k')} must be an integer >= 1{unset}, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise InputError(f"{name('top_p')} must be a number in (0, 1]{unset}, got {top_p!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise InputError(f"{name('seed')} must be an integer >= 0{unset}, got {seed!r}")


def check_stop_ids(model, stop_ids) -> frozenset:
    """None -> the tokenizer's ``stop_ids`` (eos and the end-of-turn tokens such as ``<|im_end|>``),
    none without a tokenizer; else an int or a sequence of ints."""
    V = model.config.vocab_size
    if stop_ids is None:
        stop_ids = getattr(getattr(model, "tokenizer", None), "stop_ids", ())
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


# ---- the settings a chat starts from ---------------------------------------------------------------
# An instruct model's own settings when its files carry them; else greedy.  Sampling is not a safe
# default for the small models npllama runs: SmolLM2-135M-Instruct (Q4_1) gives "The" 15 % and
# French starts ("L", "La", "Le") 30 % as the first token of its answer to "What is the capital of
# France?", so at temperature 0.2 (p ** 5, renormalised) 45 % of its answers start in French.
GREEDY = {"temperature": 0.0, "top_k": None, "top_p": None}


def chat_sampling(path) -> tuple[dict, str]:
    """(temperature, top_k, top_p; where they come from) for a chat with the model at ``path``:

    * a directory's ``generation_config.json``, read as Hugging Face's ``generate`` reads it:
      ``do_sample`` false or absent means greedy; true means sampling at its ``temperature``
      (default 1.0), ``top_k`` (default 50; 0 = off) and ``top_p`` (default 1.0 = off);
    * a ``.gguf`` file's ``general.sampling.temp`` / ``.top_k`` / ``.top_p`` (llama.cpp's defaults
      for the model), where present;
    * else greedy (see GREEDY above).
    """
    path = Path(path)
    config_file = path / "generation_config.json"
    if path.is_dir() and config_file.is_file():
        config = read_json(config_file, "generation config")
        if not isinstance(config, dict) or not config.get("do_sample"):
            return dict(GREEDY), f"{config_file}: do_sample is not set"
        temperature, top_k, top_p = config.get("temperature", 1.0), config.get("top_k", 50), config.get("top_p", 1.0)
        settings = {"temperature": temperature, "top_k": top_k or None, "top_p": None if top_p == 1.0 else top_p}
        try:
            check_sampling(0, settings["temperature"], settings["top_k"], settings["top_p"], None)
        except InputError as e:
            raise CheckpointError(f"{config_file}: {e}") from None
        return settings, str(config_file)
    from ..formats.gguf import is_gguf, open_gguf   # (here: only a chat with a GGUF needs the gguf package)
    if is_gguf(path):
        ckpt = open_gguf(path)
        temperature, top_k, top_p = (ckpt.value(f"general.sampling.{key}") for key in ("temp", "top_k", "top_p"))
        if (temperature, top_k, top_p) != (None, None, None):
            return {"temperature": 0.8 if temperature is None else temperature, "top_k": top_k or None,
                    "top_p": None if top_p in (None, 1.0) else top_p}, f"{path.name}'s general.sampling.* metadata"
    return dict(GREEDY), "npllama's chat default: the model brings no sampling settings"


def describe_sampling(temperature, top_k, top_p) -> str:
    """"greedy" or "temperature T, top-k K, top-p P" (the ones in use)."""
    if temperature == 0:
        return "greedy"
    parts = [f"temperature {temperature:g}"]
    if top_k is not None:
        parts.append(f"top-k {top_k}")
    if top_p is not None and top_p < 1:
        parts.append(f"top-p {top_p:g}")
    return ", ".join(parts)
