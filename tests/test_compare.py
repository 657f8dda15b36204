"""Golden files (`npllama reference`) and the first-divergence report (`npllama compare`, npllama.compare).

1. A NumPy Llama of its own (tests/own_llama.py: Meta's names, fused wqkv / w13, w2 transposed,
   Meta's RoPE order) agrees with the golden file through a --map; each planted bug of issue 27
   is named as the first divergence at the activation or gradient where it is.
2. The command line: the golden file's contents and metadata, compare's exit codes, order and
   listing of missing / unknown names, .npz and bfloat16 files, one-line errors.
"""
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npllama
import own_llama
from npllama import reference
from npllama.cli import main
from npllama.divergence import DEFAULT_RTOL, apply_map, check_rules, order_key
from npllama.golden import golden_tensors, next_token_targets, read_tensors
from npllama.gradcheck import random_params

ROOT = Path(__file__).resolve().parent.parent
CFG = npllama.LlamaConfig(vocab_size=17, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=12, max_seq_len=8)


@pytest.fixture(scope="module")
def case():
    r = np.random.default_rng(0)
    params = random_params(CFG, r)
    tokens = r.integers(0, CFG.vocab_size, size=(2, 7))
    targets = next_token_targets(tokens)
    golden = golden_tensors(reference.run_with_cache(params, CFG, tokens, targets), tokens, targets)
    return params, tokens, targets, golden


# ---- 1. an implementation of its own, right and with each planted bug ---------------------------
@pytest.mark.parametrize("meta_rope", [False, True])
def test_a_correct_implementation_of_its_own_agrees_through_a_map(case, meta_rope):
    params, tokens, targets, golden = case
    rules = own_llama.MAP + own_llama.qkv_rules(CFG) + (own_llama.meta_rope_rules(CFG) if meta_rope else [])
    mine = own_llama.run(own_llama.own_params(params, CFG, meta_rope), CFG, tokens, targets, meta_rope=meta_rope)
    result = npllama.compare(golden, mine, map=rules)
    assert result.ok, result.report()
    assert result.missing == [] and result.unknown == []
    assert len(result.rows) == len(golden)
    assert max(r.max_rel for r in result.rows) < 1e-13
    # without the RoPE rules, Meta's order is (rightly) a divergence at the q projection
    if meta_rope:
        plain = npllama.compare(golden, mine, map=own_llama.MAP + own_llama.qkv_rules(CFG))
        assert plain.first_divergence == "model.layers.0.self_attn.q_proj"


PLANTED = {
    "rope_interleaved": "model.layers.0.self_attn.q_rope",
    "scale_1_over_hd": "model.layers.0.self_attn.scores",
    "gqa_tile": "model.layers.0.self_attn.scores",
    "eps_outside_sqrt": "model.layers.0.input_layernorm",
    "swiglu_no_sigma_prime": f"grad.model.layers.{CFG.n_layers - 1}.mlp.gate_proj",   # the forward is right
}


@pytest.mark.parametrize("bug", own_llama.BUGS)
def test_each_planted_bug_is_named_where_it_is(case, bug):
    params, tokens, targets, golden = case
    mine = own_llama.run(own_llama.own_params(params, CFG), CFG, tokens, targets, bugs=(bug,))
    result = npllama.compare(golden, mine, map=own_llama.MAP + own_llama.qkv_rules(CFG))
    assert result.first_divergence == PLANTED[bug], result.report()
    assert result.report().splitlines()[-1].startswith(f"first divergence: {PLANTED[bug]} (max rel ")
    # everything before it agrees to rounding
    before = result.rows[:[r.name for r in result.rows].index(PLANTED[bug])]
    assert before and max(r.max_rel for r in before) < 1e-13


# ---- 2. the files and the commands -----------------------------------------------------------------
def test_order_is_inputs_forward_backward_parameters():
    names = ["grad.lm_head.weight", "model.layers.1.resid_pre", "grad.model.layers.0.resid_pre", "lm_head",
             "grad.model.embed_tokens.weight", "model.embed_tokens", "tokens", "grad.lm_head",
             "model.layers.0.self_attn.probs", "model.layers.0.self_attn.scores", "loss", "something_else",
             "grad.model.layers.1.input_layernorm.weight", "grad.model.layers.0.mlp.up_proj.weight"]
    assert sorted(names, key=order_key) == [
        "tokens", "model.embed_tokens", "model.layers.0.self_attn.scores", "model.layers.0.self_attn.probs",
        "model.layers.1.resid_pre", "lm_head", "loss", "grad.lm_head", "grad.model.layers.0.resid_pre",
        "grad.model.embed_tokens.weight", "grad.model.layers.0.mlp.up_proj.weight",
        "grad.model.layers.1.input_layernorm.weight", "grad.lm_head.weight", "something_else"]


def test_map_rules():
    x = np.arange(24.0).reshape(2, 12)
    rules = check_rules([{"match": r"^a\.(\d)$", "rename": r"b.\1"},
                         {"match": r"^b\.1$", "split": ["p", "q"], "axis": 1, "sizes": [4, 8]},
                         {"match": r"^q$", "rope": "interleaved", "head_dim": 4, "axis": -1},
                         {"match": r"^p$", "transpose": True}])
    out = apply_map({"a.1": x, "grad.a.1": -x, "c": x}, rules)
    assert set(out) == {"p", "q", "grad.p", "grad.q", "c"}
    np.testing.assert_array_equal(out["p"], x[:, :4].T)
    np.testing.assert_array_equal(out["q"][0], [4, 6, 5, 7, 8, 10, 9, 11])     # pairs -> halves, per head
    np.testing.assert_array_equal(out["grad.q"], -out["q"])
    for bad, match in [({"rename": "x"}, "needs match"), ({"match": "(", "rename": "x"}, "not a regular"),
                       ({"match": "a"}, "exactly one of"), ({"match": "a", "split": ["x"]}, "two or more"),
                       ({"match": "a", "rope": "interleaved"}, "head_dim")]:
        with pytest.raises(npllama.InputError, match=match):
            check_rules([bad])
    with pytest.raises(npllama.InputError, match=r"cannot split axis 1 of shape \(2, 12\) into \[5, 5\]"):
        apply_map({"a": x}, check_rules([{"match": "a", "split": ["x", "y"], "axis": 1, "sizes": [5, 5]}]))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "npllama.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=600)


def test_reference_and_compare_commands(tmp_path, case):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CFG.to_dict()))
    golden_path = tmp_path / "golden.safetensors"
    done = cli("reference", "--random-config", config, "--seed", 3, "--tokens", "1,2,3,4;5,6,7,8",
               "--out", golden_path)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and (tmp_path / "golden.model" / "model.safetensors").exists()
    tensors, meta = read_tensors(golden_path)
    assert meta["npllama.dtype"] == "float64" and meta["npllama.version"] == npllama.__version__
    assert json.loads(meta["npllama.config"]) == CFG.to_dict()
    assert "--random-config" in meta["npllama.command"]
    np.testing.assert_array_equal(tensors["tokens"], [[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(tensors["targets"], [[2, 3, 4, -100], [6, 7, 8, -100]])
    expected = set(reference.activation_shapes(CFG, 2, 4))
    assert {k for k in tensors if not k.startswith("grad.")} == expected | {"tokens", "targets", "loss"}
    params = {k: v for k, v in read_tensors(tmp_path / "golden.model" / "model.safetensors")[0].items()}
    assert {k.removeprefix("grad.") for k in tensors if k.startswith("grad.")} == expected | set(params)
    # the saved weights are the golden file's: the reference on them gives the same numbers
    run = reference.run_with_cache(params, CFG, tensors["tokens"], tensors["targets"])
    np.testing.assert_array_equal(run.logits, tensors["lm_head"])

    # itself: exit 0; float32 from the saved weights: exit 0 under float32's rtol
    same = cli("compare", golden_path, golden_path)
    assert same.returncode == 0 and same.stdout.splitlines()[-1].startswith("no divergence:")
    f32 = tmp_path / "f32.safetensors"
    assert cli("reference", tmp_path / "golden.model", "--tokens", "1,2,3,4;5,6,7,8", "--dtype", "float32",
               "--out", f32).returncode == 0
    done = cli("compare", golden_path, f32)
    assert done.returncode == 0 and f"rtol {DEFAULT_RTOL['float32']:.0e}" in done.stdout, done.stdout
    assert cli("compare", golden_path, f32, "--rtol", "1e-12").returncode == 1

    # a wrong tensor, a missing one, an unknown one, as .npz
    wrong = dict(tensors)
    wrong["model.layers.1.mlp.swiglu"] = wrong["model.layers.1.mlp.swiglu"] * (1 + 1e-6)
    del wrong["grad.model.norm"]
    wrong["my.extra"] = np.zeros(3)
    np.savez(tmp_path / "mine.npz", **wrong)
    done = cli("compare", golden_path, tmp_path / "mine.npz")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("first divergence: model.layers.1.mlp.swiglu (max rel 1.00e-06 > rtol 1e-10)")
    assert "missing from MINE (1): grad.model.norm" in done.stdout
    assert "not in GOLDEN, ignored (1): my.extra" in done.stdout
    names = [line.split()[0] for line in lines[1:] if line.split()[0] in tensors]
    assert names == sorted(names, key=order_key)

    # bfloat16 tensors in safetensors (as PyTorch writes them) are read
    bits = (tensors["lm_head"].astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"lm_head": {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [0, bits.nbytes]}})
    header += " " * (-len(header) % 8)
    header_dtype_file = tmp_path / "bf16.safetensors"
    header_dtype_file.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bits.tobytes())
    mine, _ = read_tensors(header_dtype_file)
    assert mine["lm_head"].dtype == np.float32
    assert np.abs(mine["lm_head"] - tensors["lm_head"]).max() <= 2 ** -7 * np.abs(tensors["lm_head"]).max()


@pytest.mark.parametrize("args, message", [
    (["reference", "--out", "x.safetensors"], "give MODEL or --random-config CONFIG.json, exactly one"),
    (["reference", "--random-config", "{config}", "--tokens", "1,x", "--out", "{tmp}/g.safetensors"],
     "--tokens expects integers"),
    (["reference", "--random-config", "{config}", "--tokens", "1,99", "--out", "{tmp}/g.safetensors"],
     r"token id 99 at (0, 1) is outside [0, 17)"),
    (["reference", "--random-config", "{config}", "--tokens", "1,2;3", "--out", "{tmp}/g.safetensors"],
     "every row needs the same length"),
    (["reference", "--random-config", "{config}", "--text", "hi", "--out", "{tmp}/g.safetensors"],
     "--text needs the model's tokenizer"),
    (["reference", "--random-config", "{config}", "--seq-len", "9", "--out", "{tmp}/g.safetensors"],
     "longer than max_seq_len (8)"),
    (["compare", "{tmp}/none.safetensors", "{tmp}/none.safetensors"], "no such file"),
    (["compare", "{config}", "{config}"], "config.json"),
    (["compare", "{tmp}/a.npz", "{tmp}/a.npz", "--map", "{tmp}/none.toml"], "no such map file"),
    (["compare", "{tmp}/a.npz", "{tmp}/a.npz", "--map", "{config}"], "not a TOML file"),
    (["compare", "{tmp}/a.npz", "{tmp}/b.npz"], "no tensor name in common"),
])
def test_bad_arguments_give_one_line(tmp_path, args, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CFG.to_dict()))
    np.savez(tmp_path / "a.npz", x=np.zeros(2))
    np.savez(tmp_path / "b.npz", y=np.zeros(2))
    args = [a.format(config=config, tmp=tmp_path) for a in args]
    done = cli(*args)
    assert done.returncode == 1, done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("npllama: error: "), done.stderr
    assert message in done.stderr


def test_compare_in_python_takes_dicts_and_paths(tmp_path, case):
    _, _, _, golden = case
    np.savez(tmp_path / "g.npz", **golden)
    result = npllama.compare(tmp_path / "g.npz", golden)
    assert result.ok and result.rtol == DEFAULT_RTOL["float64"]
    assert main(["compare", str(tmp_path / "g.npz"), str(tmp_path / "g.npz")]) == 0


def test_reference_of_a_peft_adapter_directory_is_the_merged_model(tmp_path):
    """A PEFT adapter directory (tests/fixtures/lora_peft, on ../hf_gqa): the golden file's logits are
    what PEFT computed (its fixture, float64) for the same tokens."""
    fixture = ROOT / "tests" / "fixtures" / "lora_peft"
    peft_values, _ = read_tensors(fixture / "reference.safetensors")
    tokens = peft_values["tokens"]
    done = cli("reference", fixture, "--tokens", ";".join(",".join(map(str, row)) for row in tokens),
               "--out", tmp_path / "golden.safetensors")
    assert done.returncode == 0, done.stderr
    golden, _ = read_tensors(tmp_path / "golden.safetensors")
    scale = np.abs(peft_values["logits"]).max()
    assert np.abs(golden["lm_head"] - peft_values["logits"]).max() <= 1e-12 * scale
