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
import io
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np

from .errors import CheckpointError, ConfigError, DataError, one_line
from .files import atomic_write_bytes, atomic_write_json
from .tokenizer import first_uncut_stretch

BUNDLED_CORPUS = "data/shakespeare.txt.gz"   # inside the npllama package
IGNORE_INDEX = -100                           # target value the loss skips (padding)
CACHE_FORMAT = 1                              # bump when the cache layout changes


# ------------------------------------------------------------------------------------- text

# What a folder's files count as text by default: common prose, markup, data and source suffixes
# (each also gzip-compressed, ``x.py.gz``).  Anything else needs --include; binaries are skipped.
TEXT_SUFFIXES = frozenset("""
    .txt .text .md .markdown .rst .adoc .org .tex .bib .csv .tsv .json .jsonl .yaml .yml .toml .ini .cfg
    .conf .xml .html .htm .css .scss .svg
    .py .pyi .pyx .c .h .cc .cpp .cxx .hpp .hh .cs .java .kt .kts .scala .go .rs .swift .m .mm
    .js .jsx .mjs .cjs .ts .tsx .vue .rb .php .pl .pm .lua .r .jl .hs .ml .mli .ex .exs .erl .clj .lisp
    .el .scm .sh .bash .zsh .fish .ps1 .bat .sql .proto .f90 .f .asm .s .cmake .mk .gradle .dart .zig .nim
    """.split())


@dataclass(frozen=True)
class Corpus:
    """A training corpus as read from disk: its documents (one per file) and what was left out.

    Attributes:
        source: what was read, for messages ("file a.txt", "directory src", "the bundled corpus").
        documents: ``(name, text)`` per file read, in sorted order (``name`` relative to a folder).
        skipped: ``(name, why)`` per file of a folder left out: "binary", "not UTF-8" (a file
            matching the patterns whose content is not text).
        unmatched: number of files of a folder not matching the patterns, by suffix (hidden files
            and folders, names starting with ".", are not even looked at).
    """
    source: str
    documents: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...] = ()
    unmatched: tuple[tuple[str, int], ...] = ()

    @property
    def text(self) -> str:
        """The documents joined: each ends with a newline, then one more: a blank line between files.
        A single file is its text unchanged."""
        return join_documents(text for _, text in self.documents)

    @property
    def n_bytes(self) -> int:
        return sum(len(text.encode("utf-8")) for _, text in self.documents)

    def describe(self, max_names: int = 6) -> str:
        """One or two lines for the log: which files were read, how many bytes, what was skipped."""
        sizes = [(name, len(text.encode("utf-8"))) for name, text in self.documents]
        if len(sizes) == 1 and not self.skipped and not self.unmatched:
            return f"corpus: {self.source}, {sizes[0][1]:,} bytes"
        shown = ", ".join(f"{name} ({size:,} B)" for name, size in sizes[:max_names])
        more = f", ... and {len(sizes) - max_names:,} more" if len(sizes) > max_names else ""
        line = f"corpus: {self.source}: {len(sizes):,} files, {self.n_bytes:,} bytes: {shown}{more}"
        left_out = []
        if self.skipped:
            names = ", ".join(f"{name} ({why})" for name, why in self.skipped[:max_names])
            left_out.append(f"{len(self.skipped):,} skipped as not text: {names}"
                            + (", ..." if len(self.skipped) > max_names else ""))
        if self.unmatched:
            counts = ", ".join(f"{suffix or '(no suffix)'} {n:,}" for suffix, n in self.unmatched[:max_names])
            left_out.append(f"{sum(n for _, n in self.unmatched):,} not matching the file patterns ({counts}"
                            + (", ..." if len(self.unmatched) > max_names else "") + ")")
        return line + ("\ncorpus: left out " + "; ".join(left_out) if left_out else "")


def join_documents(texts) -> str:
    """Texts joined with a blank line between them (a newline is added to one that lacks it); empty
    texts are dropped.  A single text comes back unchanged."""
    texts = [t for t in texts if t]
    if len(texts) == 1:
        return texts[0]
    return "\n".join(t if t.endswith("\n") else t + "\n" for t in texts)


def parse_include(include: str | None) -> tuple[str, ...] | None:
    """``"*.py,docs/*.md"`` -> ``("*.py", "docs/*.md")``; None -> None (the default suffixes)."""
    if include is None:
        return None
    patterns = tuple(p.strip() for p in include.split(",") if p.strip())
    if not patterns:
        raise ConfigError(f"--include must name at least one file pattern such as '*.py', got {include!r}")
    return patterns


def matches(relative: str, patterns: tuple[str, ...] | None) -> bool:
    """Whether a folder's file (its path relative to the folder, with /) is read: with no patterns,
    when its suffix (before a final .gz) is one of TEXT_SUFFIXES; else when a pattern matches it as
    ``PurePath.match`` does (from the right: ``*.py`` matches ``a/b.py``)."""
    path = PurePosixPath(relative)
    if patterns is None:
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        return PurePosixPath(name).suffix.lower() in TEXT_SUFFIXES
    return any(path.match(p) for p in patterns)


def load_corpus(path: str | os.PathLike | None = None, include: str | None = None) -> Corpus:
    """Read a training corpus.

    Args:
        path: ``None`` for the bundled Shakespeare corpus; a UTF-8 text file (``.gz`` is
            decompressed); or a directory, whose text files (see ``matches``; searched recursively
            without entering hidden folders, sorted by relative path) are the documents.  A leading
            UTF-8 byte-order mark is dropped; nothing else is changed (line endings stay as they are).
        include: comma-separated file patterns for a directory (default: TEXT_SUFFIXES).
    Raises:
        DataError: path missing, a single file not UTF-8 or binary (the file is named), a directory
            with no text file, or a corpus that is empty / only whitespace.  Inside a directory a
            binary or non-UTF-8 file is skipped (and listed in ``skipped``) instead.  A file with
            megabytes nowhere to cut into words (``check_cuttable``) is refused, named.
    """
    patterns = parse_include(include)
    if path is None:
        resource = importlib.resources.files("npllama").joinpath(BUNDLED_CORPUS)
        text = _decode_text(gzip.decompress(resource.read_bytes()), f"<bundled {BUNDLED_CORPUS}>")
        corpus = Corpus("the bundled corpus", (("shakespeare.txt", text),))
    else:
        root = Path(path)
        if root.is_dir():
            corpus = _load_folder(root, patterns)
        elif root.is_file():
            corpus = Corpus(f"file {root}", ((root.name, _read_text_file(root)),))
        else:
            raise DataError(f"corpus path not found: {root}")
    if not any(text.strip() for _, text in corpus.documents):
        raise DataError(f"corpus is empty: {corpus.source} has no text")
    if path is not None:
        for name, text in corpus.documents:
            check_cuttable(text, root if root.is_file() else root / name)
    return corpus


def check_cuttable(text: str, path) -> None:
    """Refuse a text (the file ``path``) with more than ``MAX_UNCUT_CHARS`` characters in a row
    nowhere to cut into words (no space, tab or newline before a letter, digit or punctuation): one
    word to a tokenizer's pre-tokenizer, gigabytes to its BPE; checked here, where the file is
    known, before any tokenizer sees it."""
    stretch = first_uncut_stretch(text)
    if stretch is not None:
        start, length = stretch
        raise DataError(f"{path}: {length:,} characters from line {text.count(chr(10), 0, start) + 1:,} (character "
                        f"{start:,}) on without a place to cut them into words (a space, tab or newline before a "
                        "letter, digit or punctuation): not text a tokenizer can learn from or encode")


def _load_folder(root: Path, patterns: tuple[str, ...] | None) -> Corpus:
    files, unmatched = [], {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]      # .git, .venv, ...: never text to learn
        for name in names:
            p = Path(folder) / name
            relative = p.relative_to(root).as_posix()
            if name.startswith(".") or not p.is_file():
                continue
            if matches(relative, patterns):
                files.append((relative, p))
            else:
                suffix = p.suffix.lower()
                unmatched[suffix] = unmatched.get(suffix, 0) + 1
    files.sort()
    documents, skipped = [], []
    for relative, p in files:
        try:
            text = _read_text_file(p)
        except NotText as e:
            skipped.append((relative, e.why))
            continue
        if text:
            documents.append((relative, text))
    what = "the default text and source suffixes" if patterns is None else "--include " + ",".join(patterns)
    if not documents:
        found = f"; {len(skipped)} matching files are not text" if skipped else ""
        raise DataError(f"no text files in directory {root} (looked for {what}{found}); "
                        "choose the files with --include, e.g. --include '*.py,*.md'")
    by_count = tuple(sorted(unmatched.items(), key=lambda kv: (-kv[1], kv[0])))
    return Corpus(f"directory {root}", tuple(documents), tuple(skipped), by_count)


def load_text(path: str | os.PathLike | None = None, include: str | None = None) -> str:
    """The text of ``load_corpus(path, include)``: its documents joined (``Corpus.text``)."""
    return load_corpus(path, include).text


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".gz":
        data = _gunzip(data, path)
    return _decode_text(data, str(path))


GUNZIP_RATIO = 20               # text compresses 3-5x; far more is a gzip bomb, not a corpus
GUNZIP_FLOOR = 64 * 1024 * 1024


def _gunzip(data: bytes, path: Path) -> bytes:
    """``data`` decompressed, refused once it grows past ``GUNZIP_RATIO`` times its compressed size
    (at least ``GUNZIP_FLOOR`` bytes): a 3 MB file that would become 3 GB stops at 64 MB."""
    limit = max(GUNZIP_FLOOR, GUNZIP_RATIO * len(data))
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            out = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({one_line(e, 200)})") from None
    if len(out) > limit:
        raise DataError(f"{path}: decompresses to more than {limit:,} bytes, {GUNZIP_RATIO} times its size "
                        "(a gzip bomb? decompress it yourself if it really is text)")
    return out


class NotText(DataError):
    """A file that is not UTF-8 text; ``why``: "binary" or "not UTF-8" (a folder skips it)."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def _decode_text(data: bytes, name: str) -> str:
    nul = data.find(b"\x00")
    if nul >= 0:
        # Valid UTF-8 can hold NUL, but text never does: this is an image, archive, .npy, ...
        raise NotText(f"{name}: looks like a binary file (NUL byte at offset {nul}), expected UTF-8 text", "binary")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise NotText(f"{name}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset "
                      f"{e.start}); convert it to UTF-8 first", "not UTF-8") from None


# Held-out share of the text, for the library and for `npllama train` alike.
DEFAULT_VAL_FRACTION = 0.05


def split_train_val(text: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[str, str]:
    """Split ``text`` into (train, val) with ``train + val == text``.

    The nominal cut leaves ``v = round(val_fraction * len(text))`` characters (at least 1) for val;
    it is moved forward to just after the next newline, or, when there is none before the final
    character, back to just after a newline at most ``v`` characters earlier; with neither the
    nominal cut is kept. Both parts are non-empty.
    """
    _check_val_fraction(val_fraction)
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


def _check_val_fraction(val_fraction) -> None:
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


# How the held-out set is drawn from a corpus (`npllama train --val-split`).
VAL_SPLITS = ("per-file", "documents", "tail")
VAL_SPLIT_SEED = 0   # of --val-split documents: the same files for every run of a corpus, comparable


@dataclass(frozen=True)
class Split:
    """A corpus cut into training and held-out text, and a sentence saying what was held out."""
    train_text: str
    val_text: str
    description: str

    @property
    def digest(self) -> str:
        """SHA-256 over both texts: what a tokenizer and tokens made from them depend on."""
        return hashlib.sha256(f"{text_sha256(self.train_text)} {text_sha256(self.val_text)}".encode()).hexdigest()


def split_corpus(corpus: Corpus, val_fraction: float = DEFAULT_VAL_FRACTION, how: str = "per-file",
                 val_corpus: Corpus | None = None) -> Split:
    """Cut ``corpus`` into training and held-out text.

    how:
        ``"per-file"``: the last ``val_fraction`` of every file, cut at a line boundary: every file
            (language, module, author) is represented.  A file's share is rounded to whole lines, the
            rounding carried over to the next file so the total stays near ``val_fraction``; no file
            gives more than half of itself.  With one file this is ``"tail"``.
        ``"documents"``: whole files drawn at random (seed ``VAL_SPLIT_SEED``) until they hold
            ``val_fraction`` of the bytes: for many short documents, where a file's tail is no text.
        ``"tail"``: the last ``val_fraction`` of the joined text (``split_train_val``).
    ``val_corpus`` (``--val-data``): all of ``corpus`` trains and ``val_corpus`` is the held-out set.
    Train and held-out parts are joined like ``Corpus.text`` (a blank line between files).
    """
    if val_corpus is not None:
        train, val = corpus.text, val_corpus.text
        return Split(train, val, f"held-out set: {val_corpus.source} ({_bytes(val)}), given by --val-data; all of "
                                 f"{corpus.source} trains")
    _check_val_fraction(val_fraction)
    if how not in VAL_SPLITS:
        raise ConfigError(f"--val-split must be one of {', '.join(VAL_SPLITS)}, got {how!r}")
    share = f"{100 * val_fraction:g}%"
    if how == "tail" or len(corpus.documents) == 1:
        text = corpus.text
        train, val = split_train_val(text, val_fraction)
        first = _document_at(corpus, len(train))
        where = "" if len(corpus.documents) == 1 else f", from {first} on"
        what = "" if how == "tail" or len(corpus.documents) > 1 else " (the corpus is one file)"
        return Split(train, val, f"held-out set: the last {share} of the text{what}{where} ({_bytes(val)})")
    if how == "documents":
        return _split_documents(corpus, val_fraction, share)
    train_parts, val_parts, owed, n_files = [], [], 0.0, 0
    for _, text in corpus.documents:
        owed += val_fraction * len(text)
        cut = _line_cut(text, len(text) - min(owed, len(text) / 2))
        train_parts.append(text[:cut])
        if cut < len(text):
            val_parts.append(text[cut:])
            owed -= len(text) - cut
            n_files += 1
    if not val_parts:
        raise DataError(f"--val-split per-file found no file of {corpus.source} with lines to hold out (each is one "
                        "line): use --val-split documents or tail, or --val-data")
    train, val = join_documents(train_parts), join_documents(val_parts)
    return Split(train, val, f"held-out set: the last ~{share} of each file, cut at a line ({n_files:,} of "
                             f"{len(corpus.documents):,} files; {_bytes(val)}, {_percent(val, train)})")


def _split_documents(corpus: Corpus, val_fraction: float, share: str) -> Split:
    n = len(corpus.documents)
    sizes = [len(text.encode("utf-8")) for _, text in corpus.documents]
    order = np.random.default_rng(VAL_SPLIT_SEED).permutation(n)
    held, total, target = set(), 0, val_fraction * sum(sizes)
    for i in order:                               # (a file that would overshoot twice the share is passed over)
        if total >= target:
            break
        if total + sizes[i] <= 2 * target and len(held) < n - 1:
            held.add(int(i))
            total += sizes[i]
    if not held:
        raise DataError(f"--val-split documents: every file of {corpus.source} is more than twice the held-out "
                        f"share ({share}); use --val-split per-file")
    train = join_documents(text for i, (_, text) in enumerate(corpus.documents) if i not in held)
    val = join_documents(text for i, (_, text) in enumerate(corpus.documents) if i in held)
    names = [corpus.documents[i][0] for i in sorted(held)]
    shown = ", ".join(names[:6]) + (f", ... and {len(names) - 6} more" if len(names) > 6 else "")
    return Split(train, val, f"held-out set: {len(held):,} of {n:,} whole files drawn at random (seed "
                             f"{VAL_SPLIT_SEED}) for ~{share} of the bytes: {shown} ({_bytes(val)}, "
                             f"{_percent(val, train)})")


def _line_cut(text: str, nominal: float) -> int:
    """The line boundary of ``text`` (0, just after a newline, or len(text)) nearest ``nominal``,
    not 0: a file keeps at least its first line for training."""
    nominal = int(round(nominal))
    after = text.find("\n", max(nominal - 1, 0))
    before = text.rfind("\n", 0, max(nominal - 1, 0) + 1)
    candidates = [len(text)] + [i + 1 for i in (before, after) if i >= 0]
    return min(candidates, key=lambda c: (abs(c - nominal), -c))


def _document_at(corpus: Corpus, offset: int) -> str:
    """The name of the document that holds character ``offset`` of ``corpus.text``."""
    position = 0
    for name, text in corpus.documents:
        position += len(text) + (0 if text.endswith("\n") else 1) + 1
        if offset < position:
            return name
    return corpus.documents[-1][0]


def _bytes(text: str) -> str:
    return f"{len(text.encode('utf-8')):,} bytes"


def _percent(val: str, train: str) -> str:
    v, t = len(val.encode("utf-8")), len(train.encode("utf-8"))
    return f"{100 * v / max(v + t, 1):.1f}% of the corpus"


# ----------------------------------------------------------------------------------- tokens

def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..vocab_size-1: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _encode(tokenizer, text: str, progress=None) -> np.ndarray:
    if getattr(tokenizer, "encode_long", None) is None:
        return np.asarray(tokenizer.encode(text))
    return np.asarray(tokenizer.encode_long(text, progress=progress))


def cached_tokens(text: str, tokenizer, cache_dir: str | os.PathLike, name: str, progress=None) -> np.ndarray:
    """Token ids of ``text`` read (memory-mapped) from ``cache_dir/{name}.tokens``.

    The file is raw little-endian ``token_dtype(vocab)`` ids. Its JSON sidecar ``{name}.json`` holds
    the tokenizer fingerprint, the text's SHA-256, dtype, number of tokens and of UTF-8 bytes; when any
    of them differs from the current ones (or the file size is wrong) the text is tokenized again
    (``progress`` as ``Tokenizer.encode_long`` takes it).
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
    cached = open_cached_tokens(cache_dir, name, expected)
    if cached is not None:
        return cached

    ids = _encode(tokenizer, text, progress)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= tokenizer.vocab_size):
        raise DataError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")
    tokens = ids.astype(dtype.newbyteorder("<"), copy=False)
    meta_path.unlink(missing_ok=True)
    atomic_write_bytes(tokens_path, [memoryview(np.ascontiguousarray(tokens)).cast("B")])
    atomic_write_json(meta_path, {**expected, "n_tokens": int(tokens.size)})
    return _memmap_tokens(tokens_path, dtype, int(tokens.size))


def open_cached_tokens(cache_dir: str | os.PathLike, name: str, expected: dict) -> np.ndarray | None:
    """``cache_dir/{name}.tokens`` memory-mapped if its sidecar holds every item of ``expected``
    (format, tokenizer and text SHA-256, dtype, bytes; see ``cached_tokens``) and the file has the
    size the sidecar gives; else None."""
    cache_dir = Path(cache_dir)
    tokens_path = cache_dir / f"{name}.tokens"
    meta = token_cache_meta(cache_dir, name)
    if meta is None or any(meta.get(k) != v for k, v in expected.items()) or expected.get("dtype") not in (
            "uint16", "uint32"):
        return None
    dtype, n_tokens = np.dtype(expected["dtype"]), meta.get("n_tokens")
    if (isinstance(n_tokens, int) and n_tokens >= 0 and tokens_path.is_file()
            and tokens_path.stat().st_size == n_tokens * dtype.itemsize):
        return _memmap_tokens(tokens_path, dtype, n_tokens)
    return None


def token_cache_meta(cache_dir: str | os.PathLike, name: str) -> dict | None:
    """The sidecar ``cache_dir/{name}.json`` of a token cache, or None when missing or unreadable."""
    return _read_sidecar(Path(cache_dir) / f"{name}.json")


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
        return cls.from_texts(train_text, val_text, tokenizer, cache_dir)

    @classmethod
    def from_texts(cls, train_text: str, val_text: str, tokenizer,
                   cache_dir: str | os.PathLike | None = None, progress=None) -> "TokenDataset":
        """Tokenize a training and a held-out text (a ``Split``'s, or any two); ``cache_dir`` as in
        ``from_text``; ``progress(characters_done, characters)`` called as the texts are tokenized."""
        if progress is not None:
            total, train_chars = len(train_text) + len(val_text), len(train_text)
            progress_train = lambda done, _: progress(done, total)                # noqa: E731
            progress_val = lambda done, _: progress(train_chars + done, total)    # noqa: E731
        else:
            progress_train = progress_val = None
        if cache_dir is None:
            dtype = token_dtype(tokenizer.vocab_size)
            train = _encode(tokenizer, train_text, progress_train).astype(dtype)
            val = _encode(tokenizer, val_text, progress_val).astype(dtype)
        else:
            train = cached_tokens(train_text, tokenizer, cache_dir, "train", progress_train)
            val = cached_tokens(val_text, tokenizer, cache_dir, "val", progress_val)
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
    return windows_at(tokens, rng.integers(0, n - seq_len, size=batch_size), seq_len)


def windows_at(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The windows that start at ``starts``: ``x[b] = tokens[s_b : s_b+T]``, ``y[b] = tokens[s_b+1 :
    s_b+T+1]``, int64 (len(starts), T)."""
    windows = np.asarray(tokens[np.asarray(starts)[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
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
        return windows_at(self.tokens, self.next_starts(), self.seq_len)

    def next_starts(self) -> np.ndarray:
        """The start offsets of the next batch's windows (what ``next_batch`` cuts out): data-parallel
        ranks all draw the whole batch's starts, so the order does not depend on their number, and
        each cuts out only its own share."""
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.batches_drawn += 1
        return starts

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
