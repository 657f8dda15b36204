"""Training data: load a corpus, split it, tokenize it once into a cached token file, sample batches.

Pipeline::

    text = load_text(path)                     # None -> bundled Shakespeare corpus
    data = TokenDataset.from_text(text, tokenizer, cache_dir="runs/x/tokens")
    sampler = BatchSampler(data.train_tokens, batch_size=8, seq_len=128, seed=0)
    x, y = sampler.next_batch()                 # int64 (B, T); y[:, t] is the token after x[:, t]
    ...
    nats = sum(mean_loss(x, y) * (y != -100).sum() for x, y in data.iter_val_batches(8, 128))
    bpb = bits_per_byte(nats, data.val_bytes)

Validation split: the last ``val_fraction`` (``DEFAULT_VAL_FRACTION`` = 5%, as in `npllama train`)
of the *characters*, moved forward to just after the next newline so that no line is split between
train and val. Train and val are tokenized separately, so no token spans the cut and
``train_text + val_text == text``.

Bits per byte: ``bpb = (sum over val targets of -ln p(target)) / val_bytes / ln 2``, where
``val_bytes`` is the number of UTF-8 bytes of the validation text. It compares models with
different tokenizers, because the byte count does not depend on the tokenizer. For the sum to cover
exactly the bytes counted, every validation token must be predicted exactly once: the evaluation
stream is ``[last train token] + val_tokens`` (the token that precedes the validation text in the
corpus serves as context for the first validation token; it is never a target), cut into
non-overlapping windows; see ``iter_eval_batches``.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CheckpointError, ConfigError, DataError
from .files import atomic_write_bytes, atomic_write_json

BUNDLED_CORPUS = "data/shakespeare.txt.gz"   # inside the npllama package
IGNORE_INDEX = -100                           # target value the loss skips (padding)
CACHE_FORMAT = 1                              # bump when the cache layout changes


# ------------------------------------------------------------------------------------- text

def load_text(path: str | os.PathLike | None = None) -> str:
    """Read a training corpus.

    Args:
        path: ``None`` for the bundled Shakespeare corpus; a UTF-8 text file (``.gz`` is
            decompressed); or a directory, whose ``*.txt`` files (searched recursively, sorted by
            relative path) are joined with one blank line between files. A leading UTF-8 byte-order
            mark is dropped; nothing else is changed (line endings stay as they are).
    Raises:
        DataError: path missing, a file not UTF-8 or binary (the file is named), a directory with
            no ``.txt`` file, or a corpus that is empty / only whitespace.
    """
    if path is None:
        resource = importlib.resources.files("npllama").joinpath(BUNDLED_CORPUS)
        text = _decode_text(gzip.decompress(resource.read_bytes()), f"<bundled {BUNDLED_CORPUS}>")
        source = "the bundled corpus"
    else:
        root = Path(path)
        if root.is_dir():
            files = sorted((p for p in root.rglob("*.txt") if p.is_file()),
                           key=lambda p: p.relative_to(root).as_posix())
            if not files:
                raise DataError(f"no .txt files in directory {root}")
            texts = [_read_text_file(p) for p in files]
            # Each file ends with a newline, then one more newline: a blank line between files.
            text = "\n".join(t if t.endswith("\n") else t + "\n" for t in texts if t)
            source = f"directory {root} ({len(files)} .txt files)"
        elif root.is_file():
            text = _read_text_file(root)
            source = f"file {root}"
        else:
            raise DataError(f"corpus path not found: {root}")
    if not text.strip():
        raise DataError(f"corpus is empty: {source} has no text")
    return text


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    return _decode_text(data, str(path))


def _decode_text(data: bytes, name: str) -> str:
    nul = data.find(b"\x00")
    if nul >= 0:
        # Valid UTF-8 can hold NUL, but text never does: this is an image, archive, .npy, ...
        raise DataError(f"{name}: looks like a binary file (NUL byte at offset {nul}), expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}); convert it to UTF-8 first") from None


# Held-out share of the text, for the library and for `npllama train` alike.
DEFAULT_VAL_FRACTION = 0.05


def split_train_val(text: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[str, str]:
    """Split ``text`` into (train, val) with ``train + val == text``.

    The nominal cut leaves ``v = round(val_fraction * len(text))`` characters (at least 1) for val;
    it is moved forward to just after the next newline, or, when there is none before the final
    character, back to just after a newline at most ``v`` characters earlier; with neither the
    nominal cut is kept. Both parts are non-empty.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = len(text)
    if n < 2:
        raise DataError(f"corpus of {n} characters is too short to split into train and validation")
    val_chars = min(max(1, round(val_fraction * n)), n - 1)
    nominal = n - val_chars
    # A newline at nominal-1 already ends train; one at n-1 would leave val empty.
    newline = text.find("\n", nominal - 1, n - 1)
    if newline < 0:  # look back, but at most val_chars, so val is at most twice the nominal size
        newline = text.rfind("\n", max(0, nominal - 1 - val_chars), nominal - 1)
    cut = newline + 1 if newline >= 0 else nominal
    return text[:cut], text[cut:]


# ----------------------------------------------------------------------------------- tokens

def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..vocab_size-1: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _encode(tokenizer, text: str) -> np.ndarray:
    encode = getattr(tokenizer, "encode_long", None) or tokenizer.encode
    return np.asarray(encode(text))


def cached_tokens(text: str, tokenizer, cache_dir: str | os.PathLike, name: str) -> np.ndarray:
    """Token ids of ``text`` read (memory-mapped) from ``cache_dir/{name}.tokens``.

    The file is raw little-endian ``token_dtype(vocab)`` ids. Its JSON sidecar ``{name}.json`` holds
    the tokenizer fingerprint, the text's SHA-256, dtype, number of tokens and of UTF-8 bytes; when any
    of them differs from the current ones (or the file size is wrong) the text is tokenized again.
    The sidecar is deleted before and rewritten after the token file, both atomically, so a crash
    in between leaves no sidecar and hence a rebuild, never a stale match.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokens_path = cache_dir / f"{name}.tokens"
    meta_path = cache_dir / f"{name}.json"
    dtype = token_dtype(tokenizer.vocab_size)
    expected = {
        "format": CACHE_FORMAT,
        "tokenizer_sha256": tokenizer.fingerprint,
        "text_sha256": text_sha256(text),
        "dtype": dtype.name,
        "n_bytes": len(text.encode("utf-8")),
    }
    meta = _read_sidecar(meta_path)
    if meta is not None and all(meta.get(k) == v for k, v in expected.items()):
        n_tokens = meta.get("n_tokens")
        if (isinstance(n_tokens, int) and n_tokens >= 0 and tokens_path.is_file()
                and tokens_path.stat().st_size == n_tokens * dtype.itemsize):
            return _memmap_tokens(tokens_path, dtype, n_tokens)

    ids = _encode(tokenizer, text)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= tokenizer.vocab_size):
        raise DataError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")
    tokens = ids.astype(dtype.newbyteorder("<"), copy=False)
    meta_path.unlink(missing_ok=True)
    atomic_write_bytes(tokens_path, [memoryview(np.ascontiguousarray(tokens)).cast("B")])
    atomic_write_json(meta_path, {**expected, "n_tokens": int(tokens.size)})
    return _memmap_tokens(tokens_path, dtype, int(tokens.size))


def _read_sidecar(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _memmap_tokens(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", shape=(n_tokens,))


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """Tokenized train and validation splits of one corpus.

    Attributes:
        train_tokens, val_tokens: 1-D uint16/uint32 arrays (``np.memmap`` when cached).
        train_bytes, val_bytes: UTF-8 byte counts of the train and val texts (for bits per byte).
        vocab_size: the tokenizer's vocabulary size.
    """
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    train_bytes: int
    val_bytes: int
    vocab_size: int

    @classmethod
    def from_text(cls, text: str, tokenizer, cache_dir: str | os.PathLike | None = None,
                  val_fraction: float = DEFAULT_VAL_FRACTION) -> "TokenDataset":
        """Split ``text`` (``split_train_val``) and tokenize both parts; ``cache_dir=None`` keeps
        the tokens in memory, otherwise they are cached as ``train.tokens``/``val.tokens``."""
        train_text, val_text = split_train_val(text, val_fraction)
        if cache_dir is None:
            dtype = token_dtype(tokenizer.vocab_size)
            train = _encode(tokenizer, train_text).astype(dtype)
            val = _encode(tokenizer, val_text).astype(dtype)
        else:
            train = cached_tokens(train_text, tokenizer, cache_dir, "train")
            val = cached_tokens(val_text, tokenizer, cache_dir, "val")
        return cls(train_tokens=train, val_tokens=val, train_bytes=len(train_text.encode("utf-8")),
                   val_bytes=len(val_text.encode("utf-8")), vocab_size=tokenizer.vocab_size)

    @classmethod
    def from_path(cls, path: str | os.PathLike | None, tokenizer, cache_dir: str | os.PathLike | None = None,
                  val_fraction: float = DEFAULT_VAL_FRACTION) -> "TokenDataset":
        """``from_text(load_text(path), ...)``; ``path=None`` is the bundled corpus."""
        return cls.from_text(load_text(path), tokenizer, cache_dir=cache_dir, val_fraction=val_fraction)

    @property
    def eval_context_token(self) -> int | None:
        """The last train token: context for predicting the first validation token."""
        return int(self.train_tokens[-1]) if len(self.train_tokens) else None

    def iter_val_batches(self, batch_size: int, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Eval batches whose targets are every validation token exactly once (see module doc)."""
        return iter_eval_batches(self.val_tokens, batch_size, seq_len, context_token=self.eval_context_token)


# ---------------------------------------------------------------------------------- batches

def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_stream_length(n_tokens: int, seq_len: int) -> None:
    if n_tokens < seq_len + 1:
        raise DataError(
            f"corpus smaller than one context window: the token stream has {n_tokens} tokens, but a "
            f"training window needs seq_len + 1 = {seq_len + 1} (inputs plus the shifted targets); "
            f"use a larger corpus or a smaller seq_len")


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` random contiguous windows of the token stream.

    Window starts ``s_b`` are drawn uniformly from ``0..len(tokens)-seq_len-1`` (every start whose
    window of ``seq_len + 1`` tokens fits); ``x[b] = tokens[s_b : s_b+T]``,
    ``y[b] = tokens[s_b+1 : s_b+T+1]``. Both are int64 arrays of shape (B, T).
    """
    batch_size = _check_positive_int("batch_size", batch_size)
    seq_len = _check_positive_int("seq_len", seq_len)
    n = len(tokens)
    _check_stream_length(n, seq_len)
    starts = rng.integers(0, n - seq_len, size=batch_size)
    windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


class BatchSampler:
    """Reproducible stream of random training batches (``get_batch`` with its own generator).

    The generator is ``np.random.default_rng(seed)`` (PCG64). ``state_dict()`` returns a
    JSON-serialisable dict (the bit generator's state and the sampler's shape); after
    ``load_state_dict`` the sampler yields exactly the batches the saved one would have yielded next.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int | None = 0):
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.seq_len = _check_positive_int("seq_len", seq_len)
        _check_stream_length(len(tokens), self.seq_len)
        self.tokens = tokens
        self.seed = None if seed is None else int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.batches_drawn = 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        batch = get_batch(self.tokens, self.batch_size, self.seq_len, self.rng)
        self.batches_drawn += 1
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serialisable sampler state (``json.dumps``/``json.loads`` round-trip it exactly)."""
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_tokens": int(len(self.tokens)),
            "seed": self.seed,
            "batches_drawn": self.batches_drawn,
            "bit_generator_state": _json_copy(self.rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``.

        Raises:
            CheckpointError: the state is malformed, or was saved for another batch shape or
                token stream length (resuming would then silently draw different data).
        """
        if not isinstance(state, dict) or "bit_generator_state" not in state:
            raise CheckpointError("sampler state must be a dict from BatchSampler.state_dict()")
        for key, current in (("batch_size", self.batch_size), ("seq_len", self.seq_len),
                             ("n_tokens", int(len(self.tokens)))):
            if state.get(key) != current:
                raise CheckpointError(
                    f"sampler state was saved with {key}={state.get(key)!r}, but this sampler has "
                    f"{key}={current}: cannot resume the same batch sequence")
        rng = generator_from_state(state["bit_generator_state"], "sampler state")
        batches_drawn = state.get("batches_drawn", 0)
        if isinstance(batches_drawn, bool) or not isinstance(batches_drawn, int) or not 0 <= batches_drawn < 2**63:
            raise CheckpointError(f"sampler state: batches_drawn must be a non-negative integer, got {batches_drawn!r}")
        self.rng = rng
        self.seed = state.get("seed")
        self.batches_drawn = batches_drawn


def generator_from_state(state, what: str) -> np.random.Generator:
    """A PCG64 ``np.random.Generator`` restored from ``bit_generator.state`` as saved in JSON,
    after checking every field (NumPy itself would wrap out-of-range integers silently, or fail
    with an OverflowError deep inside)."""
    def bad(why):
        return CheckpointError(f"{what}: invalid random generator state ({why})")

    def is_int(x, bits):
        return not isinstance(x, bool) and isinstance(x, int) and 0 <= x < 2**bits

    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        raise bad("expected a PCG64 state")
    inner = state.get("state")
    if not isinstance(inner, dict) or set(inner) != {"state", "inc"}:
        raise bad("'state' must hold 'state' and 'inc'")
    if not (is_int(inner["state"], 128) and is_int(inner["inc"], 128)):
        raise bad("'state' and 'inc' must be integers in [0, 2**128)")
    if state.get("has_uint32") not in (0, 1) or isinstance(state.get("has_uint32"), bool):
        raise bad("'has_uint32' must be 0 or 1")
    if not is_int(state.get("uinteger"), 32):
        raise bad("'uinteger' must be an integer in [0, 2**32)")
    rng = np.random.default_rng()
    rng.bit_generator.state = {"bit_generator": "PCG64", "state": dict(inner),
                               "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}
    return rng


def _json_copy(obj):
    # Deep copy through JSON: proves serialisability and detaches from the live generator.
    return json.loads(json.dumps(obj))


def count_eval_targets(n_tokens: int, with_context_token: bool) -> int:
    """Number of targets ``iter_eval_batches`` yields for a stream of ``n_tokens`` tokens."""
    return n_tokens if with_context_token else max(n_tokens - 1, 0)


def iter_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                      context_token: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Deterministic, non-overlapping windows over a token stream, for evaluation.

    The stream is ``s = [context_token] + tokens`` when a context token is given (then every token of
    ``tokens`` is a target exactly once), else ``s = tokens`` (then ``tokens[0]`` is only context).
    Window ``k`` has inputs ``s[kT : kT+T]`` and targets ``s[kT+1 : kT+T+1]``; the last window is
    padded to length T with input 0 and target ``IGNORE_INDEX`` (-100). Padding sits at the end of a
    row, so under causal attention it never changes the logits of real positions. Windows are grouped
    ``batch_size`` at a time; the last batch may have fewer rows. Yields int64 (x, y) of shape (B, T).

    Total loss: ``sum over batches of mean_loss(x, y) * count(y != -100)`` in nats, where mean_loss
    averages over non-ignored targets. Bits per byte: ``total_nats / n_bytes / ln 2``, with ``n_bytes``
    the UTF-8 bytes of the text that ``tokens`` encodes (exact only when ``context_token`` is given).
    """
    batch_size = _check_positive_int("batch_size", batch_size)
    seq_len = _check_positive_int("seq_len", seq_len)
    n = len(tokens)
    offset = 0 if context_token is None else 1
    n_targets = count_eval_targets(n, context_token is not None)
    if n_targets < 1:
        raise DataError(f"evaluation stream of {n} tokens has no token to predict")

    def stream(lo: int, hi: int) -> np.ndarray:
        # s[lo:hi] without materialising s (tokens may be a large memmap).
        if offset and lo == 0:
            return np.concatenate([np.array([context_token], dtype=np.int64),
                                   np.asarray(tokens[0:hi - 1], dtype=np.int64)])
        return np.asarray(tokens[lo - offset:hi - offset], dtype=np.int64)

    n_windows = math.ceil(n_targets / seq_len)
    for first in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - first)
        x = np.zeros((rows, seq_len), dtype=np.int64)
        y = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
        for r in range(rows):
            lo = (first + r) * seq_len
            length = min(seq_len, n_targets - lo)
            x[r, :length] = stream(lo, lo + length)
            y[r, :length] = stream(lo + 1, lo + 1 + length)
        yield x, y


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """``total_nats / n_bytes / ln 2``: the model's code length per UTF-8 byte of text."""
    if n_bytes <= 0:
        raise DataError(f"bits per byte needs a positive byte count, got {n_bytes}")
    return float(total_nats) / n_bytes / math.log(2)
