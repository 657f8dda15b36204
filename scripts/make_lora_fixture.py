"""Make tests/fixtures/lora_peft: a LoRA adapter as PEFT writes it, with float64 values from torch autograd.

The base model is tests/fixtures/hf_gqa (made by make_hf_fixture.py: vocab 64, hidden 32, 2 layers,
4 heads / 2 kv heads, intermediate 48, float64 weights).  PEFT wraps it with a LoRA adapter on all
seven projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), rank 4,
lora_alpha 8 (scaling 2), lora_dropout 0.25.  A keeps PEFT's init (kaiming_uniform_(a=sqrt(5)), i.e.
U(-1/sqrt(in), 1/sqrt(in))); B, which PEFT starts at zero, is set to N(0, 0.2^2) so that the adapter
changes the model (B A scaled by 2 is ~30% of the base weights' size).

The fixture directory holds
  adapter_config.json, adapter_model.safetensors   -- exactly as PeftModel.save_pretrained writes them
      (keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, A: (r, in), B: (out, r),
      float64), except for base_model_name_or_path, set to "../hf_gqa": the base model's directory
      relative to the adapter's (PEFT records whatever path the base was loaded from, here a path of
      the machine that made the fixture).  PEFT's model card README.md is not kept.
  reference.safetensors                            -- float64, computed by transformers + PEFT:
      tokens   int64 (B, T)         input ids (the same batch recipe as hf_gqa's)
      targets  int64 (B, T)         target ids, a few -100; targets[b, t] belongs to logits[b, t]
      logits   float64 (B, T, V)    the adapted model's logits
      loss     float64 ()           mean cross-entropy over targets != -100 (no shift)
      grad.<adapter key>  float64   dloss/d(lora_A or lora_B) by torch autograd, for every key of
                                    adapter_model.safetensors
    the same in training mode, with each adapted module's dropout replaced by a fixed mask (PEFT
    applies lora_dropout to the adapter's input, lora_B(lora_A(dropout(x))), one nn.Dropout per module):
      mask.<module>       float64 (B, T, in)  entries 0 or 1/(1 - 0.25), e.g. mask.model.layers.0.mlp.up_proj
      dropout_loss        float64 ()
      dropout_grad.<adapter key>  float64

transformers runs in float64 throughout (npllama.hf_oracle.float64_llama lifts its float32 casts), PEFT's
LoRA layers in the base layer's dtype.  The script checks the reference against (1) the merged model,
W' = W + scaling B A for every adapted projection, run by transformers (logits must agree to 1e-12),
(2) the chain rule through the merged weights, dL/dA = scaling B^T dL/dW', dL/dB = scaling dL/dW' A^T,
with dL/dW' by autograd on the merged model (1e-12), and (3) central finite differences of the PEFT
loss for a few adapter entries; it prints the agreement.

Rerun (CPU, a few seconds):
    pip install torch==2.13.0 transformers && pip install peft --no-deps   # made with peft 0.21.2
    python scripts/make_lora_fixture.py
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's npllama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from npllama.hf_oracle import causal_lm_loss, float64_llama  # noqa: E402
from make_hf_fixture import finite_difference_check, load_float64, random_batch, relative_error  # noqa: E402

FIXTURE_ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
BASE = FIXTURE_ROOT / "hf_gqa"
OUT = FIXTURE_ROOT / "lora_peft"
SEED = 4321
RANK, ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
B_STD = 0.2
DROPOUT = 0.25
AGREEMENT_LIMIT = 1e-12


def adapter_key(param_name: str) -> str:
    """PeftModel parameter name -> the key save_pretrained writes (the adapter's name dropped)."""
    return param_name.replace(".default.", ".")


def peft_model_with_adapter(generator: torch.Generator):
    base = load_float64(BASE)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, bias="none")
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(B_STD * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all(("lora_A" in n or "lora_B" in n) and p.dtype == torch.float64 for n, p in lora.items())
    return model, lora


def merged_weights(model) -> dict:
    """Every adapted projection's W + scaling B A, keyed by the base model's parameter name."""
    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            w = module.base_layer.weight.detach()
            a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
            merged[name.removeprefix("base_model.model.") + ".weight"] = w + module.scaling["default"] * b @ a
    return merged


def chain_rule_check(model, lora, tokens, targets, logits, grads) -> dict:
    """The reference against transformers on the merged weights, and the adapter gradients by the
    chain rule through W' = W + s B A."""
    base = load_float64(BASE)
    merged = merged_weights(model)
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, w in merged.items():
            params[name].copy_(w)
    merged_logits = base(input_ids=tokens).logits
    merged_grads = dict(zip(merged, torch.autograd.grad(causal_lm_loss(merged_logits, targets),
                                                         [params[n] for n in merged])))
    worst = 0.0
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            g = merged_grads[name.removeprefix("base_model.model.") + ".weight"]
            a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
            s = module.scaling["default"]
            worst = max(worst, relative_error(grads[f"{name}.lora_A.default.weight"], s * b.T @ g),
                        relative_error(grads[f"{name}.lora_B.default.weight"], s * g @ a.T))
    return {"merged logits": relative_error(logits, merged_logits.detach()), "chain-rule grads(max)": worst}


class FixedMask(torch.nn.Module):
    """Inverted dropout with a given mask, in place of a LoRA module's nn.Dropout."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def dropout_reference(model, lora, tokens, targets, generator):
    """(masks by module name, loss, grads) with every adapter's dropout a fixed random mask."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            shape = (*tokens.shape, module.in_features)
            mask = (torch.rand(shape, generator=generator, dtype=torch.float64) >= DROPOUT) / (1 - DROPOUT)
            masks[name.removeprefix("base_model.model.")] = mask
            module.lora_dropout["default"] = FixedMask(mask)
    loss = causal_lm_loss(model(input_ids=tokens).logits, targets)
    grads = dict(zip(lora, torch.autograd.grad(loss, list(lora.values()))))
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.lora_dropout["default"] = torch.nn.Dropout(DROPOUT)
    return masks, loss.detach(), grads


def save_adapter_atomically(model, directory: Path) -> None:
    """save_pretrained into a temporary sibling directory, keep the two adapter files, swap it in."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.peft_config["default"].base_model_name_or_path = "../hf_gqa"
        model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(SEED)                       # PEFT's kaiming init of A draws from the global generator
    generator = torch.Generator().manual_seed(SEED)
    with float64_llama():
        model, lora = peft_model_with_adapter(generator)
        model.eval()
        tokens, targets = random_batch(model.config.vocab_size, generator)
        logits = model(input_ids=tokens).logits
        loss = causal_lm_loss(logits, targets)
        grads = dict(zip(lora, torch.autograd.grad(loss, list(lora.values()))))
        logits = logits.detach()
        report = chain_rule_check(model, lora, tokens, targets, logits, grads)
        report["finite differences (h=1e-5)"] = finite_difference_check(model, tokens, targets, grads, generator,
                                                                         params=lora)
        masks, dropout_loss, dropout_grads = dropout_reference(model, lora, tokens, targets, generator)
    worst = max(report["merged logits"], report["chain-rule grads(max)"])
    assert worst <= AGREEMENT_LIMIT, f"PEFT's float64 reference disagrees with the merged model by {worst:.2e}"

    save_adapter_atomically(model, OUT)
    tensors = {"tokens": tokens.numpy(), "targets": targets.numpy(), "logits": logits.numpy(),
               "loss": loss.detach().numpy().reshape(())}
    for name, g in grads.items():
        tensors[f"grad.{adapter_key(name)}"] = g.numpy()
        tensors[f"dropout_grad.{adapter_key(name)}"] = dropout_grads[name].numpy()
    tensors["dropout_loss"] = dropout_loss.numpy().reshape(())
    for module, mask in masks.items():
        tensors[f"mask.{module}"] = mask.numpy()
    metadata = {"made_by": "scripts/make_lora_fixture.py", "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__, "base": "../hf_gqa",
                "reference_dtype": "float64",
                "loss": "mean cross-entropy of logits[b, t] vs targets[b, t] over targets != -100 (no shift)"}
    out = OUT / "reference.safetensors"
    tmp = out.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"about": json.dumps(metadata, sort_keys=True)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)

    report["loss"] = loss.item()
    report["loss with dropout masks"] = dropout_loss.item()
    report["adapter tensors"] = len(grads)
    report["bytes"] = sum(f.stat().st_size for f in OUT.iterdir())
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
