"""A byte-level BPE tokenizer taken apart for export: tokens by id, merges, special tokens, and the
name llama.cpp knows its word-splitting rule by.

npllama's own tokenizers (``Tokenizer.train``) and those of GPT-2-style checkpoints (SmolLM, Llama-3,
Qwen) are byte-level BPE: every token is a byte string, spelled in the ``tokenizers`` library with
GPT-2's 256 stand-in characters (``Ġ`` for the space byte, ...), and the merges join tokens inside
the words that a pre-tokenizer regex cuts out of the text.  Exporting needs the same description
llama.cpp's ``gpt2`` vocabulary uses: the token strings, the merges, which tokens are special, and
the pre-tokenizer by name (``tokenizer.ggml.pre``; the regex itself is not stored in a GGUF).
Added tokens (``<|endoftext|>``, ``<|im_end|>``) are kept as their text: they are matched whole in
the text, not built from bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import tokenizers

from ..errors import ConfigError
from .gguf_tokenizer import BYTE_ALPHABET, BYTE_SPELLING, PRE_TOKENIZERS

# llama.cpp's names of the splits npllama can export, first match wins: "gpt-2" is GPT-2's regex
# exactly (llama.cpp knows no "gpt2", and its "default" is another regex), "llama-bpe" Llama-3's,
# "qwen2" Qwen2's.
EXPORT_PRE_NAMES = ("gpt-2", "llama-bpe", "qwen2")
# Merges are skipped when a whole word is a token: llama.cpp does so for Llama-3's split only.
IGNORES_MERGES = ("llama-bpe",)
_BYTE_VALUE = {c: b for b, c in BYTE_SPELLING.items()}


@dataclass
class ByteLevelVocabulary:
    tokens: list[str]                 # id -> GPT-2 byte-alphabet spelling (added tokens: their text)
    merges: list[tuple[str, str]]     # in rank order
    special_ids: frozenset[int]       # added tokens marked special (CONTROL in llama.cpp)
    added_ids: frozenset[int]         # all added tokens, special or not
    pre: str                          # llama.cpp's name of the pre-tokenizer

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for."""
        token = self.tokens[token_id]
        if token_id in self.added_ids:
            return token.encode("utf-8")
        return bytes(_BYTE_VALUE[c] for c in token)

    def byte_token_ids(self) -> list[int | None]:
        """The id of the one-byte token of each byte 0..255 (None for a byte without one: a
        pretrained vocabulary may lack bytes its training text never had, such as 0xC0)."""
        ids = {t: i for i, t in enumerate(self.tokens) if i not in self.added_ids}
        return [ids.get(BYTE_SPELLING[b]) for b in range(256)]


def _steps(pre_tokenizer_json) -> list:
    """A pre-tokenizer's JSON as its list of steps (a Sequence of one step is that step)."""
    if pre_tokenizer_json is None:
        return []
    if pre_tokenizer_json.get("type") == "Sequence":
        return list(pre_tokenizer_json.get("pretokenizers") or [])
    return [pre_tokenizer_json]


def _pre_tokenizer_json(steps) -> list:
    probe = tokenizers.Tokenizer(tokenizers.models.BPE())
    probe.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(steps)
    return _steps(json.loads(probe.to_str())["pre_tokenizer"])


def byte_level_vocabulary(tokenizer) -> ByteLevelVocabulary:
    """The vocabulary of ``tokenizer`` (an ``npllama.Tokenizer``) for export.

    Raises:
        ConfigError: not a byte-level BPE tokenizer, or one whose word split llama.cpp does not
            know by name, or with an added token or merge that cannot be written.
    """
    spec = json.loads(tokenizer.hf_tokenizer.to_str())
    model = spec.get("model") or {}
    not_byte_level = ConfigError(
        "only byte-level BPE tokenizers (GPT-2 style, as npllama trains them) can be exported; this one is "
        f"{model.get('type')} with a {(spec.get('pre_tokenizer') or {}).get('type')} pre-tokenizer")
    if (model.get("type") != "BPE" or spec.get("normalizer") is not None or model.get("byte_fallback")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or (spec.get("decoder") or {}).get("type") != "ByteLevel"):
        raise not_byte_level
    steps = _steps(spec.get("pre_tokenizer"))
    pre = next((name for name in EXPORT_PRE_NAMES if _pre_tokenizer_json(PRE_TOKENIZERS[name]) == steps), None)
    if pre is None:
        if not any(s.get("type") == "ByteLevel" for s in steps):
            raise not_byte_level
        raise ConfigError(f"the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} is not one "
                          f"llama.cpp knows by name ({', '.join(EXPORT_PRE_NAMES)}); it cannot be exported")
    if bool(model.get("ignore_merges")) != (pre in IGNORES_MERGES):
        raise ConfigError(f"the tokenizer {'skips' if model.get('ignore_merges') else 'applies'} merges on words "
                          f"that are tokens, which llama.cpp does not with the {pre!r} split; it cannot be exported")

    tokens = [None] * tokenizer.vocab_size
    for token, i in model["vocab"].items():
        tokens[i] = token
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    for i, t in added.items():
        tokens[i] = t["content"]
    if None in tokens:
        raise ConfigError(f"the tokenizer has no token for id {tokens.index(None)}; it cannot be exported")
    for i, token in enumerate(tokens):
        if not set(token) <= BYTE_ALPHABET:
            what = "added token" if i in added else "token"
            raise ConfigError(f"{what} {i} ({token!r}) has characters outside the byte-level alphabet (a space?); "
                              "llama.cpp would read it as other bytes")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    for m in merges:
        if len(m) != 2 or " " in m[0] + m[1]:
            raise ConfigError(f"merge {m!r} cannot be written as llama.cpp's 'left right' text")
    return ByteLevelVocabulary(tokens=tokens, merges=merges,
                               special_ids=frozenset(i for i, t in added.items() if t.get("special")),
                               added_ids=frozenset(added), pre=pre)
