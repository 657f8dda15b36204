"""`npllama gradcheck --layer L --shape ... --dtype ...`: a layer's backward at the sizes a user asks
for, in float64 or float32, against float64 central differences (sampled entries for large inputs)."""
import re

import pytest

from npllama.cli import main
from npllama.gradcheck import FULL_CHECK_ENTRIES, check_attention, sizes_of


def rows(out):
    return re.findall(r"^\s*(?:\w+\s+)?(\w+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+(ok|FAIL)$", out, flags=re.M)


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-6), ("float32", 1e-4)])
def test_attention_at_a_given_shape_and_dtype(capsys, dtype, tolerance):
    shape = "B=1,T=130,H=4,K=2,hd=16"          # 8320 entries in q: a sample is checked
    assert 4 * 130 * 16 > FULL_CHECK_ENTRIES
    assert main(["gradcheck", "--layer", "attention", "--shape", shape, "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert f"against the {dtype} backward; pass when the max-normalised error <= {tolerance:.0e}" in out
    reference_rows, fast_rows = out.split("attention (fast)")    # the reference's rows, then the kernel's
    found = rows(reference_rows)
    assert [r[0] for r in found] == ["q", "k", "v"] and all(r[3] == "ok" for r in found)
    assert fast_rows.count(" ok") == 4 and "FAIL" not in fast_rows   # o, dq, dk, dv against the reference
    worst = max(float(r[1]) for r in found)
    assert worst < (1e-7 if dtype == "float64" else 1e-5)
    if dtype == "float32":
        assert worst > 1e-9                     # float32's rounding shows: the backward ran in float32


def test_sizes_reach_the_inputs():
    import numpy as np
    pairs = check_attention(np.random.default_rng(0), B=1, H=6, K=3, T=4, hd=2)
    assert pairs["q"][0].shape == (1, 6, 4, 2) and pairs["k"][0].shape == (1, 3, 4, 2)
    assert sizes_of("attention") == {"B": 2, "H": 4, "K": 2, "T": 5, "hd": 3}


@pytest.mark.parametrize("args, message", [
    (["--layer", "attention", "--shape", "B=2,X=3"], "attention takes the sizes B=2, H=4, K=2, T=5, hd=3; got 'X'"),
    (["--layer", "attention", "--shape", "B=two"], "B must be a positive integer, got 'two'"),
    (["--layer", "attention", "--shape", "B=0"], "B must be a positive integer, got 0"),
    (["--layer", "attention", "--shape", "H=3,K=2"], "H (3) must be a multiple of K (2)"),
    (["--layer", "attention", "--layer", "rope", "--shape", "B=2"], "--shape needs exactly one --layer"),
    (["--layer", "model", "--shape", "B=2"], "--shape needs exactly one --layer"),
    (["--layer", "model", "--dtype", "float32"], "--dtype float32 applies to the layers"),
])
def test_bad_shapes_give_one_line(capsys, args, message):
    assert main(["gradcheck", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
