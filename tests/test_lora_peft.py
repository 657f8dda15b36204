"""npllama's LoRA against PEFT + torch autograd, in float64.

tests/fixtures/lora_peft (made by scripts/make_lora_fixture.py) holds a LoRA adapter on every
projection of tests/fixtures/hf_gqa, as PEFT's save_pretrained writes it, and PEFT's float64 logits,
loss and adapter gradients for one batch, without dropout and with given dropout masks on the
adapters' inputs.  Two independent routes to those numbers:

* npllama.reference with ``lora=``: each adapted projection a ``lora_forward_reference`` and its
  backward ``lora_backward_reference`` (dA, dB; the frozen weights get no gradient), with the
  masks given as ``lora_masks=``;
* the merged model (no dropout): the fast ``npllama.Llama`` with every adapted W replaced by
  ``merge_lora`` = W + s B A, whose weight gradients G give the adapter's by the chain rule,
  dA = s B^T G and dB = s G A^T.

These tests only read files (no torch).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import npllama
from npllama.adapters import merge_adapters
from npllama import reference
from npllama.errors import CheckpointError
from npllama.gradcheck import relative_error
from npllama.layers.lora import merge_lora

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ADAPTER_DIR = FIXTURES / "lora_peft"
PEFT_PREFIX = "base_model.model."
TOLERANCE = 1e-12
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def load_adapter(directory):
    """{module name: (A, B, scale)} from PEFT's adapter_config.json + adapter_model.safetensors."""
    config = json.loads((directory / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    return {key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"):
            (tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")], scale)
            for key in tensors if key.endswith(".lora_A.weight")}


def from_peft_keys(tensors, prefix):
    """{"<prefix>base_model.model.<name>": t} -> {"<name>": t}: PEFT's keys as npllama.reference's."""
    return {key.removeprefix(prefix + PEFT_PREFIX): t for key, t in tensors.items() if key.startswith(prefix)}


@pytest.fixture(scope="module")
def case():
    base_dir = ADAPTER_DIR / json.loads((ADAPTER_DIR / "adapter_config.json").read_text())["base_model_name_or_path"]
    cfg = npllama.LlamaConfig.from_hf_dict(json.loads((base_dir / "config.json").read_text()))
    params = load_file(str(base_dir / "model.safetensors"))
    ref = load_file(str(ADAPTER_DIR / "reference.safetensors"))
    return base_dir, cfg, params, load_adapter(ADAPTER_DIR), ref


def test_adapter_files_are_in_peft_layout(case):
    _, cfg, params, lora, ref = case
    config = json.loads((ADAPTER_DIR / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, False)
    assert sorted(config["target_modules"]) == sorted(name.split(".")[1] for name in PROJECTIONS)
    assert set(lora) == {f"model.layers.{i}.{m}" for i in range(cfg.n_layers) for m in PROJECTIONS}
    for name, (a, b, scale) in lora.items():
        d_out, d_in = params[name + ".weight"].shape
        assert a.shape == (4, d_in) and b.shape == (d_out, 4) and a.dtype == b.dtype == np.float64, name
        assert scale == 2.0
        assert np.abs(a).max() <= 1 / np.sqrt(d_in) and b.any(), name    # A as PEFT inits it, B moved
    stored = set(load_file(str(ADAPTER_DIR / "adapter_model.safetensors")))
    assert {k.removeprefix("grad.") for k in ref if k.startswith("grad.")} == stored


def test_reference_with_lora_matches_peft(case):
    _, cfg, params, lora, ref = case
    assert relative_error(reference.forward(params, cfg, ref["tokens"], lora=lora), ref["logits"]) <= TOLERANCE
    loss, grads = reference.loss_and_grad(params, cfg, ref["tokens"], ref["targets"], lora=lora)
    assert abs(loss - float(ref["loss"])) <= TOLERANCE * abs(float(ref["loss"]))
    peft_grads = from_peft_keys(ref, "grad.")
    assert set(grads) == set(peft_grads)                 # the adapters' gradients, and nothing frozen
    worst = max(relative_error(grads[key], peft_grads[key]) for key in peft_grads)
    assert worst <= TOLERANCE, worst
    # the adapters matter: without them the logits are visibly different
    assert relative_error(reference.forward(params, cfg, ref["tokens"]), ref["logits"]) > 0.1


def test_reference_with_lora_dropout_masks_matches_peft(case):
    _, cfg, params, lora, ref = case
    masks = {key.removeprefix("mask."): m for key, m in ref.items() if key.startswith("mask.")}
    assert set(masks) == set(lora)
    loss, grads = reference.loss_and_grad(params, cfg, ref["tokens"], ref["targets"], lora=lora, lora_masks=masks)
    assert abs(loss - float(ref["dropout_loss"])) <= TOLERANCE * abs(float(ref["dropout_loss"]))
    peft_grads = from_peft_keys(ref, "dropout_grad.")
    assert set(grads) == set(peft_grads)
    worst = max(relative_error(grads[key], peft_grads[key]) for key in peft_grads)
    assert worst <= TOLERANCE, worst
    # the masks matter: the gradients without them are visibly different
    no_masks = from_peft_keys(ref, "grad.")
    assert max(relative_error(no_masks[key], peft_grads[key]) for key in peft_grads) > 0.01


def test_reference_refuses_an_adapter_on_no_projection(case):
    _, cfg, params, lora, ref = case
    a, b, scale = lora["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="model.layers.0.mlp.upproj"):
        reference.forward(params, cfg, ref["tokens"], lora={"model.layers.0.mlp.upproj": (a, b, scale)})


def test_merged_fast_model_matches_peft(case):
    base_dir, cfg, params, lora, ref = case
    model = npllama.Llama.from_pretrained(base_dir, dtype=np.float64)
    for name, (a, b, scale) in lora.items():
        model.params[name + ".weight"][...] = merge_lora(params[name + ".weight"], a, b, scale)
    assert relative_error(model.forward(ref["tokens"]), ref["logits"]) <= TOLERANCE
    loss, weight_grads = model.loss_and_grad(ref["tokens"], ref["targets"])
    assert abs(loss - float(ref["loss"])) <= TOLERANCE * abs(float(ref["loss"]))
    peft_grads = from_peft_keys(ref, "grad.")
    for name, (a, b, scale) in lora.items():             # W' = W + s B A: dA = s B^T G, dB = s G A^T
        g = weight_grads[name + ".weight"]
        assert relative_error(scale * b.T @ g, peft_grads[name + ".lora_A.weight"]) <= TOLERANCE, name
        assert relative_error(scale * g @ a.T, peft_grads[name + ".lora_B.weight"]) <= TOLERANCE, name


def test_from_pretrained_adapter_dir_applies_the_adapter(case):
    _, cfg, params, lora, ref = case
    model = npllama.Llama.from_pretrained(ADAPTER_DIR, dtype=np.float64)
    assert model.lora.rank == 4 and model.lora.scale == 2.0 and model.lora_base == (ADAPTER_DIR / "../hf_gqa").resolve()
    logits = model.forward(ref["tokens"])
    assert relative_error(logits, reference.forward(params, cfg, ref["tokens"], lora=lora)) <= TOLERANCE
    assert relative_error(logits, ref["logits"]) <= TOLERANCE
    masks = {key.removeprefix("mask."): m for key, m in ref.items() if key.startswith("mask.")}
    loss, grads = model.loss_and_grad(ref["tokens"], ref["targets"], lora_masks=masks)
    assert abs(loss - float(ref["dropout_loss"])) <= TOLERANCE * abs(float(ref["dropout_loss"]))
    peft_grads = from_peft_keys(ref, "dropout_grad.")
    assert set(grads) == set(peft_grads)
    assert max(relative_error(grads[key], peft_grads[key]) for key in peft_grads) <= TOLERANCE
    # the adapter's lora_dropout (0.25): drawn when training, off in eval mode
    no_dropout = from_peft_keys(ref, "grad.")
    _, drawn = model.loss_and_grad(ref["tokens"], ref["targets"])
    assert max(relative_error(drawn[key], no_dropout[key]) for key in no_dropout) > 0.01
    _, grads = model.eval().loss_and_grad(ref["tokens"], ref["targets"])
    assert max(relative_error(grads[key], no_dropout[key]) for key in no_dropout) <= TOLERANCE


def test_saved_adapter_round_trips_in_peft_layout(case, tmp_path):
    base_dir, _, _, _, ref = case
    model = npllama.Llama.from_pretrained(ADAPTER_DIR, dtype=np.float64)
    model.save_adapter(tmp_path / "adapter", base_dir.resolve())
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        ("LORA", 4, 8.0, str(base_dir.resolve()))
    assert sorted(config["target_modules"]) == sorted(name.split(".")[1] for name in PROJECTIONS)
    assert set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) == \
        set(load_file(str(ADAPTER_DIR / "adapter_model.safetensors")))
    again = npllama.Llama.from_pretrained(tmp_path / "adapter", dtype=np.float64)
    np.testing.assert_array_equal(again.forward(ref["tokens"]), model.forward(ref["tokens"]))


def test_merge_adapters_computes_the_adapter_form(case):
    _, _, _, _, ref = case
    model = npllama.Llama.from_pretrained(ADAPTER_DIR, dtype=np.float64)
    merged = merge_adapters(model)
    assert merged.lora is None
    assert relative_error(merged.forward(ref["tokens"]), ref["logits"]) <= TOLERANCE
    prompt = ref["tokens"][0, :3]
    np.testing.assert_array_equal(model.generate(prompt, 4), merged.generate(prompt, 4))


def test_adapter_dir_errors_name_the_problem(tmp_path):
    bad = tmp_path / "adapter"
    shutil.copytree(ADAPTER_DIR, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nowhere"}))
    with pytest.raises(CheckpointError, match="nowhere"):
        npllama.Llama.from_pretrained(bad)
    (bad / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(ADAPTER_DIR / "../hf_gqa"),
                                                         "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        npllama.Llama.from_pretrained(bad)


def _edited_adapter(tmp_path, **changes):
    bad = tmp_path / "adapter"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(ADAPTER_DIR, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(ADAPTER_DIR.parent / "hf_gqa")
    (bad / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return bad


def test_an_adapter_rank_its_weights_do_not_have_is_refused_before_allocating(tmp_path):
    """A small adapter claiming r = 10^6: refused from the weights' header, in bounded memory (was:
    23.5 s and 7.4 GB before the shape error)."""
    import resource
    bad = _edited_adapter(tmp_path, r=10**6)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), hard))
    try:
        with pytest.raises(CheckpointError, match=r"not of the rank r = 1000000 that adapter_config.json gives") as e:
            npllama.Llama.from_pretrained(bad)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert str(bad / "adapter_model.safetensors") in str(e.value)


@pytest.mark.parametrize("alpha", ["Infinity", "NaN", "-Infinity"])
def test_a_non_finite_lora_alpha_is_refused(tmp_path, alpha):
    bad = _edited_adapter(tmp_path)
    text = (bad / "adapter_config.json").read_text()
    config = json.loads(text)
    (bad / "adapter_config.json").write_text(text.replace(f'"lora_alpha": {json.dumps(config["lora_alpha"])}',
                                                          f'"lora_alpha": {alpha}'))
    with pytest.raises(CheckpointError, match="a finite lora_alpha > 0") as e:
        npllama.Llama.from_pretrained(bad)
    assert str(bad / "adapter_config.json") in str(e.value)


def test_an_adapter_whose_base_is_itself_is_refused_by_name(tmp_path):
    bad = _edited_adapter(tmp_path, base_model_name_or_path=".")
    with pytest.raises(CheckpointError, match=r"base model '\.' is a LoRA adapter directory \(this one\)"):
        npllama.Llama.from_pretrained(bad)
