"""npllama.reference.run_with_cache: named activations, their gradients, patching, real training inputs.

1. Every named gradient ("grad.<activation>") equals central finite differences of the loss for a
   delta added at that activation (hypothesis, float64), also with packed rows, padding,
   inputs_embeds, a summed loss and a backward from a given dlogits; and with the optional
   pieces (LoRA adapters with dropout on their inputs, residual dropout), which act at those names.
2. Packed rows (segment_ids + position_ids) compute what the documents compute alone, and a padded
   row what the row computes without its padding: checks that need no other implementation.
3. float32 in, float32 out; bfloat16 emulation rounds the products' inputs.
4. Bad inputs: one clear InputError each.
5. Against transformers in float64 with position_ids and a 4-D mask (skipped without torch).
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npllama
from npllama import reference
from npllama.errors import InputError
from npllama.gradcheck import LLAMA3_SCALING, random_dropout_masks, random_params, relative_error, richardson_gradient
from npllama.layers.dropout import dropout_forward

FD_TOLERANCE = 1e-6
# Richardson's differences at h = 1e-4 carry ~eps |L| / h ~ 2e-11 of rounding (measured: 1.2e-11 on a
# gradient that is 0 up to 5e-17: the keys' when two positions attend): an error is taken relative to
# the gradient's scale, but to no less than FD_SCALE (an absolute 1e-10).
FD_SCALE = 1e-4


@st.composite
def small_configs(draw):
    kv = draw(st.integers(1, 2))
    heads = kv * draw(st.integers(1, 3))
    hd = draw(st.sampled_from([2, 4]).filter(lambda hd: heads * hd >= 4))
    return npllama.LlamaConfig(
        vocab_size=draw(st.integers(3, 11)), dim=heads * hd, n_layers=draw(st.integers(1, 2)), n_heads=heads,
        n_kv_heads=kv, hidden_dim=draw(st.integers(2, 7)), max_seq_len=8,
        norm_eps=draw(st.sampled_from([1e-5, 1e-2])), rope_scaling=draw(st.sampled_from([None, LLAMA3_SCALING])),
        tie_embeddings=draw(st.booleans()))


def packed_inputs(r, B, T):
    """segment_ids with 1-3 documents per row, position_ids restarting at each, and a padding mask
    whose last position(s) may be padding."""
    segment_ids = np.sort(r.integers(0, 3, size=(B, T)), axis=1)
    position_ids = np.zeros((B, T), dtype=np.int64)
    for b in range(B):
        for t in range(1, T):
            position_ids[b, t] = position_ids[b, t - 1] + 1 if segment_ids[b, t] == segment_ids[b, t - 1] else 0
    attention_mask = np.ones((B, T), dtype=np.int64)
    attention_mask[:, T - r.integers(0, 2):] = 0
    return dict(segment_ids=segment_ids, position_ids=position_ids, attention_mask=attention_mask)


def fd_check_every_name(params, cfg, tokens, targets, r, n_entries=4, **kw):
    """For each named activation: a few entries of its gradient against finite differences of the
    loss (or of sum(dlogits * logits)) for a delta at that activation."""
    run = reference.run_with_cache(params, cfg, tokens, targets, **kw)
    G = kw.get("dlogits")

    def loss(patches):
        out = reference.run_with_cache(params, cfg, tokens, targets, patches=patches, **kw)
        return out.loss if G is None else float(np.sum(G * out.logits))

    for name, act in run.activations.items():
        grad = run.grads["grad." + name]
        assert grad.shape == act.shape, name
        finite = np.flatnonzero(np.isfinite(act.reshape(-1)))
        idx = np.unique(np.append(r.choice(finite, size=min(n_entries, finite.size), replace=False),
                                  finite[np.argmax(np.abs(grad.reshape(-1)[finite]))]))
        delta = np.zeros(act.shape)
        numeric = richardson_gradient(lambda: loss({name: delta}), delta, h=1e-4, indices=idx).reshape(-1)[idx]
        err = relative_error(grad.reshape(-1)[idx], numeric, smallest_scale=FD_SCALE)
        assert err < FD_TOLERANCE, f"grad.{name}: relative error {err:.2e} ({cfg})"
    return run


@settings(max_examples=12, deadline=None)
@given(cfg=small_configs(), b=st.integers(1, 2), t=st.integers(2, 6), seed=st.integers(0, 2**32 - 1),
       packed=st.booleans())
def test_every_named_gradient_matches_finite_differences(cfg, b, t, seed, packed):
    r = np.random.default_rng(seed)
    params = random_params(cfg, r)
    tokens, targets = r.integers(0, cfg.vocab_size, size=(b, t)), r.integers(0, cfg.vocab_size, size=(b, t))
    targets[r.random((b, t)) < 0.3] = -100
    inputs = packed_inputs(r, b, t) if packed else {}
    if packed:
        targets[inputs["attention_mask"] == 0] = -100
    run = fd_check_every_name(params, cfg, tokens, targets, r, **inputs)
    assert list(run.activations) == list(reference.activation_shapes(cfg, b, t))
    assert {k for k in run.grads if k.removeprefix("grad.") in params} == {"grad." + p for p in params}


def test_named_gradients_with_inputs_embeds_sum_loss_and_given_dlogits():
    cfg = npllama.LlamaConfig(vocab_size=9, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=6, max_seq_len=8)
    r = np.random.default_rng(3)
    params = random_params(cfg, r)
    embeds = r.normal(size=(2, 5, 8))
    tokens, targets = r.integers(0, 9, size=(2, 5)), r.integers(0, 9, size=(2, 5))
    run = fd_check_every_name(params, cfg, None, targets, r, inputs_embeds=embeds, reduction="sum")
    assert "grad.inputs_embeds" in run.grads and "model.embed_tokens" not in run.activations
    mean = reference.run_with_cache(params, cfg, None, targets, inputs_embeds=embeds)
    assert run.loss == pytest.approx(mean.loss * 10, rel=1e-14)
    # inputs_embeds = the embedding rows: the same run as from the tokens
    from_tokens = reference.run_with_cache(params, cfg, tokens, targets)
    from_embeds = reference.run_with_cache(params, cfg, None, targets,
                                           inputs_embeds=params["model.embed_tokens.weight"][tokens])
    assert from_embeds.loss == from_tokens.loss
    np.testing.assert_array_equal(from_embeds["grad.inputs_embeds"], from_tokens["grad.model.embed_tokens"])
    # a backward from dlogits: the gradients of sum(G * logits); with G = the loss's dlogits, the loss's
    G = r.normal(size=(2, 5, 9))
    fd_check_every_name(params, cfg, tokens, None, r, dlogits=G)
    again = reference.run_with_cache(params, cfg, tokens, dlogits=from_tokens["grad.lm_head"])
    assert again.loss is None
    for name in params:
        np.testing.assert_allclose(again["grad." + name], from_tokens["grad." + name], rtol=0, atol=1e-15)


def test_named_gradients_with_lora_and_dropout():
    """LoRA and residual dropout act at the named points (reference.py's LoRA, ResidualDropout): with
    both on, every named gradient still matches finite differences of the patched run; an adapted
    projection's output includes its adapter's term; the parameters' gradients are the adapters'."""
    cfg = npllama.LlamaConfig(vocab_size=9, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=6,
                              max_seq_len=8, dropout=0.25)
    r = np.random.default_rng(5)
    params = random_params(cfg, r)
    tokens, targets = r.integers(0, 9, size=(2, 5)), r.integers(0, 9, size=(2, 5))
    lora, lora_masks = {}, {}
    for i in range(cfg.n_layers):
        for projection in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{projection}"
            out, inp = params[name + ".weight"].shape
            lora[name] = (r.normal(size=(2, inp)), r.normal(size=(out, 2)), 1.5)
            lora_masks[name] = dropout_forward(np.ones((2, 5, inp)), 0.3, r, True)[1]
    dropout_masks = random_dropout_masks(cfg, 2, 5, r)
    kw = dict(lora=lora, lora_masks=lora_masks, dropout_masks=dropout_masks)
    run = fd_check_every_name(params, cfg, tokens, targets, r, **kw)
    a, b, scale = lora["model.layers.1.self_attn.q_proj"]
    n1, m = run["model.layers.1.input_layernorm"], lora_masks["model.layers.1.self_attn.q_proj"]
    np.testing.assert_allclose(run["model.layers.1.self_attn.q_proj"],
                               n1 @ params["model.layers.1.self_attn.q_proj.weight"].T + scale * (n1 * m) @ a.T @ b.T,
                               rtol=1e-13, atol=1e-13)
    loss, grads = reference.loss_and_grad(params, cfg, tokens, targets, **kw)
    assert run.loss == loss
    assert set(grads) == {f"{name}.lora_{m}.weight" for name in lora for m in "AB"}
    for name, g in grads.items():
        np.testing.assert_array_equal(run["grad." + name], g)
    plain = reference.run_with_cache(params, cfg, tokens, targets)     # without them: another run
    assert abs(plain.loss - loss) > 1e-3


def test_run_agrees_with_forward_and_loss_and_grad():
    cfg = npllama.LlamaConfig(vocab_size=9, dim=8, n_layers=2, n_heads=2, hidden_dim=6, max_seq_len=8)
    r = np.random.default_rng(0)
    params = random_params(cfg, r)
    tokens, targets = r.integers(0, 9, size=(2, 5)), r.integers(0, 9, size=(2, 5))
    run = reference.run_with_cache(params, cfg, tokens, targets)
    np.testing.assert_array_equal(run.logits, reference.forward(params, cfg, tokens))
    loss, grads = reference.loss_and_grad(params, cfg, tokens, targets)
    assert run.loss == loss
    for name, g in grads.items():
        np.testing.assert_array_equal(run["grad." + name], g)
    assert reference.run_with_cache(params, cfg, tokens).grads == {}
    # the order: activations forward, their gradients backward, then the parameters'
    grads_order = [k for k in run.grads if k.removeprefix("grad.") in run.activations]
    assert grads_order == ["grad." + k for k in reversed(list(run.activations))]
    assert list(run.grads)[len(grads_order):] == ["grad." + p for p in params]


def test_patching_changes_what_follows_only():
    cfg = npllama.LlamaConfig(vocab_size=9, dim=8, n_layers=2, n_heads=2, hidden_dim=6, max_seq_len=8)
    r = np.random.default_rng(1)
    params = random_params(cfg, r)
    tokens = r.integers(0, 9, size=(1, 5))
    clean = reference.run_with_cache(params, cfg, tokens)
    delta = np.zeros((1, 5, 8))
    delta[0, 3] = 1.0
    patched = reference.run_with_cache(params, cfg, tokens, patches={"model.layers.1.resid_pre": delta})
    np.testing.assert_array_equal(patched["model.layers.0.resid_post"], clean["model.layers.0.resid_post"])
    np.testing.assert_array_equal(patched["model.layers.1.resid_pre"], clean["model.layers.1.resid_pre"] + delta)
    np.testing.assert_array_equal(patched.logits[0, :3], clean.logits[0, :3])      # causal: earlier positions
    assert np.abs(patched.logits[0, 3:] - clean.logits[0, 3:]).min() > 0


# ---- 2. packed rows and padding against the documents alone ------------------------------------
def test_packed_rows_compute_each_document_alone():
    cfg = npllama.LlamaConfig(vocab_size=13, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=10,
                              max_seq_len=12, rope_scaling=LLAMA3_SCALING)
    r = np.random.default_rng(5)
    params = random_params(cfg, r)
    docs = [r.integers(0, 13, size=n) for n in (4, 3, 5)]
    packed = np.concatenate(docs)[None]
    segment_ids = np.repeat([0, 1, 2], [4, 3, 5])[None]
    position_ids = np.concatenate([np.arange(len(d)) for d in docs])[None]
    run = reference.run_with_cache(params, cfg, packed, segment_ids=segment_ids, position_ids=position_ids)
    start = 0
    for d in docs:
        alone = reference.forward(params, cfg, d[None])
        np.testing.assert_allclose(run.logits[:, start:start + len(d)], alone, rtol=1e-12, atol=1e-13)
        start += len(d)
    # without the segments the documents see each other
    assert not np.allclose(reference.forward(params, cfg, packed, position_ids=position_ids)[:, 4:7],
                           run.logits[:, 4:7])


def test_padding_changes_nothing_at_the_tokens():
    cfg = npllama.LlamaConfig(vocab_size=13, dim=8, n_layers=2, n_heads=2, hidden_dim=10, max_seq_len=12)
    r = np.random.default_rng(6)
    params = random_params(cfg, r)
    tokens = r.integers(0, 13, size=(1, 6))
    targets = r.integers(0, 13, size=(1, 6))
    # left padding: two pad tokens first, positions counted from the first real token
    padded = np.concatenate([[[0, 0]], tokens], axis=1)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1]])
    positions = np.array([[0, 0, 0, 1, 2, 3, 4, 5]])
    padded_targets = np.concatenate([[[-100, -100]], targets], axis=1)
    run = reference.run_with_cache(params, cfg, padded, padded_targets, attention_mask=mask, position_ids=positions)
    plain = reference.run_with_cache(params, cfg, tokens, targets)
    np.testing.assert_allclose(run.logits[:, 2:], plain.logits, rtol=1e-12, atol=1e-13)
    assert run.loss == pytest.approx(plain.loss, rel=1e-13)
    for name in params:
        np.testing.assert_allclose(run["grad." + name], plain["grad." + name], rtol=1e-10, atol=1e-13)


# ---- 3. dtypes ----------------------------------------------------------------------------------
def test_float32_stays_float32_and_bfloat16_rounds_the_products():
    cfg = npllama.LlamaConfig(vocab_size=11, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24,
                              max_seq_len=8, rope_scaling=LLAMA3_SCALING)
    r = np.random.default_rng(2)
    params = random_params(cfg, r)
    tokens, targets = r.integers(0, 11, size=(2, 7)), r.integers(0, 11, size=(2, 7))
    inputs = packed_inputs(r, 2, 7)
    runs = {d: reference.run_with_cache(params, cfg, tokens, targets, dtype=d, **inputs) for d in reference.DTYPES}
    for d, want in (("float32", np.float32), ("bfloat16", np.float32), ("float64", np.float64)):
        kinds = {t.dtype for t in runs[d].tensors().values()}
        assert kinds == {np.dtype(want)}, (d, kinds)
    errors = {}
    for d in ("float32", "bfloat16"):
        errors[d] = max(relative_error(runs[d][n], runs["float64"][n]) for n in runs[d].tensors()
                        if np.isfinite(runs["float64"][n]).all())
    assert 1e-8 < errors["float32"] < 1e-4         # float32 rounding, not float64's
    assert 10 * errors["float32"] < errors["bfloat16"] < 0.2
    assert reference.round_to_bfloat16(np.float32(1.00390625)) == 1.0                # tie -> even (1.0)
    assert reference.round_to_bfloat16(np.float32(1.01171875)) == np.float32(1.015625)   # tie -> even
    assert reference.round_to_bfloat16(np.float32(1.005859375)) == np.float32(1.0078125)
    assert reference.round_to_bfloat16(np.float32(-2.5)) == np.float32(-2.5)
    assert np.isinf(reference.round_to_bfloat16(np.float32(3.4e38)))          # past bfloat16's largest


# ---- 4. bad inputs --------------------------------------------------------------------------------
CFG = npllama.LlamaConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=6)
PARAMS = random_params(CFG, np.random.default_rng(0))
TOKENS = np.array([[1, 2, 3]])
BAD = [
    ({"tokens": np.array([[1, -1, 3]])}, r"token id -1 at \(0, 1\) is outside \[0, 10\)"),
    ({"tokens": np.array([[1, 10, 3]])}, r"token id 10 at \(0, 1\) is outside \[0, 10\)"),
    ({"tokens": np.array([[1.0, 2.0]])}, "tokens must be integers"),
    ({"tokens": np.array([1, 2])}, "tokens must be 2-D"),
    ({"tokens": np.zeros((1, 7), dtype=int)}, r"7 positions is longer than max_seq_len \(6\)"),
    ({"targets": np.array([[1, -5, 3]])}, r"target -5 at \(0, 1\) is outside \[0, 10\) and not -100"),
    ({"targets": np.array([[1, 2]])}, r"targets must have the tokens' shape \(1, 3\)"),
    ({"params": {k: v for k, v in PARAMS.items() if k != "model.norm.weight"}}, "lack 1 parameter.*model.norm"),
    ({"params": {**PARAMS, "model.layers.1.mlp.up_proj.weight": np.zeros((8, 8))}},
     "no parameter for: model.layers.1.mlp.up_proj.weight"),
    ({"params": {**PARAMS, "model.norm.weight": np.ones(7)}}, r"model.norm.weight has shape \(7,\), .* \(8,\)"),
    ({"params": {**PARAMS, "model.norm.weight": np.ones(8, dtype=np.float32)}}, "share one dtype"),
    ({"position_ids": np.array([[0, 1, 6]])}, r"position_ids must lie in \[0, max_seq_len = 6\), got 6"),
    ({"position_ids": np.array([[0, 1]])}, r"position_ids must have shape \(3,\) or \(1, 3\)"),
    ({"segment_ids": np.array([0, 0, 1])}, r"segment_ids must have shape \(1, 3\)"),
    ({"attention_mask": np.array([[1, 2, 1]])}, "attention_mask must hold 0 .* and 1"),
    ({"patches": {"model.layers.0.attn": 0.0}}, "patch 'model.layers.0.attn' names no activation"),
    ({"patches": {"lm_head": np.zeros((1, 3, 9))}}, r"patch for lm_head has shape \(1, 3, 9\)"),
    ({"dtype": "float16"}, "dtype must be one of float64, float32, bfloat16"),
    ({"inputs_embeds": np.zeros((1, 3, 8))}, "give tokens or inputs_embeds, exactly one"),
    ({"dlogits": np.zeros((1, 3, 10))}, "give targets or dlogits, not both"),
    ({"targets": None, "dlogits": np.zeros((1, 3, 9))}, r"dlogits must be a float array of the logits' shape"),
]


@pytest.mark.parametrize("change, match", BAD)
def test_bad_inputs_raise_one_clear_error(change, match):
    kw = {"params": PARAMS, "tokens": TOKENS, "targets": TOKENS, **change}
    params, tokens, targets = kw.pop("params"), kw.pop("tokens"), kw.pop("targets")
    with pytest.raises(InputError, match=match):
        reference.run_with_cache(params, CFG, tokens, targets, **kw)
