import gzip
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllama.data import (DEFAULT_VAL_FRACTION, IGNORE_INDEX, BatchSampler, TokenDataset, bits_per_byte, cached_tokens,
                          count_eval_targets, get_batch, iter_eval_batches, load_corpus, load_text, split_corpus,
                          split_train_val, VAL_SPLITS,
                          token_dtype)
from npllama.errors import CheckpointError, ConfigError, DataError, NpllamaError
from npllama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus():
    return load_text()


@pytest.fixture(scope="module")
def small_text(corpus):
    return corpus[:60_000]


@pytest.fixture(scope="module")
def tok(small_text):
    return Tokenizer.train(small_text, 300)


class CountingTokenizer:
    """Duck-typed tokenizer that records how often it is asked to encode."""

    def __init__(self, inner, vocab_size=None, fingerprint=None):
        self.inner = inner
        self.vocab_size = vocab_size or inner.vocab_size
        self.fingerprint = fingerprint or inner.fingerprint
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)


# ---------------------------------------------------------------------------------- load_text

def test_bundled_corpus(corpus):
    assert isinstance(corpus, str)
    assert len(corpus) == 5_057_321
    assert corpus.startswith("ALL'S WELL THAT ENDS WELL")
    assert corpus.isascii()


def test_load_text_file_utf8_and_bom(tmp_path):
    text = "naïve café\n東京 🙂\r\n  spaces  \n"
    p = tmp_path / "a.txt"
    p.write_text(text, encoding="utf-8")
    assert load_text(p) == text
    assert load_text(str(p)) == text
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())  # byte-order mark is dropped
    assert load_text(p) == text
    gz = tmp_path / "b.txt.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    assert load_text(gz) == text


def test_load_text_folder_sorted_and_joined(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first")          # no final newline: one is added
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third\n\n")  # its own trailing blank line is kept
    (tmp_path / "notes.md").write_text("markdown")    # a text suffix too
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "model.bin").write_bytes(b"\x00\x01")  # not a text suffix: not even opened
    assert load_text(tmp_path) == "first\n\nsecond\n\nmarkdown\n\nthird\n\n"
    assert load_text(tmp_path, include="*.txt") == "first\n\nsecond\n\nthird\n\n"


def test_load_corpus_takes_source_files_skips_binaries_and_says_so(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("def f(x):\n    return x\n")
    (tmp_path / "pkg" / "mod.cpython-311.pyc").write_bytes(b"\x00\x0d\x0d\x0a")
    (tmp_path / "run.sh").write_text("echo hi\n")
    (tmp_path / "Makefile").write_text("all:\n")
    (tmp_path / "image.svg").write_bytes(b"\x89PNG\x00")  # a text suffix holding a binary: skipped
    (tmp_path / "latin1.c").write_bytes("/* café */".encode("latin-1"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.toml").write_text("hidden folders are never read\n")
    (tmp_path / ".hidden.py").write_text("nor hidden files\n")
    corpus = load_corpus(tmp_path)
    assert [name for name, _ in corpus.documents] == ["pkg/mod.py", "run.sh"]
    assert corpus.skipped == (("image.svg", "binary"), ("latin1.c", "not UTF-8"))
    assert dict(corpus.unmatched) == {".pyc": 1, "": 1}
    log = corpus.describe()
    assert "2 files, 31 bytes: pkg/mod.py (23 B), run.sh (8 B)" in log
    assert "2 skipped as not text: image.svg (binary), latin1.c (not UTF-8)" in log
    assert "2 not matching the file patterns ((no suffix) 1, .pyc 1)" in log
    # --include: patterns matched from the right of the relative path, comma-separated
    assert [n for n, _ in load_corpus(tmp_path, include="Makefile, pkg/*.py").documents] == ["Makefile", "pkg/mod.py"]
    with pytest.raises(DataError, match=r"no text files in directory .*--include \*.rs.*--include '\*.py,\*.md'"):
        load_corpus(tmp_path, include="*.rs")
    with pytest.raises(ConfigError, match="--include must name"):
        load_corpus(tmp_path, include=" , ")
    assert load_corpus(tmp_path / "run.sh").describe() == f"corpus: file {tmp_path / 'run.sh'}, 8 bytes"


def test_load_text_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*missing.txt"):
        load_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.*empty.txt"):
        load_text(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n\t")
    with pytest.raises(DataError, match="empty"):
        load_text(blank)
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DataError, match="weights.txt.*binary"):
        load_text(binary)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8.*0xe9 at offset 3"):
        load_text(latin1)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.png").write_text("not text by its name")
    (folder / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="no text files in directory.*folder.*1 matching files are not text"):
        load_text(folder)
    assert issubclass(DataError, NpllamaError) and issubclass(DataError, ValueError)


# -------------------------------------------------------------------------------------- split

def test_split_bundled_corpus(corpus):
    train, val = split_train_val(corpus)
    assert train + val == corpus
    assert train.endswith("\n")
    f = DEFAULT_VAL_FRACTION
    assert f - 0.001 < len(val) / len(corpus) < f + 0.001
    # The cut is the first newline at or after the nominal (1 - f) point.
    nominal = len(corpus) - round(f * len(corpus))
    assert "\n" not in corpus[nominal - 1:len(train) - 1]


@given(st.text(alphabet="ab\n ", min_size=2, max_size=200), st.floats(0.01, 0.99))
def test_split_properties(text, fraction):
    train, val = split_train_val(text, fraction)
    assert train + val == text
    assert train and val
    v = max(1, round(fraction * len(text)))
    nominal = len(text) - min(v, len(text) - 1)
    # Val grows by at most v (the look-back limit), so it is at most about twice the nominal size.
    assert len(val) <= 2 * v + 1
    if "\n" in text[nominal - 1:len(text) - 1]:
        assert train.endswith("\n") and len(train) >= nominal


def test_split_errors():
    with pytest.raises(ConfigError, match="val_fraction"):
        split_train_val("abc\ndef", 0.0)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_train_val("abc\ndef", 1.0)
    with pytest.raises(DataError, match="too short"):
        split_train_val("a")
    assert split_train_val("ab") == ("a", "b")


def _six_languages(tmp_path):
    """A folder of six 'languages' of different sizes (letters standing for scripts), sorted so that
    the last 5 % of the joined text is all the last language."""
    folder = tmp_path / "langs"
    folder.mkdir()
    for i, lang in enumerate("abcdef"):
        lines = [f"{lang * (3 + (k % 7))} {k}" for k in range(200 + 150 * i)]
        (folder / f"{lang}.txt").write_text("\n".join(lines) + "\n")
    return load_corpus(folder)


def test_held_out_tail_of_the_text_is_one_language_per_file_is_all(tmp_path):
    corpus = _six_languages(tmp_path)
    tail = split_corpus(corpus, 0.05, "tail")
    assert (tail.train_text, tail.val_text) == split_train_val(corpus.text, 0.05)
    assert set(tail.val_text) <= set("f 0123456789\n")           # the issue: one language only
    assert "the last 5% of the text, from f.txt on" in tail.description

    split = split_corpus(corpus, 0.05, "per-file")
    val_bytes, total = len(split.val_text.encode()), len(corpus.text.encode())
    assert 0.045 < val_bytes / total < 0.055
    for lang, text in corpus.documents:                          # each file: its last lines, roughly 5 %
        held = [line for line in split.val_text.splitlines() if line.startswith(lang[0] * 3)]
        assert held and "\n".join(held) + "\n" in text and text.endswith("\n".join(held) + "\n")
        assert 0.02 < len("\n".join(held)) / len(text) < 0.09
    # nothing lost, nothing twice: the lines of train and val together are the corpus's lines
    lines = lambda t: sorted(line for line in t.split("\n") if line)
    assert lines(split.train_text + "\n" + split.val_text) == lines(corpus.text)
    assert "the last ~5% of each file, cut at a line (6 of 6 files" in split.description
    assert "5.0% of the corpus" in split.description


def test_held_out_whole_documents_drawn_with_the_fixed_seed(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.md").write_text(f"# doc {i}\n" + "words " * (50 + 7 * i) + "\n")
    corpus = load_corpus(folder)
    split = split_corpus(corpus, 0.1, "documents")
    assert split == split_corpus(corpus, 0.1, "documents")       # the same files every time
    held = [text for _, text in corpus.documents if text in split.val_text]
    assert 2 <= len(held) < 40
    assert all(text not in split.train_text for text in held)
    docs = lambda t: [d.strip() for d in t.split("\n\n")]
    assert sorted(docs(split.train_text) + docs(split.val_text)) == sorted(docs(corpus.text))
    share = len(split.val_text) / len(corpus.text)
    assert 0.1 <= share < 0.2
    assert f"{len(held)} of 40 whole files drawn at random (seed 0)" in split.description
    one = load_corpus(folder / "doc00.md")
    assert split_corpus(one, 0.1, "documents").val_text == split_train_val(one.text, 0.1)[1]  # one file: its tail


def test_held_out_val_data_and_errors(tmp_path):
    corpus = _six_languages(tmp_path)
    (tmp_path / "val.txt").write_text("held out\n")
    split = split_corpus(corpus, 0.05, "per-file", val_corpus=load_corpus(tmp_path / "val.txt"))
    assert split.train_text == corpus.text and split.val_text == "held out\n"
    assert split.description == f"held-out set: file {tmp_path / 'val.txt'} (9 bytes), given by --val-data; " \
                                f"all of {corpus.source} trains"
    assert split.digest != split_corpus(corpus).digest
    with pytest.raises(ConfigError, match="--val-split must be one of per-file, documents, tail"):
        split_corpus(corpus, 0.05, "random")
    (tmp_path / "one_line").mkdir()
    for name in "xy":
        (tmp_path / "one_line" / f"{name}.txt").write_text("a single line")
    with pytest.raises(DataError, match="no file .* with lines to hold out"):
        split_corpus(load_corpus(tmp_path / "one_line"), 0.05, "per-file")
    assert VAL_SPLITS[0] == "per-file"


def test_dataset_from_a_split(tok, tmp_path):
    corpus = _six_languages(tmp_path)
    split = split_corpus(corpus)
    data = TokenDataset.from_texts(split.train_text, split.val_text, tok)
    assert tok.decode(data.train_tokens) == split.train_text and tok.decode(data.val_tokens) == split.val_text
    assert data.val_bytes == len(split.val_text.encode())


# ---------------------------------------------------------------------------------- datasets

def test_token_dtype():
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_dataset_in_memory(tok, small_text):
    data = TokenDataset.from_text(small_text, tok)
    train_text, val_text = split_train_val(small_text)
    assert data.train_tokens.dtype == np.uint16 and data.val_tokens.dtype == np.uint16
    assert tok.decode(data.train_tokens) == train_text
    assert tok.decode(data.val_tokens) == val_text
    assert data.train_bytes == len(train_text.encode()) and data.val_bytes == len(val_text.encode())
    assert data.vocab_size == tok.vocab_size
    assert data.eval_context_token == int(data.train_tokens[-1])


def test_dataset_cache_written_and_reused(tok, small_text, tmp_path):
    counting = CountingTokenizer(tok)
    data = TokenDataset.from_text(small_text, counting, cache_dir=tmp_path)
    assert counting.calls == 2
    assert isinstance(data.train_tokens, np.memmap) and isinstance(data.val_tokens, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.json", "train.tokens", "val.json", "val.tokens"]
    meta = json.loads((tmp_path / "val.json").read_text())
    _, val_text = split_train_val(small_text)
    assert meta["dtype"] == "uint16"
    assert meta["n_tokens"] == len(data.val_tokens) == len(tok.encode(val_text))
    assert meta["n_bytes"] == data.val_bytes == len(val_text.encode())
    assert meta["tokenizer_sha256"] == tok.fingerprint
    assert (tmp_path / "val.tokens").stat().st_size == 2 * meta["n_tokens"]
    np.testing.assert_array_equal(data.val_tokens, tok.encode(val_text))

    again = TokenDataset.from_text(small_text, counting, cache_dir=tmp_path)
    assert counting.calls == 2  # read from the cache, not tokenized again
    np.testing.assert_array_equal(again.train_tokens, data.train_tokens)
    assert again.val_bytes == data.val_bytes


def test_cache_invalidated_by_text_and_tokenizer(tok, small_text, tmp_path):
    counting = CountingTokenizer(tok)
    first = cached_tokens(small_text[:5000], counting, tmp_path, "train")
    assert counting.calls == 1
    changed = small_text[:4999] + "!"
    second = cached_tokens(changed, counting, tmp_path, "train")
    assert counting.calls == 2
    assert tok.decode(second) == changed and tok.decode(first) != changed

    other_tok = Tokenizer.train(small_text, 280)
    third = cached_tokens(changed, other_tok, tmp_path, "train")
    np.testing.assert_array_equal(third, other_tok.encode(changed))
    assert json.loads((tmp_path / "train.json").read_text())["tokenizer_sha256"] == other_tok.fingerprint


def test_cache_rebuilt_when_damaged(tok, small_text, tmp_path):
    counting = CountingTokenizer(tok)
    text = small_text[:3000]
    expected = tok.encode(text)
    cached_tokens(text, counting, tmp_path, "val")
    tokens_path = tmp_path / "val.tokens"
    tokens_path.write_bytes(tokens_path.read_bytes()[:-2])  # truncated
    np.testing.assert_array_equal(cached_tokens(text, counting, tmp_path, "val"), expected)
    assert counting.calls == 2
    (tmp_path / "val.json").unlink()  # sidecar lost (e.g. crash between the two writes)
    np.testing.assert_array_equal(cached_tokens(text, counting, tmp_path, "val"), expected)
    assert counting.calls == 3
    (tmp_path / "val.json").write_text("{not json")
    np.testing.assert_array_equal(cached_tokens(text, counting, tmp_path, "val"), expected)
    assert counting.calls == 4
    cached_tokens(text, counting, tmp_path, "val")
    assert counting.calls == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cache_uint32_for_big_vocab(tok, tmp_path):
    big = CountingTokenizer(tok, vocab_size=70_000, fingerprint="f" * 64)
    tokens = cached_tokens("hello world\n", big, tmp_path, "train")
    assert tokens.dtype == np.uint32
    assert json.loads((tmp_path / "train.json").read_text())["dtype"] == "uint32"
    np.testing.assert_array_equal(tokens, tok.encode("hello world\n"))


# ----------------------------------------------------------------------------------- batches

def test_get_batch_shift_by_one_and_bounds():
    n, T, B = 50, 8, 16
    tokens = np.arange(n, dtype=np.uint16)  # token value == its position
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(40):
        x, y = get_batch(tokens, B, T, rng)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(T))  # contiguous windows
        np.testing.assert_array_equal(y, x + 1)                    # targets shifted by one
        starts.update(x[:, 0].tolist())
    assert starts == set(range(n - T))  # every fitting window is drawn, none past the end


def test_get_batch_uses_real_token_values(tok, small_text):
    tokens = tok.encode(small_text[:5000]).astype(np.uint16)
    x, y = get_batch(tokens, 4, 16, np.random.default_rng(3))
    for row_x, row_y in zip(x, y):
        s = next(i for i in range(len(tokens) - 16)
                 if np.array_equal(tokens[i:i + 16], row_x) and np.array_equal(tokens[i + 1:i + 17], row_y))
        assert s >= 0


def test_get_batch_smallest_stream():
    tokens = np.array([5, 6, 7], dtype=np.uint16)
    x, y = get_batch(tokens, 3, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(x, [[5, 6]] * 3)
    np.testing.assert_array_equal(y, [[6, 7]] * 3)
    with pytest.raises(DataError, match="corpus smaller than one context window.*3 tokens.*4"):
        get_batch(tokens, 1, 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="seq_len"):
        get_batch(tokens, 1, 0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="batch_size"):
        get_batch(tokens, -1, 1, np.random.default_rng(0))


def test_get_batch_reproducible_by_seed():
    tokens = np.arange(1000, dtype=np.uint16)
    a = get_batch(tokens, 4, 10, np.random.default_rng(7))
    b = get_batch(tokens, 4, 10, np.random.default_rng(7))
    c = get_batch(tokens, 4, 10, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_sampler_reproducible_and_restorable():
    tokens = np.arange(10_000, dtype=np.uint16)
    s1 = BatchSampler(tokens, 4, 32, seed=11)
    s2 = BatchSampler(tokens, 4, 32, seed=np.int64(11))  # NumPy seed: state must still be JSON
    for _ in range(3):
        np.testing.assert_array_equal(s1.next_batch()[0], s2.next_batch()[0])
    state = json.loads(json.dumps(s1.state_dict()))  # JSON round trip, no pickle
    assert json.loads(json.dumps(s2.state_dict())) == state
    assert state["batches_drawn"] == 3
    expected = [s1.next_batch() for _ in range(5)]

    resumed = BatchSampler(tokens, 4, 32, seed=999)  # seed is irrelevant once state is loaded
    resumed.load_state_dict(state)
    assert resumed.batches_drawn == 3
    for (ex, ey), (rx, ry) in zip(expected, [next(resumed) for _ in range(5)]):
        np.testing.assert_array_equal(ex, rx)
        np.testing.assert_array_equal(ey, ry)
    assert resumed.batches_drawn == 8
    # A fresh sampler (not restored) draws something else.
    assert not np.array_equal(BatchSampler(tokens, 4, 32, seed=999).next_batch()[0], expected[0][0])


def test_sampler_state_errors():
    tokens = np.arange(500, dtype=np.uint16)
    state = BatchSampler(tokens, 4, 32, seed=1).state_dict()
    with pytest.raises(CheckpointError, match="batch_size=4.*batch_size=8"):
        BatchSampler(tokens, 8, 32).load_state_dict(state)
    with pytest.raises(CheckpointError, match="n_tokens"):
        BatchSampler(tokens[:400], 4, 32).load_state_dict(state)
    with pytest.raises(CheckpointError, match="state_dict"):
        BatchSampler(tokens, 4, 32).load_state_dict({"seed": 1})
    broken = dict(state, bit_generator_state={"bit_generator": "PCG64", "state": "garbage"})
    with pytest.raises(CheckpointError, match="invalid random generator state"):
        BatchSampler(tokens, 4, 32).load_state_dict(broken)
    with pytest.raises(DataError, match="smaller than one context window"):
        BatchSampler(tokens[:32], 1, 32)


# -------------------------------------------------------------------------------------- eval

def _collect(tokens, B, T, context_token=None):
    xs, ys = [], []
    for x, y in iter_eval_batches(tokens, B, T, context_token=context_token):
        assert x.dtype == y.dtype == np.int64 and x.shape == y.shape
        assert x.shape[1] == T and 1 <= x.shape[0] <= B
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


@given(st.integers(1, 80), st.integers(1, 5), st.integers(1, 9), st.booleans())
@settings(max_examples=100)
def test_eval_windows_cover_each_token_once(n, B, T, with_context):
    tokens = np.arange(1, n + 1, dtype=np.uint16)  # distinct values, none equal to 0 (the context)
    context = 0 if with_context else None
    if count_eval_targets(n, with_context) == 0:
        with pytest.raises(DataError, match="no token to predict"):
            list(iter_eval_batches(tokens, B, T, context_token=context))
        return
    x, y = _collect(tokens, B, T, context)
    stream = np.concatenate([[0], tokens]) if with_context else tokens.astype(np.int64)
    real = y != IGNORE_INDEX
    # Row-major order of the real targets is exactly the stream minus its first token: every
    # target once, windows non-overlapping and in order.
    np.testing.assert_array_equal(y[real], stream[1:])
    np.testing.assert_array_equal(x[real], stream[:-1])  # each input is its target's predecessor
    assert real.sum() == count_eval_targets(n, with_context)
    # Padding only at the end of the very last row.
    flat = real.ravel()
    assert flat[:real.sum()].all() and not flat[real.sum():].any()
    assert len(x) == math.ceil(real.sum() / T)


def test_eval_batches_deterministic_and_on_dataset(tok, small_text):
    data = TokenDataset.from_text(small_text, tok)
    a = list(data.iter_val_batches(3, 64))
    b = list(data.iter_val_batches(3, 64))
    assert len(a) == len(b) == math.ceil(math.ceil(len(data.val_tokens) / 64) / 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    x0, y0 = a[0]
    assert x0[0, 0] == data.train_tokens[-1]  # context token from the end of train
    assert y0[0, 0] == data.val_tokens[0]
    ys = np.concatenate([y for _, y in a])
    np.testing.assert_array_equal(ys[ys != IGNORE_INDEX], data.val_tokens)


def test_bits_per_byte_of_uniform_model(tok, small_text):
    """A model that predicts uniformly over V tokens pays ln V nats per target: then
    bpb = n_val_tokens * log2(V) / val_bytes, computed here from per-batch mean losses."""
    data = TokenDataset.from_text(small_text, tok)
    V = data.vocab_size
    total_nats = 0.0
    for x, y in data.iter_val_batches(4, 50):
        n_real = int((y != IGNORE_INDEX).sum())
        mean_loss = math.log(V)  # what loss_and_grad would return for uniform logits
        total_nats += mean_loss * n_real
    bpb = bits_per_byte(total_nats, data.val_bytes)
    assert bpb == pytest.approx(len(data.val_tokens) * math.log2(V) / data.val_bytes, rel=1e-12)
    assert bits_per_byte(8 * math.log(2), 1) == pytest.approx(8.0)
    with pytest.raises(DataError, match="positive byte count"):
        bits_per_byte(1.0, 0)
