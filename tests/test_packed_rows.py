"""Packed rows and padding in the fast engine: ``Llama.forward`` / ``loss`` / ``loss_and_grad`` with
position_ids, segment_ids and attention_mask.

1. Equal to npllama.reference at 1e-12 in float64 (logits, loss, every gradient) on packed rows and
   padding drawn by hypothesis (MHA, GQA, MQA; one thread's row split and the batch parts), and
   on rows of several attention tiles.
2. Without them, or with the values that change nothing, the same numbers as the plain causal path.
3. Bad values: the reference's own clear errors.
4. Against transformers in float64 with position_ids and a 4-D mask (skipped without torch).
"""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npllama
from npllama import reference
from npllama.engine.threads import available_cores, thread_limit
from npllama.errors import InputError
from npllama.golden import positions_per_document
from npllama.gradcheck import LLAMA3_SCALING, random_params
from test_reference import EQUAL, GRAD_FLOOR, normwise_error, small_configs

INPUTS = ("position_ids", "segment_ids", "attention_mask")


def packed_batch(cfg, B, T, r, which=INPUTS):
    """tokens, targets and the packed inputs named in ``which``: 1-4 documents per row (usually in
    order, sometimes interleaved), positions restarting at each, padding at a row's end or
    anywhere (targets -100 there and at each document's last position)."""
    tokens = r.integers(0, cfg.vocab_size, size=(B, T))
    segments = np.sort(r.integers(0, r.integers(1, 5), size=(B, T)), axis=1)
    if r.random() < 0.2:
        segments = r.permuted(segments, axis=1)
    mask = np.ones((B, T), dtype=np.int64)
    for b in range(B):
        n_pad = int(r.integers(0, T // 2 + 1))
        if r.random() < 0.3:
            mask[b, r.choice(T, size=n_pad, replace=False)] = 0
        elif n_pad:
            mask[b, T - n_pad:] = 0
    targets = np.roll(tokens, -1, axis=1)
    targets[:, :-1][segments[:, 1:] != segments[:, :-1]] = -100
    targets[mask == 0] = -100
    targets[:, -1] = r.integers(0, cfg.vocab_size, size=B)         # at least one target per row
    inputs = dict(position_ids=positions_per_document(segments), segment_ids=segments, attention_mask=mask)
    return tokens, targets, {name: inputs[name] for name in which}


def model_of(cfg, r):
    model = npllama.Llama(cfg, dtype=np.float64)
    for name, value in random_params(cfg, r).items():
        model.params[name][...] = value
    return model


def fast_vs_reference(model, tokens, targets, inputs):
    """Every norm-wise relative error between the fast engine and the reference on one batch."""
    cfg, params = model.config, model.params
    logits, ref_logits = model.forward(tokens, **inputs), reference.forward(params, cfg, tokens, **inputs)
    errors = {"logits": normwise_error(logits, ref_logits)}
    ref_loss, ref_grads = reference.loss_and_grad(params, cfg, tokens, targets, **inputs)
    loss, grads = model.loss_and_grad(tokens, targets, **inputs)
    errors["loss"] = abs(loss - ref_loss) / abs(ref_loss)
    errors["Llama.loss"] = abs(model.loss(tokens, targets, **inputs) - ref_loss) / abs(ref_loss)
    assert set(grads) == set(ref_grads)
    floor = GRAD_FLOOR * max(np.linalg.norm(g) for g in ref_grads.values())
    errors.update({name: normwise_error(grads[name], ref_grads[name], floor) for name in ref_grads})
    return errors


def assert_equal_to_reference(model, tokens, targets, inputs):
    errors = fast_vs_reference(model, tokens, targets, inputs)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= EQUAL, f"{worst}: {errors[worst]:.2e} ({model.config}, {inputs})"
    return errors


# ---- 1. equal to the reference ---------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(cfg=small_configs(max_seq_len=12), b=st.integers(1, 3), t=st.integers(2, 12), seed=st.integers(0, 2**32 - 1),
       which=st.sampled_from([INPUTS, ("position_ids",), ("segment_ids",), ("attention_mask",),
                              ("segment_ids", "attention_mask")]))
def test_packed_rows_and_padding_equal_reference(cfg, b, t, seed, which):
    r = np.random.default_rng(seed)
    cfg = dataclasses.replace(cfg, dropout=0.0)
    model = model_of(cfg, r)
    assert_equal_to_reference(model, *packed_batch(cfg, b, t, r, which))


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_rows_across_tiles_and_batch_parts(threads):
    # T = 300: two attention tiles (head_dim 8 in float64: 128 wide), documents longer and shorter
    # than a tile, whole tiles before a query block's first document skipped; GQA; with 2 threads
    # loss_and_grad runs the batch as two parts, each with its rows' positions and documents.
    if threads > available_cores():
        pytest.skip("needs two cores")
    r = np.random.default_rng(threads)
    cfg = npllama.LlamaConfig(vocab_size=29, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24,
                              max_seq_len=300, rope_scaling={**LLAMA3_SCALING, "original_max_position_embeddings": 64})
    B, T = 2, 300
    segments = np.repeat([[0, 1, 2, 3], [0, 1, 2, 3]], [140, 7, 130, 23], axis=1)
    segments[1] = np.repeat([5, 9], [40, 260])
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, 280:] = 0
    tokens = r.integers(0, cfg.vocab_size, size=(B, T))
    targets = np.where(mask == 1, np.roll(tokens, -1, axis=1), -100)
    inputs = dict(position_ids=positions_per_document(segments), segment_ids=segments, attention_mask=mask)
    with thread_limit(threads):
        assert_equal_to_reference(model_of(cfg, r), tokens, targets, inputs)


# ---- 2. the plain path unchanged ---------------------------------------------------------------------
def test_inputs_that_change_nothing_give_the_plain_path():
    r = np.random.default_rng(5)
    cfg = npllama.LlamaConfig(vocab_size=17, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, max_seq_len=20)
    model = model_of(cfg, r)
    tokens = r.integers(0, cfg.vocab_size, size=(2, 20))
    targets = np.roll(tokens, -1, axis=1)
    plain = model.forward(tokens)
    plain_loss, plain_grads = model.loss_and_grad(tokens, targets)
    # positions 0 .. T-1 per row are the plain path's tables, row by row: the same bits
    np.testing.assert_array_equal(model.forward(tokens, position_ids=np.arange(20)), plain)
    # one document, no padding: the documents' path sees what causal attention sees
    same = dict(segment_ids=np.full((2, 20), 7), attention_mask=np.ones((2, 20), dtype=int))
    np.testing.assert_allclose(model.forward(tokens, **same), plain, rtol=1e-14, atol=1e-14)
    loss, grads = model.loss_and_grad(tokens, targets, **same)
    assert abs(loss - plain_loss) <= 1e-14 * plain_loss
    for name, g in plain_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-12, atol=1e-14, err_msg=name)
    # and the workspace holds no packing over to the next plain pass
    np.testing.assert_array_equal(model.forward(tokens), plain)
    assert model.loss_and_grad(tokens, targets)[0] == plain_loss


def test_padding_is_seen_by_no_other_position():
    # what the tokens of a padded row compute does not depend on what the padding holds
    r = np.random.default_rng(2)
    cfg = npllama.LlamaConfig(vocab_size=17, dim=16, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=24, max_seq_len=9)
    model = model_of(cfg, r)
    tokens = r.integers(0, cfg.vocab_size, size=(1, 9))
    mask = np.array([[1, 1, 0, 1, 1, 1, 0, 0, 1]])
    other = np.where(mask == 1, tokens, (tokens + 1) % cfg.vocab_size)
    logits, other_logits = model.forward(tokens, attention_mask=mask), model.forward(other, attention_mask=mask)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[mask == 1], other_logits[mask == 1], rtol=1e-13, atol=1e-13)
    assert not np.allclose(logits[mask == 0], other_logits[mask == 0])


# ---- 3. bad values -------------------------------------------------------------------------------------
BAD = [
    ({"position_ids": np.array([[0, 1, 6]])}, r"position_ids must lie in \[0, max_seq_len = 6\), got 6"),
    ({"position_ids": np.array([[0, -1, 2]])}, r"position_ids must lie in \[0, max_seq_len = 6\), got -1"),
    ({"position_ids": np.array([[0, 1]])}, r"position_ids must have shape \(3,\) or \(1, 3\)"),
    ({"position_ids": np.array([0.0, 1.0, 2.0])}, "position_ids must be integers"),
    ({"segment_ids": np.array([0, 0, 1])}, r"segment_ids must have shape \(1, 3\)"),
    ({"segment_ids": np.array([[0.5, 0, 1]])}, "segment_ids must be integers"),
    ({"attention_mask": np.array([[1, 2, 1]])}, "attention_mask must hold 0 .* and 1"),
    ({"attention_mask": np.ones((1, 4), dtype=int)}, r"attention_mask must have shape \(1, 3\)"),
]


@pytest.mark.parametrize("change, match", BAD)
@pytest.mark.parametrize("call", ["forward", "loss", "loss_and_grad", "reference"])
def test_bad_packing_raises_the_references_errors(change, match, call):
    cfg = npllama.LlamaConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=6)
    model, tokens = npllama.Llama(cfg, dtype=np.float64), np.array([[1, 2, 3]])
    run = {"forward": lambda: model.forward(tokens, **change), "loss": lambda: model.loss(tokens, tokens, **change),
           "loss_and_grad": lambda: model.loss_and_grad(tokens, tokens, **change),
           "reference": lambda: reference.forward(model.params, cfg, tokens, **change)}[call]
    with pytest.raises(InputError, match=match):
        run()


# ---- 4. against transformers ---------------------------------------------------------------------------
def test_packed_rows_and_padding_match_transformers(tmp_path):
    """The fast engine against transformers' LlamaForCausalLM in float64 throughout (npllama.hf_oracle),
    position_ids restarting per document and a 4-D mask: logits, loss and every parameter gradient
    to 1e-12 (GQA, and MQA with tied embeddings and Llama-3 RoPE scaling)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from npllama import hf_oracle
    from npllama.formats.hf import save_pretrained
    from test_hf_oracle import CONFIGS, HF_EQUAL
    for name in sorted(CONFIGS):
        cfg = npllama.LlamaConfig(**CONFIGS[name])
        r = np.random.default_rng(9)
        model = model_of(cfg, r)
        save_pretrained(tmp_path / name, cfg, model.params, None)
        hf = hf_oracle.load_float64(tmp_path / name)
        tokens = r.integers(0, cfg.vocab_size, size=(2, 12))
        segment_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [4, 4, 4, 4, 4, 4, 4, 1, 1, 1, 1, 1]])
        mask = np.ones((2, 12), dtype=np.int64)
        mask[1, 10:] = 0                                                   # right padding in row 1
        mask[0, 5] = 0                                                     # and a hole inside a document
        inputs = dict(position_ids=positions_per_document(segment_ids), segment_ids=segment_ids, attention_mask=mask)
        targets = np.where(mask == 1, np.roll(tokens, -1, axis=1), -100)
        hf_tensors = hf_oracle.record_transformers(hf, tokens, targets, reduction="mean", **inputs)
        logits = model.forward(tokens, **inputs)
        loss, grads = model.loss_and_grad(tokens, targets, **inputs)
        scale = lambda a: np.abs(a).max()                                  # noqa: E731
        assert np.abs(logits - hf_tensors["lm_head"]).max() <= HF_EQUAL * scale(hf_tensors["lm_head"]), name
        assert abs(loss - float(hf_tensors["loss"])) <= HF_EQUAL * abs(loss), name
        for p, g in grads.items():
            want = hf_tensors["grad." + p]
            assert np.abs(g - want).max() <= HF_EQUAL * scale(want), (name, p)
