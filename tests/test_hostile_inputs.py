"""Hostile inputs that once crashed, hung or passed silently (issue 28): each ends in one clear
error naming what is wrong."""
import numpy as np
import pytest

from npllama import CheckpointError, Llama, LlamaConfig
from npllama import cli

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=32)


@pytest.mark.parametrize("temperature, top_p", [(0.0, None), (0.8, None), (0.8, 0.9)])
def test_nan_logits_stop_generation_with_one_clear_error(temperature, top_p):
    """(was: an IndexError in sampling.top_p_ids, or, greedy, nothing printed and exit 0)"""
    model = Llama(CFG, seed=0)
    model.params["lm_head.weight"][5, 0] = np.nan
    with pytest.raises(CheckpointError, match=r"^the model's logits are NaN or infinite after 3 tokens: its weights"):
        model.generate(np.array([1, 2, 3]), 4, temperature=temperature, top_p=top_p, seed=0)


def test_overflowing_logits_from_a_saved_model_end_the_cli_in_one_line(tmp_path, capsys):
    from npllama import Tokenizer
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (a short text: fewer merges than asked for)
        tokenizer = Tokenizer.train("the cat sat on the mat; the dog sat on the log. " * 20, vocab_size=300)
    model = Llama(LlamaConfig(**{**CFG.to_dict(), "vocab_size": 300}), seed=0)
    model.params["lm_head.weight"][...] = 3e38   # finite weights, infinite float32 logits
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "m")
    assert cli.main(["generate", str(tmp_path / "m"), "--prompt", "the cat", "--max-new-tokens", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("npllama: error: the model's logits are NaN or infinite after ")
