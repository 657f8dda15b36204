"""`npllama gradcheck --layer X` checks what the docs teach: the function npllama/reference.py calls
for that layer (finite differences), and beside it the engine's kernel against that reference.  So
breaking a reference function, as a student editing it would, fails that layer's check, and
`--layer reference` names the first layer that fails; a broken kernel fails its '(fast)' row alone."""
import re

import numpy as np
import pytest

from npllama import gradcheck, reference
from npllama.cli import main


def rmsnorm_backward_without_the_mean_term(dy, cache):
    x, w, r = cache
    r = r[..., None]
    return r * dy * w, np.sum((dy * x * r).reshape(-1, x.shape[-1]), axis=0)


def attention_backward_without_psi(do, cache, hooks):
    q, k_all, v_all, probs, scale, G = cache
    B, H, T, hd = q.shape
    dprobs = do @ v_all.transpose(0, 1, 3, 2)
    dscores = probs * dprobs                       # psi_i = sum_j P_ij dP_ij dropped
    dq, dk_all = dscores @ k_all * scale, dscores.transpose(0, 1, 3, 2) @ q * scale
    dv_all = probs.transpose(0, 1, 3, 2) @ do
    return dq, dk_all.reshape(B, H // G, G, T, hd).sum(2), dv_all.reshape(B, H // G, G, T, hd).sum(2)


def rows(out, layer):
    """{gradient: "ok" | "FAIL"} of one layer's block of rows in gradcheck's table."""
    result, current = {}, None
    for line in out.splitlines():
        m = re.match(r"^(\S.{0,21}?)\s{2,}(\S+)\s+[\d.e+-]+\s+[\d.e+-]+\s+(ok|FAIL)$", line)
        if m:
            current = m.group(1).strip()
        m2 = re.match(r"^\s+(\S+)\s+[\d.e+-]+\s+[\d.e+-]+\s+(ok|FAIL)$", line)
        if m and current == layer:
            result[m.group(2)] = m.group(3)
        elif m2 and current == layer:
            result[m2.group(1)] = m2.group(2)
    return result


def test_every_layer_passes_and_so_does_every_kernel_against_its_reference(capsys):
    layers = ["embedding", "linear", "rmsnorm", "rope", "attention", "swiglu", "cross_entropy", "lora", "dropout"]
    assert main(["gradcheck", *[a for layer in layers for a in ("--layer", layer)]]) == 0
    out = capsys.readouterr().out
    for layer in layers:
        assert rows(out, layer) and set(rows(out, layer).values()) == {"ok"}, layer
        if layer != "dropout":           # dropout has one implementation, the engine's
            assert set(rows(out, f"{layer} (fast)").values()) == {"ok"}, layer


def test_a_broken_reference_rmsnorm_fails_its_layer_and_is_named(monkeypatch, capsys):
    monkeypatch.setattr(reference, "rmsnorm_backward_reference", rmsnorm_backward_without_the_mean_term)
    assert main(["gradcheck", "--layer", "rmsnorm"]) == 1
    out = capsys.readouterr().out
    assert rows(out, "rmsnorm") == {"x": "FAIL", "weight": "ok"}
    assert rows(out, "rmsnorm (fast)")["dx"] == "FAIL"          # the kernel no longer equals the reference
    assert main(["gradcheck", "--layer", "reference"]) == 1
    out = capsys.readouterr().out
    assert "the first of its layers (in forward order) whose own check fails: rmsnorm" in out
    assert gradcheck.failing_layers() == ["rmsnorm"]


def test_a_broken_reference_attention_fails_its_layer_and_is_named(monkeypatch, capsys):
    monkeypatch.setattr(reference, "attention_backward", attention_backward_without_psi)
    assert main(["gradcheck", "--layer", "attention"]) == 1
    out = capsys.readouterr().out
    assert rows(out, "attention") == {"q": "FAIL", "k": "FAIL", "v": "ok"}
    assert main(["gradcheck", "--layer", "reference_tied"]) == 1
    assert "whose own check fails: attention  (npllama gradcheck --layer attention)" in capsys.readouterr().out


def test_a_broken_kernel_fails_its_fast_row_only(monkeypatch, capsys):
    right = gradcheck.rmsnorm_backward
    monkeypatch.setattr(gradcheck, "rmsnorm_backward", lambda dy, cache: (right(dy, cache)[0] * (1 + 1e-9),
                                                                         right(dy, cache)[1]))
    assert main(["gradcheck", "--layer", "rmsnorm"]) == 1
    out = capsys.readouterr().out
    assert set(rows(out, "rmsnorm").values()) == {"ok"}
    assert rows(out, "rmsnorm (fast)") == {"y": "ok", "dx": "FAIL", "dweight": "ok"}


def test_a_broken_composition_is_not_blamed_on_a_layer(monkeypatch, capsys):
    right = reference.block_backward
    monkeypatch.setattr(reference, "block_backward", lambda dout, cache, cfg: (
        0.5 * right(dout, cache, cfg)[0], right(dout, cache, cfg)[1]))
    assert main(["gradcheck", "--layer", "reference"]) == 1
    assert "each of its layers passes alone" in capsys.readouterr().out
