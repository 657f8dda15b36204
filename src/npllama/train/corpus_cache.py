"""A machine-wide cache of what a fresh run makes from its corpus before it trains: the BPE tokenizer
trained on the text and the token ids of its training and held-out parts.

Training the default 2048-token tokenizer on the bundled Shakespeare and tokenizing the text take
~2.5 s, most of a later run's start-up.  Both depend only on the training and held-out texts
(data.Split.digest: the corpus and how it was split), the vocabulary size and the tokenizers library,
so they are kept under one key of those in
``$NPLLAMA_CORPUS_CACHE`` (default ``corpora`` in npllama's cache directory, npllama/caches.py;
``NPLLAMA_CORPUS_CACHE=0`` switches the cache off) and copied into each run directory, which keeps
its own copy (``--resume`` and the other ranks of an MPI job read the tokens there).

Nothing in the cache is trusted blindly: the token files carry the sidecars of a run's token cache
(tokenizer and text SHA-256, sizes; data.cached_tokens checks them and tokenizes again on any
mismatch), and a tokenizer file that does not load is trained again.  A cache that cannot be
written is skipped (the run goes on without it).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from ..caches import cache_dir
from ..errors import ConfigError
from ..files import atomic_write_bytes
from ..tokenizer import Tokenizer

ENV_DIR = "NPLLAMA_CORPUS_CACHE"
FORMAT = 1   # bump when what is stored, or how the tokenizer is trained, changes
TOKEN_FILES = ("train.tokens", "val.tokens", "train.json", "val.json")   # (sidecars last: see copy_tokens)


def cache_root() -> Path | None:
    """The cache directory, or None when switched off."""
    chosen = os.environ.get(ENV_DIR)
    if chosen == "0":
        return None
    if chosen:
        return Path(chosen)
    return cache_dir() / "corpora"


def entry_dir(split_digest: str, vocab_size: int) -> Path | None:
    """The directory of one (training and held-out text: ``data.Split.digest``, vocabulary size),
    or None when switched off."""
    root = cache_root()
    if root is None:
        return None
    import tokenizers
    key = json.dumps([FORMAT, split_digest, vocab_size, tokenizers.__version__])
    return root / hashlib.sha256(key.encode()).hexdigest()[:24]


def tokenizer_for(split, vocab_size: int) -> tuple[Tokenizer, Path | None, str]:
    """The byte-level BPE tokenizer of ``split`` (a ``data.Split``): from the cache, else trained on
    its training text (never on the held-out text) and stored there.  Returns it, the cache entry
    and what was done, for the log.

    Raises:
        ConfigError: the text has fewer distinct pairs than ``vocab_size`` asks for.
    """
    entry = entry_dir(split.digest, vocab_size)
    tokenizer = load_tokenizer(entry)
    if tokenizer is not None:
        return tokenizer, entry, (f"byte-level BPE tokenizer of {tokenizer.vocab_size} tokens trained on this text "
                                  f"by an earlier run, read from {entry}")
    with warnings.catch_warnings():   # a short vocabulary is an error here, not a warning
        warnings.simplefilter("ignore", UserWarning)
        tokenizer = Tokenizer.train(split.train_text, vocab_size)
    if tokenizer.vocab_size < vocab_size:
        raise ConfigError(f"--vocab-size {vocab_size} is more than this text supports: BPE found only "
                          f"{tokenizer.vocab_size} tokens (pairs seen at least twice); use --vocab-size "
                          f"{tokenizer.vocab_size} or less, or more text")
    store_tokenizer(entry, tokenizer)
    return tokenizer, entry, f"trained a byte-level BPE tokenizer of {tokenizer.vocab_size} tokens"


def load_tokenizer(entry: Path | None) -> Tokenizer | None:
    """The tokenizer stored in ``entry``, or None (no entry, none stored, or a file that does not load)."""
    if entry is None or not (entry / "tokenizer.json").is_file():
        return None
    try:
        return Tokenizer.from_file(entry / "tokenizer.json")
    except Exception:   # (a damaged file: train again and write over it)
        return None


def store_tokenizer(entry: Path | None, tokenizer: Tokenizer) -> None:
    if entry is None:
        return
    try:
        entry.mkdir(parents=True, exist_ok=True)
        tokenizer.save(entry / "tokenizer.json")   # (atomic)
    except OSError:
        pass


def copy_tokens(source: Path | None, dest: Path | None) -> bool:
    """Copy the token files and their sidecars from one token directory to another (the cache and a
    run's ``tokens/``), each written atomically (files.atomic_write_bytes), the sidecars last: a copy
    cut short leaves tokens without a sidecar, which data.cached_tokens ignores and rebuilds.
    Returns whether the files were copied."""
    if source is None or dest is None or not all((source / name).is_file() for name in TOKEN_FILES):
        return False
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in TOKEN_FILES:
            atomic_write_bytes(dest / name, _chunks(source / name))
    except OSError:   # (files.WriteError is one too)
        return False
    return True


def _chunks(path: Path, size: int = 1 << 22):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def sidecar_stamps(tokens_dir: Path) -> tuple:
    """What changes when data.cached_tokens rewrites a sidecar (it does so only when it tokenizes
    again): whether copied tokens were used as they are."""
    stamps = []
    for name in ("train.json", "val.json"):
        try:
            st = (tokens_dir / name).stat()
            stamps.append((st.st_ino, st.st_mtime_ns))
        except OSError:
            stamps.append(None)
    return tuple(stamps)
