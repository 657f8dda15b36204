"""Setting up a run: a directory holding a run refused, fine-tuning from a run or a Hugging Face
directory (tests/test_run_dir.py: the run directory; tests/test_corpus_cache.py: the cache)."""
import numpy as np
import pytest

import npllama
from npllama.errors import ConfigError
from npllama.train import STATE_FILE, new_run, train

from train_helpers import corpus, tiny  # noqa: F401  (corpus: a fixture)


def test_new_run_refuses_a_directory_holding_a_run(corpus, tmp_path):
    d = tmp_path / "run"
    train(tiny(corpus, d, steps=1, eval_interval=0), progress=False, verbose=False)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(tiny(corpus, d, steps=1), progress=False, verbose=False)


def test_init_from_uses_checkpoint_weights_and_tokenizer(corpus, tmp_path):
    src = tmp_path / "src"
    train(tiny(corpus, src, steps=3, eval_interval=0), progress=False, verbose=False)
    source = npllama.Llama.from_pretrained(src)

    cfg = tiny(corpus, tmp_path / "ft", data=str(corpus[1]), init_from=str(src), dim=None, n_layers=None,
               n_heads=None, vocab_size=999, dropout=0.05, steps=2)
    run = new_run(cfg, verbose=False)
    np.testing.assert_array_equal(run.model.flat_params, source.flat_params)
    assert run.tokenizer.fingerprint == source.tokenizer.fingerprint
    assert run.config.vocab_size == source.config.vocab_size
    assert run.model.config.dropout == 0.05
    assert (tmp_path / "ft" / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()

    result = train(tiny(corpus, tmp_path / "ft2", data=str(corpus[1]), init_from=str(src), dim=None,
                        n_layers=None, n_heads=None, steps=2), progress=False, verbose=False)
    assert result.step == 2


def test_init_from_a_hugging_face_directory(corpus, tmp_path):
    src = tmp_path / "src"
    train(tiny(corpus, src, steps=1, eval_interval=0), progress=False, verbose=False)
    hf = tmp_path / "hf"
    npllama.Llama.from_pretrained(src).save_pretrained(hf)   # config.json, model.safetensors, tokenizer.json
    assert not (hf / STATE_FILE).exists()
    result = train(tiny(corpus, tmp_path / "ft", init_from=str(hf), dim=None, n_layers=None, n_heads=None,
                        steps=1), progress=False, verbose=False)
    assert result.step == 1

    (hf / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        new_run(tiny(corpus, tmp_path / "ft3", init_from=str(hf), dim=None, n_layers=None, n_heads=None),
                verbose=False)
    with pytest.raises(ConfigError, match="--dim"):
        new_run(tiny(corpus, tmp_path / "ft4", init_from=str(src), n_layers=None, n_heads=None), verbose=False)
