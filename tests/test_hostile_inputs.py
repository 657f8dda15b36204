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


# ---- chat templates: bounded in output, time and what they may raise ---------------------------------
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, match", [
    ("{{ 'ab ' * 7*10**7 }}", "'\\*' would make a sequence of 210,000,000 items"),      # was: SIGABRT in tokenizers
    ("{{ [1] * 10**9 }}", "'\\*' would make a sequence"),
    ("{{ 10 ** (10 ** 8) }}", "'\\*\\*' would make an integer"),
    ("{% for i in range(90000) %}{{ 'abcdefghij' * 50 }}{% endfor %}", "its output passed"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than"),  # was: a hang
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ range(10**9) | list }}", "OverflowError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
])
def test_a_hostile_chat_template_ends_in_one_error_within_seconds(template, match):
    import time
    from npllama.chat_template import render_chat
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=match) as e:
        render_chat(template, USER)
    assert time.monotonic() - t0 < 3 and "\n" not in str(e.value)
    assert str(e.value).startswith("the chat template ")


def test_chat_with_one_prompt_the_template_refuses_exits_with_an_error(tmp_path, capsys):
    """`--chat --prompt` (one message, no conversation to go on with): was exit 0, the error in brackets on stdout."""
    from npllama import Tokenizer
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = Tokenizer.train("the cat sat on the mat; the dog sat on the log. " * 20, vocab_size=300)
    tokenizer.chat_template = "{{ raise_exception('no cats here') if 'cat' in messages[-1]['content'] }}{{ messages[-1]['content'] }}"
    model = Llama(LlamaConfig(**{**CFG.to_dict(), "vocab_size": 300}), seed=0)
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "m")
    assert cli.main(["generate", str(tmp_path / "m"), "--chat", "--prompt", "the cat", "--max-new-tokens", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "npllama: error: the chat template refused the conversation: no cats here\n"
    assert cli.main(["generate", str(tmp_path / "m"), "--chat", "--prompt", "the dog " * 20, "--max-new-tokens", "2"]) == 1
    assert capsys.readouterr().err.startswith("npllama: error: the message is too long:")
