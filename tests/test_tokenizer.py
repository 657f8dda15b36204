import json
import warnings

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from npllama.data import load_text
from npllama.errors import CheckpointError, ConfigError, InputError
from npllama.tokenizer import Tokenizer, split_at_safe_cuts

VOCAB = 400


@pytest.fixture(scope="module")
def sample_text():
    return load_text()[:200_000]


@pytest.fixture(scope="module")
def tok(sample_text):
    return Tokenizer.train(sample_text, VOCAB)


# ---------------------------------------------------------------------------------- training

def test_train_vocab_layout(tok):
    assert tok.vocab_size == VOCAB == len(tok)
    # Special token first, then the 256 byte tokens, then merges.
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.eos_id == 0
    assert tok.bos_id is None
    vocab = tok.hf_tokenizer.get_vocab()
    byte_chars = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    assert len(byte_chars) == 256
    assert all(c in vocab for c in byte_chars)
    # Merges actually compress: Shakespeare text needs far fewer tokens than bytes.
    text = "To be, or not to be, that is the question:\n"
    assert len(tok.encode(text)) < 0.6 * len(text.encode())


def test_train_accepts_iterator_of_texts(sample_text):
    lines = sample_text.splitlines(keepends=True)
    t = Tokenizer.train(iter(lines), 300, special_tokens=("<s>", "</s>"))
    assert t.vocab_size == 300
    assert (t.bos_id, t.eos_id) == (0, 1)
    assert t.decode(t.encode(sample_text[:5000])) == sample_text[:5000]


def test_train_vocab_too_small_is_config_error():
    with pytest.raises(ConfigError, match="vocab_size must be an integer >= 257"):
        Tokenizer.train("hello", 256)
    with pytest.raises(ConfigError, match=">= 258"):
        Tokenizer.train("hello", 257, special_tokens=("<a>", "<b>"))
    with pytest.raises(ConfigError, match="special_tokens"):
        Tokenizer.train("hello", 300, special_tokens=("<a>", "<a>"))


def test_train_stops_early_and_reports_actual_size():
    text = "hello world hello world"
    with pytest.warns(UserWarning, match=r"stopped at vocab size (\d+) < requested 1000"):
        t = Tokenizer.train(text, 1000)
    # 1 special + 256 bytes + merges of pairs seen twice: he, ll, hell.. up to whole words.
    assert 257 < t.vocab_size < 300
    assert len(t.encode("hello")) == 1 and len(t.encode(" world")) == 1
    assert t.decode(t.encode(text)) == text


# ------------------------------------------------------------------------------ round trips

@given(st.text())
@settings(max_examples=200)
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [
    "", " ", "\n", "\n\n\n", "   leading", "trailing   ", "a\r\nb\r\n", "\t tabs \t\n",
    "naïve café — 東京 🙂🙂", "\x00\x01\x7f", "<|endoftext|>", "a<|endoftext|>b\n<|endoftext|><|endoftext|>",
    "<|endoftext", "'s 'll 've  123 4567",
])
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_is_one_id(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert list(ids).count(tok.eos_id) == 1
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    # Not matched when incomplete.
    assert tok.eos_id not in tok.encode("<|endoftext")


def test_decode_accepts_arrays_and_lists(tok):
    ids = tok.encode("hello there")
    assert tok.decode(ids.astype(np.uint16)) == tok.decode(list(ids)) == "hello there"
    assert tok.decode([]) == ""


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(InputError, match=f"token id {VOCAB} out of range"):
        tok.decode([1, VOCAB])
    with pytest.raises(InputError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(InputError, match="1-D"):
        tok.decode(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(InputError, match="integer"):
        tok.decode([1.5])
    with pytest.raises(InputError, match="str"):
        tok.encode(b"bytes")


# ------------------------------------------------------------------------------ encode_long

# Pieces chosen to probe the GPT-2 regex around newlines: runs of whitespace, \r, unicode spaces
# (\u2028, \u00a0), a character that Python but not Rust calls whitespace (\x1c), contractions,
# digits, multi-byte characters and the special token.
TRICKY_PIECES = ["a", "B", "z", " ", "  ", "\n", "\n", "\r", "\t", ".", ",", "'", "'s", "1", "é",
                 "東", "🙂", "<|endoftext|>", "\u2028", "\x1c", "\u00a0", "the", " the"]
TRICKY = st.lists(st.sampled_from(TRICKY_PIECES), max_size=300).map("".join)


@pytest.fixture(scope="module")
def tricky_tok():
    """Trained on the tricky pieces themselves, so it has merges of whitespace around newlines
    ("\n ", " \n", "\n\n", "\r\n") that make a wrong cut visible in the ids; Shakespeare-trained
    merges mostly hide it."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(TRICKY_PIECES, size=40_000))
    t = Tokenizer.train(text, 600)
    assert {"ĊĠ", "ĠĊ", "ĊĊ", "čĊ", "ĠĠ"} <= set(t.hf_tokenizer.get_vocab())
    return t


@given(TRICKY, st.integers(1, 40))
@settings(max_examples=300)
def test_encode_long_equals_encode(tricky_tok, text, chunk_chars):
    pieces = split_at_safe_cuts(text, chunk_chars)
    assert "".join(pieces) == text
    np.testing.assert_array_equal(tricky_tok.encode_long(text, chunk_chars=chunk_chars),
                                  tricky_tok.encode(text))


@given(TRICKY, st.integers(1, 40))
@settings(max_examples=100)
def test_encode_long_cuts_a_sequence_of_one_byte_level_pre_tokenizer(tricky_tok, text, chunk_chars):
    """The GGUF reader wraps GPT-2's ByteLevel in a Sequence (SmolLM2): the same words, so the same
    safe cuts; a Split before the ByteLevel (Llama-3's regex) is another pre-tokenizer: encoded whole."""
    from tokenizers import pre_tokenizers
    wrapped = tokenizers.Tokenizer.from_str(tricky_tok.hf_tokenizer.to_str())
    wrapped.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=True)])
    t = Tokenizer(wrapped)
    assert t._chunking().kind == "words"
    np.testing.assert_array_equal(t.encode_long(text, chunk_chars=chunk_chars), tricky_tok.encode(text))
    split = tokenizers.Tokenizer.from_str(tricky_tok.hf_tokenizer.to_str())
    split.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(r"\n"), "isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert Tokenizer(split)._chunking() is None   # (a regex npllama does not know: encoded whole)


def test_encode_long_cut_rule_matters():
    """Cutting at every newline would change the ids (newline+spaces is one word to the GPT-2
    regex); the safe cuts never do, whatever the chunk size."""
    # "kl \n\n" teaches the merge " \n", which a cut in "ab \n|cd" would then wrongly use.
    unit = "ab \ncd\n  ef\n\tgh.\n\n  ij\r\nkl \n\nmn\n"
    with pytest.warns(UserWarning, match="stopped at vocab size"):
        t = Tokenizer.train(unit * 200, 300)
    text = unit * 3
    whole = t.encode(text)
    naive = np.concatenate([t.encode(line) for line in text.splitlines(keepends=True)])
    assert "ĠĊ" in t.hf_tokenizer.get_vocab() and len(naive) != len(whole)
    for chunk_chars in range(1, 2 * len(unit)):
        np.testing.assert_array_equal(t.encode_long(text, chunk_chars=chunk_chars), whole)


@pytest.mark.parametrize("ending", ["\n", "\r\n", " "])
def test_a_corpus_is_cut_into_bounded_chunks_whatever_its_line_endings(tok, sample_text, ending):
    """CRLF line endings (a newline beside a CR was never a cut) and a corpus on one line (no
    newline at all) were encoded whole: a 31 MB CRLF corpus peaked at 6 GB, a 75 MB line aborted."""
    text = "\n".join(sample_text.splitlines()).replace("\n", ending)
    pieces = split_at_safe_cuts(text, 1000, ["<|endoftext|>"])
    assert "".join(pieces) == text
    assert len(pieces) >= len(text) // 1100 and max(len(p) for p in pieces) < 1100
    np.testing.assert_array_equal(tok.encode_long(text, chunk_chars=1000), tok.encode(text))


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def split_regex_tok(tricky_tok, request):
    """tricky_tok's vocabulary behind the pre-tokenizer the GGUF reader builds for Llama-3 / Qwen2."""
    from npllama.formats.gguf_tokenizer import PRE_TOKENIZERS
    from tokenizers import pre_tokenizers
    hf = tokenizers.Tokenizer.from_str(tricky_tok.hf_tokenizer.to_str())
    hf.pre_tokenizer = pre_tokenizers.Sequence(PRE_TOKENIZERS[request.param])
    return Tokenizer(hf)


LETTER_TEXT = st.lists(st.sampled_from(TRICKY_PIECES + ["ab", " cd", "\nef", "東京", "\n東", "  x", "x\r\n", "'S", "123"]),
                       max_size=300).map("".join)


@given(LETTER_TEXT, st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_encode_long_cuts_llama3_and_qwen2_style_text_to_the_same_ids(split_regex_tok, text, chunk_chars):
    """(was: encoded whole: a Split regex before the ByteLevel)"""
    assert split_regex_tok._chunking().kind == "letters"
    np.testing.assert_array_equal(split_regex_tok.encode_long(text, chunk_chars=chunk_chars),
                                  split_regex_tok.encode(text))

# SentencePiece-style tokenizers see a whole stretch of text as one word (Metaspace without split, or
# Llama-2's Prepend + Replace normalizer): merges across "▁", a stray "▁" in the text, unknown
# characters, special tokens.
SP_PIECES = ["a", "b", "c", "ab", "ba", " ", "  ", "\n", "\t", "\r\n", ".", "the", " the", " cab", "é", "東",
             "\u2581", "</s>", "<s>"]
SP_TEXT = st.lists(st.sampled_from(SP_PIECES), max_size=300).map("".join)


def sentencepiece_style(kind: str, prepend: str = "first", split: bool = False) -> Tokenizer:
    """A BPE trained on SP_PIECES text as one word per line: merges across spaces ("b▁c", "▁▁t")."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=kind == "gguf"))
    if kind == "metaspace":
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend, split=split)
        hf.decoder = decoders.Metaspace(prepend_scheme=prepend, split=split)
    else:   # Llama-2's tokenizer.json before Metaspace's prepend_scheme
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    rng = np.random.default_rng(1)
    lines = ["".join(rng.choice(SP_PIECES[:15], size=60)) for _ in range(400)]
    hf.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    return Tokenizer(hf)


SP_KINDS = [("metaspace", "first", False), ("metaspace", "always", False), ("metaspace", "never", False),
            ("metaspace", "first", True), ("metaspace", "always", True), ("legacy", None, None)]


@pytest.fixture(scope="module", params=SP_KINDS, ids=lambda k: "-".join(str(x) for x in k if x is not None))
def sp_tok(request):
    t = sentencepiece_style(*request.param)
    if not request.param[2]:   # (tokens across a space, which a wrong cut would show; split: none)
        assert any("\u2581" in v[1:-1] for v in t.hf_tokenizer.get_vocab())
    return t


@given(SP_TEXT, st.integers(1, 40))
@settings(max_examples=150, deadline=None)
def test_encode_long_cuts_sentencepiece_style_text_to_the_same_ids(sp_tok, text, chunk_chars):
    """(was: encoded whole, the corpus one word of BPE however long it is)"""
    assert sp_tok._chunking().kind == "pairs"
    seen = []
    ids = sp_tok.encode_long(text, chunk_chars=chunk_chars, progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(ids, sp_tok.encode(text))
    assert seen[-1] == (len(text), len(text))


def test_encode_long_cuts_a_long_sentencepiece_text_into_chunks(sample_text):
    t = sentencepiece_style("metaspace")
    pieces = t._chunking().split(sample_text, 1000)
    assert "".join(pieces) == sample_text and len(pieces) >= len(sample_text) // 1100
    np.testing.assert_array_equal(t.encode_long(sample_text, chunk_chars=1000), t.encode(sample_text))


def test_a_sentencepiece_text_nowhere_to_cut_is_refused(monkeypatch):
    from npllama.errors import DataError
    monkeypatch.setattr("npllama.tokenizer.MAX_UNCUT_CHARS", 500)
    t = sentencepiece_style("metaspace")
    assert "ab" in t._chunking().inside
    with pytest.raises(DataError, match="more than 500 characters from character 100 on without a place"):
        t.encode_long("ab" * 400, chunk_chars=100)
    np.testing.assert_array_equal(t.encode_long("ab" * 200 + " c", chunk_chars=100), t.encode("ab" * 200 + " c"))


def test_encode_long_on_corpus_cuts_and_matches(tok, sample_text):
    pieces = split_at_safe_cuts(sample_text, 5000)
    assert len(pieces) > 30  # it really cut
    assert all(p[0] in " \t\n\r" for p in pieces[1:])
    np.testing.assert_array_equal(tok.encode_long(sample_text, chunk_chars=5000), tok.encode(sample_text))


# ---------------------------------------------------------------------------------- save/load

def test_save_and_load_round_trip(tok, tmp_path, sample_text):
    path = tok.save(tmp_path / "tokenizer.json")
    assert path == tmp_path / "tokenizer.json"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
    assert loaded.fingerprint == tok.fingerprint
    text = sample_text[:3000] + "🙂 <|endoftext|>"
    np.testing.assert_array_equal(loaded.encode(text), tok.encode(text))
    # A directory works too, both ways.
    d = tmp_path / "ckpt"
    d.mkdir()
    assert tok.save(d) == d / "tokenizer.json"
    assert Tokenizer.from_file(d).fingerprint == tok.fingerprint


def test_save_replaces_existing_file(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("old")
    tok.save(path)
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_fingerprint_differs_between_tokenizers(tok, sample_text):
    other = Tokenizer.train(sample_text, VOCAB + 10)
    assert other.fingerprint != tok.fingerprint
    assert len(tok.fingerprint) == 64


def test_from_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(CheckpointError, match="not found.*nope"):
        Tokenizer.from_file(missing)
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.from_file(tmp_path)  # directory without tokenizer.json
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"model": ')
    with pytest.raises(CheckpointError, match="bad.json.*not a valid tokenizer.json"):
        Tokenizer.from_file(bad_json)
    not_tok = tmp_path / "other.json"
    not_tok.write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="other.json.*not a valid tokenizer.json"):
        Tokenizer.from_file(not_tok)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(CheckpointError, match="bin.json"):
        Tokenizer.from_file(binary)


def test_tokenizer_config_chooses_eos_and_bos(sample_text, tmp_path):
    t = Tokenizer.train(sample_text[:20000], 300, special_tokens=("<s>", "</s>", "<|eot|>"))
    assert (t.bos_id, t.eos_id) == (0, 1)
    t.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|eot|>", "special": True}, "bos_token": "<s>"}))
    loaded = Tokenizer.from_file(tmp_path)
    assert (loaded.bos_id, loaded.eos_id) == (0, 2)


def test_wraps_foreign_tokenizer_json(tmp_path):
    """A SentencePiece-style (Metaspace) tokenizer, as in Llama-2 checkpoints, is wrapped as is."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    hf.train_from_iterator(["the cat sat on the mat\nthe dog sat on the log\n"] * 20, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (t.bos_id, t.eos_id) == (1, 2)
    text = "the cat sat on the log"
    assert t.decode(t.encode(text)) == text
    long_text = "the cat sat\non the mat\n" * 10
    # (cut between characters no token holds together, each piece after the first without a ▁ before it)
    assert t._chunking().kind == "pairs"
    np.testing.assert_array_equal(t.encode_long(long_text, chunk_chars=8), t.encode(long_text))


# ------------------------------------------------------------------------------ transformers

def test_transformers_fast_tokenizer_loads_and_matches(tok, tmp_path, sample_text):
    transformers = pytest.importorskip("transformers")
    path = tok.save(tmp_path / "tokenizer.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in (sample_text[:2000], "naïve café 🙂\n\n  x", "a<|endoftext|>b"):
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text).tolist()
        assert fast.decode(ids) == tok.decode(ids) == text
    assert len(fast) == tok.vocab_size


def test_a_text_with_nowhere_to_cut_is_refused_not_encoded_whole(tok):
    """Megabytes without whitespace are one word to the pre-tokenizer (BPE on it: gigabytes)."""
    from npllama.errors import DataError
    from npllama.tokenizer import MAX_UNCUT_CHARS
    text = "the start\n" + "x" * (MAX_UNCUT_CHARS + 70_000)
    with pytest.raises(DataError, match=r"characters from character 65,536 on without a place to cut"):
        tok.encode_long(text)
    assert len(split_at_safe_cuts("a b\n" * 10 + "x" * 1000, 8)) > 1   # (a long word below the limit: kept whole)


def test_a_corpus_being_tokenized_reports_its_progress(tok, sample_text, monkeypatch, capsys):
    from npllama.data import TokenDataset
    from npllama.train import progress
    seen = []
    data = TokenDataset.from_texts(sample_text[:150_000], sample_text[150_000:], tok,
                                   progress=lambda done, total: seen.append((done, total)))
    assert len(seen) >= 2 and all(total == len(sample_text) for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and seen[-1][0] == len(sample_text)
    np.testing.assert_array_equal(data.train_tokens, tok.encode(sample_text[:150_000]))
    # what `npllama train` shows of it: a line every TOKENIZING_EVERY seconds, none at the end
    monkeypatch.setattr(progress, "TOKENIZING_EVERY", 0.0)
    report = progress.tokenizing_progress(True)
    report(250, 1000)
    report(1000, 1000)
    assert capsys.readouterr().err == "tokenizing: 25% of 1,000 characters, 0s\n"
    assert progress.tokenizing_progress(False) is None
