"""An adapter written by npllama loads in PEFT (``PeftModel.from_pretrained`` on the transformers
model of its base) and gives npllama's logits: float32, <= 1e-5 relative (max-normalised).
Skipped without torch, transformers and peft."""
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama.adapters import merge_adapters
from npllama.gradcheck import relative_error

BASE_DIR = Path(__file__).resolve().parent / "fixtures" / "hf_gqa"
TOLERANCE = 1e-5


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                     ("v_proj", "down_proj")])
def test_npllama_adapter_loads_in_peft(targets, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = npllama.Llama.from_pretrained(BASE_DIR, dtype=np.float32)
    model.add_lora(4, 16.0, targets, seed=1)
    rng = np.random.default_rng(2)
    for name, p in model.lora_params.items():       # B moved away from 0, as after training
        if ".lora_B." in name:
            p[...] = rng.normal(0.0, 0.05, size=p.shape)
    tokens = rng.integers(0, model.config.vocab_size, size=(2, 9))
    logits = model.forward(tokens)
    model.save_adapter(tmp_path, BASE_DIR)

    base = transformers.LlamaForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    peft_model.eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    err = relative_error(logits, peft_logits)
    print(f"npllama vs PEFT logits, float32: {err:.2e}")
    assert err <= TOLERANCE
    # the adapter is what makes them equal: the base alone is visibly different
    plain = npllama.Llama.from_pretrained(BASE_DIR, dtype=np.float32).forward(tokens)
    assert relative_error(plain, peft_logits) > 1e-3
    # the merged model, saved as a Hugging Face checkpoint, loads in transformers with the same logits
    merge_adapters(model).save_pretrained(tmp_path / "merged")
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                           attn_implementation="eager")
    with torch.no_grad():
        merged_logits = merged(input_ids=torch.from_numpy(tokens)).logits.numpy()
    assert relative_error(merged_logits, peft_logits) <= TOLERANCE
