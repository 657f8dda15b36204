"""Make the Hugging Face reference fixtures tests/fixtures/hf_gqa and tests/fixtures/hf_mqa_tied_llama3.

Each fixture is a directory holding
  config.json, generation_config.json, model.safetensors   -- exactly as transformers' save_pretrained writes them
  reference.safetensors                                   -- float64 values computed by transformers:
      tokens   int64 (B, T)          input ids
      targets  int64 (B, T)          target ids, a few set to -100 (ignored); targets[b, t] belongs to logits[b, t]
      logits   float64 (B, T, V)     LlamaForCausalLM(tokens).logits
      loss     float64 ()            mean cross-entropy over the targets != -100
      grad.<name>  float64           dloss/dparam for every parameter of model.named_parameters() (with tied
                                     embeddings only model.embed_tokens.weight, which then includes the lm_head part)

The fixtures:
  hf_gqa              vocab 64, hidden 32, 2 layers, 4 heads / 2 kv heads (head_dim 8), intermediate 48,
                      max_position 32, rms_norm_eps 1e-5, rope_theta 1e4, untied.  Weights stored as float64.
  hf_mqa_tied_llama3  vocab 64, hidden 48, 2 layers, 2 heads / 1 kv head (head_dim 24), intermediate 32,
                      max_position 32, tied embeddings, rope_theta 5e5, llama3 RoPE scaling (factor 8,
                      low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 28).
                      Weights stored as float32; the reference is computed from their exact float64 upcast.
                      head_dim 24 with L = 28 puts the 12 RoPE frequencies in all three llama3 bands
                      (wavelength 2pi < L/4 kept; 18.7 in [L/4, L] smoothed; the other 10 divided by 8);
                      head_dim 8 would leave the "kept" band empty, and L must stay < max_position
                      (transformers warns otherwise).
Both use B = 2, T = 12 and weights ~ N(0, 0.2^2) (RMSNorm weights 1 + N(0, 0.1^2)), so the logits are far
from uniform and every norm weight matters.

The reference is computed by reloading the saved directory with from_pretrained(dtype=torch.float64,
attn_implementation="eager") inside npllama.hf_oracle.float64_llama(), which lifts transformers' float32 casts
(RMSNorm, RoPE tables, softmax), and the loss by npllama.hf_oracle.causal_lm_loss in float64.  The script then
checks that reference against (1) an independent functional float64 Llama written here from the maths
(Meta-style per-frequency llama3 scaling), gradients by torch autograd on it, and (2) central finite
differences of the transformers loss for a few weights; it prints the agreement, and how far the
unpatched (float32-cast) transformers model is off, and fails if the float64 agreement is worse than 1e-12.

Rerun (CPU is fine, ~20 s):
    pip install torch==2.13.0 transformers      # transformers 5.x; made with 5.24.0
    python scripts/make_hf_fixture.py
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's npllama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from npllama.hf_oracle import causal_lm_loss, float64_llama, rope_inv_freq_float64  # noqa: E402

FIXTURE_ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SEED = 1234
WEIGHT_STD = 0.2
NORM_WEIGHT_STD = 0.1
BATCH, SEQ_LEN = 2, 12
N_IGNORED = 4              # target positions set to -100
AGREEMENT_LIMIT = 1e-12    # fail if the independent float64 check disagrees by more than this (relative)

FIXTURES = {
    "hf_gqa": dict(
        storage_dtype=torch.float64,
        config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                    rms_norm_eps=1e-5, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "hf_mqa_tied_llama3": dict(
        storage_dtype=torch.float32,
        config=dict(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32,
                    rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 28}),
    ),
}


def relative_error(a, b) -> float:
    """max|a - b| / max|b|."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def random_llama(config_kwargs: dict, storage_dtype: torch.dtype, generator: torch.Generator,
                 weight_std: float = WEIGHT_STD):
    """A LlamaForCausalLM in storage_dtype with N(0, weight_std^2) matrices and 1 + N(0, NORM_WEIGHT_STD^2) norms."""
    config = transformers.LlamaConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None, **config_kwargs)
    model = transformers.LlamaForCausalLM(config).to(storage_dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if name.endswith("norm.weight"):
                value = 1.0 + NORM_WEIGHT_STD * noise
            else:
                value = weight_std * noise
            param.copy_(value.to(storage_dtype))
    return model


def save_pretrained_atomically(model, directory: Path) -> None:
    """save_pretrained into a temporary sibling directory, then swap it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def random_batch(vocab_size: int, generator: torch.Generator):
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=generator, dtype=torch.int64)
    targets = torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=generator, dtype=torch.int64)
    # A few ignored targets, including a last position and a first position.
    ignored = [(0, SEQ_LEN - 1), (1, 0), (1, 5), (0, 7)][:N_IGNORED]
    for b, t in ignored:
        targets[b, t] = -100
    return tokens, targets


def load_float64(directory: Path):
    """The saved checkpoint as a float64 eager-attention model (call inside float64_llama())."""
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager")
    model.eval()
    return model


def transformers_reference(model, tokens, targets):
    """logits, loss and {param name: grad} from the (patched, float64) transformers model."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    loss = causal_lm_loss(logits, targets)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


# ---- independent float64 Llama, written from the maths (no transformers code) ---------------------------

def meta_llama3_inv_freq(head_dim, theta, rope: dict) -> list[float]:
    """RoPE frequencies with llama3 scaling, element by element as in Meta's reference apply_scaling()."""
    freqs = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if rope.get("rope_type", "default") == "default":
        return freqs
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            s = (old_len / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return out


def functional_llama_logits(w: dict, cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Llama forward from a dict of float64 weights (HF names and layouts).

    h = E[tokens];  per layer: h += Wo attn(RoPE(Wq n1(h)), RoPE(Wk n1(h)), Wv n1(h));
                               h += Wd (silu(Wg n2(h)) * Wu n2(h));   logits = W_lm norm(h)
    with n(x) = g * x / sqrt(mean(x^2) + eps), causal softmax(q k^T / sqrt(head_dim)), kv heads shared
    by n_heads / n_kv_heads consecutive query heads, and RoPE rotating (x[:d/2], x[d/2:]) pairs.
    """
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg["hidden_size"]
    hd = dim // n_heads
    eps = cfg["rms_norm_eps"]
    rope = cfg["rope_parameters"]
    B, T = tokens.shape
    inv = torch.tensor(meta_llama3_inv_freq(hd, rope["rope_theta"], rope), dtype=torch.float64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]          # (T, hd/2)
    cos, sin = torch.cos(angles), torch.sin(angles)

    def rms(x, g):
        return g * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rotate(x):  # x (B, H, T, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    h = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(B, T, n_heads, hd).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(B, T, n_kv, hd).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(B, T, n_kv, hd).transpose(1, 2)
        q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        scores = scores - scores.max(-1, keepdim=True).values
        probs = torch.exp(scores)
        probs = probs / probs.sum(-1, keepdim=True)
        attn = (probs @ v).transpose(1, 2).reshape(B, T, n_heads * hd)
        h = h + attn @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        h = h + (gate / (1 + torch.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    h = rms(h, w["model.norm.weight"])
    lm_head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return h @ lm_head.T


def functional_loss(logits, targets):
    """-(1/N) sum over kept positions of log softmax(logits)[target], written out."""
    keep = targets != -100
    lg = logits[keep]
    y = targets[keep]
    m = lg.max(-1, keepdim=True).values
    logz = m[:, 0] + torch.log(torch.exp(lg - m).sum(-1))
    return (logz - lg[torch.arange(len(y)), y]).mean()


def check_against_functional(model, cfg, tokens, targets, logits, loss, grads) -> dict:
    weights = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    f_logits = functional_llama_logits(weights, cfg, tokens)
    f_loss = functional_loss(f_logits, targets)
    f_grads = torch.autograd.grad(f_loss, list(weights.values()))
    return {
        "logits": relative_error(logits, f_logits.detach()),
        "loss": relative_error(loss, f_loss.detach()),
        "grads(max)": max(relative_error(grads[n], g) for n, g in zip(weights, f_grads)),
    }


def finite_difference_check(model, tokens, targets, grads, generator, n_entries=8, h=1e-5, params=None) -> float:
    """Largest |FD - autograd| over a few random entries of ``params`` (default: the model's named
    parameters; grads has the same names), relative to the largest gradient entry overall."""
    scale = max(float(g.abs().max()) for g in grads.values())
    names = list(grads)
    worst = 0.0
    with torch.no_grad():
        params = dict(model.named_parameters()) if params is None else params
        for _ in range(n_entries):
            name = names[int(torch.randint(len(names), (1,), generator=generator))]
            flat = params[name].view(-1)
            j = int(torch.randint(flat.numel(), (1,), generator=generator))
            old = flat[j].item()
            flat[j] = old + h
            plus = causal_lm_loss(model(input_ids=tokens).logits, targets).item()
            flat[j] = old - h
            minus = causal_lm_loss(model(input_ids=tokens).logits, targets).item()
            flat[j] = old
            fd = (plus - minus) / (2 * h)
            worst = max(worst, abs(fd - grads[name].view(-1)[j].item()) / scale)
    return worst


def describe_llama3_bands(config) -> dict:
    rope = config.rope_parameters
    head_dim = config.head_dim
    base = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / base
    old_len = rope["original_max_position_embeddings"]
    return {
        "kept": int((wavelen < old_len / rope["high_freq_factor"]).sum()),
        "smoothed": int(((wavelen >= old_len / rope["high_freq_factor"]) &
                         (wavelen <= old_len / rope["low_freq_factor"])).sum()),
        "divided": int((wavelen > old_len / rope["low_freq_factor"]).sum()),
    }


def make_fixture(name: str, spec: dict, generator: torch.Generator) -> dict:
    directory = FIXTURE_ROOT / name
    model = random_llama(spec["config"], spec["storage_dtype"], generator)
    save_pretrained_atomically(model, directory)
    tokens, targets = random_batch(model.config.vocab_size, generator)
    cfg = json.loads((directory / "config.json").read_text())
    report = {"storage_dtype": str(spec["storage_dtype"])}

    # Unpatched transformers (float32 casts inside), only to show how much the patches matter.
    plain = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float64)
    with torch.no_grad():
        plain_logits = plain(input_ids=tokens).logits

    with float64_llama():
        model = load_float64(directory)
        hf_inv_freq = model.model.rotary_emb.inv_freq
        inv_freq64 = rope_inv_freq_float64(model.config)
        report["inv_freq float32 buffer vs float64"] = relative_error(hf_inv_freq, inv_freq64)
        logits, loss, grads = transformers_reference(model, tokens, targets)
        report["unpatched transformers logits rel. error"] = relative_error(plain_logits, logits)
        report["vs functional float64"] = check_against_functional(model, cfg, tokens, targets, logits, loss, grads)
        report["finite differences (h=1e-5)"] = finite_difference_check(model, tokens, targets, grads, generator)

    if cfg["rope_parameters"].get("rope_type") == "llama3":
        bands = describe_llama3_bands(model.config)
        unscaled = 1.0 / cfg["rope_parameters"]["rope_theta"] ** (
            torch.arange(0, model.config.head_dim, 2, dtype=torch.float64) / model.config.head_dim)
        report["llama3 bands"] = bands
        report["llama3 frequencies changed"] = int((inv_freq64 != unscaled).sum())
        assert all(bands.values()), f"llama3 scaling does not exercise all three bands: {bands}"

    # The reference was computed from the reloaded checkpoint, so it belongs to exactly the stored weights.
    worst = max(report["vs functional float64"].values())
    assert worst <= AGREEMENT_LIMIT, f"{name}: float64 reference disagrees with the functional Llama by {worst:.2e}"

    tensors = {
        "tokens": tokens.numpy(),
        "targets": targets.numpy(),
        "logits": logits.numpy(),
        "loss": loss.numpy().reshape(()),
    }
    for param_name, g in grads.items():
        tensors[f"grad.{param_name}"] = g.numpy()
    metadata = {
        "made_by": "scripts/make_hf_fixture.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "weights_dtype": str(spec["storage_dtype"]).removeprefix("torch."),
        "reference_dtype": "float64",
        "loss": "mean cross-entropy of logits[b, t] vs targets[b, t] over targets != -100 (no shift)",
    }
    out = directory / "reference.safetensors"
    tmp = out.with_suffix(".tmp")
    # One metadata key: safetensors writes several keys in hash order, which would make reruns differ byte-wise.
    save_file(tensors, str(tmp), metadata={"about": json.dumps(metadata, sort_keys=True)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    report["loss"] = float(loss)
    report["bytes"] = sum(f.stat().st_size for f in directory.iterdir())
    return report


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(SEED)  # transformers' own init draws from the global generator
    generator = torch.Generator().manual_seed(SEED)
    total = 0
    for name, spec in FIXTURES.items():
        report = make_fixture(name, spec, generator)
        total += report["bytes"]
        print(f"{name}:")
        for key, value in report.items():
            print(f"  {key}: {value}")
    print(f"total fixture size: {total} bytes")


if __name__ == "__main__":
    main()
