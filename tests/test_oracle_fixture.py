"""`npllama reference` against transformers' recorded activations and gradients, without torch.

tests/fixtures/hf_*/oracle*.safetensors were written by scripts/make_oracle_fixture.py: transformers'
LlamaForCausalLM in float64 throughout (npllama.hf_oracle), every named activation and gradient
recorded by hooks.  The golden file `npllama reference` writes for the same directory and batch, and
the reference on packed rows with padding, must agree with them to 1e-12 in every tensor (measured:
a few 1e-15), through `npllama compare`.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama import reference
from npllama.golden import golden_tensors, read_tensors

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
HF_EQUAL = 1e-12


@pytest.mark.parametrize("name", ["hf_gqa", "hf_mqa_tied_llama3"])
def test_npllama_reference_matches_the_transformers_dump(name, tmp_path):
    oracle = FIXTURES / name / "oracle.safetensors"
    tokens = read_tensors(oracle)[0]["tokens"]
    golden = tmp_path / "golden.safetensors"
    done = subprocess.run([sys.executable, "-m", "npllama.cli", "reference", str(FIXTURES / name), "--tokens",
                           ";".join(",".join(map(str, row)) for row in tokens), "--out", str(golden)],
                          capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src")}, timeout=600)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "npllama.cli", "compare", str(golden), str(oracle), "--rtol",
                           str(HF_EQUAL)], capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src")},
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "missing" not in done.stdout and "not in GOLDEN" not in done.stdout, done.stdout
    assert done.stdout.splitlines()[-1].startswith("no divergence: ")


@pytest.mark.parametrize("name", ["hf_gqa", "hf_mqa_tied_llama3"])
def test_packed_rows_with_padding_match_the_transformers_dump(name):
    oracle, _ = read_tensors(FIXTURES / name / "oracle_packed.safetensors")
    model = npllama.Llama.from_pretrained(FIXTURES / name, dtype=np.float64)
    inputs = {k: oracle.pop(k) for k in ("segment_ids", "position_ids", "attention_mask")}
    run = reference.run_with_cache(model.params, model.config, oracle["tokens"], oracle["targets"], reduction="sum",
                                   **inputs)
    result = npllama.compare(golden_tensors(run, oracle["tokens"], oracle["targets"]), oracle, rtol=HF_EQUAL)
    assert result.ok and not result.missing and not result.unknown, result.report()
    assert max(r.max_rel for r in result.rows) < 1e-13


def test_packed_golden_file_from_the_command_line(tmp_path):
    """`npllama reference --segment-ids --attention-mask --reduction sum`: positions restart per
    document, targets -100 at documents' ends and padding -- the oracle's batch, to 1e-12."""
    oracle_path = FIXTURES / "hf_gqa" / "oracle_packed.safetensors"
    oracle, _ = read_tensors(oracle_path)
    rows = lambda a: ";".join(",".join(map(str, row)) for row in a)   # noqa: E731
    golden = tmp_path / "packed.safetensors"
    done = subprocess.run([sys.executable, "-m", "npllama.cli", "reference", str(FIXTURES / "hf_gqa"),
                           "--tokens", rows(oracle["tokens"]), "--segment-ids", rows(oracle["segment_ids"]),
                           "--attention-mask", rows(oracle["attention_mask"]), "--reduction", "sum", "--out", str(golden)],
                          capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src")}, timeout=600)
    assert done.returncode == 0, done.stderr
    result = npllama.compare(golden, oracle_path, rtol=HF_EQUAL)
    assert result.ok and not result.missing and not result.unknown, result.report()
    assert {"segment_ids", "position_ids", "attention_mask", "targets"} <= {r.name for r in result.rows}
