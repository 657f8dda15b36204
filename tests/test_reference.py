"""npllama.reference, the plain-NumPy Llama, is the source of truth; the fast path is held to it.

1. The fast path (npllama.Llama: row buffers, Numba kernels, threads) equals the reference in
   float64: logits, loss and every gradient to <= 1e-12 in the norm-wise relative error
   ||fast - ref||_F / ||ref||_F of each tensor (|a - b| / |b| for the loss).  Small configs are
   drawn by hypothesis; three explicit cases are large enough to switch on every fast path
   (several attention tiles, row-split matmuls, split-key attention backward), which
   ``test_large_cases_switch_on_the_fast_paths`` asserts.
2. The reference equals Hugging Face transformers' float64 LlamaForCausalLM (the fixtures of
   tests/test_hf_fixture.py): logits, loss and every gradient.
3. The reference's gradients equal central finite differences on random configs.
4. gradcheck's measures and its whole-reference-model check; the README's reference snippet.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npllama
from npllama import reference
from npllama.cli import main
from npllama.errors import InputError
from npllama.gradcheck import (LLAMA3_SCALING, elementwise_relative_error, numerical_gradient, random_dropout_masks,
                               random_params, relative_error, richardson_gradient, sampled_entries)
from npllama.engine import matmul
from npllama.layers.attention import block_size, key_block_splits
from npllama.engine.threads import available_cores, get_threads, thread_limit
from test_hf_fixture import FIXTURES, HF_FIXTURES, load_reference, relative_error as hf_error

EQUAL = 1e-12   # fast path vs reference, float64, norm-wise relative
HF_EQUAL = 1e-13   # reference vs transformers, max|a - b| / max|b| (measured: <= 4e-15)
ROOT = Path(__file__).resolve().parent.parent


# A gradient far smaller than the model's others is the small difference of large terms (e.g. q's
# gradient when one key dominates every softmax: seen at 1e-4 of the largest gradient norm), and two
# correct float64 implementations then differ by rounding of those terms, ~1e-16 of the LARGE
# gradients (measured: 3.8e-16 absolute on a q gradient of norm 1.4e-4, i.e. 2.7e-12 of its own
# norm).  So a gradient is compared relative to its own norm or to GRAD_FLOOR times the largest
# gradient norm, whichever is larger.
GRAD_FLOOR = 1e-3


def normwise_error(a, b, floor=0.0):
    """||a - b||_F / max(||b||_F, floor)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))


def masks_keeping_every_position(cfg, B, T, r):
    """Dropout masks as dropout_forward draws them, except that no position loses every channel:
    a gradient that is zero up to rounding would make a relative error meaningless."""
    masks = random_dropout_masks(cfg, B, T, r)
    for pair in masks:
        for mask in pair:
            mask[~mask.any(axis=-1), 0] = 1.0 / (1.0 - cfg.dropout)
    return masks


def random_batch(cfg, B, T, r, ignored_fraction):
    """tokens, targets (B, T); a share of the targets -100, but the last one of row 0 kept and the
    first two tokens of row 0 different.  Then no gradient is zero up to rounding, which would make
    its relative error meaningless (q's and k's are when every kept target attends to one token)."""
    tokens = r.integers(0, cfg.vocab_size, size=(B, T))
    tokens[0, 1] = (tokens[0, 0] + r.integers(1, cfg.vocab_size)) % cfg.vocab_size
    targets = r.integers(0, cfg.vocab_size, size=(B, T))
    targets[r.random((B, T)) < ignored_fraction] = -100
    targets[0, -1] = r.integers(0, cfg.vocab_size)
    return tokens, targets


def compare_fast_and_reference(cfg, B, T, seed, dropout):
    """Every norm-wise relative error between Llama and npllama.reference on one random batch."""
    r = np.random.default_rng(seed)
    model = npllama.Llama(cfg, seed=seed, dtype=np.float64)
    for name, value in random_params(cfg, r).items():
        model.params[name][...] = value
    tokens, targets = random_batch(cfg, B, T, r, ignored_fraction=0.3)
    masks = masks_keeping_every_position(cfg, B, T, r) if dropout else None

    errors = {"logits": normwise_error(model.forward(tokens), reference.forward(model.params, cfg, tokens))}
    ref_loss, ref_grads = reference.loss_and_grad(model.params, cfg, tokens, targets, masks)
    loss, grads = model.loss_and_grad(tokens, targets, dropout_masks=masks)
    errors["loss"] = abs(loss - ref_loss) / abs(ref_loss)
    assert set(grads) == set(ref_grads) == set(model.params)
    floor = GRAD_FLOOR * max(np.linalg.norm(g) for g in ref_grads.values())
    errors.update({name: normwise_error(grads[name], ref_grads[name], floor) for name in ref_grads})
    if not dropout:
        errors["Llama.loss"] = abs(model.loss(tokens, targets) - ref_loss) / abs(ref_loss)
    return errors


# ---- 1. the fast path equals the reference -----------------------------------------------------
@st.composite
def small_configs(draw, max_seq_len=8):
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))           # MHA, GQA and MQA
    # D >= 4: at D = 2 (one head of width 2) q's and k's gradients are a few nearly cancelling terms,
    # and two float64 implementations were seen to differ by 6e-13 (< 2.2e-13 at D >= 4 in 1500 draws)
    hd = draw(st.sampled_from([2, 4, 6]).filter(lambda hd: heads * hd >= 4))
    return npllama.LlamaConfig(
        vocab_size=draw(st.integers(3, 13)), dim=heads * hd, n_layers=draw(st.integers(1, 2)), n_heads=heads,
        n_kv_heads=kv, hidden_dim=draw(st.integers(2, 9)), max_seq_len=max_seq_len,
        norm_eps=draw(st.sampled_from([1e-5, 1e-2])), rope_theta=draw(st.sampled_from([10000.0, 500000.0, 7.0])),
        rope_scaling=draw(st.sampled_from([None, LLAMA3_SCALING])), tie_embeddings=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.5])))


@settings(max_examples=50)
@given(cfg=small_configs(max_seq_len=12), b=st.integers(1, 3), t=st.integers(2, 12), seed=st.integers(0, 2**32 - 1))
def test_fast_path_equals_reference_on_small_configs(cfg, b, t, seed):
    errors = compare_fast_and_reference(cfg, b, t, seed, dropout=cfg.dropout > 0)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= EQUAL, f"{worst}: {errors[worst]:.2e} ({cfg})"


LARGE_CASES = {
    # B*K = 1: split-key attention backward; T = 300: 2 tiles (head_dim 8: tiles of 256); 300 rows: row-split matmuls
    "mqa_tied_llama3_dropout": (dict(vocab_size=37, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=24,
                                     max_seq_len=300, rope_theta=500000.0, tie_embeddings=True, dropout=0.2,
                                     rope_scaling={**LLAMA3_SCALING, "original_max_position_embeddings": 64}),
                                1, 300),
    # B*K = 2 with two query heads per kv head; T = 257: the last tile holds one row
    "gqa_untied_llama3_dropout": (dict(vocab_size=29, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=20,
                                       max_seq_len=257, dropout=0.1,
                                       rope_scaling={**LLAMA3_SCALING, "original_max_position_embeddings": 64}),
                                  1, 257),
    # B*K = 4 = 2 * threads: whole-key units; 2 tiles per row (head_dim 24: tiles of 128); no dropout
    # (Llama.loss compared too)
    "gqa_untied_batch": (dict(vocab_size=31, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=20,
                              head_dim=24, max_seq_len=200), 2, 200),
}


@pytest.fixture
def two_threads():
    """Two threads where the machine has two cores (what the large cases need to take every fast
    path); yields whether it could."""
    if available_cores() < 2:
        yield False
        return
    with thread_limit(2):
        yield True


def test_large_cases_switch_on_the_fast_paths(two_threads):
    if not two_threads:
        pytest.skip("needs two cores")
    seen = set()
    for name, (kwargs, B, T) in LARGE_CASES.items():
        cfg = npllama.LlamaConfig(**kwargs)
        n_tiles = -(-T // block_size(cfg.head_dim, T))
        assert n_tiles >= 2, name
        assert B * T // matmul.MIN_SPLIT_ROWS >= 2, name                   # >= 2 row blocks of >= 64 rows
        if len(key_block_splits(B, cfg.n_kv_heads, n_tiles, get_threads())) > 2:
            seen.add("split keys" + (" GQA" if cfg.n_heads > cfg.n_kv_heads > 1 else ""))
        else:
            seen.add("whole keys")
    assert seen == {"split keys", "split keys GQA", "whole keys"}
    with matmul.split_matmuls():
        assert matmul.split_threads() == 2                                 # matmuls are split in a step


@pytest.mark.parametrize("case", sorted(LARGE_CASES))
def test_fast_path_equals_reference_on_large_cases(case, two_threads):
    kwargs, B, T = LARGE_CASES[case]
    cfg = npllama.LlamaConfig(**kwargs)
    errors = compare_fast_and_reference(cfg, B, T, seed=11, dropout=cfg.dropout > 0)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= EQUAL, f"{case}: {worst} off by {errors[worst]:.2e}"


MASK = np.ones((1, 3, 8))
BAD_MASKS = [
    ([(MASK, MASK)], "list of 2 .* pairs, one per layer, got 1"),
    (np.ones((2, 2, 1, 3, 8)), "list of 2 .* got ndarray"),
    ([(MASK, MASK), (MASK,)], r"dropout_masks\[1\] must be an \(attn_mask, ffn_mask\) pair"),
    ([(MASK, MASK), (MASK, MASK[..., :7])],
     r"dropout_masks\[1\]\[1\] must be a real array of shape .* \(1, 3, 8\), got float64 \(1, 3, 7\)"),
    ([(MASK, MASK), (np.full((1, 3, 8), "x"), MASK)], r"dropout_masks\[1\]\[0\] must be a real array"),
]


@pytest.mark.parametrize("masks, match", BAD_MASKS)
def test_bad_dropout_masks_raise_clear_errors(masks, match):
    cfg = npllama.LlamaConfig(vocab_size=10, dim=8, n_layers=2, n_heads=2, hidden_dim=8, max_seq_len=6, dropout=0.5)
    tokens = np.array([[1, 2, 3]])
    with pytest.raises(InputError, match=match):
        npllama.Llama(cfg, dtype=np.float64).loss_and_grad(tokens, tokens, dropout_masks=masks)


def test_given_masks_replace_the_drawn_ones():
    """All-ones masks are no dropout, whatever config.dropout and the train/eval mode say."""
    cfg = npllama.LlamaConfig(vocab_size=10, dim=8, n_layers=2, n_heads=2, hidden_dim=8, max_seq_len=6, dropout=0.5)
    model = npllama.Llama(cfg, dtype=np.float64).train()
    tokens = np.array([[1, 2, 3]])
    loss, _ = model.loss_and_grad(tokens, tokens, dropout_masks=[(MASK, MASK)] * 2)
    assert loss == model.loss(tokens, tokens)
    assert model.loss_and_grad(tokens, tokens)[0] != model.loss(tokens, tokens)   # without them: dropout


# ---- 2. the reference equals Hugging Face transformers -----------------------------------------
@pytest.mark.parametrize("name", HF_FIXTURES)
def test_reference_matches_transformers(name):
    ref, ref_grads = load_reference(name)
    model = npllama.Llama.from_pretrained(FIXTURES / name, dtype=np.float64)
    params, cfg = model.params, model.config
    assert hf_error(reference.forward(params, cfg, ref["tokens"]), ref["logits"]) <= HF_EQUAL
    loss, grads = reference.loss_and_grad(params, cfg, ref["tokens"], ref["targets"])
    ref_loss = float(ref["loss"].reshape(()))
    assert abs(loss - ref_loss) / abs(ref_loss) <= HF_EQUAL
    assert set(grads) == set(ref_grads)
    errors = {key: hf_error(grads[key], ref_grads[key]) for key in ref_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= HF_EQUAL, f"{name}: gradient of {worst} off by {errors[worst]:.2e}"


# ---- 3. the reference equals finite differences ------------------------------------------------
@settings(max_examples=20)
@given(cfg=small_configs(), b=st.integers(1, 2), t=st.integers(2, 6), seed=st.integers(0, 2**32 - 1))
def test_reference_gradients_match_finite_differences(cfg, b, t, seed):
    # The numerical gradient is Richardson's extrapolation of two central differences,
    # (4 D(h/2) - D(h)) / 3 at h = 1e-4: no h^2 truncation term, and rounding ~eps |L| / h ~ 1e-11.
    # That rounding is also the finest gradient finite differences resolve, so the error is taken
    # relative to the gradient's scale but to no less than FD_SCALE = 1e-5 (an absolute 1e-11):
    # with two positions, the second layer's q/k gradients can be ~5e-6 in all (seed 310543), and
    # a plain h = 1e-6 difference then missed them by 5.5e-5 of that scale.
    FD_SCALE = 1e-5
    r = np.random.default_rng(seed)
    params = random_params(cfg, r)
    tokens, targets = random_batch(cfg, b, t, r, ignored_fraction=0.4)
    masks = masks_keeping_every_position(cfg, b, t, r) if cfg.dropout > 0 else None
    _, grads = reference.loss_and_grad(params, cfg, tokens, targets, masks)
    loss = lambda: reference.loss_and_grad(params, cfg, tokens, targets, masks)[0]  # noqa: E731
    for name, p in params.items():
        idx = sampled_entries(grads[name], r, n=10)   # the largest entry and 9 at random
        numeric = richardson_gradient(loss, p, h=1e-4, indices=idx).reshape(-1)[idx]
        err = relative_error(grads[name].reshape(-1)[idx], numeric, smallest_scale=FD_SCALE)
        assert err < 1e-6, f"{name}: relative error {err:.2e} ({cfg})"


# ---- 4. gradcheck ------------------------------------------------------------------------------
def test_elementwise_relative_error_is_cs231ns():
    a, n = np.array([1.0, 0.0, -2.0, 1e-20]), np.array([1.1, 0.0, -2.0, 0.0])
    assert elementwise_relative_error(a, n) == 1.0                          # 1e-20 against 0: all of it
    assert elementwise_relative_error(a[:3], n[:3]) == pytest.approx(0.1 / 2.1, rel=1e-15)
    assert relative_error(a, n) == pytest.approx(0.1 / 2.0, rel=1e-15)     # max-normalised: scale 2
    assert elementwise_relative_error(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        elementwise_relative_error(np.zeros(2), np.zeros(3))


def test_richardson_gradient_cancels_the_h2_error_and_the_scale_floor():
    # exp(3x) has a large third derivative: at h = 1e-4 a central difference is off by h^2 f(3)/6
    # relative (1.5e-8), Richardson's extrapolation by ~h^4 (and rounding, ~1e-12)
    x = np.array([0.3, -0.7])
    loss = lambda: float(np.sum(np.exp(3 * x)))                    # noqa: E731
    exact = 3 * np.exp(3 * x)
    assert relative_error(exact, numerical_gradient(loss, x, h=1e-4)) > 1e-9
    assert relative_error(exact, richardson_gradient(loss, x, h=1e-4)) < 1e-10
    assert relative_error(np.array([1e-9]), np.array([2e-9])) == pytest.approx(0.5)
    assert relative_error(np.array([1e-9]), np.array([2e-9]), smallest_scale=1e-5) == pytest.approx(1e-4)


def test_gradcheck_checks_the_reference_model(capsys):
    assert main(["gradcheck", "--layer", "reference", "--layer", "reference_tied", "--layer", "decoder_block"]) == 0
    out = capsys.readouterr().out
    assert "elementwise" in out and "all gradients match" in out
    assert "lm_head.weight" in out and out.count("model.layers.1.self_attn.k_proj.weight") == 2
    assert main(["gradcheck", "--layer", "reference", "--tolerance", "1e-20"]) == 1  # the check can fail
    assert "FAILED" in capsys.readouterr().out


def test_readme_learn_snippet_runs():
    """The README's Learn section starts the student on the reference: its command works, and an
    untrained model's loss is near ln(vocabulary), as it claims."""
    readme = (ROOT / "README.md").read_text()
    learn = readme[readme.index("## Learn"):]
    code = re.search(r'^python -c "\n(.*?)^"\n', learn, flags=re.S | re.M).group(1)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr
    loss, ln_vocab = map(float, re.search(r"loss ([\d.]+) \(ln 50 = ([\d.]+)\)", proc.stdout).groups())
    assert abs(loss - ln_vocab) < 0.05 and "21 gradients" in proc.stdout, proc.stdout
