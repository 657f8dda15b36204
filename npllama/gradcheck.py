"""Finite-difference gradient checking.

The analytic backward of every layer is checked against central differences in float64:

    df/dx_i ~= (f(x + h e_i) - f(x - h e_i)) / (2 h)

whose truncation error is O(h^2 f''') and rounding error O(eps_machine |f| / h).  With h = 1e-6
in float64 both are around 1e-10 relative, so a relative error below 1e-6 means the backward is
right and anything above ~1e-4 means it is wrong.

To check a function ``y = f(x)`` with upstream gradient ``g``, reduce it to the scalar
``L = sum(g * f(x))``: then dL/dx is exactly what the backward returns for ``dout = g``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def numerical_gradient(loss_fn: Callable[[], float], x: np.ndarray, h: float = 1e-6,
                       indices=None) -> np.ndarray:
    """Central-difference gradient of the scalar ``loss_fn()`` with respect to ``x``, perturbed in place.

    ``indices`` (flat positions) restricts the check to those entries; the others stay 0."""
    if x.dtype != np.float64:
        raise TypeError(f"finite differences need float64, got {x.dtype}")
    grad = np.zeros_like(x)
    flat_x = x.reshape(-1)  # a view: perturbing it perturbs x
    flat_g = grad.reshape(-1)
    if not np.shares_memory(flat_x, x):
        raise ValueError("x must be contiguous so that it can be perturbed in place")
    for i in (range(flat_x.size) if indices is None else indices):
        old = flat_x[i]
        flat_x[i] = old + h
        plus = loss_fn()
        flat_x[i] = old - h
        minus = loss_fn()
        flat_x[i] = old
        flat_g[i] = (plus - minus) / (2.0 * h)
    return grad


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """max |a - n| / max(max |a|, max |n|): the worst error relative to the gradient's scale.

    Scaling by the largest entry (rather than entry by entry) keeps entries that are zero up to
    rounding from dominating, while still failing on any entry that is wrong by a visible amount.
    """
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise ValueError(f"shape mismatch: {analytic.shape} vs {numeric.shape}")
    scale = max(np.max(np.abs(analytic), initial=0.0), np.max(np.abs(numeric), initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(analytic - numeric)) / scale)


def check_gradients(loss_fn: Callable[[], float], inputs: dict[str, np.ndarray],
                    analytic: dict[str, np.ndarray], h: float = 1e-6) -> dict[str, float]:
    """Relative error of each analytic gradient against finite differences of ``loss_fn``."""
    return {name: relative_error(analytic[name], numerical_gradient(loss_fn, x, h)) for name, x in inputs.items()}


# ---- the checks behind `npllama gradcheck` -----------------------------------------------------
TOLERANCE = 1e-6


def _fd(forward, inputs, analytic, dout):
    loss = lambda: float(np.sum(dout * forward()))
    return {name: relative_error(analytic[name], numerical_gradient(loss, x)) for name, x in inputs.items()}


def check_embedding(r):
    from .layers.embedding import embedding_backward, embedding_forward
    ids, w = r.integers(0, 7, size=(2, 5)), r.normal(size=(7, 4))
    dout = r.normal(size=(2, 5, 4))
    _, cache = embedding_forward(ids, w)
    dw = embedding_backward(dout, cache, np.zeros_like(w))
    return _fd(lambda: embedding_forward(ids, w)[0], {"weight": w}, {"weight": dw}, dout)


def check_rmsnorm(r):
    from .layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
    x, w, dy = r.normal(size=(6, 8)), r.normal(size=8), r.normal(size=(6, 8))
    _, cache = rmsnorm_forward(x, w, 1e-5)
    dx, dw = rmsnorm_backward(dy, cache)
    return _fd(lambda: rmsnorm_forward(x, w, 1e-5)[0], {"x": x, "weight": w}, {"x": dx, "weight": dw}, dy)


def check_rope(r):
    from .layers.rope import rope_backward, rope_cos_sin, rope_forward, rope_frequencies
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4}
    cos, sin = rope_cos_sin(np.arange(6), rope_frequencies(8, 500000.0, scaling), np.float64)
    x, dy = r.normal(size=(2, 3, 6, 8)), r.normal(size=(2, 3, 6, 8))
    _, cache = rope_forward(x, cos, sin)
    return _fd(lambda: rope_forward(x, cos, sin)[0], {"x": x}, {"x": rope_backward(dy, cache)}, dy)


def check_attention(r):
    from .layers.attention import attention_backward, attention_forward
    q, k, v = r.normal(size=(2, 4, 5, 3)), r.normal(size=(2, 2, 5, 3)), r.normal(size=(2, 2, 5, 3))
    do = r.normal(size=(2, 4, 5, 3))
    _, cache = attention_forward(q, k, v)
    dq, dk, dv = attention_backward(do, cache)
    return _fd(lambda: attention_forward(q, k, v)[0], {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv}, do)


def check_swiglu(r):
    from .layers.swiglu import feedforward_backward, feedforward_forward
    x, wgu, wd, dy = r.normal(size=(4, 5)), r.normal(size=(12, 5)), r.normal(size=(5, 6)), r.normal(size=(4, 5))
    _, cache = feedforward_forward(x, wgu, wd)
    dx, dwgu, dwd = feedforward_backward(dy, cache)
    return _fd(lambda: feedforward_forward(x, wgu, wd)[0], {"x": x, "w_gate_up": wgu, "w_down": wd},
               {"x": dx, "w_gate_up": dwgu, "w_down": dwd}, dy)


def check_linear(r):
    from .layers.linear import linear_backward, linear_forward
    x, w, dy = r.normal(size=(4, 5)), r.normal(size=(3, 5)), r.normal(size=(4, 3))
    _, cache = linear_forward(x, w)
    dx, dw = linear_backward(dy, cache)
    return _fd(lambda: linear_forward(x, w)[0], {"x": x, "weight": w}, {"x": dx, "weight": dw}, dy)


def check_dropout(r):
    from .layers.dropout import dropout_backward, dropout_forward
    x, dy = r.normal(size=(4, 6)), r.normal(size=(4, 6))
    _, mask = dropout_forward(x, 0.3, np.random.default_rng(0), True)
    return _fd(lambda: dropout_forward(x, 0.3, np.random.default_rng(0), True)[0], {"x": x},
               {"x": dropout_backward(dy, mask)}, dy)


def check_cross_entropy(r):
    from .layers.cross_entropy import cross_entropy_backward, cross_entropy_forward
    logits, targets = r.normal(size=(6, 9)), r.integers(0, 9, size=6)
    targets[2] = -100
    _, cache = cross_entropy_forward(logits, targets)
    return _fd(lambda: cross_entropy_forward(logits, targets)[0], {"logits": logits},
               {"logits": cross_entropy_backward(1.0, cache)}, 1.0)


def check_decoder_block(r):
    """The fast engine's block (layers/block.py, on rows of activations).
    TODO(lead): the reference branch checks npllama/reference.py's block here instead or as well."""
    from .config import LlamaConfig
    from .layers.block import BlockActivations, RowBatch, decoder_block_backward_rows, decoder_block_forward_rows
    from .layers.rope import rope_frequencies
    cfg = LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=6, max_seq_len=8)
    w = {"attn_norm": 1 + 0.3 * r.normal(size=8), "wqkv": r.normal(size=(16, 8)), "wo": r.normal(size=(8, 8)),
         "ffn_norm": 1 + 0.3 * r.normal(size=8), "w_gate_up": r.normal(size=(12, 8)), "w_down": r.normal(size=(8, 6))}
    B, T = 2, 5
    batch = RowBatch(cfg, B, T, np.float64, rope_frequencies(cfg.head_dim, cfg.rope_theta))
    x, dout = r.normal(size=(B * T, 8)), r.normal(size=(B * T, 8))

    def forward():
        acts = BlockActivations(cfg, B * T, np.float64)
        acts.x[...] = x
        out = np.empty_like(x)
        decoder_block_forward_rows(acts, w, out, batch)
        return out, acts

    _, acts = forward()
    dw = {k: np.zeros_like(v) for k, v in w.items()}
    batch.scratch.dres[...] = dout
    decoder_block_backward_rows(acts, w, dw, batch)
    dx = batch.scratch.dres.copy()
    return _fd(lambda: forward()[0], {"x": x, **w}, {"x": dx, **dw}, dout)


def check_model(r, tie_embeddings=False):
    from .config import LlamaConfig
    from .model import Llama
    cfg = LlamaConfig(vocab_size=11, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=6, max_seq_len=8,
                      tie_embeddings=tie_embeddings)
    model = Llama(cfg, dtype=np.float64)
    model.flat_params[...] += r.normal(0.0, 0.5, model.flat_params.shape)
    tokens, targets = r.integers(0, 11, size=(2, 6)), r.integers(0, 11, size=(2, 6))
    targets[0, 2] = -100
    _, grads = model.loss_and_grad(tokens, targets)
    loss = lambda: model.loss(tokens, targets)
    return {name: relative_error(grads[name], numerical_gradient(loss, p)) for name, p in model.params.items()}


LAYER_CHECKS = {
    "embedding": check_embedding, "rmsnorm": check_rmsnorm, "rope": check_rope, "attention": check_attention,
    "swiglu": check_swiglu, "linear": check_linear, "dropout": check_dropout, "cross_entropy": check_cross_entropy,
    "decoder_block": check_decoder_block, "model": check_model,
    "model_tied": lambda r: check_model(r, tie_embeddings=True),
}


def add_arguments(parser):
    parser.add_argument("--layer", choices=sorted(LAYER_CHECKS), action="append",
                        help="check only this layer (repeatable); default: every layer and the full model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest relative error that passes")


def run(args) -> int:
    """Print one row per layer: the worst relative error of each gradient; exit code 1 on failure."""
    names = args.layer or list(LAYER_CHECKS)
    print(f"float64 central differences (h = 1e-6); pass when relative error <= {args.tolerance:.0e}")
    print(f"{'layer':<15} {'gradient':<48} {'rel. error':>10}  result")
    failed = 0
    for name in names:
        errors = LAYER_CHECKS[name](np.random.default_rng(args.seed))
        for i, (grad_name, err) in enumerate(errors.items()):
            ok = err <= args.tolerance
            failed += not ok
            print(f"{name if i == 0 else '':<15} {grad_name:<48} {err:>10.2e}  {'ok' if ok else 'FAIL'}")
    print("all gradients match" if not failed else f"{failed} gradient(s) FAILED")
    return 1 if failed else 0
