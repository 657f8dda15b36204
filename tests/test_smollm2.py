"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers' answers on the same file.

tests/fixtures/smollm2 was made by scripts/make_smollm2_fixture.py: transformers' GGUF loader, the
float32 dequantized weights (checked there to equal npllama's bit for bit) run in float64.  The
.gguf itself (98 MB) is fetched once per machine by tests/real_model.py.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from npllama import Llama, Tokenizer
from npllama.chat import chat
from npllama.formats.gguf import load_weights, open_gguf
from real_model import smollm2_gguf

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2"


@pytest.fixture(scope="module")
def expected():
    return json.loads((FIXTURE / "fixture.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def checkpoint():
    return open_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_gguf(checkpoint)


@pytest.fixture(scope="module")
def model64(checkpoint):
    model = Llama(checkpoint.config, dtype=np.float64)
    load_weights(checkpoint, model.params)
    return model.eval()


def test_config_from_the_metadata(checkpoint):
    cfg = checkpoint.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.rope_theta,
            cfg.tie_embeddings, cfg.max_seq_len) == (49152, 576, 30, 9, 3, 1536, 1e5, True, 8192)


def test_tokenizer_ids_equal_transformers_on_mixed_text(tokenizer, expected):
    text = expected["tokenizer"]["text"]
    ids = tokenizer.encode(text)
    assert len(text) > 3000
    assert ids.tolist() == expected["tokenizer"]["ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(expected["prompt"]).tolist() == expected["prompt_ids"]


def test_chat_template_ids_equal_transformers(tokenizer, expected):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": expected["chat"]["question"]}],
                                        add_generation_prompt=True)
    assert ids.tolist() == expected["chat"]["prompt_ids"]
    assert tokenizer.stop_ids == (tokenizer.token_to_id("<|im_end|>"),)


@pytest.mark.slow
def test_float64_logits_equal_transformers(model64, expected):
    ref = load_file(str(FIXTURE / "logits.safetensors"))
    logits = model64.forward(np.array([expected["prompt_ids"]]))[0]
    got = np.take_along_axis(logits, np.array(expected["logits"]["ids"]), axis=1)
    np.testing.assert_allclose(got, ref["logits"], rtol=1e-9, atol=0)
    m = logits.max(axis=1)
    logsumexp = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    np.testing.assert_allclose(logsumexp, ref["logsumexp"], rtol=1e-9, atol=0)


@pytest.mark.slow
def test_greedy_chat_answer_equals_transformers(model64, tokenizer, expected):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": expected["chat"]["question"]}],
                                           add_generation_prompt=True)
    answer = model64.generate(prompt, expected["chat"]["max_new_tokens"], stop_ids=tokenizer.stop_ids)
    assert answer.tolist() == expected["chat"]["answer_ids"]
    assert tokenizer.decode(answer) == "The capital of France is Paris.<|im_end|>"


@pytest.mark.slow
def test_chat_answers_streams_and_keeps_the_history(model64, tokenizer, expected):
    script = iter([expected["chat"]["question"], "And of Italy?"])
    written, prompts = [], []
    stream = model64.stream

    def recording_stream(prompt_ids, *args, **kwargs):
        prompts.append(np.asarray(prompt_ids).tolist())
        return stream(prompt_ids, *args, **kwargs)

    model64.stream = recording_stream
    try:
        history = chat(model64, tokenizer, lambda: next(script, None), written.append, max_new_tokens=24)
    finally:
        del model64.stream
    first = tokenizer.decode(expected["chat"]["answer_ids"][:-1])   # without <|im_end|>
    assert history[0] == {"role": "user", "content": expected["chat"]["question"]}
    assert history[1] == {"role": "assistant", "content": first}
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert "Rome" in history[3]["content"]
    assert "".join(written) == first + "\n" + history[3]["content"] + "\n"
    assert prompts[0] == expected["chat"]["prompt_ids"]
    assert prompts[1] == tokenizer.apply_chat_template(history[:3], add_generation_prompt=True).tolist()
