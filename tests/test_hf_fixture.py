"""npllama against Hugging Face transformers' LlamaForCausalLM.

The fixtures in tests/fixtures/hf_* were made by scripts/make_hf_fixture.py with transformers 5.24 in
float64 (its float32 casts lifted); the reference values there agree with an independent float64 Llama
to ~5e-15.  Loading them in float64, npllama's logits, loss and every gradient must agree to 1e-10
relative (max|a - b| / max|b|).  These tests only read files; torch is not needed.

The round-trip tests at the end (skipped without torch/transformers) go the other way: a random npllama
model is written with save_pretrained and read by transformers.LlamaForCausalLM.from_pretrained.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import npllama

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HF_FIXTURES = ["hf_gqa", "hf_mqa_tied_llama3"]
TOLERANCE = 1e-10


def relative_error(a, b) -> float:
    """max|a - b| / max|b|: the worst error relative to the reference's scale."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference shape {b.shape}"
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def load_reference(name):
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    grads = {key.removeprefix("grad."): value for key, value in ref.items() if key.startswith("grad.")}
    return ref, grads


@pytest.fixture(scope="module", params=HF_FIXTURES)
def hf_case(request):
    name = request.param
    ref, ref_grads = load_reference(name)
    model = npllama.Llama.from_pretrained(FIXTURES / name, dtype=np.float64)
    return name, model, ref, ref_grads


def test_fixture_configs_parse_as_intended():
    """The fixtures exercise what they are named for (transformers 5 writes RoPE as rope_parameters)."""
    gqa = npllama.LlamaConfig.from_hf_dict(json.loads((FIXTURES / "hf_gqa" / "config.json").read_text()))
    assert (gqa.n_heads, gqa.n_kv_heads, gqa.tie_embeddings, gqa.rope_scaling) == (4, 2, False, None)
    assert gqa.rope_theta == 10000.0 and gqa.norm_eps == 1e-5

    raw = json.loads((FIXTURES / "hf_mqa_tied_llama3" / "config.json").read_text())
    assert "rope_scaling" not in raw and raw["rope_parameters"]["rope_type"] == "llama3"
    mqa = npllama.LlamaConfig.from_hf_dict(raw)
    assert (mqa.n_heads, mqa.n_kv_heads, mqa.tie_embeddings) == (2, 1, True)
    assert mqa.rope_theta == 500000.0
    assert mqa.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 28}


def test_param_names_match_transformers(hf_case):
    name, model, ref, ref_grads = hf_case
    assert set(model.params) == set(ref_grads), name
    for key, value in model.params.items():
        assert value.shape == ref_grads[key].shape, key


def test_loaded_weights_equal_checkpoint(hf_case):
    """Every tensor of model.safetensors lands unchanged (float32 ones upcast exactly) under its name."""
    name, model, _, _ = hf_case
    stored = load_file(str(FIXTURES / name / "model.safetensors"))
    assert set(stored) == set(model.params)  # tied checkpoints hold no lm_head.weight
    for key, value in stored.items():
        assert model.params[key].dtype == np.float64
        np.testing.assert_array_equal(model.params[key], value.astype(np.float64), err_msg=key)


def test_logits_match_transformers(hf_case):
    name, model, ref, _ = hf_case
    logits = model.forward(ref["tokens"])
    assert logits.dtype == np.float64
    assert relative_error(logits, ref["logits"]) <= TOLERANCE, name


def test_loss_and_grads_match_transformers(hf_case):
    name, model, ref, ref_grads = hf_case
    assert np.sum(ref["targets"] == -100) > 0  # the fixture does exercise ignored targets
    loss, grads = model.loss_and_grad(ref["tokens"], ref["targets"])
    ref_loss = float(ref["loss"].reshape(()))
    assert abs(float(loss) - ref_loss) / abs(ref_loss) <= TOLERANCE, (name, loss, ref_loss)
    assert set(grads) == set(ref_grads)
    errors = {key: relative_error(grads[key], ref_grads[key]) for key in ref_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{name}: gradient of {worst} off by {errors[worst]:.2e}"


# ---- npllama -> transformers ------------------------------------------------------------------------

ROUND_TRIP_CONFIGS = {
    "gqa": dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=40, max_seq_len=24,
                norm_eps=1e-5, rope_theta=10000.0),
    "tied_llama3": dict(vocab_size=50, dim=48, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=40,
                        max_seq_len=32, norm_eps=1e-6, rope_theta=500000.0, tie_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 28}),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CONFIGS))
def test_save_pretrained_loads_in_transformers(case, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from npllama import hf_oracle   # needs torch: imported once the test knows it is there

    cfg = npllama.LlamaConfig(**ROUND_TRIP_CONFIGS[case])
    model = npllama.Llama(cfg, seed=3, dtype=np.float64)
    # Weights far from the 0.02-std init, so the logits are not near-uniform and norm gains matter.
    rng = np.random.default_rng(7)
    for key, value in model.params.items():
        value[...] = 1.0 + 0.1 * rng.standard_normal(value.shape) if value.ndim == 1 else \
            0.2 * rng.standard_normal(value.shape)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 10))
    logits = model.forward(tokens)
    model.save_pretrained(tmp_path)

    with hf_oracle.float64_llama():
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                           attn_implementation="eager")
        hf.eval()
        state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
        with torch.no_grad():
            hf_logits = hf(input_ids=torch.from_numpy(tokens)).logits.numpy()

    # transformers read the RoPE settings npllama wrote.
    rope = hf.config.rope_parameters
    assert rope["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling is None:
        assert rope.get("rope_type", "default") == "default"
    else:
        for key, value in cfg.rope_scaling.items():
            assert rope[key] == value, key
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert hf.config.num_key_value_heads == cfg.n_kv_heads
    # Every weight arrives under the same name, exactly.
    for key, value in model.params.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    if cfg.tie_embeddings:
        np.testing.assert_array_equal(state["lm_head.weight"], model.params["model.embed_tokens.weight"])
    assert relative_error(logits, hf_logits) <= TOLERANCE
