"""npllama.chat on a tiny model: history kept within the context, streaming whole characters.
The real-model chat is in tests/test_smollm2.py."""
import numpy as np
import pytest

from npllama import InputError, Llama, LlamaConfig, Tokenizer
from npllama.chat import answer, chat, chat_prompt

TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer.train(["hello there how are you " * 30], vocab_size=270,
                          special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = TEMPLATE
    return tok


def test_history_drops_the_oldest_exchanges_and_keeps_the_system_message(tokenizer):
    model = Llama(LlamaConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                              max_seq_len=64))
    system = {"role": "system", "content": "be brief"}
    turns = [{"role": r, "content": f"hello {i}"} for i, r in enumerate(["user", "assistant"] * 4 + ["user"])]
    ids, kept = chat_prompt(model, tokenizer, [system] + turns, max_new_tokens=8)
    assert kept[0] == system and kept[-1] == turns[-1] and len(kept) % 2 == 0 and len(kept) < 1 + len(turns)
    assert ids.size <= 64 - 8
    one_more = [system] + turns[len(turns) - (len(kept) - 1) - 2:]   # the last exchange dropped, kept
    assert tokenizer.apply_chat_template(one_more, add_generation_prompt=True).size > 64 - 8
    np.testing.assert_array_equal(ids, tokenizer.apply_chat_template(kept, add_generation_prompt=True))
    with pytest.raises(InputError, match="too long"):
        chat_prompt(model, tokenizer, [{"role": "user", "content": "hello " * 60}], max_new_tokens=8)
    written = []
    history = chat(model, tokenizer, iter(["hello " * 60, None]).__next__, written.append, max_new_tokens=8)
    assert history == [] and "too long" in written[0]


class ScriptedModel:
    """Stands in for the model: streams the given ids."""
    def __init__(self, ids):
        self.ids = ids

    def stream(self, prompt_ids, max_new_tokens, stop_ids=None, **sampling):
        return iter(self.ids[:max_new_tokens])


def test_answer_streams_whole_characters_and_stops_before_the_stop_token(tokenizer):
    text = "hé 🌍!"
    ids = tokenizer.encode(text).tolist()
    assert len(ids) > len(text)   # the accented letter and the emoji take several byte tokens
    written = []
    model = ScriptedModel(ids + [tokenizer.token_to_id("<|im_end|>")] + tokenizer.encode("after").tolist())
    assert answer(model, tokenizer, np.array([1]), written.append, max_new_tokens=100) == text
    assert "".join(written) == text and not any("\ufffd" in w for w in written)
    assert "🌍" in written   # written at once when its last byte came


def test_a_chat_keeps_its_cache_and_answers_as_without_it(tokenizer):
    """Each turn after the first runs only its new tokens, as one batch over the kept cache, with the
    LoRA adapters as they are (no merged copy); every answer is the one a fresh prefill of the whole
    conversation gives."""
    model = Llama(LlamaConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=2, n_heads=2, n_kv_heads=1,
                              hidden_dim=32, max_seq_len=128), dtype=np.float64, seed=1)
    rng = np.random.default_rng(1)
    model.flat_params[...] += rng.normal(0.0, 0.3, model.flat_params.shape)
    model.add_lora(2, 4.0)
    model.flat_lora[...] = rng.normal(0.0, 0.3, model.flat_lora.shape)
    model.eval()
    runs, run_rows = [], model.last_hidden_state      # what each pass over rows ran: (tokens, over the cache?)
    model.last_hidden_state = lambda tokens, **kw: (runs.append((tokens.shape[1], "kv_cache" in kw)),
                                                    run_rows(tokens, **kw))[1]
    messages = iter(["hello there", "how are you", "hello you", None])
    history = chat(model, tokenizer, messages.__next__, lambda _: None, system="be brief", max_new_tokens=6)
    assert [m["role"] for m in history] == ["system"] + ["user", "assistant"] * 3
    assert runs[0][1] is False and [kept for _, kept in runs[1:]] == [True, True]
    del model.last_hidden_state
    for i in (2, 4, 6):
        prompt, _ = chat_prompt(model, tokenizer, history[:i], 6)
        if i > 2:
            assert runs[i // 2 - 1][0] < prompt.size              # the turn ran its own tokens only
        assert answer(model, tokenizer, prompt, lambda _: None, 6) == history[i]["content"]
