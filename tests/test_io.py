"""Hugging Face format: save/load round trips, both RoPE spellings, and clear errors for bad files."""
import json

import numpy as np
import pytest

import npllama
from npllama.errors import CheckpointError, ConfigError
from npllama.formats.safetensors import read_safetensors, write_safetensors

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def make_model(tie=False, scaling=None, dtype=np.float32):
    cfg = npllama.LlamaConfig(vocab_size=17, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=12,
                              max_seq_len=32, tie_embeddings=tie, rope_scaling=scaling, rope_theta=50000.0)
    return npllama.Llama(cfg, seed=3, dtype=dtype)


@pytest.mark.parametrize("tie, scaling", [(False, None), (True, LLAMA3)])
def test_save_load_round_trip(tmp_path, tie, scaling):
    m = make_model(tie, scaling)
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    m2 = npllama.Llama.from_pretrained(tmp_path, dtype=np.float32)
    assert m2.config == m.config
    np.testing.assert_array_equal(m2.flat_params, m.flat_params)
    tokens = np.arange(10).reshape(2, 5)
    np.testing.assert_array_equal(m2.forward(tokens), m.forward(tokens))
    m3 = npllama.Llama.from_pretrained(tmp_path, dtype=np.float64)
    np.testing.assert_array_equal(m3.flat_params, m.flat_params.astype(np.float64))


def test_both_rope_spellings(tmp_path):
    m = make_model(scaling=LLAMA3)
    m.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    old_style = {k: v for k, v in hf.items() if k != "rope_parameters"}
    new_style = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    for variant in (old_style, new_style):
        cfg = npllama.LlamaConfig.from_hf_dict(variant)
        assert cfg.rope_theta == 50000.0 and cfg.rope_scaling == LLAMA3


def test_bf16_and_fp16_weights_are_upcast(tmp_path):
    m = make_model()
    m.save_pretrained(tmp_path)
    tensors = {k: v for k, (_, v) in read_safetensors(tmp_path / "model.safetensors").items()}
    as_f16 = {k: v.astype(np.float16) for k, v in tensors.items()}
    write_safetensors(tmp_path / "model.safetensors", as_f16)
    m16 = npllama.Llama.from_pretrained(tmp_path)
    np.testing.assert_array_equal(m16.params["model.norm.weight"], as_f16["model.norm.weight"].astype(np.float32))
    # bfloat16 = the high 16 bits of a float32; write such a file by hand
    bits = {k: (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for k, v in tensors.items()}
    write_safetensors(tmp_path / "model.safetensors", bits)
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"U16"', b'"BF16"')
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    mbf = npllama.Llama.from_pretrained(tmp_path)
    w = tensors["model.embed_tokens.weight"]
    np.testing.assert_allclose(mbf.params["model.embed_tokens.weight"], w, rtol=2 ** -7)
    expected = (bits["model.embed_tokens.weight"].astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(mbf.params["model.embed_tokens.weight"], expected)


def test_sharded_checkpoint(tmp_path):
    m = make_model()
    names = [n for n, _ in m.layout]
    half = len(names) // 2
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {n: m.params[n] for n in names[:half]})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {n: m.params[n] for n in names[half:]})
    weight_map = {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_hf_dict()))
    np.testing.assert_array_equal(npllama.Llama.from_pretrained(tmp_path).flat_params, m.flat_params)
    weight_map[names[0]] = "../evil.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside"):
        npllama.Llama.from_pretrained(tmp_path)


@pytest.fixture
def saved(tmp_path):
    make_model().save_pretrained(tmp_path)
    return tmp_path


def test_missing_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not a directory"):
        npllama.Llama.from_pretrained(tmp_path / "nope")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        npllama.Llama.from_pretrained(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json.*not found"):
        npllama.Llama.from_pretrained(saved)


@pytest.mark.parametrize("corrupt, match", [
    (lambda b: b[:len(b) // 2], "offsets|truncated"),
    (lambda b: b[:5], "truncated"),
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "claims"),
    (lambda b: b[:8] + b"X" + b[9:], "corrupt safetensors header"),
])
def test_corrupt_safetensors(saved, corrupt, match):
    path = saved / "model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CheckpointError, match=match):
        npllama.Llama.from_pretrained(saved)


def test_wrong_tensors(saved):
    path = saved / "model.safetensors"
    tensors = {k: v for k, (_, v) in read_safetensors(path).items()}
    bad = dict(tensors, **{"model.norm.weight": np.ones(5, np.float32)})
    write_safetensors(path, bad)
    with pytest.raises(CheckpointError, match="model.norm.weight.*shape"):
        npllama.Llama.from_pretrained(saved)
    write_safetensors(path, {k: v for k, v in tensors.items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointError, match="missing tensor.*lm_head.weight"):
        npllama.Llama.from_pretrained(saved)
    write_safetensors(path, dict(tensors, **{"model.layers.9.mlp.up_proj.weight": np.ones((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        npllama.Llama.from_pretrained(saved)
    write_safetensors(path, dict(tensors, **{"model.norm.weight": np.ones(8, np.int32)}))
    with pytest.raises(CheckpointError, match="floating-point"):
        npllama.Llama.from_pretrained(saved)
    nan = tensors["model.norm.weight"].copy()
    nan[0] = np.nan
    write_safetensors(path, dict(tensors, **{"model.norm.weight": nan}))
    with pytest.raises(CheckpointError, match="NaN"):
        npllama.Llama.from_pretrained(saved)


@pytest.mark.parametrize("edit, match", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "yarn"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ({"num_key_value_heads": 3}, "divisible by n_kv_heads"),
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"hidden_size": "big"}, "hidden_size|dim"),
])
def test_config_refused_with_named_field(saved, edit, match):
    hf = json.loads((saved / "config.json").read_text())
    hf.update(edit)
    (saved / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=match):
        npllama.Llama.from_pretrained(saved)


def test_corrupt_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        npllama.Llama.from_pretrained(saved)


def test_pickle_checkpoint_is_refused(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        npllama.Llama.from_pretrained(saved)


def test_gradcheck_cli(capsys):
    from npllama.cli import main
    assert main(["gradcheck", "--layer", "attention", "--layer", "rmsnorm"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "rmsnorm" in out and "all gradients match" in out
    assert main(["gradcheck", "--layer", "rope", "--tolerance", "1e-20"]) == 1   # the check can fail
    assert "FAILED" in capsys.readouterr().out
