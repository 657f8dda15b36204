"""Write tests/fixtures/hf_*/oracle.safetensors: transformers' every named activation and gradient,
in float64 throughout, recorded by npllama.hf_oracle's hooks in npllama's golden file format.

tests/test_oracle_fixture.py (no torch needed) then checks `npllama reference` on the same directory
and batch against these files with `npllama compare`: the round trip "transformers vs npllama" runs
in CI, where torch is not installed.  Two batches per fixture:

  oracle.safetensors          tokens (2, 7), next-token targets
  oracle_packed.safetensors   tokens (2, 9) as packed rows with padding: segment_ids, position_ids,
                              attention_mask stored beside (npllama's 4-D mask given to transformers),
                              targets -100 at the padding, the loss summed

Rerun (CPU, a few seconds):
    pip install torch==2.13.0 transformers
    python scripts/make_oracle_fixture.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))   # this checkout's npllama
from npllama import hf_oracle  # noqa: E402
from npllama.golden import next_token_targets, write_golden  # noqa: E402

FIXTURES = ("hf_gqa", "hf_mqa_tied_llama3")
TOKENS = np.array([[5, 1, 7, 3, 0, 2, 11], [9, 9, 4, 8, 6, 1, 30]])
PACKED = dict(
    tokens=np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8, 2, 8, 1, 8, 0]]),
    segment_ids=np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]]),
    position_ids=np.array([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2, 3]]),
    attention_mask=np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0]]),
)


def main():
    for name in FIXTURES:
        directory = ROOT / "tests" / "fixtures" / name
        model = hf_oracle.load_float64(directory)
        tensors = hf_oracle.record_transformers(model, TOKENS, next_token_targets(TOKENS))
        write_golden(directory / "oracle.safetensors", tensors, producer="transformers (npllama.hf_oracle)",
                     command="python scripts/make_oracle_fixture.py")
        inputs = {k: v for k, v in PACKED.items() if k != "tokens"}
        targets = next_token_targets(PACKED["tokens"], **inputs)   # -100 at documents' ends and padding
        tensors = hf_oracle.record_transformers(model, PACKED["tokens"], targets, reduction="sum", **inputs)
        write_golden(directory / "oracle_packed.safetensors", {**tensors, **inputs},
                     producer="transformers (npllama.hf_oracle)", command="python scripts/make_oracle_fixture.py")
        print(f"wrote {directory}/oracle.safetensors, oracle_packed.safetensors")


if __name__ == "__main__":
    main()
