"""The machine-wide corpus cache (npllama/train/corpus_cache.py): a later run on the same text and
settings takes the tokenizer and the tokens made by an earlier one, identical to making them again;
a damaged entry is made again; NPLLAMA_CORPUS_CACHE=0 switches it off."""
import numpy as np
import pytest

from npllama.data import load_text
from npllama.train import TrainConfig, read_metrics, train
from npllama.train.run import TOKENS_DIR
from npllama.train.corpus_cache import TOKEN_FILES


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(load_text(None)[:20000], encoding="utf-8")
    return path


def run(text_file, out_dir, **overrides):
    values = dict(data=str(text_file), preset="tiny", dim=32, n_layers=1, n_heads=2, vocab_size=300, seq_len=16,
                  batch_size=4, steps=2, warmup_steps=1, eval_interval=0, final_eval_tokens=200, sample_tokens=0,
                  checkpoint_interval=0, out_dir=str(out_dir))
    values.update(overrides)
    train(TrainConfig(**values), progress=False, verbose=True)
    return out_dir


def made(out_dir):
    return ((out_dir / "tokenizer.json").read_text(encoding="utf-8"),
            [np.fromfile(out_dir / TOKENS_DIR / f"{name}.tokens", dtype="<u2") for name in ("train", "val")],
            [r["loss"] for r in read_metrics(out_dir) if "loss" in r])


def printed(capsys):
    out = capsys.readouterr()
    return out.out + out.err


def test_a_later_run_takes_the_cached_tokenizer_and_tokens(text_file, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NPLLAMA_CORPUS_CACHE", "0")
    reference = made(run(text_file, tmp_path / "uncached"))

    monkeypatch.setenv("NPLLAMA_CORPUS_CACHE", str(cache))
    capsys.readouterr()
    first = made(run(text_file, tmp_path / "first"))
    out = printed(capsys)
    assert "trained a byte-level BPE tokenizer" in out and "tokenized in" in out
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == sorted(("tokenizer.json",) + TOKEN_FILES)

    second = made(run(text_file, tmp_path / "second"))
    out = printed(capsys)
    assert "trained on this text by an earlier run, read from" in out and "read from the cache in" in out
    for got in (first, second):
        assert got[0] == reference[0]
        for a, b in zip(got[1], reference[1]):
            np.testing.assert_array_equal(a, b)
        assert got[2] == reference[2]        # the same training, step for step

    # another vocabulary size or held-out fraction is another entry
    run(text_file, tmp_path / "third", vocab_size=280)
    assert len(list(cache.iterdir())) == 2


def test_a_damaged_entry_is_made_again(text_file, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NPLLAMA_CORPUS_CACHE", str(cache))
    reference = made(run(text_file, tmp_path / "first"))
    (entry,) = cache.iterdir()
    (entry / "tokenizer.json").write_text("{not json", encoding="utf-8")
    tokens = entry / "train.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-2])           # one token short: its sidecar no longer matches
    capsys.readouterr()
    again = made(run(text_file, tmp_path / "again"))
    out = printed(capsys)
    assert "trained a byte-level BPE tokenizer" in out and "tokenized in" in out
    assert again[0] == reference[0]
    for a, b in zip(again[1], reference[1]):
        np.testing.assert_array_equal(a, b)
    run(text_file, tmp_path / "third")                     # and the entry is whole again
    assert "read from the cache in" in printed(capsys)


def test_switched_off_writes_nothing(text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("NPLLAMA_CORPUS_CACHE", "0")
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "home-cache"))
    run(text_file, tmp_path / "run")
    assert not (tmp_path / "home-cache").exists()
