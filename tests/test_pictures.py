"""The docs' pictures are drawn by code (npllama/pictures.py, docs/figures/make_figures.py) and so
cannot rot: CI draws them all (matplotlib is in the [test] extra; outside CI the drawing tests skip
without it), the numbers they show are checked here, and `npllama inspect` draws a model's attention."""
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama import cli
from npllama.errors import InputError
from npllama.pictures import attention_patterns, draw_gqa, head_summary

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def needs_matplotlib():
    if os.environ.get("CI"):      # CI installs it: a missing matplotlib there is a failure, not a skip
        import matplotlib  # noqa: F401
    else:
        pytest.importorskip("matplotlib")


def tiny_model_with_tokenizer(tmp_path):
    from npllama.tokenizer import Tokenizer
    text = npllama.data.load_text(None)[:20000]
    tokenizer = Tokenizer.train(text, vocab_size=280)
    cfg = npllama.LlamaConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=2, n_heads=4, n_kv_heads=2,
                              hidden_dim=32, max_seq_len=32)
    model = npllama.Llama(cfg, seed=0, dtype=np.float32)
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model


def test_attention_patterns_are_causal_softmax_rows():
    cfg = npllama.LlamaConfig(vocab_size=11, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=16, max_seq_len=8)
    model = npllama.Llama(cfg, seed=1, dtype=np.float64)
    probs = attention_patterns(model.params, cfg, [3, 1, 4, 1, 5, 9])
    assert probs.shape == (2, 4, 6, 6)
    assert np.all(probs[:, :, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0)   # causal
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-14)
    assert probs[0, 0, 0, 0] == 1.0                       # the first position sees only itself
    # query heads sharing a key/value head still attend differently (their queries differ)
    assert not np.allclose(probs[0, 0], probs[0, 1])


def test_head_summary_reads_the_patterns():
    T = 6
    identity = np.eye(T)[None, None]
    previous = np.eye(T, k=-1)[None, None].copy()
    previous[0, 0, 0, 0] = 1.0
    first = np.zeros((1, 1, T, T))
    first[..., 0] = 1.0
    (me,), (prev,), (sink,) = head_summary(identity), head_summary(previous), head_summary(first)
    assert me["self"] == 1 and me["previous"] == 0 and me["distance"] == 0
    assert prev["previous"] == 1 and prev["self"] == 0 and prev["distance"] == 1
    assert sink["first"] == 1 and sink["distance"] == pytest.approx(np.mean(np.arange(1, T)))


def test_make_figures_draws_every_picture_the_docs_show(tmp_path):
    needs_matplotlib()
    sys.path.insert(0, str(FIGURES))
    try:
        import make_figures
    finally:
        sys.path.remove(str(FIGURES))
    probs = make_figures.main(["--quick", "--out", str(tmp_path)])
    drawn = {p.name for p in tmp_path.glob("*.png")}
    assert drawn == {"attention.png", "gqa.png", "rope_pairs.png", "block_graph.png", "loss.png"}
    for name in drawn:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert np.all(np.triu(probs, 1) == 0) and np.allclose(probs.sum(-1), 1.0)
    # the docs show exactly these pictures, and the committed ones are there
    shown = set()
    for page in (ROOT / "docs").glob("*.md"):
        shown |= set(re.findall(r"\(figures/([\w.-]+\.png)\)", page.read_text()))
    assert shown == drawn
    assert all((FIGURES / name).read_bytes()[:8] == PNG_MAGIC for name in shown)


def test_draw_gqa_checks_the_head_counts(tmp_path):
    with pytest.raises(InputError, match="multiple of n_kv_heads"):
        draw_gqa(6, 4, tmp_path / "x.png")


def test_inspect_draws_a_models_attention(tmp_path, capsys):
    needs_matplotlib()
    path, model = tiny_model_with_tokenizer(tmp_path)
    text = "ROMEO: But soft"
    assert cli.main(["inspect", str(path), "--text", text]) == 0
    out = capsys.readouterr().out
    assert (path / "attention.png").read_bytes()[:8] == PNG_MAGIC
    n = len(model.tokenizer.encode(text))
    assert out.startswith(f"{n} tokens: ")
    assert len(re.findall(r"^layer \d head \d: first [\d.]+, self [\d.]+, previous [\d.]+, mean distance back",
                          out, flags=re.M)) == 2 * 4
    assert cli.main(["inspect", str(path), "--text", text, "--layer", "1", "--out", str(tmp_path / "l1.png")]) == 0
    assert (tmp_path / "l1.png").exists()
    assert len(re.findall(r"^layer 1 head", capsys.readouterr().out, flags=re.M)) == 4


def test_inspect_errors_are_one_line(tmp_path, capsys):
    path, _ = tiny_model_with_tokenizer(tmp_path)
    assert cli.main(["inspect", str(path), "--text", "hello", "--layer", "7"]) == 1
    assert "--layer 7: the model has layers 0 to 1" in capsys.readouterr().err
    assert cli.main(["inspect", str(path), "--text", "x" * 200]) == 1
    assert "can be drawn" in capsys.readouterr().err
    no_tokenizer = tmp_path / "bare"
    m = npllama.Llama.from_pretrained(path)
    m.tokenizer = None
    m.save_pretrained(no_tokenizer)
    assert cli.main(["inspect", str(no_tokenizer), "--text", "hello"]) == 1
    assert "no tokenizer" in capsys.readouterr().err
