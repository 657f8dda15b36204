"""Make tests/fixtures/hf_generate: a tiny random Llama and transformers' greedy continuations of a few prompts.

Writes
  tests/fixtures/hf_generate/config.json, generation_config.json, model.safetensors   (save_pretrained output)
  tests/fixtures/hf_generate/greedy.json

The model: vocab 96, hidden 48, 2 layers, 4 heads / 2 kv heads (GQA, head_dim 12), intermediate 64,
max_position 64, rope_theta 1e4, untied, no eos token.  Weights are stored as float32 and drawn as
N(0, 0.5^2) (RMSNorm weights 1 + N(0, 0.1^2)): large enough that greedy decoding does not collapse onto
one token.

greedy.json holds, for each prompt (a list of token ids):
  new_tokens       transformers' generate(prompt, do_sample=False, max_new_tokens=20), new tokens only,
                   computed in float64 from the exact upcast of the stored float32 weights, with
                   transformers' float32 casts lifted (npllama/hf_oracle.py) and no early stop
  last_logits      float64 logits at the last position of a plain forward over prompt + new_tokens
  min_top2_margin  the smallest (largest logit - second largest logit) over the 20 greedy steps, from a
                   full-sequence float64 forward; a float32 model follows the same path if its logits
                   are off by much less than this
The script checks that transformers' float64 logits agree with the independent functional Llama of
make_hf_fixture.py to 1e-12, that the cached, incremental generate() picks the argmax of the full-sequence forward
at every step, that each continuation has at least 4 distinct tokens, and that every margin exceeds
MIN_MARGIN.

Rerun (CPU, a few seconds):
    pip install torch==2.13.0 transformers      # transformers 5.x; made with 5.24.0
    python scripts/make_generate_fixture.py
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's npllama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from npllama.hf_oracle import float64_llama  # noqa: E402
from make_hf_fixture import (AGREEMENT_LIMIT, functional_llama_logits, random_llama,  # noqa: E402
                             relative_error, save_pretrained_atomically)

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf_generate"
SEED = 2024
MAX_NEW_TOKENS = 20
WEIGHT_STD = 0.5
MIN_MARGIN = 1e-3      # float32 logits are off by ~1e-6 relative; keep greedy ties far away
CONFIG = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
PROMPTS = [
    [5],
    [17, 42, 3],
    [90, 1, 1, 64, 8, 23],
    [7, 7, 7, 7, 12, 50, 31, 2, 88, 45],
]


def greedy_new_tokens(model, prompt: list[int]) -> list[int]:
    input_ids = torch.tensor([prompt], dtype=torch.int64)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, eos_token_id=None,
                         pad_token_id=0, temperature=None, top_k=None, top_p=None)
    new = out[0, len(prompt):].tolist()
    if len(new) != MAX_NEW_TOKENS:
        raise RuntimeError(f"generate returned {len(new)} new tokens, expected {MAX_NEW_TOKENS}")
    return new


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = random_llama(CONFIG, torch.float32, generator, weight_std=WEIGHT_STD)
    save_pretrained_atomically(model, FIXTURE_DIR)

    cfg = json.loads((FIXTURE_DIR / "config.json").read_text())
    records = []
    with float64_llama(), torch.no_grad():
        model = transformers.LlamaForCausalLM.from_pretrained(FIXTURE_DIR, dtype=torch.float64,
                                                              attn_implementation="eager")
        model.eval()
        for prompt in PROMPTS:
            new = greedy_new_tokens(model, prompt)
            full = torch.tensor([prompt + new], dtype=torch.int64)
            logits = model(input_ids=full).logits[0]                        # (len, V)
            # Position len(prompt) - 1 + s predicts new token s.
            step_logits = logits[len(prompt) - 1: len(prompt) - 1 + MAX_NEW_TOKENS]
            # Independent check of transformers' float64 forward (see make_hf_fixture.functional_llama_logits).
            weights = {n: p.detach() for n, p in model.named_parameters()}
            if not model.config.tie_word_embeddings:
                weights.setdefault("lm_head.weight", model.lm_head.weight.detach())
            functional = functional_llama_logits(weights, cfg, full)[0]
            agreement = relative_error(logits, functional)
            if agreement > AGREEMENT_LIMIT:
                raise RuntimeError(f"prompt {prompt}: transformers vs functional float64 logits differ by {agreement:.2e}")
            if step_logits.argmax(-1).tolist() != new:
                raise RuntimeError(f"prompt {prompt}: cached generate disagrees with the full forward's argmax")
            top2 = step_logits.topk(2, dim=-1).values
            margin = float((top2[:, 0] - top2[:, 1]).min())
            if margin < MIN_MARGIN:
                raise RuntimeError(f"prompt {prompt}: greedy margin {margin:.2e} < {MIN_MARGIN}; pick another seed")
            if len(set(new)) < 4:
                raise RuntimeError(f"prompt {prompt}: continuation {new} is nearly constant; use bigger weights")
            records.append({"prompt": prompt, "new_tokens": new, "last_logits": logits[-1].tolist(),
                            "min_top2_margin": margin})
            print(f"prompt {prompt} -> {new}  (min top-2 margin {margin:.3g}, "
                  f"float64 logits vs functional Llama {agreement:.1e})")

    fixture = {
        "about": ("transformers LlamaForCausalLM.generate(do_sample=False, max_new_tokens=20, no eos) in float64 "
                  "from the float32 weights in model.safetensors; new_tokens excludes the prompt; last_logits are "
                  "the float64 logits at the last position of a forward over prompt + new_tokens. "
                  "Made by scripts/make_generate_fixture.py"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "max_new_tokens": MAX_NEW_TOKENS,
        "cases": records,
    }
    out = FIXTURE_DIR / "greedy.json"
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        # Floats are written with repr(), so they read back bit-exact; lists of numbers go on one line.
        text = json.dumps(fixture, indent=1)
        text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        f.write(text)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    print(f"{FIXTURE_DIR}: {sum(f.stat().st_size for f in FIXTURE_DIR.iterdir())} bytes")


if __name__ == "__main__":
    main()
