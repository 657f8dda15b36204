"""The fast model, npllama.Llama: gradients against finite differences on configs drawn by
hypothesis, its identities (batch rows independent, dropout off in eval), and clear errors for bad
input.  That it computes the Llama equations is tests/test_reference.py's: it equals
npllama.reference, which equals Hugging Face transformers."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npllama
from npllama.errors import ConfigError, InputError
from npllama.gradcheck import LLAMA3_SCALING as LLAMA3, numerical_gradient, relative_error


@st.composite
def tiny_configs(draw):
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 2))
    hd = draw(st.sampled_from([2, 4]))
    return npllama.LlamaConfig(
        vocab_size=draw(st.integers(3, 11)), dim=heads * hd, n_layers=draw(st.integers(1, 2)), n_heads=heads,
        n_kv_heads=kv, hidden_dim=draw(st.integers(2, 9)), max_seq_len=8, norm_eps=draw(st.sampled_from([1e-5, 1e-2])),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0, 7.0])), rope_scaling=draw(st.sampled_from([None, LLAMA3])),
        tie_embeddings=draw(st.booleans()))


def random_model(cfg, seed):
    model = npllama.Llama(cfg, seed=seed, dtype=np.float64)
    # move away from the init (norm gains 1, small weights) so every term is exercised
    model.flat_params[...] += np.random.default_rng(seed).normal(0.0, 0.5, model.flat_params.shape)
    return model


@settings(max_examples=12)
@given(cfg=tiny_configs(), seed=st.integers(0, 10**6), b=st.integers(1, 2), t=st.integers(1, 6), data=st.data())
def test_model_gradients_match_finite_differences(cfg, seed, b, t, data):
    model = random_model(cfg, seed)
    r = np.random.default_rng(seed)
    tokens = r.integers(0, cfg.vocab_size, size=(b, t))
    targets = r.integers(0, cfg.vocab_size, size=(b, t))
    n_ignored = data.draw(st.integers(0, b * t - 1))
    targets.reshape(-1)[r.permutation(b * t)[:n_ignored]] = -100
    loss, grads = model.loss_and_grad(tokens, targets)
    assert set(grads) == set(model.params)
    np.testing.assert_allclose(loss, model.loss(tokens, targets), rtol=1e-13)
    grads = {k: v.copy() for k, v in grads.items()}
    for name, p in model.params.items():
        # up to 12 random entries of each parameter keeps this fast; every entry is eligible
        idx = r.choice(p.size, size=min(p.size, 12), replace=False)
        numeric = numerical_gradient(lambda: model.loss(tokens, targets), p, indices=idx).reshape(-1)[idx]
        analytic = grads[name].reshape(-1)
        # relative to the scale of the whole gradient of this parameter, as relative_error does; a
        # gradient that is exactly zero or tiny (q and k when only position 0 has a target: it
        # attends to itself alone) is held to an absolute 1e-8, above the error of the differences
        # (measured up to ~1.5e-9 here: h^2 times the third derivative, with weights of std 0.5)
        err = np.max(np.abs(analytic[idx] - numeric)) / max(np.max(np.abs(analytic)), 1e-2)
        assert err < 1e-6, f"{name}: relative error {err:.2e} (config {cfg})"


def test_float32_close_to_float64(rng):
    cfg = npllama.LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, max_seq_len=16)
    m64 = npllama.Llama(cfg, seed=0, dtype=np.float64)
    m32 = npllama.Llama(cfg, seed=0, dtype=np.float32)
    m32.flat_params[...] = m64.flat_params
    tokens = rng.integers(0, 32, size=(2, 16))
    l64, g64 = m64.loss_and_grad(tokens, tokens)
    l32, g32 = m32.loss_and_grad(tokens, tokens)
    assert g32["model.norm.weight"].dtype == np.float32
    np.testing.assert_allclose(l32, l64, rtol=1e-5)
    assert relative_error(m32.flat_grads, m64.flat_grads) < 1e-4


def test_loss_and_grad_copies_unless_asked_not_to(rng):
    """copy=True: the gradients survive the next call; copy=False: views into flat_grads, which
    the next call overwrites."""
    cfg = npllama.LlamaConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=8)
    m = random_model(cfg, 2)
    a, b = rng.integers(0, 20, size=(2, 2, 8))
    _, kept = m.loss_and_grad(a, a)
    first = m.flat_grads.copy()
    _, views = m.loss_and_grad(b, b, copy=False)
    assert not np.array_equal(m.flat_grads, first)
    assert not any(np.shares_memory(g, m.flat_grads) for g in kept.values())
    np.testing.assert_array_equal(np.concatenate([g.ravel() for g in kept.values()]), first)  # layout order
    assert all(np.shares_memory(g, m.flat_grads) for g in views.values())
    m.loss_and_grad(a, a, copy=False)
    np.testing.assert_array_equal(np.concatenate([g.ravel() for g in views.values()]), first)  # overwritten


def test_params_are_views_of_flat_buffers():
    cfg = npllama.LlamaConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=4, tie_embeddings=True)
    m = npllama.Llama(cfg)
    assert "lm_head.weight" not in m.params
    assert sum(p.size for p in m.params.values()) == m.flat_params.size == cfg.num_parameters()
    m.flat_params[...] = 0.5
    assert all(np.all(p == 0.5) for p in m.params.values())
    assert m.params["model.layers.0.self_attn.q_proj.weight"].shape == (8, 8)


def test_batch_rows_are_independent(rng):
    cfg = npllama.LlamaConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=8)
    m = random_model(cfg, 1)
    tokens = rng.integers(0, 20, size=(3, 8))
    full = m.forward(tokens)
    for b in range(3):
        np.testing.assert_allclose(m.forward(tokens[b:b + 1])[0], full[b], rtol=1e-13, atol=1e-13)


def test_dropout_training_vs_eval(rng):
    cfg = npllama.LlamaConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=8, dropout=0.5)
    m = random_model(cfg, 1)
    tokens = rng.integers(0, 20, size=(2, 8))
    l_train, _ = m.train().loss_and_grad(tokens, tokens)
    l_eval, _ = m.eval().loss_and_grad(tokens, tokens)
    assert l_train != l_eval
    np.testing.assert_allclose(l_eval, m.loss(tokens, tokens), rtol=1e-13)


# ---- bad input ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    cfg = npllama.LlamaConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=6)
    return npllama.Llama(cfg)


@pytest.mark.parametrize("tokens, match", [
    (np.array([[1, 2, 10]]), "outside \\[0, 10\\)"),
    (np.array([[1, -1, 2]]), "outside"),
    (np.array([[1.0, 2.0]]), "integer"),
    (np.array([1, 2, 3]), "shape \\(batch, seq_len\\)"),
    (np.zeros((1, 0), dtype=np.int64), "empty"),
    (np.zeros((1, 7), dtype=np.int64), "past max_seq_len=6"),
    (np.array([["a", "b"]]), "integer"),
])
def test_bad_tokens_raise_clear_errors(small_model, tokens, match):
    with pytest.raises(InputError, match=match):
        small_model.forward(tokens)
    with pytest.raises(InputError, match=match):
        small_model.loss_and_grad(tokens, np.zeros_like(tokens, dtype=np.int64) if tokens.dtype.kind in "iu" else tokens)


def test_bad_targets_raise_clear_errors(small_model):
    tokens = np.array([[1, 2, 3]])
    with pytest.raises(InputError, match="does not match"):
        small_model.loss_and_grad(tokens, np.array([[1, 2]]))
    with pytest.raises(InputError, match="targets has id -5"):
        small_model.loss_and_grad(tokens, np.array([[1, -5, 2]]))
    with pytest.raises(InputError, match="targets has id 10"):
        small_model.loss_and_grad(tokens, np.array([[1, 10, 2]]))


def test_valid_edge_cases(small_model):
    assert small_model.forward(np.array([[3]])).shape == (1, 1, 10)                 # T = 1
    assert small_model.forward(np.zeros((1, 6), dtype=np.uint8)).shape == (1, 6, 10)  # full context
    read_only = np.arange(6).reshape(2, 3)[:, ::-1]
    read_only.flags.writeable = False
    assert small_model.forward(read_only).shape == (2, 3, 10)                       # non-contiguous, read-only
    loss, _ = small_model.loss_and_grad(np.array([[1, 2]]), np.array([[-100, -100]]))
    assert loss == 0.0                                                              # nothing to predict


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(dim=10, n_heads=4), "dim \\(10\\) must be divisible by n_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(dropout=1.0), "dropout"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
])
def test_bad_config_raises(kwargs, match):
    base = dict(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=6)
    with pytest.raises(ConfigError, match=match):
        npllama.LlamaConfig(**{**base, **kwargs})


def test_bad_dtype_raises():
    cfg = npllama.LlamaConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=6)
    with pytest.raises(ConfigError, match="float32 or float64"):
        npllama.Llama(cfg, dtype=np.float16)


@pytest.mark.parametrize("lora", [False, True])
def test_a_batch_split_among_threads_gives_the_whole_batchs_loss_and_gradient(lora):
    # With two threads loss_and_grad runs the batch as two parts, one per thread, and sums their
    # gradients (engine/batch.py): the same loss and gradient as the whole batch on one
    # thread, with an odd batch (parts of 1 and 2 sequences), ignored targets spread unevenly (each
    # part's mean weighed by its targets) and dropout drawn from the model's generator (the parts
    # take their rows of the same masks).
    from npllama.engine.threads import thread_limit
    cfg = npllama.LlamaConfig(vocab_size=30, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24,
                              max_seq_len=9, dropout=0.2)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 30, size=(3, 9))
    y = x.copy()
    y[0, :7] = -100                                   # the first part: 2 of its 9 targets count

    def run(threads, steps):
        m = random_model(cfg, 3).train()
        if lora:
            m.add_lora(2, 4.0, dropout=0.3, seed=1)
            m.flat_lora[...] = np.random.default_rng(2).normal(size=m.flat_lora.size)
        with thread_limit(threads):
            for _ in range(steps):
                ready = []
                loss, grads = m.loss_and_grad(x, y, on_grads_ready=lambda lo, hi: ready.append((lo, hi)))
        # every range of flat_grads reported once, in the backward's order (MPI's all-reduce reads them)
        assert ready[0][1] == m.flat_grads.size and ready[-1][0] == 0
        assert all(ready[i][0] == ready[i + 1][1] for i in range(len(ready) - 1))
        return loss, grads
    for steps in (1, 2):                              # parts one after the other, then at once
        whole_loss, whole = run(1, steps)
        loss, parts = run(2, steps)
        assert abs(loss - whole_loss) < 1e-12 * abs(whole_loss)
        for name, g in whole.items():
            np.testing.assert_allclose(parts[name], g, rtol=1e-11, atol=1e-13, err_msg=name)
