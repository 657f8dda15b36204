"""Greedy decoding against transformers' generate(do_sample=False).

tests/fixtures/hf_generate (scripts/make_generate_fixture.py) holds a tiny random GQA Llama with float32
weights and, per prompt, the 20 tokens transformers' greedy generate() appends (computed in float64, no
early stop), plus the float64 logits at the last position of a forward over prompt + continuation.
Along every greedy path the top two logits are >= ~0.01 apart (logits of size ~10), so float32 rounding
(~1e-6) cannot flip a choice and the float32 model must produce the same tokens too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import npllama

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hf_generate"
GREEDY = json.loads((FIXTURE / "greedy.json").read_text())
CASES = GREEDY["cases"]
N_NEW = GREEDY["max_new_tokens"]


@pytest.fixture(scope="module", params=[np.float64, np.float32], ids=["float64", "float32"])
def model(request):
    m = npllama.Llama.from_pretrained(FIXTURE, dtype=request.param)
    m.eval()
    return m


@pytest.mark.parametrize("case", CASES, ids=[f"prompt{i}" for i in range(len(CASES))])
def test_greedy_matches_transformers(model, case):
    # generate returns the new tokens only; no stop id (the fixture has no tokenizer), so all N_NEW
    result = model.generate(np.array(case["prompt"]), N_NEW, temperature=0.0)
    assert result.dtype == np.int64 and result.shape == (N_NEW,)
    assert result.tolist() == case["new_tokens"]


@pytest.mark.parametrize("case", CASES, ids=[f"prompt{i}" for i in range(len(CASES))])
def test_stream_matches_transformers(model, case):
    assert list(model.stream(case["prompt"], N_NEW)) == case["new_tokens"]


@pytest.mark.parametrize("case", CASES, ids=[f"prompt{i}" for i in range(len(CASES))])
def test_last_position_logits_match_transformers(case):
    m = npllama.Llama.from_pretrained(FIXTURE, dtype=np.float64)
    full = np.array([case["prompt"] + case["new_tokens"]])
    logits = m.forward(full)[0, -1]
    ref = np.array(case["last_logits"])
    assert np.max(np.abs(logits - ref)) / np.max(np.abs(ref)) <= 1e-10
