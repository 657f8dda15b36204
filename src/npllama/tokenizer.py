"""Byte-level BPE tokenizer: a thin wrapper over Hugging Face ``tokenizers``.

Tokenizers that npllama trains are GPT-2 style byte-level BPE:

* no normalizer, so no character is ever changed;
* ``ByteLevel(add_prefix_space=False)`` pre-tokenizer: the GPT-2 regex splits the text into
  words, and every UTF-8 byte of a word is mapped to one of 256 printable stand-in characters;
* a BPE model whose initial alphabet is those 256 byte characters, so every string is
  encodable (no unknown token) and merges only ever join bytes of the same word;
* ``ByteLevel`` decoder, which maps the stand-in characters back to bytes and the bytes to UTF-8.

Hence ``decode(encode(text)) == text`` for every ``str`` (newlines, runs of spaces, emoji, ...).
Special tokens (by default ``<|endoftext|>``) are matched in the text as whole tokens and decode
back to their literal text, so the round trip holds for text containing them too.

``Tokenizer.from_file`` wraps *any* ``tokenizer.json`` (for example the one of a Hugging Face Llama
checkpoint, which may use a Metaspace or Split pre-tokenizer); the exact round trip is then only
as good as that tokenizer's own.  ``Tokenizer.from_pretrained`` also reads the tokenizer stored in
a ``.gguf`` file (npllama.formats.gguf_tokenizer).

A pretrained tokenizer may carry a chat template (``tokenizer_config.json``'s ``chat_template``,
or the GGUF's ``tokenizer.chat_template``): ``apply_chat_template(messages, add_generation_prompt=True)``
renders a conversation through it (npllama.chat_template) and returns the ids to prompt the model
with; ``stop_ids`` are the tokens that end the model's turn.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .chat_template import ChatTemplateError, TemplateRefusal, render_chat
from .errors import CheckpointError, ConfigError, DataError, InputError, one_line
from .files import MAX_JSON_BYTES, atomic_write_bytes, open_regular_file, parse_json, read_json
from .formats.gguf import find_gguf, is_gguf, open_gguf
from .formats.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, read_gguf_tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)
N_BYTE_TOKENS = 256

# Looked up in this order when no tokenizer_config.json names the token. Llama-3 base uses
# <|end_of_text|>, Llama-2/SentencePiece models </s>, GPT-2 and npllama <|endoftext|>.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
# Tokens that end a chat turn (ChatML, Llama-3, Phi-3, Gemma): generation stops at them, and at eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

# Chunk size for encode_long (characters). Small enough for both cores to get work and to keep
# the per-chunk Encoding objects (which also hold offsets and token strings) small.
ENCODE_CHUNK_CHARS = 1 << 16


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with NumPy in/out, npllama errors and eos/bos lookup.

    Args:
        hf_tokenizer: the wrapped ``tokenizers.Tokenizer``.
        eos_token, bos_token: override the token strings used for ``eos_id``/``bos_id``; by default
            the first of ``EOS_CANDIDATES``/``BOS_CANDIDATES`` present in the vocabulary.
        chat_template: the checkpoint's Jinja chat template, if it has one.
        add_bos: whether the model expects BOS before a plain (non-chat) prompt (SentencePiece
            Llamas do); ``encode`` itself never adds it.
        source: the file it was read from (``from_file``, ``from_gguf``), which errors about it name.
        chat_template_file: the file the chat template was read from (tokenizer_config.json,
            chat_template.jinja, the .gguf), which the template's errors name.
    """

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, eos_token: str | None = None,
                 bos_token: str | None = None, chat_template: str | None = None, add_bos: bool = False,
                 source: str | os.PathLike | None = None, chat_template_file: str | os.PathLike | None = None):
        if not isinstance(hf_tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"Tokenizer wraps a tokenizers.Tokenizer, got {type(hf_tokenizer).__name__}")
        self.hf_tokenizer = hf_tokenizer
        self.eos_id = self._find_token_id(eos_token, EOS_CANDIDATES)
        self.bos_id = self._find_token_id(bos_token, BOS_CANDIDATES)
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.source = None if source is None else str(source)
        self._template_read = (chat_template, None if chat_template_file is None else str(chat_template_file))
        self._fingerprint: str | None = None
        self._regex_parts: dict[str, tuple[str, ...]] = {}
        self._chunking_found: tuple | None = None

    # ----------------------------------------------------------------------------------- build
    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, min_frequency: int = 2) -> "Tokenizer":
        """Train a byte-level BPE tokenizer.

        The vocabulary is: the special tokens (ids 0..S-1), the 256 byte tokens, then one token per
        learned merge, up to ``vocab_size`` in all. Training stops early when no pair of adjacent
        tokens inside a word occurs at least ``min_frequency`` times; then a ``UserWarning`` gives
        the actual size, which ``vocab_size`` reports (the model's embedding can be sized from it).

        Args:
            texts: one string, or an iterable of strings (documents or lines).
            vocab_size: requested vocabulary size, at least 256 + len(special_tokens).
            special_tokens: tokens matched whole in the text and never split or merged.
            min_frequency: a merge is learned only for a pair seen at least this often.
        Raises:
            ConfigError: vocab_size too small, or bad special tokens / min_frequency.
        """
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or not all(
                isinstance(t, str) and t for t in special_tokens):
            raise ConfigError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
        smallest = N_BYTE_TOKENS + len(special_tokens)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < smallest:
            raise ConfigError(
                f"vocab_size must be an integer >= {smallest} (256 byte tokens + {len(special_tokens)} "
                f"special tokens), got {vocab_size!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
            raise ConfigError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")

        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size), min_frequency=min_frequency, special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        if isinstance(texts, str):
            # One long string is a single sequence to the trainer, which then pre-tokenizes on one
            # core. Pieces cut where encode_long cuts parallelise and leave every word (hence the
            # word counts the merges are learned from) exactly as in the whole text.
            texts = split_at_safe_cuts(texts, ENCODE_CHUNK_CHARS, special_tokens)
        hf.train_from_iterator(texts, trainer)
        tokenizer = cls(hf)
        if tokenizer.vocab_size < vocab_size:
            warnings.warn(
                f"BPE training stopped at vocab size {tokenizer.vocab_size} < requested {vocab_size}: "
                f"no more pairs occur at least {min_frequency} times in the training text",
                UserWarning, stacklevel=2)
        return tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a ``tokenizer.json`` (or a directory containing one, e.g. a HF checkpoint).

        When a ``tokenizer_config.json`` lies beside it, its ``eos_token``/``bos_token`` choose
        ``eos_id``/``bos_id``, its ``chat_template`` is the chat template and its
        ``add_bos_token`` sets ``add_bos`` (without it: whether tokenizer.json's post-processor
        puts the BOS first, as Llama-3's does).

        Raises:
            CheckpointError: the file is missing, is not JSON, or is not a valid tokenizer.
        """
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        f, size = open_regular_file(path, "tokenizer.json")
        with f:
            if size > MAX_JSON_BYTES:   # (the limit every JSON file npllama reads has)
                raise CheckpointError(f"{path}: not a valid tokenizer.json ({size:,} bytes, more than the "
                                      f"{MAX_JSON_BYTES:,} allowed)")
            raw = f.read(size)
        try:
            parse_json(raw, str(path), "tokenizer.json")   # (UTF-8, nesting, duplicate keys, huge integers)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({str(e).removeprefix(f'{path}: ')})") from None
        text = raw.decode("utf-8")
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for bad content
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({one_line(e)})") from None
        eos_token, bos_token, chat_template, template_file, add_bos = _read_tokenizer_config(
            path.parent / TOKENIZER_CONFIG_FILE)
        tokenizer = cls(hf, eos_token=eos_token, bos_token=bos_token, chat_template=chat_template, source=path,
                        chat_template_file=template_file)
        if add_bos is None:
            add_bos = tokenizer.bos_id is not None and hf.encode("", add_special_tokens=True).ids[:1] == [tokenizer.bos_id]
        tokenizer.add_bos = add_bos
        return tokenizer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer of a checkpoint: a Hugging Face directory or ``tokenizer.json`` (see
        ``from_file``), a ``.gguf`` file, or a directory holding one ``.gguf`` and no tokenizer.json.

        Raises:
            CheckpointError: no tokenizer there, or one that cannot be read.
        """
        path = Path(path)
        if is_gguf(path) or (path.is_dir() and not (path / TOKENIZER_FILE).exists() and any(path.glob("*.gguf"))):
            return cls.from_gguf(open_gguf(find_gguf(path)))
        return cls.from_file(path)

    @classmethod
    def from_gguf(cls, ckpt) -> "Tokenizer":
        """The tokenizer stored in an open GGUF checkpoint (npllama.formats.gguf.GGUFCheckpoint)."""
        spec = read_gguf_tokenizer(ckpt)
        return cls(spec.hf_tokenizer, eos_token=spec.eos_token, bos_token=spec.bos_token,
                   chat_template=spec.chat_template, add_bos=spec.add_bos, source=ckpt.path,
                   chat_template_file=ckpt.path)

    @classmethod
    def from_str(cls, json_text: str) -> "Tokenizer":
        """Build from the JSON text of a ``tokenizer.json``."""
        try:
            return cls(tokenizers.Tokenizer.from_str(json_text))
        except Exception as e:
            raise CheckpointError(f"not a valid tokenizer.json string ({one_line(e)})") from None

    def to_str(self) -> str:
        """The ``tokenizer.json`` content."""
        return self.hf_tokenizer.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` atomically; ``path`` is the file, or a directory to write it in.

        Returns the path of the file written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        atomic_write_bytes(path, [self.to_str().encode("utf-8")])
        return path

    def save_config(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer_config.json`` (as transformers names them: bos_token, eos_token,
        add_bos_token, chat_template) atomically into ``directory``, what ``from_file`` reads back
        beside tokenizer.json.  Returns the path of the file written."""
        path = Path(directory) / TOKENIZER_CONFIG_FILE
        config = {"add_bos_token": self.add_bos}
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if token_id is not None:
                config[key] = self.id_to_token(token_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_bytes(path, [json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8")])
        return path

    # ------------------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are 0..vocab_size-1)."""
        return self.hf_tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the ``tokenizer.json`` text: equal fingerprints encode identically."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()
        return self._fingerprint

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end the model's turn: eos and the end-of-turn tokens in the vocabulary."""
        ids = {self.eos_id} | {self.hf_tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS}
        return tuple(sorted(i for i in ids if i is not None))

    def token_to_id(self, token: str) -> int | None:
        return self.hf_tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf_tokenizer.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})"

    # ------------------------------------------------------------------------- encode/decode
    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int64 array; no BOS/EOS is added.

        Raises:
            InputError: not a str, text that is not valid Unicode (a lone surrogate: undecodable
                bytes of a command-line argument or of stdin), or one the tokenizer cannot split
                (a regex of its file gave up: see ``_call``), naming the file.
        """
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"the text is not valid UTF-8 (undecodable byte "
                             f"0x{ord(text[e.start]) & 0xFF:02x} at character {e.start})") from None
        encoding = self._call("encode", self.hf_tokenizer.encode, text, add_special_tokens=False)
        return np.asarray(encoding.ids, dtype=np.int64)

    def encode_long(self, text: str, chunk_chars: int = ENCODE_CHUNK_CHARS, progress=None) -> np.ndarray:
        """Same ids as ``encode(text)``, faster and leaner on long texts (a whole corpus).

        The text is cut into chunks of about ``chunk_chars`` where no token can cross the cut, so
        that the chunks' ids concatenate to the ids of the whole, and the chunks are encoded in
        parallel, a few at a time (only their encodings live at once).  Where may be cut depends on
        the tokenizer (``_Chunking``):

        * byte-level BPE with GPT-2's regex (what ``train`` builds, SmolLM2's): where the regex
          starts a word whatever follows (``split_at_safe_cuts``: before the last whitespace
          character of a run that a word character follows), whatever the line endings, on one
          long line too;
        * SentencePiece-style BPE, which sees the text as one word (a Metaspace pre-tokenizer, as
          the GGUF reader and Llama-2's tokenizer.json build, or Llama-2's older Prepend + Replace
          normalizer): between two characters that no token of the vocabulary holds side by side
          (``split_between_pairs``: a word's end and the ``▁`` of the next), each chunk after the
          first encoded without the ``▁`` put before the text's start.

        Any other tokenizer is encoded whole.  ``progress``, if given, is called as
        ``progress(characters_done, characters)`` after each few chunks (once, a text encoded whole).
        """
        if not isinstance(text, str):
            raise InputError(f"encode_long expects a str, got {type(text).__name__}")
        chunking = self._chunking()
        if chunking is None or len(text) <= chunk_chars:
            ids = self.encode(text)
            if progress is not None:
                progress(len(text), len(text))
            return ids
        chunks = chunking.split(text, chunk_chars)
        parts, done = [], 0
        group = 64  # encode a few chunks at a time so only their Encoding objects live at once
        for i in range(0, len(chunks), group):
            parts.extend(self._encode_chunks(chunks[i:i + group], chunking, first=i == 0))
            done += sum(len(c) for c in chunks[i:i + group])
            if progress is not None:
                progress(done, len(text))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _encode_chunks(self, chunks: list[str], chunking: "_Chunking", first: bool) -> list[np.ndarray]:
        """The ids of consecutive chunks of a text (``first``: the text's first chunk among them).
        A chunk after the first goes to ``chunking.continuation`` (no ``▁`` put before it) up to
        its first added token, from there to the tokenizer itself (after an added token a
        tokenizer that prepends ``▁`` to each piece of text does so in the whole text too)."""
        continuation = chunking.continuation or self.hf_tokenizer
        jobs = []   # (tokenizer, text) in the text's order
        for k, chunk in enumerate(chunks):
            if (first and k == 0) or chunking.continuation is None:
                jobs.append((self.hf_tokenizer, chunk))
                continue
            at = min((i for i in (chunk.find(t) for t in chunking.added if t) if i >= 0), default=len(chunk))
            if at > 0:
                jobs.append((continuation, chunk[:at]))
            if at < len(chunk):
                jobs.append((self.hf_tokenizer, chunk[at:]))
        ids = {}
        for hf in {id(hf): hf for hf, _ in jobs}.values():
            # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody reads here:
            # 1.6 -> 0.9 s for the bundled corpus on 2 cores
            encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)
            mine = [i for i, (h, _) in enumerate(jobs) if h is hf]
            encodings = self._call("encode", encode_batch, [jobs[i][1] for i in mine], add_special_tokens=False)
            ids.update((i, np.asarray(e.ids, dtype=np.int64)) for i, e in zip(mine, encodings))
        return [ids[i] for i in range(len(jobs))]

    def decode(self, ids) -> str:
        """Text of a sequence of token ids (special tokens are kept as their text).

        Raises:
            InputError: ids not integers, not 1-D, or outside [0, vocab_size).
        """
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1:
            raise InputError(f"decode expects a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"decode expects integer token ids, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} out of range [0, {self.vocab_size})")
        return self._call("decode", self.hf_tokenizer.decode, arr.tolist(), skip_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> np.ndarray:
        """Token ids of a conversation rendered through the checkpoint's chat template.

        ``messages`` is a list of {"role": "system" | "user" | "assistant", "content": str}; with
        ``add_generation_prompt`` the text ends with the start of the assistant's turn.  As in
        transformers, the template writes any BOS itself and the text is encoded without adding one.

        Raises:
            ConfigError: the tokenizer has no chat template.
            InputError: malformed messages, or a conversation the template refuses (TemplateRefusal).
            ChatTemplateError: a template that is not Jinja, fails or passes its bounds.
            The template's refusals and faults name the file it came from (``chat_template_file``).
        """
        if self.chat_template is None:
            raise ConfigError("this tokenizer has no chat template (the checkpoint did not come with one)")
        special = {name: self.hf_tokenizer.id_to_token(i) for name, i in
                   (("bos_token", self.bos_id), ("eos_token", self.eos_id)) if i is not None}
        try:
            text = render_chat(self.chat_template, messages, add_generation_prompt, **special)
        except (ChatTemplateError, TemplateRefusal) as e:
            where = self.chat_template_file
            if where is None:
                raise
            raise type(e)(f"{where}: {e}") from None
        return self.encode(text)

    @property
    def chat_template_file(self) -> str | None:
        """The file the chat template was read from, while it is still the one read (else None)."""
        template, path = self._template_read
        return path if template is not None and self.chat_template is template else None

    # ---------------------------------------------------------------------------- internals
    def _call(self, work: str, method, *args, **kwargs):
        """``method(*args, **kwargs)``, a method of the wrapped tokenizer doing ``work`` ("encode" or
        "decode"), with one InputError naming
        the tokenizer's file for a Rust panic inside it (tokenizers' ``PanicException``, a
        BaseException).  A tokenizer file's own regex panics when Oniguruma gives up on a text
        (``(a+)+b`` on 30 a's: its backtracking limit), and Rust's panic hook writes its report to
        stderr before the exception reaches Python; the regex cannot be told safe beforehand, so
        while a tokenizer holding one runs, stderr (fd 2) is held in a file and written back after,
        without the panic's report (``_holding_stderr``)."""
        regexes = self._regexes(work)
        try:
            if regexes:
                return _holding_stderr(method, *args, **kwargs)
            return method(*args, **kwargs)
        except BaseException as e:
            if type(e).__name__ != "PanicException":
                raise
            where = f"{self.source}: " if self.source else ""
            regex = " (its regex gave up)" if regexes else ""
            raise InputError(f"{where}the tokenizer cannot {work} this text{regex}: {one_line(e, 200)}") from None

    def _regexes(self, work: str) -> tuple[str, ...]:
        """The regular expressions that ``work`` runs: "encode" the normalizer's and pre-tokenizer's,
        "decode" the decoder's."""
        if work not in self._regex_parts:
            hf, found = self.hf_tokenizer, []
            for part in ((hf.normalizer, hf.pre_tokenizer) if work == "encode" else (hf.decoder,)):
                if part is not None:
                    _collect_regexes(json.loads(part.__getstate__()), found)
            self._regex_parts[work] = tuple(found)
        return self._regex_parts[work]

    def _find_token_id(self, token: str | None, candidates: Sequence[str]) -> int | None:
        if token is not None:
            token_id = self.hf_tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        for candidate in candidates:
            token_id = self.hf_tokenizer.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    def _chunking(self) -> "_Chunking | None":
        """How ``encode_long`` may cut this tokenizer's text, or None: encoded whole."""
        if self._chunking_found is None:
            self._chunking_found = (_Chunking.of(json.loads(self.hf_tokenizer.to_str())),)
        return self._chunking_found[0]


class _Chunking:
    """Where a tokenizer's text may be cut so that the pieces' ids concatenate to the whole's (see
    ``Tokenizer.encode_long``): ``kind`` "words" (byte-level BPE, GPT-2's regex), "letters"
    (byte-level BPE after Llama-3's or Qwen2's Split regex) or "pairs" (SentencePiece-style BPE); ``added`` the added tokens' text (never cut into, never cut before:
    "words"); for "pairs", ``inside`` the pairs of characters some token holds side by side,
    ``spelled`` what the normalizer and pre-tokenizer make of a character (" " -> "▁"),
    ``unknown_fused`` whether two characters outside the vocabulary become one unknown token, and
    ``continuation`` the tokenizer for the pieces after the first (nothing put before them)."""

    def __init__(self, kind, added, inside=frozenset(), spelled=None, vocab=frozenset(), unknown_fused=False,
                 continuation=None):
        self.kind, self.added, self.inside, self.spelled = kind, added, inside, spelled or {}
        self.vocab, self.unknown_fused, self.continuation = vocab, unknown_fused, continuation

    @classmethod
    def of(cls, spec: dict) -> "_Chunking | None":
        """The chunking of the tokenizer whose tokenizer.json is ``spec``, or None."""
        added = spec.get("added_tokens") or []
        contents = tuple(t.get("content", "") for t in added)
        # (a token that holds or strips whitespace, or matches only between words, would reach across a cut)
        if any(c.isspace() for t in contents for c in t) or any(
                t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
            return None
        pre = spec.get("pre_tokenizer")
        one = pre
        # A Sequence of one ByteLevel is the same pre-tokenizer: how the GGUF reader rebuilds
        # GPT-2-style ones (SmolLM2's); encoded whole, its corpus costs ~10x the memory.
        if one and one.get("type") == "Sequence" and len(one.get("pretokenizers") or []) == 1:
            one = one["pretokenizers"][0] or {}
        if (spec.get("normalizer") is None and one and one.get("type") == "ByteLevel"
                and one.get("use_regex", True) and not one.get("add_prefix_space", False)):
            return cls("words", contents)
        if spec.get("normalizer") is None and _split_regex(pre) in (LLAMA3_SPLIT, QWEN2_SPLIT):
            return cls("letters", contents)
        return cls._sentencepiece(spec, contents)

    @classmethod
    def _sentencepiece(cls, spec: dict, contents: tuple[str, ...]) -> "_Chunking | None":
        """BPE over each stretch of text between added tokens as one word (or its pieces starting
        at ``▁``: Metaspace's split), after a normalizer of one-character Replace and Prepend steps
        and a Metaspace pre-tokenizer: a cut between two characters no token holds side by side
        changes no merge.  The continuation tokenizer, for a piece's text up to its first added
        token (the middle of a stretch in the whole text), is the same without what is put before
        a stretch (the Prepend steps, the Metaspace's ``▁``)."""
        model = spec.get("model") or {}
        if (model.get("type") != "BPE" or model.get("dropout") or model.get("ignore_merges")
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
            return None
        continuation = json.loads(json.dumps(spec))
        spelled: dict[str, str] = {}

        def replace(old: str, new: str):
            for k in spelled:
                spelled[k] = spelled[k].replace(old, new)
            spelled.setdefault(old, new)

        normalizer = spec.get("normalizer")
        if normalizer is not None:
            if any(t.get("normalized") for t in spec.get("added_tokens") or []):
                return None   # (matched in normalized text)
            steps = normalizer.get("normalizers") if normalizer.get("type") == "Sequence" else [normalizer]
            kept = []
            for step in steps or []:
                pattern = (step.get("pattern") or {}).get("String") if step.get("type") == "Replace" else None
                if step.get("type") == "Prepend":
                    continue
                if not (isinstance(pattern, str) and len(pattern) == 1 and step.get("content")):
                    return None
                replace(pattern, step["content"])
                kept.append(step)
            continuation["normalizer"] = {"type": "Sequence", "normalizers": kept} if kept else None
        pre = spec.get("pre_tokenizer")
        if pre is not None:
            if pre.get("type") != "Metaspace" or pre.get("prepend_scheme") not in ("first", "always", "never"):
                return None
            replace(" ", pre.get("replacement") or "\u2581")
            continuation["pre_tokenizer"]["prepend_scheme"] = "never"
        if any(not v for v in spelled.values()):
            return None
        tokens = list((model.get("vocab") or {}).keys())
        inside = frozenset(t[i:i + 2] for t in tokens + list(contents) for i in range(len(t) - 1))
        return cls("pairs", contents, inside, spelled, frozenset(t for t in tokens if len(t) == 1),
                   bool(model.get("fuse_unk")), tokenizers.Tokenizer.from_str(json.dumps(continuation)))

    def split(self, text: str, chunk_chars: int) -> list[str]:
        if self.kind == "words":
            return split_at_safe_cuts(text, chunk_chars, self.added)
        if self.kind == "letters":
            return split_at_letters(text, chunk_chars)
        return split_between_pairs(text, chunk_chars, self.can_cut, self.added)

    def can_cut(self, left: str, right: str) -> bool:
        """Whether a cut between the characters ``left`` and ``right`` changes no token."""
        a, b = self.spelled.get(left, left)[-1], self.spelled.get(right, right)[0]
        return a + b not in self.inside and not (self.unknown_fused and a not in self.vocab and b not in self.vocab)


def _split_regex(pre) -> str | None:
    """The regex of a pre-tokenizer that is a Split (isolated) then a ByteLevel without regex."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space", False)):
        return (split.get("pattern") or {}).get("Regex")
    return None


# Llama-3's and Qwen2's regexes end a word at a letter whatever follows, start one at a space before
# letters, and end a run of newlines before a letter: a word starts at these places in any text.
_LETTER_CUT = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])|(?<=\n)(?=[A-Za-z\u4e00-\u9fff])")


def split_at_letters(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` characters where Llama-3's or Qwen2's regex
    starts a word whatever the text around: before a space between two ASCII letters, or after a
    newline before an ASCII letter or a CJK ideograph.  A text without such places stays one piece
    up to the next one.  ``"".join(pieces) == text``."""
    pieces, start, n = [], 0, len(text)
    while n - start > chunk_chars:
        cut = _LETTER_CUT.search(text, start + chunk_chars)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def split_between_pairs(text: str, chunk_chars: int, can_cut, added_tokens=()) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` characters, each cut at the first place
    after that where ``can_cut(left character, right character)``, not just after one of
    ``added_tokens`` (there the whole text starts a new stretch, which a tokenizer may put a ``▁``
    before; a piece of text starting there would be a stretch of its own either way, but the first
    of its text, which a tokenizer may treat apart).  ``"".join(pieces) == text``.

    Raises:
        DataError: more than ``MAX_UNCUT_CHARS`` characters in a row without such a place."""
    pieces, start, n = [], 0, len(text)
    while n - start > chunk_chars:
        cut = start + chunk_chars
        stop = min(n, cut + MAX_UNCUT_CHARS)
        while cut < stop and not (can_cut(text[cut - 1], text[cut])
                                   and not any(text.endswith(t, 0, cut) for t in added_tokens if t)):
            cut += 1
        if cut >= n:
            break
        if cut >= stop:
            raise DataError(f"the text has more than {MAX_UNCUT_CHARS:,} characters from character "
                            f"{start + chunk_chars:,} on without a place this tokenizer's words can be cut "
                            "apart: not text it can encode in bounded memory")
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _collect_regexes(spec, found: list) -> None:
    if isinstance(spec, dict):
        if isinstance(spec.get("Regex"), str):
            found.append(spec["Regex"])
        for value in spec.values():
            _collect_regexes(value, found)
    elif isinstance(spec, list):
        for value in spec:
            _collect_regexes(value, found)


_STDERR_LOCK = threading.Lock()
# Rust's report of a panic: a blank line, its first line, the message, a backtrace if RUST_BACKTRACE asks for one,
# and a last line starting "note: " (how to see more).
_PANIC_REPORT = re.compile(rb"\n?thread '[^'\n]*'[^\n]* panicked at .*?(?:\nnote: [^\n]*\n|\Z)", re.S)


def _holding_stderr(function, *args, **kwargs):
    """``function(*args, **kwargs)`` with file descriptor 2 pointed at a temporary file meanwhile;
    what was written there goes to stderr after, except the report of a Rust panic when the call
    raised one (the caller says in one line what went wrong).  One call at a time."""
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):   # no stderr to hold
            return function(*args, **kwargs)
        panicked = False
        with tempfile.TemporaryFile() as held:
            try:
                os.dup2(held.fileno(), 2)
                return function(*args, **kwargs)
            except BaseException as e:
                panicked = type(e).__name__ == "PanicException"
                raise
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                text = held.read()
                if panicked:
                    text = _PANIC_REPORT.sub(b"", text)
                while text:
                    text = text[os.write(2, text):]


def _is_word_char(c: str) -> bool:
    # Conservative: whitespace in neither Python's nor the Rust regex's (Unicode White_Space) sense.
    return c.isalnum() or "!" <= c <= "~"


MAX_UNCUT_CHARS = 1 << 22   # characters a piece may have when nowhere in it can be cut
# Where a cut may fall: before a space, tab, newline or CR that a word character follows.
_CUT_CANDIDATE = re.compile(r"[ \t\n\r](?=[!-~\w])")


def first_uncut_stretch(text: str, limit: int = MAX_UNCUT_CHARS) -> tuple[int, int] | None:
    """(start, length) of the first stretch of ``text`` longer than ``limit`` characters holding
    no place ``split_at_safe_cuts`` may cut at (megabytes without a space, tab or newline before a
    word character: one word to a pre-tokenizer, gigabytes to BPE), or None.  On ordinary text one
    short search every ``limit / 2`` characters; a stretch is measured exactly only where a window
    of ``limit / 2`` characters holds no such place."""
    n, half = len(text), max(limit // 2, 1)
    if n <= limit:
        return None
    pos = 0   # (each window [pos, pos + half] of a stretch longer than 2 half + 1 holds no place)
    while pos + half < n:
        if _CUT_CANDIDATE.search(text, pos, pos + half + 2):
            pos += half
            continue
        before = None   # (the window before this one held a place, or pos is one)
        for before in _CUT_CANDIDATE.finditer(text, max(0, pos - half - 2), pos + 1):
            pass
        start = before.start() + 1 if before else 0
        after = _CUT_CANDIDATE.search(text, pos)
        end = after.start() if after else n
        if end - start > limit:
            return start, end - start
        pos = end
    return None


def split_at_safe_cuts(text: str, chunk_chars: int, added_tokens=()) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` characters where the GPT-2 regex never
    joins two words: before the last whitespace character (space, tab, newline or CR) of a run that
    a word character follows.  That character starts a word (a newline, tab or CR alone; a space
    with the word after it), and the run before it is one word whether the text goes on or ends
    there (the regex's rule for whitespace leaves a run's last character to what follows it).  Any line endings,
    and text on one long line, cut alike.  Not before one of ``added_tokens`` (the tokenizer's
    special and added tokens, matched before the regex: a run before one ends a piece of text, and
    is one word).  ``"".join(pieces) == text``; a text without such places (no whitespace at all)
    stays one piece."""
    pieces = []
    start = 0
    n = len(text)
    while n - start > chunk_chars:
        cut = -1
        for match in _CUT_CANDIDATE.finditer(text, start + chunk_chars):
            if _is_word_char(text[match.end()]) and not any(text.startswith(t, match.end()) for t in added_tokens):
                cut = match.start()
                break
        if cut < 0:
            if n - start - chunk_chars > MAX_UNCUT_CHARS:   # one "word" of megabytes: BPE on it takes gigabytes
                raise DataError(f"the text has {n - start - chunk_chars:,} characters from character "
                                f"{start + chunk_chars:,} on without a "
                                "place to cut them into words (a space, tab or newline before a letter, digit "
                                "or punctuation): not text a tokenizer can learn from or encode")
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _read_tokenizer_config(path: Path) -> tuple[str | None, str | None, str | None, Path | None, bool | None]:
    """eos/bos token strings, the chat template and the file it is in, and add_bos_token from a HF
    tokenizer_config.json (or, for the template, the chat_template.jinja beside it), each None when
    absent or unreadable."""
    jinja = path.parent / "chat_template.jinja"
    template = None
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            warnings.warn(f"{jinja}: unreadable, no chat template", UserWarning, stacklevel=3)
    if not path.is_file():
        return None, None, template, jinja, None
    try:
        config = read_json(path, TOKENIZER_CONFIG_FILE)
    except CheckpointError as e:
        # The tokenizer itself is fine; the eos/bos fall back to the candidate lists.
        warnings.warn(f"{one_line(e)}; eos/bos tokens guessed from the vocabulary", UserWarning, stacklevel=3)
        return None, None, template, jinja, None

    def token_text(value):
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    if not isinstance(config, dict):
        return None, None, template, jinja, None
    source = jinja if template is not None else path
    if template is None:
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template
                     if isinstance(t, dict) and isinstance(t.get("name"), str)}
            template = named.get("default")
    add_bos = config.get("add_bos_token")
    return (token_text(config.get("eos_token")), token_text(config.get("bos_token")),
            template if isinstance(template, str) else None, source, add_bos if isinstance(add_bos, bool) else None)
