"""`npllama generate --chat` and the stop tokens, in real processes: a scripted conversation on a
tiny model (two messages on stdin, then its end) equals npllama.chat.chat's in-process; the same
model as a .gguf answers the same; a plain prompt stops at the tokenizer's end-of-turn token and
gets a BOS when the tokenizer says so; and SmolLM2-135M answers the capital of France (slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import test_gguf
from npllama import Llama, LlamaConfig, Tokenizer
from npllama.chat import chat
from real_model import smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ)
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# <|im_end|> first: id 0, what greedy picks when every logit is equal
SPECIAL = ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "<s>"]
CFG = LlamaConfig(vocab_size=280, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=128,
                  tie_embeddings=False)


def npllama(args, stdin=""):
    done = subprocess.run([sys.executable, "-m", "npllama.cli", "generate", *map(str, args)], input=stdin,
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer.train(["hello there how are you, fine thanks " * 30], vocab_size=CFG.vocab_size,
                          special_tokens=SPECIAL)
    tok.chat_template = TEMPLATE
    assert tok.vocab_size == CFG.vocab_size
    return tok


@pytest.fixture(scope="module")
def run_dir(tokenizer, tmp_path_factory):
    model = test_gguf.random_model(CFG, seed=4)
    model.tokenizer = tokenizer
    path = tmp_path_factory.mktemp("chat")
    model.save_pretrained(path)
    return path


def in_process_chat(path, messages, system=None):
    model = Llama.from_pretrained(path).eval()
    written = []
    chat(model, model.tokenizer, iter(messages + [None]).__next__, written.append, system=system,
         max_new_tokens=6, temperature=0.0)
    return "".join(written)


def test_saved_model_keeps_its_chat_template_and_stop_tokens(run_dir, tokenizer):
    config = json.loads((run_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == {"add_bos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
                      "chat_template": TEMPLATE}
    loaded = Llama.from_pretrained(run_dir).tokenizer
    assert loaded.chat_template == TEMPLATE and loaded.stop_ids == (0, 1) == tokenizer.stop_ids


def test_scripted_chat_two_messages_then_end_of_input(run_dir):
    messages = ["hello there", "how are you"]
    done = npllama([run_dir, "--chat", "--system", "be fine", "--temperature", 0, "--max-new-tokens", 6],
                   stdin="".join(m + "\n" for m in messages))
    expected = in_process_chat(run_dir, messages, system="be fine")
    assert done.stdout == expected and expected.count("\n") == 2
    first, *reports = done.stderr.splitlines()
    assert first == "npllama: sampling: greedy (--temperature as given, the rest from npllama's chat default: " \
                    "the model brings no sampling settings); answers up to 6 tokens (--max-new-tokens)"
    answers = [r for r in reports if r.startswith("npllama: prompt ")]
    assert len(answers) == 2 and all(" tok/s" in r and "new token" in r for r in answers), reports
    cut = [r for r in reports if "the answer was cut at 6 tokens" in r]
    assert len(cut) == sum("stopped at --max-new-tokens" in r for r in answers), reports


def test_chat_sampling_comes_from_the_model_else_greedy(run_dir, tmp_path, monkeypatch):
    from npllama.errors import CheckpointError
    from npllama.generate.sampling import chat_sampling
    greedy = {"temperature": 0.0, "top_k": None, "top_p": None}
    assert chat_sampling(run_dir) == (greedy, "npllama's chat default: the model brings no sampling settings")
    config = tmp_path / "generation_config.json"
    config.write_text('{"bos_token_id": 1, "eos_token_id": 2}')     # SmolLM2's: Hugging Face's generate is greedy
    assert chat_sampling(tmp_path)[0] == greedy
    config.write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.9}')
    assert chat_sampling(tmp_path) == ({"temperature": 0.6, "top_k": 50, "top_p": 0.9}, str(config))
    config.write_text('{"do_sample": true, "top_k": 0}')               # Hugging Face's defaults, top-k off
    assert chat_sampling(tmp_path)[0] == {"temperature": 1.0, "top_k": None, "top_p": None}
    config.write_text('{"do_sample": true, "temperature": -1}')
    with pytest.raises(CheckpointError, match="generation_config.json: temperature must be"):
        chat_sampling(tmp_path)

    params = Llama.from_pretrained(run_dir).params
    test_gguf.write_gguf(tmp_path / "plain.gguf", params, CFG)
    assert chat_sampling(tmp_path / "plain.gguf")[0] == greedy
    test_gguf.write_gguf(tmp_path / "sampled.gguf", params, CFG,
                         tokenizer={"add_sampling_temp": 0.7, "add_sampling_top_k": 20, "add_sampling_top_p": 0.8})
    settings, source = chat_sampling(tmp_path / "sampled.gguf")
    assert settings == {"temperature": pytest.approx(0.7), "top_k": 20, "top_p": pytest.approx(0.8)}
    assert source == "sampled.gguf's general.sampling.* metadata"


def test_chat_uses_the_models_settings_and_says_so(run_dir, tmp_path):
    for f in run_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.5, "top_k": 7}')
    done = npllama([tmp_path, "--chat", "--prompt", "hello there", "--max-new-tokens", 6, "--seed", 3])
    assert done.stderr.startswith(f"npllama: sampling: temperature 0.5, top-k 7 (from {tmp_path / 'generation_config.json'}; "
                                  "seed 3); answers up to 6 tokens"), done.stderr
    model = Llama.from_pretrained(run_dir).eval()
    written = []
    chat(model, model.tokenizer, iter(["hello there", None]).__next__, written.append, max_new_tokens=6,
         temperature=0.5, top_k=7, top_p=None, seed=3)
    assert done.stdout == "".join(written)
    override = npllama([tmp_path, "--chat", "--prompt", "hello there", "--max-new-tokens", 6, "--top-k", 3,
                        "--seed", 3])
    assert "sampling: temperature 0.5, top-k 3 (--top-k as given, the rest from " in override.stderr


def test_chat_with_prompt_answers_one_message_and_the_gguf_answers_the_same(run_dir, tokenizer, tmp_path):
    done = npllama([run_dir, "--chat", "--prompt", "hello there", "--temperature", 0, "--max-new-tokens", 6],
                   stdin="never read\n")
    assert done.stdout == in_process_chat(run_dir, ["hello there"])

    spec = json.loads(tokenizer.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    meta = {"add_tokenizer_model": "gpt2", "add_token_list": tokens, "add_token_merges": merges,
            "add_token_types": [3 if t in SPECIAL else 1 for t in tokens],
            "add_eos_token_id": tokens.index("<|endoftext|>"), "add_chat_template": TEMPLATE}
    test_gguf.write_gguf(tmp_path / "tiny.gguf", Llama.from_pretrained(run_dir).params, CFG, tokenizer=meta)
    from_gguf = npllama([tmp_path / "tiny.gguf", "--chat", "--prompt", "hello there", "--temperature", 0,
                         "--max-new-tokens", 6])
    assert from_gguf.stdout == done.stdout


def test_plain_generation_stops_at_the_end_of_turn_token_and_starts_with_bos_if_asked(run_dir, tokenizer, tmp_path):
    model = Llama.from_pretrained(run_dir)
    model.params["lm_head.weight"][...] = 0.0   # every logit 0: greedy picks id 0, <|im_end|>
    model.save_pretrained(tmp_path)
    n_prompt = tokenizer.encode("hello there").size
    done = npllama([tmp_path, "--prompt", "hello there", "--temperature", 0, "--max-new-tokens", 5])
    assert done.stdout == "hello there"
    assert f"prompt {n_prompt} tokens" in done.stderr and "1 new token," in done.stderr
    assert "stopped at <|im_end|> (a stop token)" in done.stderr

    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    done = npllama([tmp_path, "--prompt", "hello there", "--temperature", 0, "--max-new-tokens", 5])
    assert f"prompt {n_prompt + 1} tokens" in done.stderr


@pytest.mark.slow
def test_smollm2_gguf_chat_answers_paris():
    """With no sampling option: the GGUF brings no settings, so the chat is greedy, and says so."""
    done = npllama([smollm2_gguf(), "--chat", "--prompt", "What is the capital of France?"])
    assert done.stdout == "The capital of France is Paris.\n", done.stdout
    assert done.stderr.startswith("npllama: sampling: greedy (from npllama's chat default"), done.stderr
    assert "tok/s" in done.stderr and "stopped at <|im_end|> (a stop token)" in done.stderr
