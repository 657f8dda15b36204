"""Tests of npllama.optim: AdamW, clip_grad_norm and lr_at."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from npllama.errors import CheckpointError, ConfigError, InputError
from npllama.optim import (
    AdamW,
    adamw_coefficients,
    adamw_update_kernel,
    adamw_update_reference,
    UNIT,
    clip_grad_norm,
    lr_at,
    sum_of_squares,
)
from npllama.engine.threads import thread_limit

FIXTURE = Path(__file__).parent / "fixtures" / "adamw_trajectory.safetensors"


def make_params(dtype=np.float64, seed=0):
    """A toy 'model': an embedding, a projection and a 1-D norm weight."""
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((5, 3)).astype(dtype),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((3, 3)).astype(dtype),
        "model.norm.weight": (1.0 + 0.1 * rng.standard_normal(3)).astype(dtype),
    }


def random_grads(params, rng):
    return {n: rng.standard_normal(p.shape).astype(p.dtype) for n, p in params.items()}


def copy_params(params):
    return {n: p.copy() for n, p in params.items()}


def flat_model(params):
    """Pack params into one flat buffer (with a 2-element gap, as padding might be) and return views."""
    dtype = next(iter(params.values())).dtype
    total = sum(p.size for p in params.values()) + 2
    flat = np.full(total, 7.0, dtype=dtype)
    views, offset = {}, 0
    for name, p in params.items():
        views[name] = flat[offset:offset + p.size].reshape(p.shape)
        views[name][...] = p
        offset += p.size
        if name == "model.embed_tokens.weight":
            offset += 2  # the gap
    return flat, views


# ---------------------------------------------------------------------------------------------
# AdamW: single-step properties
# ---------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       lr=st.floats(1e-5, 1.0),
       seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_first_step_moves_each_element_by_lr_times_sign_of_grad(shape, lr, seed, dtype):
    # Step 1: m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps) = lr * sign(g) up to
    # a relative eps/|g| (<= 1e-5 here since |g| >= 1e-3) and rounding.  Zero gradients don't move.
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape).astype(dtype)
    g = (rng.choice([-1.0, 1.0], size=shape) * np.exp(rng.uniform(np.log(1e-3), np.log(1e3), size=shape)))
    g = g.astype(dtype)
    g.reshape(-1)[0] = 0.0
    params = {"w": p0.copy()}
    AdamW(params, lr=lr, weight_decay=0.0).step({"w": g})
    delta = params["w"].astype(np.float64) - p0
    expected = -lr * np.sign(g.astype(np.float64))
    # rounding of p + delta: a few ulps of |p| in the parameter dtype
    tol = lr * 1e-5 + 4 * np.finfo(dtype).eps * (np.abs(p0) + lr)
    assert np.all(np.abs(delta - expected) <= tol)
    assert delta.reshape(-1)[0] == 0.0


def test_first_step_sign_holds_with_decay_off_for_norm_weights():
    params = make_params()
    before = copy_params(params)
    grads = {n: np.full(p.shape, -3.0) for n, p in params.items()}
    AdamW(params, lr=0.01, weight_decay=0.1).step(grads)
    move = 0.01 * 3.0 / (3.0 + 1e-8)  # lr * |g| / (|g| + eps)
    np.testing.assert_allclose(params["model.norm.weight"], before["model.norm.weight"] + move, rtol=0, atol=1e-15)
    # matrices: decayed first, then moved by +lr
    for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        np.testing.assert_allclose(params[n], before[n] * (1 - 0.01 * 0.1) + move, rtol=0, atol=1e-15)


def test_zero_grad_decays_matrices_by_exactly_one_minus_lr_wd_and_leaves_norms_alone():
    params = make_params()
    before = copy_params(params)
    opt = AdamW(params, lr=0.05, weight_decay=0.2)
    zeros = {n: np.zeros_like(p) for n, p in params.items()}
    factor = 1.0
    for _ in range(3):
        opt.step(zeros)
        factor *= 1 - 0.05 * 0.2
    for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        np.testing.assert_allclose(params[n], before[n] * factor, rtol=1e-14)
        assert not np.allclose(params[n], before[n])
    np.testing.assert_array_equal(params["model.norm.weight"], before["model.norm.weight"])


def test_default_decay_set_is_the_matrices():
    opt = AdamW(make_params(), lr=0.1)
    assert opt.decayed == {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}


def test_decay_by_names_and_by_predicate():
    params = make_params()
    opt = AdamW(params, lr=0.1, decay={"model.norm.weight"})
    assert opt.decayed == {"model.norm.weight"}
    opt = AdamW(params, lr=0.1, decay=lambda name, p: "embed" in name)
    assert opt.decayed == {"model.embed_tokens.weight"}
    before = copy_params(params)
    opt.step({n: np.zeros_like(p) for n, p in params.items()})
    np.testing.assert_allclose(params["model.embed_tokens.weight"], before["model.embed_tokens.weight"] * 0.99)
    np.testing.assert_array_equal(params["model.layers.0.self_attn.q_proj.weight"],
                                  before["model.layers.0.self_attn.q_proj.weight"])


def test_moments_keep_the_parameter_dtype():
    params = make_params(np.float32)
    opt = AdamW(params, lr=1e-3)
    opt.step(random_grads(params, np.random.default_rng(1)))
    for n, p in params.items():
        assert p.dtype == opt.m[n].dtype == opt.v[n].dtype == np.float32
    assert opt.t == 1


def test_lr_override_applies_to_that_step_only():
    a, b = make_params(), make_params()
    grads = random_grads(a, np.random.default_rng(2))
    opt_a = AdamW(a, lr=0.3)
    opt_b = AdamW(b, lr=0.1)
    opt_a.step(grads, lr=0.1)
    opt_b.step(grads)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])
    assert opt_a.lr == 0.3


def test_converges_on_a_quadratic():
    # f(x) = 0.5 * sum(a * (x - c)^2): minimum at c, gradient a * (x - c), curvatures over 3 decades.
    rng = np.random.default_rng(3)
    c = rng.standard_normal((4, 5))
    a = np.exp(rng.uniform(np.log(0.01), np.log(10.0), size=c.shape))
    params = {"x": np.zeros_like(c)}
    opt = AdamW(params, lr=0.1, weight_decay=0.0)
    total = 600
    start_err = np.abs(params["x"] - c).max()
    for step in range(total):
        lr = lr_at(step, max_lr=0.1, warmup_steps=20, total_steps=total, min_lr=1e-4)
        opt.step({"x": a * (params["x"] - c)}, lr=lr)
    assert start_err > 1.0
    assert np.abs(params["x"] - c).max() < 1e-3


# ---------------------------------------------------------------------------------------------
# Kernel against reference, flat buffers against per-array
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_matches_reference(dtype):
    rng = np.random.default_rng(4)
    n = 1037
    p_k = rng.standard_normal(n).astype(dtype)
    m_k, v_k = np.zeros(n, dtype), np.zeros(n, dtype)
    p_r, m_r, v_r = p_k.copy(), m_k.copy(), v_k.copy()
    for step in range(1, 8):
        g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 2, size=n)).astype(dtype)
        c = adamw_coefficients(dtype, lr=0.01 * step, beta1=0.9, beta2=0.95, eps=1e-8,
                               weight_decay=0.1, step=step)
        adamw_update_kernel(p_k, g, m_k, v_k, *c)
        adamw_update_reference(p_r, g, m_r, v_r, *c)
    assert p_k.dtype == m_k.dtype == v_k.dtype == dtype
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    # same operations in the same order: in practice bit-identical
    for k, r in ((p_k, p_r), (m_k, m_r), (v_k, v_r)):
        np.testing.assert_allclose(k, r, rtol=rtol, atol=0)
    assert not np.allclose(p_k, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_buffers_give_the_same_trajectory_as_separate_arrays(dtype):
    separate = make_params(dtype)
    flat, views = flat_model(separate)
    flat_grads, grad_views = flat_model({n: np.zeros_like(p) for n, p in separate.items()})
    opt_sep = AdamW(separate, lr=0.01)
    opt_flat = AdamW(views, lr=0.01, flat_params=flat)
    rng = np.random.default_rng(5)
    for step in range(5):
        grads = random_grads(separate, rng)
        for n in grads:
            grad_views[n][...] = grads[n]
        opt_sep.step(grads, lr=0.01 * (step + 1))
        opt_flat.step(flat_grads=flat_grads, lr=0.01 * (step + 1))
    for n in separate:
        np.testing.assert_array_equal(views[n], separate[n])
        np.testing.assert_array_equal(opt_flat.m[n], opt_sep.m[n])
        np.testing.assert_array_equal(opt_flat.v[n], opt_sep.v[n])
    np.testing.assert_array_equal(flat[3 * 5:3 * 5 + 2], [7.0, 7.0])  # the gap is left alone
    assert np.shares_memory(opt_flat.m["model.norm.weight"], opt_flat._flat_m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_flat_step_in_units_on_threads_is_the_reference_bit_for_bit(dtype, threads):
    # parameters larger than a unit and not multiples of it, decayed and not, so that units end
    # inside runs and runs inside units; every element against the NumPy reference, exactly
    rng = np.random.default_rng(11)
    sizes = {"model.embed_tokens.weight": (3, UNIT + 7), "model.norm.weight": (2 * UNIT + 5,),
             "model.layers.0.mlp.down_proj.weight": (5, 1001), "model.layers.0.input_layernorm.weight": (9,)}
    separate = {n: rng.standard_normal(s).astype(dtype) for n, s in sizes.items()}
    flat, views = flat_model(separate)
    flat_grads, grad_views = flat_model({n: np.zeros_like(p) for n, p in separate.items()})
    opt = AdamW(views, lr=0.01, weight_decay=0.1, flat_params=flat)
    assert len(opt._unit_bounds) > len(opt._flat_runs) > 1
    m = {n: np.zeros_like(p) for n, p in separate.items()}
    v = {n: np.zeros_like(p) for n, p in separate.items()}
    with thread_limit(threads):
        for step in range(1, 4):
            for n in separate:
                grad_views[n][...] = rng.standard_normal(separate[n].shape) * 10.0 ** rng.uniform(-3, 1)
            opt.step(flat_grads=flat_grads, lr=0.01 * step)
            for n, p in separate.items():
                wd = 0.1 if p.ndim >= 2 else 0.0
                c = adamw_coefficients(dtype, lr=0.01 * step, beta1=0.9, beta2=0.95, eps=1e-8,
                                       weight_decay=wd, step=step)
                adamw_update_reference(p, grad_views[n].copy(), m[n], v[n], *c)
    for n in separate:
        np.testing.assert_array_equal(views[n], separate[n])
        np.testing.assert_array_equal(opt.m[n], m[n])
        np.testing.assert_array_equal(opt.v[n], v[n])
    np.testing.assert_array_equal(flat[3 * (UNIT + 7):3 * (UNIT + 7) + 2], [7.0, 7.0])   # the gap


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_of_squares_in_units_is_exact_to_float64_and_the_same_on_any_thread_count(dtype):
    rng = np.random.default_rng(12)
    for n in (0, 1, UNIT - 1, UNIT, 3 * UNIT + 17):
        x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, size=n)).astype(dtype)
        exact = math.fsum(float(e) ** 2 for e in x.astype(np.float64))   # (float64 squares: exact enough)
        with thread_limit(1):
            one = sum_of_squares(x)
        with thread_limit(2):
            two = sum_of_squares(x)
        assert one == two
        assert one == pytest.approx(exact, rel=1e-13, abs=0)


def test_clipping_scales_a_large_buffer_as_numpy_would():
    g = np.random.default_rng(13).standard_normal(2 * UNIT + 3).astype(np.float32)
    expected = g.copy()
    total = clip_grad_norm(g, max_norm=1.0)
    expected *= np.float32(1.0 / (total + 1e-6))
    np.testing.assert_array_equal(g, expected)


def test_flat_mode_rejects_params_that_are_not_views_and_bad_flat_grads():
    params = make_params()
    flat, views = flat_model(params)
    with pytest.raises(ConfigError, match="model.norm.weight"):
        AdamW({**views, "model.norm.weight": params["model.norm.weight"]}, lr=0.1, flat_params=flat)
    opt = AdamW(views, lr=0.1, flat_params=flat)
    with pytest.raises(InputError, match="flat_grads"):
        opt.step(flat_grads=np.zeros(flat.size - 1))
    with pytest.raises(InputError, match="exactly one"):
        opt.step({n: np.zeros_like(p) for n, p in views.items()}, flat_grads=np.zeros_like(flat))
    with pytest.raises(InputError, match="flat_params"):
        AdamW(params, lr=0.1).step(flat_grads=np.zeros_like(flat))


# ---------------------------------------------------------------------------------------------
# Against torch.optim.AdamW (fixture made by scripts/make_adamw_fixture.py, torch in float64)
# ---------------------------------------------------------------------------------------------

def load_fixture():
    tensors = load_file(FIXTURE)
    with safe_open(FIXTURE, "np") as f:
        config = json.loads(f.metadata()["config"])
    names = sorted(k[len("init."):] for k in tensors if k.startswith("init."))
    return tensors, config, names


@pytest.mark.parametrize("flat", [False, True])
def test_trajectory_matches_torch_adamw(flat):
    fx, config, names = load_fixture()
    assert len(names) == 3 and any(fx[f"init.{n}"].ndim == 1 for n in names)
    params = {n: fx[f"init.{n}"].copy() for n in names}
    kwargs = {}
    if flat:
        flat_params, params = flat_model(params)
        kwargs["flat_params"] = flat_params
    opt = AdamW(params, lr=1.0, betas=tuple(config["betas"]), eps=config["eps"],
                weight_decay=config["weight_decay"], **kwargs)
    assert sorted(opt.decayed) == sorted(config["decayed"])  # the default rule is torch's grouping
    lrs = fx["lrs"]
    assert len(set(lrs.tolist())) > 5  # the lr really changes
    for step in range(config["steps"]):
        opt.step({n: fx[f"grads.{n}"][step] for n in names}, lr=float(lrs[step]))
        for n in names:
            np.testing.assert_allclose(params[n], fx[f"params.{n}"][step], rtol=1e-13, atol=1e-15,
                                       err_msg=f"{n} after step {step + 1}")
    for n in names:
        np.testing.assert_allclose(opt.m[n], fx[f"exp_avg.{n}"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(opt.v[n], fx[f"exp_avg_sq.{n}"], rtol=1e-12, atol=1e-15)
    # the zero-gradient embedding row moved by decay alone
    row = params["model.embed_tokens.weight"][5]
    np.testing.assert_allclose(row, fx["init.model.embed_tokens.weight"][5] * np.prod(1 - lrs * 0.1), rtol=1e-13)


def test_trajectory_matches_torch_adamw_in_float32():
    fx, config, names = load_fixture()
    params = {n: fx[f"init.{n}"].astype(np.float32) for n in names}
    opt = AdamW(params, lr=1.0, betas=tuple(config["betas"]), eps=config["eps"],
                weight_decay=config["weight_decay"])
    for step in range(config["steps"]):
        opt.step({n: fx[f"grads.{n}"][step] for n in names}, lr=float(fx["lrs"][step]))
    for n in names:
        assert params[n].dtype == np.float32
        np.testing.assert_allclose(params[n], fx[f"params.{n}"][-1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Checkpointing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flat", [False, True])
def test_state_dict_round_trip_resumes_bit_exactly(tmp_path, flat):
    rng = np.random.default_rng(6)
    grads_seq = [random_grads(make_params(np.float32), rng) for _ in range(8)]
    lrs = [lr_at(s, max_lr=0.01, warmup_steps=2, total_steps=8, min_lr=0.001) for s in range(8)]

    def build(params):
        if flat:
            flat_params, views = flat_model(params)
            return views, AdamW(views, lr=0.01, flat_params=flat_params)
        return params, AdamW(params, lr=0.01)

    ref_params, ref_opt = build(make_params(np.float32))
    for s in range(8):
        ref_opt.step(grads_seq[s], lr=lrs[s])

    params, opt = build(make_params(np.float32))
    for s in range(4):
        opt.step(grads_seq[s], lr=lrs[s])
    arrays, meta = opt.state_dict()
    save_file(arrays, tmp_path / "optim.safetensors")
    (tmp_path / "optim.json").write_text(json.dumps(meta))
    saved_params = copy_params(params)

    resumed_params, resumed = build(saved_params)
    resumed.load_state_dict(load_file(tmp_path / "optim.safetensors"),
                            json.loads((tmp_path / "optim.json").read_text()))
    assert resumed.t == 4
    for s in range(4, 8):
        resumed.step(grads_seq[s], lr=lrs[s])
    for n in ref_params:
        np.testing.assert_array_equal(resumed_params[n], ref_params[n])
        np.testing.assert_array_equal(resumed.m[n], ref_opt.m[n])
        np.testing.assert_array_equal(resumed.v[n], ref_opt.v[n])


def test_load_state_dict_restores_hyperparameters():
    params = make_params()
    opt = AdamW(params, lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3, decay={"model.norm.weight"})
    arrays, meta = opt.state_dict()
    other = AdamW(copy_params(params), lr=1.0)
    other.load_state_dict(arrays, meta)
    assert (other.lr, other.betas, other.eps, other.weight_decay) == (0.02, (0.8, 0.9), 1e-6, 0.3)
    assert other.decayed == {"model.norm.weight"}


def _state():
    params = make_params()
    opt = AdamW(params, lr=0.01)
    opt.step(random_grads(params, np.random.default_rng(7)))
    arrays, meta = opt.state_dict()
    return AdamW(copy_params(params), lr=0.01), arrays, meta


@pytest.mark.parametrize("corrupt, message", [
    (lambda a, m: a.pop("v.model.norm.weight"), "missing.*v.model.norm.weight"),
    (lambda a, m: a.__setitem__("m.lm_head.weight", np.zeros((2, 2))), "unexpected.*m.lm_head.weight"),
    (lambda a, m: a.__setitem__("m.model.norm.weight", np.zeros(4)), r"m.model.norm.weight.*shape"),
    (lambda a, m: a.__setitem__("v.model.norm.weight", np.zeros(3, np.float32)), "v.model.norm.weight.*float32"),
    (lambda a, m: a.__setitem__("v.model.norm.weight", -np.ones(3)), "negative"),
    (lambda a, m: a.__setitem__("m.model.norm.weight", np.full(3, np.nan)), "non-finite"),
    (lambda a, m: m.__setitem__("t", -1), "t must be"),
    (lambda a, m: m.__setitem__("format", "torch"), "format"),
    (lambda a, m: m.__setitem__("version", 99), "version"),
    (lambda a, m: m.__setitem__("betas", [0.9]), "betas"),
    (lambda a, m: m.__setitem__("decayed", ["nope"]), "nope"),
])
def test_load_state_dict_rejects_bad_state_and_changes_nothing(corrupt, message):
    opt, arrays, meta = _state()
    corrupt(arrays, meta)
    with pytest.raises(CheckpointError, match=message):
        opt.load_state_dict(arrays, meta)
    assert opt.t == 0
    assert all(not m.any() for m in opt.m.values())


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": 0.1, "betas": (0.9, 1.0)}, r"betas\[1\]"),
    ({"lr": 0.1, "eps": -1e-8}, "eps"),
    ({"lr": 0.1, "weight_decay": -0.1}, "weight_decay"),
    ({"lr": 0.1, "decay": {"model.nrom.weight"}}, "model.nrom.weight"),
])
def test_constructor_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdamW(make_params(), **kwargs)


def test_constructor_rejects_bad_params():
    with pytest.raises(ConfigError, match="no parameters"):
        AdamW({}, lr=0.1)
    with pytest.raises(ConfigError, match="'w'.*float32 or float64"):
        AdamW({"w": np.zeros(3, np.int64)}, lr=0.1)
    with pytest.raises(ConfigError, match="'w'.*contiguous"):
        AdamW({"w": np.zeros((3, 4)).T}, lr=0.1)


def test_step_rejects_mismatched_grads():
    params = make_params()
    opt = AdamW(params, lr=0.1)
    grads = {n: np.zeros_like(p) for n, p in params.items()}
    with pytest.raises(InputError, match="missing.*model.norm.weight"):
        opt.step({n: g for n, g in grads.items() if n != "model.norm.weight"})
    with pytest.raises(InputError, match="model.norm.weight.*shape"):
        opt.step({**grads, "model.norm.weight": np.zeros(4)})
    with pytest.raises(InputError, match="lr"):
        opt.step(grads, lr=-0.1)
    assert opt.t == 0


# ---------------------------------------------------------------------------------------------
# clip_grad_norm
# ---------------------------------------------------------------------------------------------

def test_clip_grad_norm_scales_to_max_norm_and_returns_the_norm_before():
    grads = make_params(np.float64, seed=8)
    expected = math.sqrt(sum(float(np.sum(g ** 2)) for g in grads.values()))
    directions = {n: g / expected for n, g in grads.items()}
    total = clip_grad_norm(grads, max_norm=0.5)
    assert total == pytest.approx(expected, rel=1e-14)
    after = math.sqrt(sum(float(np.sum(g ** 2)) for g in grads.values()))
    assert after == pytest.approx(0.5, rel=1e-5)  # torch's 1e-6 in the denominator
    for n in grads:  # direction unchanged
        np.testing.assert_allclose(grads[n] / after, directions[n], rtol=1e-12)


def test_clip_grad_norm_leaves_small_grads_alone():
    grads = make_params(np.float64, seed=9)
    before = copy_params(grads)
    total = clip_grad_norm(grads, max_norm=1e6)
    assert total == pytest.approx(math.sqrt(sum(float(np.sum(g ** 2)) for g in before.values())), rel=1e-14)
    for n in grads:
        np.testing.assert_array_equal(grads[n], before[n])


def test_clip_grad_norm_accumulates_float32_in_float64():
    # 10^6 equal float32 values: a float32 running sum is off by ~0.7% and even NumPy's pairwise
    # float32 sum by ~1.5e-8; a float64 accumulation is within ~3e-12 of sqrt(n) * |x|.
    g = np.full(1_000_000, 0.1, dtype=np.float32)
    total = clip_grad_norm({"g": g}, max_norm=1e9)
    exact = math.sqrt(1_000_000 * float(np.float32(0.1)) ** 2)
    assert total == pytest.approx(exact, rel=1e-10)


def test_clip_grad_norm_on_a_flat_buffer_and_float32():
    flat = np.arange(1, 11, dtype=np.float32)
    total = clip_grad_norm(flat, max_norm=1.0)
    assert total == pytest.approx(math.sqrt(385), rel=1e-12)
    assert flat.dtype == np.float32
    assert float(np.linalg.norm(flat.astype(np.float64))) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_with_non_finite_grads_returns_it_and_scales_nothing():
    grads = {"a": np.array([1.0, np.inf]), "b": np.array([2.0])}
    total = clip_grad_norm(grads, max_norm=1.0)
    assert math.isinf(total)
    np.testing.assert_array_equal(grads["b"], [2.0])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_clip_grad_norm_rejects_bad_max_norm(bad):
    with pytest.raises(ConfigError, match="max_norm"):
        clip_grad_norm({"a": np.ones(2)}, bad)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_landmarks(kind):
    kw = dict(max_lr=3e-4, warmup_steps=10, total_steps=100, min_lr=3e-5, kind=kind)
    assert lr_at(0, **kw) == pytest.approx(3e-5)          # max_lr * 1 / warmup
    assert lr_at(4, **kw) == pytest.approx(1.5e-4)
    assert lr_at(9, **kw) == 3e-4                         # warmup end: exactly max_lr
    assert lr_at(10, **kw) == 3e-4                        # decay starts at max_lr
    last = lr_at(99, **kw)
    assert last == (3e-4 if kind == "constant" else 3e-5)  # exactly min_lr at the last step
    assert lr_at(500, **kw) == last                       # and stays there


def test_schedule_midpoints():
    kw = dict(max_lr=1.0, warmup_steps=0, total_steps=11, min_lr=0.0)
    assert lr_at(0, **kw) == 1.0
    assert lr_at(5, **kw, kind="cosine") == pytest.approx(0.5)
    assert lr_at(5, **kw, kind="linear") == pytest.approx(0.5)
    assert lr_at(2, **kw, kind="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_at(2, **kw, kind="linear") == pytest.approx(0.8)
    assert lr_at(7, **kw, kind="constant") == 1.0


@settings(max_examples=60, deadline=None)
@given(warmup=st.integers(0, 30), decay=st.integers(0, 60), max_lr=st.floats(1e-6, 1.0),
       ratio=st.floats(0.0, 1.0), kind=st.sampled_from(["cosine", "linear"]))
def test_schedule_warms_up_then_decays_monotonically(warmup, decay, max_lr, ratio, kind):
    total = warmup + decay
    if total == 0:
        return
    min_lr = max_lr * ratio
    lrs = [lr_at(s, max_lr=max_lr, warmup_steps=warmup, total_steps=total, min_lr=min_lr, kind=kind)
           for s in range(total)]
    assert all(b > a for a, b in zip(lrs[:warmup], lrs[1:warmup]))          # warmup strictly rises
    assert all(b <= a for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))      # decay never rises
    assert all(0 < lr <= max_lr for lr in lrs[:warmup])
    assert all(min_lr <= lr <= max_lr for lr in lrs[warmup:])
    if warmup:
        assert lrs[warmup - 1] == max_lr
    if decay:
        assert lrs[-1] == min_lr


def test_schedule_when_there_is_no_room_to_decay():
    assert lr_at(4, max_lr=1.0, warmup_steps=5, total_steps=5, min_lr=0.1) == 1.0   # all warmup
    assert lr_at(5, max_lr=1.0, warmup_steps=5, total_steps=6, min_lr=0.1) == 0.1   # last step is min_lr


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=-1), "step"),
    (dict(step=1.5), "step"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=101), r"warmup_steps \(101\) > total_steps \(100\)"),
    (dict(total_steps=0, warmup_steps=0), "total_steps"),
    (dict(max_lr=-1.0), "max_lr"),
    (dict(min_lr=float("nan")), "min_lr"),
    (dict(min_lr=1.0), r"min_lr .* > max_lr"),
    (dict(kind="exponential"), "exponential"),
])
def test_schedule_rejects_bad_arguments(kwargs, message):
    kw = dict(step=0, max_lr=0.1, warmup_steps=10, total_steps=100, min_lr=0.01, kind="cosine")
    kw.update(kwargs)
    step = kw.pop("step")
    with pytest.raises(ConfigError, match=message):
        lr_at(step, **kw)
