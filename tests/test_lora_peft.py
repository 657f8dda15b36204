"""npllama's LoRA against PEFT + torch autograd, in float64.

tests/fixtures/lora_peft (made by scripts/make_lora_fixture.py) holds a LoRA adapter on every
projection of tests/fixtures/hf_gqa, as PEFT's save_pretrained writes it, and PEFT's float64 logits,
loss and adapter gradients for one batch, without dropout and with given dropout masks on the
adapters' inputs.  Two independent routes to those numbers:

* the composition: the Llama built from the layers' ``*_reference`` functions, each adapted
  projection a ``lora_forward_reference`` and its backward ``lora_backward_reference`` (dA, dB; the
  frozen weights get no gradient);
  (and with the masks, ``lora_forward_reference(..., mask)``);
* the merged model (no dropout): the fast ``npllama.Llama`` with every adapted W replaced by
  ``merge_lora`` = W + s B A, whose weight gradients G give the adapter's by the chain rule,
  dA = s B^T G and dB = s G A^T.

The composition is written out here because npllama/reference.py has not landed yet; once it has,
``reference.loss_and_grad(..., lora=...)`` replaces it.  These tests only read files (no torch).
"""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import npllama
from npllama.gradcheck import relative_error
from npllama.layers.attention import attention_backward_reference, attention_forward_reference
from npllama.layers.cross_entropy import cross_entropy_backward_reference, cross_entropy_forward_reference
from npllama.layers.embedding import embedding_forward
from npllama.layers.lora import lora_backward_reference, lora_forward_reference, merge_lora
from npllama.layers.rmsnorm import rmsnorm_backward_reference, rmsnorm_forward_reference
from npllama.layers.rope import rope_backward_reference, rope_cos_sin, rope_forward_reference, rope_frequencies
from npllama.layers.swiglu import swiglu_backward_reference, swiglu_forward_reference

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ADAPTER_DIR = FIXTURES / "lora_peft"
PEFT_PREFIX = "base_model.model."
TOLERANCE = 1e-12
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def load_adapter(directory):
    """(scale, {base weight name: (A, B)}) from PEFT's adapter_config.json + adapter_model.safetensors."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    adapters = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            adapters[module + ".weight"] = (tensors[key], tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"])
    return config["lora_alpha"] / config["r"], adapters


def peft_key(weight_name, matrix):
    """"model.layers.0.self_attn.q_proj.weight", "A" -> PEFT's "base_model.model.model.layers.0...lora_A.weight"."""
    return f"{PEFT_PREFIX}{weight_name.removesuffix('.weight')}.lora_{matrix}.weight"


@pytest.fixture(scope="module")
def case():
    base_dir = ADAPTER_DIR / json.loads((ADAPTER_DIR / "adapter_config.json").read_text())["base_model_name_or_path"]
    cfg = npllama.LlamaConfig.from_hf_dict(json.loads((base_dir / "config.json").read_text()))
    params = load_file(str(base_dir / "model.safetensors"))
    scale, adapters = load_adapter(ADAPTER_DIR)
    ref = load_file(str(ADAPTER_DIR / "reference.safetensors"))
    grads = {key.removeprefix("grad."): g for key, g in ref.items() if key.startswith("grad.")}
    return cfg, params, scale, adapters, ref, grads


# ---- the composition: layer references + LoRA on the adapted projections -------------------------
def split_heads(x, n_heads):
    B, T, _ = x.shape
    return x.reshape(B, T, n_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x):
    B, n_heads, T, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, n_heads * hd)


class Projections:
    """Every projection of the model: LoRA where an adapter exists, a frozen linear map elsewhere.
    Keeps each forward's cache by weight name and collects the adapters' gradients."""

    def __init__(self, params, adapters, scale, masks):
        self.params, self.adapters, self.scale, self.masks = params, adapters, scale, masks
        self.caches, self.grads = {}, {}

    def forward(self, x, name):
        w = self.params[name]
        if name not in self.adapters:
            self.caches[name] = None
            return x @ w.T
        a, b = self.adapters[name]
        mask = self.masks.get(name.removesuffix(".weight"))
        y, self.caches[name] = lora_forward_reference(x, w, a, b, self.scale, mask)
        return y

    def backward(self, dy, name):
        if self.caches[name] is None:
            return dy @ self.params[name]                  # frozen: dx only
        dx, self.grads[peft_key(name, "A")], self.grads[peft_key(name, "B")] = \
            lora_backward_reference(dy, self.caches[name])
        return dx


def lora_llama_loss_and_grad(params, adapters, scale, cfg, tokens, targets, masks=None):
    """(logits, loss, {PEFT adapter key: gradient}) of the base Llama with the adapters applied;
    masks: {module name: (B, T, in) dropout mask of that adapter's input}, or None for no dropout."""
    H, K, eps = cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps
    B, T = tokens.shape
    proj = Projections(params, adapters, scale, masks or {})
    cos, sin = rope_cos_sin(np.arange(T), rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                            np.float64)
    x, _ = embedding_forward(tokens, params["model.embed_tokens.weight"])        # (B, T, D)
    caches = []
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        n1, c_n1 = rmsnorm_forward_reference(x, params[p + "input_layernorm.weight"], eps)
        q, k, v = (proj.forward(n1, p + f"self_attn.{m}_proj.weight") for m in "qkv")
        q_rot, c_rope = rope_forward_reference(split_heads(q, H), cos, sin)
        k_rot, _ = rope_forward_reference(split_heads(k, K), cos, sin)
        o, c_attn = attention_forward_reference(q_rot, k_rot, split_heads(v, K))
        h = x + proj.forward(merge_heads(o), p + "self_attn.o_proj.weight")
        n2, c_n2 = rmsnorm_forward_reference(h, params[p + "post_attention_layernorm.weight"], eps)
        g, u = proj.forward(n2, p + "mlp.gate_proj.weight"), proj.forward(n2, p + "mlp.up_proj.weight")
        s, c_swiglu = swiglu_forward_reference(g, u)
        x = h + proj.forward(s, p + "mlp.down_proj.weight")
        caches.append((c_n1, c_rope, c_attn, c_n2, c_swiglu))
    xn, c_norm = rmsnorm_forward_reference(x, params["model.norm.weight"], eps)
    logits = proj.forward(xn, "lm_head.weight")                                # (B, T, V)
    loss, c_loss = cross_entropy_forward_reference(logits.reshape(B * T, -1), targets.reshape(-1))

    dlogits = cross_entropy_backward_reference(1.0, c_loss).reshape(logits.shape)
    dx, _ = rmsnorm_backward_reference(proj.backward(dlogits, "lm_head.weight"), c_norm)
    for i in reversed(range(cfg.n_layers)):
        p = f"model.layers.{i}."
        c_n1, c_rope, c_attn, c_n2, c_swiglu = caches[i]
        dg, du = swiglu_backward_reference(proj.backward(dx, p + "mlp.down_proj.weight"), c_swiglu)
        dn2 = proj.backward(dg, p + "mlp.gate_proj.weight") + proj.backward(du, p + "mlp.up_proj.weight")
        dh = dx + rmsnorm_backward_reference(dn2, c_n2)[0]
        do = proj.backward(dh, p + "self_attn.o_proj.weight")
        dq_rot, dk_rot, dv = attention_backward_reference(split_heads(do, H), c_attn)
        dn1 = (proj.backward(merge_heads(rope_backward_reference(dq_rot, c_rope)), p + "self_attn.q_proj.weight")
               + proj.backward(merge_heads(rope_backward_reference(dk_rot, c_rope)), p + "self_attn.k_proj.weight")
               + proj.backward(merge_heads(dv), p + "self_attn.v_proj.weight"))
        dx = dh + rmsnorm_backward_reference(dn1, c_n1)[0]
    return logits, loss, proj.grads


# ---- tests -------------------------------------------------------------------------------------
def test_adapter_files_are_in_peft_layout(case):
    cfg, params, scale, adapters, ref, grads = case
    config = json.loads((ADAPTER_DIR / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, False)
    assert sorted(config["target_modules"]) == sorted(name.split(".")[1] for name in PROJECTIONS)
    assert scale == 2.0
    assert set(adapters) == {f"model.layers.{i}.{m}.weight" for i in range(cfg.n_layers) for m in PROJECTIONS}
    for name, (a, b) in adapters.items():
        d_out, d_in = params[name].shape
        assert a.shape == (4, d_in) and b.shape == (d_out, 4) and a.dtype == b.dtype == np.float64, name
        assert np.abs(a).max() <= 1 / np.sqrt(d_in) and b.any(), name    # A as PEFT inits it, B moved
    assert set(grads) == set(load_file(str(ADAPTER_DIR / "adapter_model.safetensors")))


def test_composition_matches_peft(case):
    cfg, params, scale, adapters, ref, grads = case
    logits, loss, lora_grads = lora_llama_loss_and_grad(params, adapters, scale, cfg, ref["tokens"], ref["targets"])
    assert relative_error(logits, ref["logits"]) <= TOLERANCE
    assert abs(loss - float(ref["loss"])) <= TOLERANCE * abs(float(ref["loss"]))
    assert set(lora_grads) == set(grads)
    worst = max(relative_error(lora_grads[key], grads[key]) for key in grads)
    assert worst <= TOLERANCE, worst
    # the adapters matter: without them the logits are visibly different
    assert relative_error(lora_llama_loss_and_grad(params, {}, scale, cfg, ref["tokens"], ref["targets"])[0],
                          ref["logits"]) > 0.1


def test_composition_with_dropout_masks_matches_peft(case):
    cfg, params, scale, adapters, ref, grads_without_dropout = case
    masks = {key.removeprefix("mask."): m for key, m in ref.items() if key.startswith("mask.")}
    assert set(masks) == {name.removesuffix(".weight") for name in adapters}
    grads = {key.removeprefix("dropout_grad."): g for key, g in ref.items() if key.startswith("dropout_grad.")}
    _, loss, lora_grads = lora_llama_loss_and_grad(params, adapters, scale, cfg, ref["tokens"], ref["targets"], masks)
    assert abs(loss - float(ref["dropout_loss"])) <= TOLERANCE * abs(float(ref["dropout_loss"]))
    assert set(lora_grads) == set(grads)
    worst = max(relative_error(lora_grads[key], grads[key]) for key in grads)
    assert worst <= TOLERANCE, worst
    # the masks matter: the gradients without them are visibly different
    assert max(relative_error(g, grads[key]) for key, g in grads_without_dropout.items()) > 0.01


def test_merged_fast_model_matches_peft(case):
    cfg, params, scale, adapters, ref, grads = case
    base_dir = ADAPTER_DIR / json.loads((ADAPTER_DIR / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = npllama.Llama.from_pretrained(base_dir, dtype=np.float64)
    for name, (a, b) in adapters.items():
        model.params[name][...] = merge_lora(params[name], a, b, scale)
    assert relative_error(model.forward(ref["tokens"]), ref["logits"]) <= TOLERANCE
    loss, weight_grads = model.loss_and_grad(ref["tokens"], ref["targets"])
    assert abs(loss - float(ref["loss"])) <= TOLERANCE * abs(float(ref["loss"]))
    for name, (a, b) in adapters.items():                # W' = W + s B A: dA = s B^T G, dB = s G A^T
        g = weight_grads[name]
        assert relative_error(scale * b.T @ g, grads[peft_key(name, "A")]) <= TOLERANCE, name
        assert relative_error(scale * g @ a.T, grads[peft_key(name, "B")]) <= TOLERANCE, name
