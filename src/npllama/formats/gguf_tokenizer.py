"""The tokenizer of a GGUF file, rebuilt as a Hugging Face ``tokenizers.Tokenizer``.

A GGUF has no ``tokenizer.json``: it stores the vocabulary as metadata under llama.cpp's keys
(``tokenizer.ggml.model``, ``.tokens``, ``.token_type``, ``.merges`` or ``.scores``, ``.pre``,
``.bos_token_id``, ...).  Two kinds of vocabulary cover the Llama family:

* ``gpt2``: byte-level BPE (SmolLM, Llama-3, Qwen...).  Tokens are spelled in GPT-2's 256-character
  byte alphabet and the merges are listed.  Which regex cuts the text into words before the merges
  apply is not in the file, only the name of the recipe (``tokenizer.ggml.pre``): ``PRE_TOKENIZERS``
  maps the names to the splits llama.cpp uses for them.
* ``llama``: SentencePiece BPE (Llama-1/2, Mistral, TinyLlama).  Words start with ``\u2581`` (the
  space), unknown characters fall back to byte tokens ``<0x41>``, and there are no merges, only a
  score per token.  The merges are rebuilt as transformers does: every split of a token into two
  tokens is a merge, ranked by the token's score.

Tokens the file marks CONTROL (``<|im_end|>``, ``</s>``) become special tokens, USER_DEFINED ones
plain added tokens: both are then matched whole in the text, never cut into pieces.  This is what
transformers' GGUF tokenizer does (``integrations/gguf/gguf_tokenizer_mapping.py``), and the tests
hold npllama's ids equal to transformers' on the real SmolLM2 file.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from ..errors import CheckpointError, one_line
from .gguf import GGUFCheckpoint

MAX_MERGE_WORK = 50_000_000   # characters compared building a SentencePiece vocabulary's merges
MERGES_PER_TOKEN = 16
CONTROL, USER_DEFINED = 3, 4   # llama.cpp's token types (1 normal, 2 unknown, 5 unused, 6 byte)

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str) -> list:
    return [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]


_GPT2 = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
# tokenizer.ggml.pre -> the pre-tokenizer steps.  For "smollm" (and starcoder, refact) llama.cpp
# first isolates every \p{N} character, transformers does not; they differ only where the
# vocabulary merges a space onto such a character (SmolLM2 has "Ġ²", " ²").  npllama
# follows transformers, the reference its tests hold it to.
PRE_TOKENIZERS = {
    "default": _GPT2, "gpt2": _GPT2, "gpt-2": _GPT2, "smollm": _GPT2, "starcoder": _GPT2, "refact": _GPT2,
    "llama3": _split_then_bytes(LLAMA3_SPLIT), "llama-bpe": _split_then_bytes(LLAMA3_SPLIT),
    "llama-v3": _split_then_bytes(LLAMA3_SPLIT), "smaug-bpe": _split_then_bytes(LLAMA3_SPLIT),
    "dbrx": _split_then_bytes(LLAMA3_SPLIT), "falcon3": _split_then_bytes(LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(QWEN2_SPLIT), "deepseek-r1-qwen": _split_then_bytes(QWEN2_SPLIT),
}


@dataclass
class GGUFTokenizer:
    """What a GGUF says about its tokenizer: the rebuilt tokenizer and the settings around it."""
    hf_tokenizer: tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    add_bos: bool                 # whether llama.cpp puts BOS before a plain (non-chat) prompt
    chat_template: str | None


def read_gguf_tokenizer(ckpt: GGUFCheckpoint) -> GGUFTokenizer:
    """Rebuild the tokenizer described by ``ckpt``'s metadata.

    Raises:
        CheckpointError: no vocabulary, a tokenizer model other than gpt2/llama, or malformed merges.
    """
    kind = ckpt.value("tokenizer.ggml.model")
    tokens = ckpt.value("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{ckpt.path}: no tokenizer in the file (tokenizer.ggml.tokens missing)")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{ckpt.path}: tokenizer.ggml.tokens must be a list of strings")
    types = ckpt.value("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tokens = [_byte_level_spelling(t) for t in tokens]
    _check_unique(ckpt.path, tokens)
    try:
        if kind == "gpt2":
            hf = _byte_level_bpe(ckpt, tokens)
        elif kind == "llama":
            hf = _sentencepiece_bpe(ckpt, tokens)
        else:
            raise CheckpointError(f"{ckpt.path}: tokenizer model {one_line(kind, 60)!r} is not supported (only "
                                  "'gpt2' and 'llama')")
    except CheckpointError:
        raise
    except Exception as e:   # tokenizers' own complaint (a merge of a token not in the vocabulary, ...)
        raise CheckpointError(f"{ckpt.path}: the tokenizer metadata does not make a tokenizer "
                              f"({one_line(e, 200)})") from None
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                           # a CONTROL token outside the byte alphabet is a llama.cpp mislabel (transformers skips it too)
                           if ty == CONTROL and (kind != "gpt2" or set(t) <= BYTE_ALPHABET)])
    hf.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token(key):
        i = ckpt.value(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    template = ckpt.value("tokenizer.chat_template")
    return GGUFTokenizer(
        hf_tokenizer=hf, bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id"),
        add_bos=bool(ckpt.value("tokenizer.ggml.add_bos_token", kind == "llama")),
        chat_template=template if isinstance(template, str) else None)


def _check_unique(path, tokens: list[str]) -> None:
    """Refuse a vocabulary holding a token twice: two ids for one string, one of which encoding
    would never give."""
    if len(set(tokens)) != len(tokens):
        first = {}
        for i, t in enumerate(tokens):
            if t in first:
                raise CheckpointError(f"{path}: token {one_line(t, 60)!r} is in the vocabulary twice (ids {first[t]} "
                                      f"and {i})")
            first[t] = i


# ---- byte-level BPE -----------------------------------------------------------------------------
def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> stand-in character table: printable bytes stand for themselves, the rest
    are shifted to U+0100 and up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


BYTE_SPELLING = _gpt2_bytes_to_unicode()
BYTE_ALPHABET = frozenset(BYTE_SPELLING.values())


def _byte_level_spelling(token: str) -> str:
    # Some converters store a few tokens as raw text; respell them in the byte alphabet.
    return token if set(token) <= BYTE_ALPHABET else "".join(BYTE_SPELLING[b] for b in token.encode("utf-8"))


def _byte_level_bpe(ckpt: GGUFCheckpoint, tokens: list[str]) -> tokenizers.Tokenizer:
    merges = []
    for i, merge in enumerate(ckpt.value("tokenizer.ggml.merges") or []):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{ckpt.path}: merge {i} ({one_line(merge, 60)!r}) is not two tokens")
        merges.append(tuple(pair))
    hf = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None,
                                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    pre = ckpt.value("tokenizer.ggml.pre", "default")
    steps = PRE_TOKENIZERS.get(pre)
    if steps is None:
        warnings.warn(f"{ckpt.path}: unknown pre-tokenizer {pre!r}; splitting words with GPT-2's regex, which "
                      "may tokenize differently from llama.cpp", UserWarning, stacklevel=3)
        steps = _GPT2
    hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
    hf.decoder = decoders.ByteLevel()
    return hf


# ---- SentencePiece BPE --------------------------------------------------------------------------
def _sentencepiece_bpe(ckpt: GGUFCheckpoint, tokens: list[str]) -> tokenizers.Tokenizer:
    scores = ckpt.value("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(f"{ckpt.path}: a SentencePiece vocabulary needs one score per token (tokenizer.ggml.scores)")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = ckpt.value("tokenizer.ggml.unknown_token_id")
    try:
        merges = sentencepiece_merges(vocab, dict(zip(tokens, scores)))
    except ValueError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    hf = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
        unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None, dropout=None))
    prefix_space = bool(ckpt.value("tokenizer.ggml.add_space_prefix", True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix_space else "never",
                                                split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix_space else []))
    return hf


def sentencepiece_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece vocabulary: every split (left, right) of a token into
    two tokens, ranked by the token's score, highest first.  The order among equal scores is
    transformers' (``generate_merges``), so that both build the same tokenizer.

    Raises ValueError for a vocabulary whose merges would cost out of proportion to its size (every
    split of a token is tried: the work grows as the square of its length): a real one (tokens of
    a few to a few dozen characters, a few merges each) is far inside both bounds."""
    merges, work = [], 0
    for token, score in scores.items():
        work += len(token) ** 2
        if work > MAX_MERGE_WORK:
            raise ValueError(f"the SentencePiece vocabulary's tokens are too long to build its merges from (over "
                             f"{MAX_MERGE_WORK:,} characters compared; corrupt or hostile vocabulary?)")
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
        if len(merges) > MERGES_PER_TOKEN * len(vocab) + 1024:
            raise ValueError(f"the SentencePiece vocabulary of {len(vocab):,} tokens would make more than "
                             f"{MERGES_PER_TOKEN} merges a token (corrupt or hostile vocabulary?)")
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
