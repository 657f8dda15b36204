"""npllama's golden files against transformers' float64 Llama recorded by npllama.hf_oracle's hooks.

`npllama reference` on a random config, a Hugging Face directory and a GGUF file; then
``hf_oracle.record_transformers`` on the same weights and batch; ``npllama.compare`` of the two
must find every named activation and gradient within 1e-12 (measured: <= ~5e-15).  Also packed
rows (position_ids + segment_ids, as a 4-D mask) and padding, inputs_embeds, a summed loss and a
backward from dlogits.  Skipped without torch and transformers.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama import reference
from npllama.formats.hf import save_pretrained
from npllama.golden import golden_tensors, next_token_targets, read_tensors
from npllama.gradcheck import LLAMA3_SCALING, random_params

pytest.importorskip("torch")
pytest.importorskip("transformers")
from npllama import hf_oracle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HF_EQUAL = 1e-12
CONFIGS = {
    "gqa": dict(vocab_size=23, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, max_seq_len=16),
    "mqa_tied_llama3": dict(vocab_size=19, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=20,
                            max_seq_len=16, rope_theta=500000.0, tie_embeddings=True, norm_eps=1e-6,
                            rope_scaling={**LLAMA3_SCALING, "original_max_position_embeddings": 8}),
}


def reference_command(*args):
    done = subprocess.run([sys.executable, "-m", "npllama.cli", "reference", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=900)
    assert done.returncode == 0, done.stderr


def assert_agree(golden, mine):
    result = npllama.compare(golden, mine, rtol=HF_EQUAL)
    assert result.ok, result.report()
    assert result.missing == [] and result.unknown == [], (result.missing, result.unknown)
    return result


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_golden_file_of_a_random_config_matches_transformers(name, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIGS[name]))
    reference_command("--random-config", config, "--batch", 2, "--seq-len", 9, "--seed", 4,
                      "--out", tmp_path / "golden.safetensors")
    golden, _ = read_tensors(tmp_path / "golden.safetensors")
    hf = hf_oracle.load_float64(tmp_path / "golden.model")
    mine = hf_oracle.record_transformers(hf, golden["tokens"], golden["targets"])
    result = assert_agree(tmp_path / "golden.safetensors", mine)
    assert len(result.rows) == len(golden)


def test_golden_file_of_a_hugging_face_directory_matches_transformers(tmp_path):
    model_dir = ROOT / "tests" / "fixtures" / "hf_gqa"
    reference_command(model_dir, "--tokens", "5,1,7,3,0,2;9,9,4,8,6,1", "--out", tmp_path / "golden.safetensors")
    golden, _ = read_tensors(tmp_path / "golden.safetensors")
    mine = hf_oracle.record_transformers(hf_oracle.load_float64(model_dir), golden["tokens"], golden["targets"])
    assert_agree(tmp_path / "golden.safetensors", mine)


@pytest.mark.slow
def test_golden_file_of_a_gguf_matches_transformers(tmp_path):
    from real_model import smollm2_gguf   # downloads (once) the real model: only for this test
    gguf = smollm2_gguf()
    reference_command(gguf, "--text", "The cat", "--out", tmp_path / "golden.safetensors")
    golden, _ = read_tensors(tmp_path / "golden.safetensors")
    # transformers reads the same dequantized weights from a Hugging Face directory
    npllama.Llama.from_pretrained(gguf, dtype=np.float64).save_pretrained(tmp_path / "hf")
    mine = hf_oracle.record_transformers(hf_oracle.load_float64(tmp_path / "hf"), golden["tokens"], golden["targets"])
    assert_agree(tmp_path / "golden.safetensors", mine)


def test_packed_rows_padding_and_other_backwards_match_transformers(tmp_path):
    cfg = npllama.LlamaConfig(**CONFIGS["gqa"])
    r = np.random.default_rng(9)
    params = random_params(cfg, r)
    save_pretrained(tmp_path, cfg, params, None)
    hf = hf_oracle.load_float64(tmp_path)
    tokens = r.integers(0, cfg.vocab_size, size=(2, 10))
    targets = next_token_targets(tokens)
    segment_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    position_ids = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    attention_mask = np.ones((2, 10), dtype=np.int64)
    attention_mask[1, 8:] = 0                                            # right padding in row 1
    targets[attention_mask == 0] = -100
    cases = {
        "packed": dict(segment_ids=segment_ids, position_ids=position_ids),
        "packed_padded_sum": dict(segment_ids=segment_ids, position_ids=position_ids,
                                  attention_mask=attention_mask, reduction="sum"),
    }
    for name, kw in cases.items():
        run = reference.run_with_cache(params, cfg, tokens, targets, **kw)
        assert_agree(golden_tensors(run, tokens, targets), hf_oracle.record_transformers(hf, tokens, targets, **kw))
    # (positions that restart would make transformers infer documents of its own, without a mask:
    # npllama takes documents from segment_ids only)
    embeds, shifted = r.normal(size=(2, 10, cfg.dim)), np.arange(10) + 3
    run = reference.run_with_cache(params, cfg, None, targets, inputs_embeds=embeds, position_ids=shifted)
    assert_agree(golden_tensors(run, None, targets),
                 hf_oracle.record_transformers(hf, None, targets, inputs_embeds=embeds, position_ids=shifted))
    dlogits = r.normal(size=(2, 10, cfg.vocab_size))
    run = reference.run_with_cache(params, cfg, tokens, dlogits=dlogits)
    assert_agree(golden_tensors(run, tokens, None), hf_oracle.record_transformers(hf, tokens, dlogits=dlogits))
