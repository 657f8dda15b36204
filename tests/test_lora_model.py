"""The fast engine with LoRA adapters (Llama.add_lora) against npllama.reference with ``lora=`` in
float64 (<= 1e-12 relative): logits, loss and the adapters' gradients, with and without the
adapters' dropout masks and the block's dropout masks, on grouped-query and tied-embedding configs;
B = 0 (PEFT's init) reproduces the base exactly; the frozen base gets no gradient buffer."""
import numpy as np
import pytest

import npllama
from npllama import reference
from npllama.config import LlamaConfig
from npllama.errors import ConfigError, InputError
from npllama.gradcheck import relative_error
from npllama.layers.dropout import dropout_mask
from npllama.model import LORA_TARGETS
from npllama.optim import AdamW

TOLERANCE = 1e-12
CONFIGS = {
    "gqa": LlamaConfig(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=16),
    "tied": LlamaConfig(vocab_size=41, dim=24, n_layers=2, n_heads=3, n_kv_heads=1, hidden_dim=40, max_seq_len=16,
                        tie_embeddings=True),
}
TARGETS = {"all": LORA_TARGETS, "attention": ("q_proj", "v_proj"), "mlp": ("up_proj", "down_proj")}


def lora_model(cfg, targets, seed=0, rank=3, alpha=5.0):
    """A float64 model with adapters whose A and B are all nonzero, its base weights (copied), and
    the adapters in reference.py's form {module: (A, B, scale)}."""
    model = npllama.Llama(cfg, dtype=np.float64, seed=seed)
    base = {k: v.copy() for k, v in model.params.items()}
    model.add_lora(rank, alpha, targets, seed=seed)
    rng = np.random.default_rng(seed + 7)
    for p in model.lora_params.values():
        p[...] = rng.normal(0.0, 0.2, size=p.shape)
    lora = {k.removesuffix(".lora_A.weight"): (p, model.lora_params[k.replace(".lora_A.", ".lora_B.")], alpha / rank)
            for k, p in model.lora_params.items() if k.endswith(".lora_A.weight")}
    return model, base, lora


def batch(cfg, seed, B=2, T=7):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :2] = -100
    return tokens, targets


def assert_grads_equal(grads, ref_grads):
    assert set(grads) == set(ref_grads)
    worst = max(relative_error(grads[k], ref_grads[k]) for k in ref_grads)
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_lora_equals_reference(config, targets):
    cfg = CONFIGS[config]
    model, base, lora = lora_model(cfg, TARGETS[targets])
    tokens, tgt = batch(cfg, 1)
    assert relative_error(model.forward(tokens), reference.forward(base, cfg, tokens, lora=lora)) <= TOLERANCE
    loss, grads = model.loss_and_grad(tokens, tgt)
    ref_loss, ref_grads = reference.loss_and_grad(base, cfg, tokens, tgt, lora=lora)
    assert abs(loss - ref_loss) <= TOLERANCE * abs(ref_loss)
    assert_grads_equal(grads, ref_grads)
    for name, p in model.params.items():             # the base stayed as it was
        np.testing.assert_array_equal(p, base[name])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_lora_with_dropout_masks_equals_reference(config):
    cfg = CONFIGS[config]
    model, base, lora = lora_model(cfg, LORA_TARGETS, seed=3)
    tokens, tgt = batch(cfg, 4)
    B, T = tokens.shape
    rng = np.random.default_rng(5)
    lora_masks = {name: dropout_mask((B, T, a.shape[1]), 0.3, rng, np.float64)
                  for name, (a, _, _) in lora.items() if "q_proj" not in name}   # q_proj: no mask
    block_masks = [tuple(dropout_mask((B, T, cfg.dim), 0.2, rng, np.float64) for _ in range(2))
                   for _ in range(cfg.n_layers)]
    for dropout_masks in (None, block_masks):
        loss, grads = model.loss_and_grad(tokens, tgt, dropout_masks, lora_masks=lora_masks)
        ref_loss, ref_grads = reference.loss_and_grad(base, cfg, tokens, tgt, dropout_masks, lora=lora,
                                                      lora_masks=lora_masks)
        assert abs(loss - ref_loss) <= TOLERANCE * abs(ref_loss)
        assert_grads_equal(grads, ref_grads)
    # the masks matter
    _, plain = reference.loss_and_grad(base, cfg, tokens, tgt, lora=lora)
    assert max(relative_error(grads[k], plain[k]) for k in plain) > 0.01


@pytest.mark.parametrize("config", list(CONFIGS))
def test_lora_init_reproduces_the_base_exactly(config):
    cfg = CONFIGS[config]
    model = npllama.Llama(cfg, dtype=np.float64, seed=2)
    tokens, tgt = batch(cfg, 6)
    logits, base_loss = model.forward(tokens), model.loss(tokens, tgt)
    model.add_lora(4, 8.0, seed=2)
    assert all(not p.any() for k, p in model.lora_params.items() if ".lora_B." in k)
    assert all(p.any() for k, p in model.lora_params.items() if ".lora_A." in k)
    np.testing.assert_array_equal(model.forward(tokens), logits)
    np.testing.assert_array_equal(model.loss(tokens, tgt), base_loss)
    loss, grads = model.loss_and_grad(tokens, tgt)
    assert loss == base_loss
    # B = 0: dA = s B^T G = 0, but dB = s G A^T moves B (docs/12-lora.md)
    assert all(not g.any() for k, g in grads.items() if ".lora_A." in k)
    assert all(g.any() for k, g in grads.items() if ".lora_B." in k)


def test_frozen_base_has_no_gradient_buffer():
    cfg = CONFIGS["gqa"]
    model, _, _ = lora_model(cfg, ("q_proj", "v_proj"), rank=2)
    n_adapter = sum(2 * (cfg.n_heads * cfg.head_dim + cfg.dim) if t == "q_proj" else
                    2 * (cfg.n_kv_heads * cfg.head_dim + cfg.dim) for t in ("q_proj", "v_proj")) * cfg.n_layers
    assert model.flat_lora.size == n_adapter
    assert model.flat_grads.size == n_adapter and model.flat_grads.nbytes < model.flat_params.nbytes / 10
    assert model.trainable_params is model.lora_params and model.flat_trainable is model.flat_lora
    assert all(np.shares_memory(p, model.flat_lora) for p in model.lora_params.values())
    assert all(np.shares_memory(g, model.flat_grads) for g in model.grads.values())
    loss, grads = model.loss_and_grad(*batch(cfg, 0), copy=False)
    assert grads is model.grads and set(grads) == set(model.lora_params)


def test_lora_refuses_bad_settings():
    model = npllama.Llama(CONFIGS["gqa"], dtype=np.float64)
    with pytest.raises(ConfigError, match="qproj"):
        model.add_lora(4, 8.0, ("qproj",))
    with pytest.raises(ConfigError, match="rank"):
        model.add_lora(0, 8.0)
    with pytest.raises(InputError, match="no LoRA adapters"):
        model.loss_and_grad(*batch(CONFIGS["gqa"], 0), lora_masks={})
    model.add_lora(2, 4.0, ("v_proj",))
    with pytest.raises(ConfigError, match="already"):
        model.add_lora(2, 4.0)
    tokens, tgt = batch(CONFIGS["gqa"], 0)
    with pytest.raises(InputError, match="q_proj"):
        model.loss_and_grad(tokens, tgt, lora_masks={"model.layers.0.self_attn.q_proj": np.ones((2, 7, 32))})


def test_adamw_holds_state_for_the_adapters_only():
    cfg = CONFIGS["tied"]
    model, base, _ = lora_model(cfg, LORA_TARGETS)
    before = model.flat_lora.copy()
    opt = AdamW(model.trainable_params, 1e-2, weight_decay=0.1, flat_params=model.flat_trainable)
    assert set(opt.m) == set(model.lora_params)
    arrays, _ = opt.state_dict()
    assert sum(a.size for a in arrays.values()) == 2 * model.flat_lora.size
    for _ in range(2):
        model.loss_and_grad(*batch(cfg, 0), copy=False)
        opt.step(flat_grads=model.flat_grads)
    assert np.abs(model.flat_lora - before).min() > 0          # every adapter entry moved
    for name, p in model.params.items():                       # no base weight did
        np.testing.assert_array_equal(p, base[name])
