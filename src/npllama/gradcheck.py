"""Finite-difference gradient checking.

The analytic backward of every layer is checked against central differences in float64:

    df/dx_i ~= (f(x + h e_i) - f(x - h e_i)) / (2 h)

whose truncation error is O(h^2 f''') and rounding error O(eps_machine |f| / h).  With h = 1e-6
in float64 both are around 1e-10 relative, so a relative error below 1e-6 means the backward is
right and anything above ~1e-4 means it is wrong.

Two relative errors are reported.  ``relative_error`` divides the worst difference by the largest
entry of the gradient: the pass/fail measure.  ``elementwise_relative_error`` is CS231n's, entry
by entry, |a - n| / (|a| + |n|): strict on every entry, so it is also ~1 on an entry that is zero
up to rounding (a 1e-17 analytic value against 1e-11 of finite-difference noise), which is why it
is shown beside the other rather than used to pass or fail.

To check a function ``y = f(x)`` with upstream gradient ``g``, reduce it to the scalar
``L = sum(g * f(x))``: then dL/dx is exactly what the backward returns for ``dout = g``.
"""
from __future__ import annotations

import inspect
from typing import Callable

import numpy as np

from . import reference
from .config import LlamaConfig
from .errors import InputError
from .layers.attention import attention_backward, attention_forward
from .layers.cross_entropy import IGNORE_INDEX, count_targets, cross_entropy_kernel
from .layers.dropout import dropout_backward, dropout_forward
from .layers.embedding import embedding_backward
from .layers.linear import linear_backward, linear_forward
from .layers.lora import lora_adapter_backward, lora_adapter_forward, lora_backward_reference, lora_forward_reference
from .layers.rmsnorm import rmsnorm_backward_kernel, rmsnorm_dw_chunks, rmsnorm_forward_kernel
from .layers.rope import rope_cos_sin, rope_frequencies, rope_kernel
from .layers.swiglu import swiglu_backward_kernel, swiglu_forward_kernel
from .model import Llama, parameter_layout
from .reference import block_backward, block_forward, layer_weights, loss_and_grad, with_options


# ---- the layers' in-place kernels wrapped to allocate their outputs ------------------------------
# ``out, cache = f_forward(...)``, ``d_inputs... = f_backward(dout, cache)``, as the checks (and
# tests/test_layers.py) call them; the model calls the kernels themselves, into its own buffers.


# RMSNorm
def rmsnorm_forward(x, w, eps):
    """x: (..., D), w: (D,) -> y: (..., D), cache = (x, w, r)."""
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    y = np.empty_like(x2)
    r = np.empty(x2.shape[0], dtype=x.dtype)
    rmsnorm_forward_kernel(x2, w, x.dtype.type(eps), y, r)
    return y.reshape(x.shape), (x2, w, r)


def rmsnorm_backward(dy, cache, dw_out=None):
    """Returns (dx, dw); dw is written into ``dw_out`` when given."""
    x2, w, r = cache
    dy2 = np.ascontiguousarray(dy.reshape(x2.shape))
    dx = np.empty_like(x2)
    dw_partial = np.empty((rmsnorm_dw_chunks(x2.shape[0]), x2.shape[1]), dtype=x2.dtype)
    rmsnorm_backward_kernel(dy2, x2, w, r, dx, dw_partial, False)
    dw = np.sum(dw_partial, axis=0, out=dw_out)
    return dx.reshape(dy.shape), dw


# SwiGLU
def swiglu_forward(gate_up):
    """gate_up: (N, 2F) = [g | u] -> s: (N, F), cache = gate_up."""
    gate_up = np.ascontiguousarray(gate_up)
    s = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=gate_up.dtype)
    swiglu_forward_kernel(gate_up, s)
    return s, gate_up


def swiglu_backward(ds, cache):
    """ds: (N, F) -> [dg | du]: (N, 2F), a new array (the cache is left as it was)."""
    dgate_up = cache.copy()
    swiglu_backward_kernel(np.ascontiguousarray(ds), dgate_up)
    return dgate_up


def feedforward_forward(x, w_gate_up, w_down):
    """x: (N, D); w_gate_up: (2F, D); w_down: (D, F) -> y: (N, D), cache."""
    gate_up, cache_gate_up = linear_forward(x, w_gate_up)    # (N, 2F) = [g | u]
    s, cache_swiglu = swiglu_forward(gate_up)                # (N, F)
    y, cache_down = linear_forward(s, w_down)                # (N, D)
    return y, (cache_gate_up, cache_swiglu, cache_down)


def feedforward_backward(dy, cache, dw_gate_up=None, dw_down=None):
    """-> (dx, dw_gate_up, dw_down); the weight gradients go into the given arrays when given."""
    cache_gate_up, cache_swiglu, cache_down = cache
    ds, dw_down = linear_backward(dy, cache_down, dw_down)
    dgate_up = swiglu_backward(ds, cache_swiglu)             # (N, 2F) = [dg | du]
    dx, dw_gate_up = linear_backward(dgate_up, cache_gate_up, dw_gate_up)
    return dx, dw_gate_up, dw_down


# RoPE
def _rotate(x, cos, sin, sign):
    B, NH, T, hd = x.shape
    rows = np.array(x, dtype=x.dtype, order="C").reshape(B * NH * T, hd)   # a copy: one head per row
    rope_kernel(rows, 1, hd, cos, sin, x.dtype.type(sign), 0, T)
    return rows.reshape(x.shape)


def rope_forward(x, cos, sin):
    """x: (B, heads, T, hd), any strides -> y: contiguous (B, heads, T, hd), cache = (cos, sin)."""
    return _rotate(x, cos, sin, 1.0), (cos, sin)


def rope_backward(dy, cache):
    """dy: (B, heads, T, hd) -> dx: contiguous (B, heads, T, hd) (the rotation by -theta)."""
    cos, sin = cache
    return _rotate(dy, cos, sin, -1.0)


# cross-entropy
def cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX):
    """logits: (N, V); targets: int (N,) -> (mean loss as a Python float, cache)."""
    losses = np.empty(logits.shape[0], dtype=np.float64)
    cross_entropy_kernel(logits, targets, ignore_index, losses, logits.dtype.type(0.0))
    count = count_targets(targets, ignore_index)
    return float(np.sum(losses) / count), (logits, targets, count, ignore_index)


def cross_entropy_backward(dloss, cache, out=None):
    """-> dlogits (N, V), a new array or ``out`` (which may be the logits array to reuse its memory).
    The softmax is computed again from the cached logits: the forward keeps nothing (N, V)."""
    logits, targets, count, ignore_index = cache
    out = np.empty_like(logits) if out is None else out
    if out is not logits:
        np.copyto(out, logits)
    losses = np.empty(logits.shape[0], dtype=np.float64)
    cross_entropy_kernel(out, targets, ignore_index, losses, logits.dtype.type(dloss / count))
    return out


# LoRA
def lora_forward(x, w, a, b, scale, mask=None, out=None, z=None, x_drop=None):
    """x: (..., in) -> y: (..., out), cache.  mask: None or x's shape.  The base product is one BLAS
    call into ``out`` (N, out); z (N, r) and x_drop (N, in) (with a mask) are preallocated rows."""
    x2 = x.reshape(-1, w.shape[1])
    mask2 = None if mask is None else mask.reshape(x2.shape)
    y = np.matmul(x2, w.T, out=out)                   # x W^T    (N, out)
    adapter = lora_adapter_forward(x2, a, b, scale, y, mask2, z, x_drop)
    return y.reshape(*x.shape[:-1], w.shape[0]), (x.shape, w, adapter)


def lora_backward(dy, cache, dx=None, da=None, db=None, dz=None):
    """-> (dx, dA, dB), written into ``dx`` (N, in), ``da``, ``db`` when given.  No dW: W is frozen."""
    x_shape, w, adapter = cache
    dy2 = dy.reshape(-1, w.shape[0])
    dx = np.matmul(dy2, w, out=dx)                    # dy W     (N, in)
    da, db = lora_adapter_backward(dy2, adapter, dx, da, db, dz)
    return dx.reshape(x_shape), da, db


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


def richardson_gradient(loss_fn: Callable[[], float], x: np.ndarray, h: float = 1e-4,
                        indices=None) -> np.ndarray:
    """Richardson's extrapolation of two central differences, (4 D(h/2) - D(h)) / 3: the h^2 term of
    their truncation error cancels, so a larger h (smaller rounding error, ~eps |L| / h) can be
    used where the third derivative is large.  Same arguments as ``numerical_gradient``."""
    return (4 * numerical_gradient(loss_fn, x, h / 2, indices) - numerical_gradient(loss_fn, x, h, indices)) / 3


def _pair(analytic, numeric):
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise ValueError(f"shape mismatch: {analytic.shape} vs {numeric.shape}")
    return analytic, numeric


def relative_error(analytic: np.ndarray, numeric: np.ndarray, smallest_scale: float = 0.0) -> float:
    """max |a - n| / max(max |a|, max |n|): the worst error relative to the gradient's scale.

    Scaling by the largest entry (rather than entry by entry) keeps entries that are zero up to
    rounding from dominating, while still failing on any entry that is wrong by a visible amount.
    ``smallest_scale``: the scale is taken no smaller than this (a gradient below what finite
    differences resolve is then held to an absolute error instead).
    """
    analytic, numeric = _pair(analytic, numeric)
    scale = max(np.max(np.abs(analytic), initial=0.0), np.max(np.abs(numeric), initial=0.0), smallest_scale)
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(analytic - numeric)) / scale)


def elementwise_relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """max over entries of |a - n| / max(|a| + |n|, tiny): CS231n's relative error (0 where both are 0)."""
    analytic, numeric = _pair(analytic, numeric)
    denominator = np.maximum(np.abs(analytic) + np.abs(numeric), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(analytic - numeric) / denominator, initial=0.0))


def check_gradients(loss_fn: Callable[[], float], inputs: dict[str, np.ndarray],
                    analytic: dict[str, np.ndarray], h: float = 1e-6) -> dict[str, float]:
    """Relative error of each analytic gradient against finite differences of ``loss_fn``."""
    return {name: relative_error(analytic[name], numerical_gradient(loss_fn, x, h)) for name, x in inputs.items()}


# ---- the checks behind `npllama gradcheck` -----------------------------------------------------
# Each check returns {gradient name: (analytic, numeric)} on random inputs drawn from r.
TOLERANCE = 1e-6
SAMPLED_ENTRIES = 12   # entries of each gradient of the reference model that are checked
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 4}


FLOAT32_TOLERANCE = 1e-4   # a float32 backward against float64 differences: float32's rounding (~1e-6) and margin
FULL_CHECK_ENTRIES = 1000  # larger inputs (from --shape) have SAMPLED_ENTRIES of their entries checked


def _fd(forward, inputs, analytic, dout):
    """{name: (analytic, numeric)}: the gradient of sum(dout * forward()) by central differences,
    at every entry of each input, or at SAMPLED_ENTRIES of them (its largest among them) when it
    has more than FULL_CHECK_ENTRIES."""
    loss = lambda: float(np.sum(dout * forward()))
    pairs = {}
    for name, x in inputs.items():
        if np.shape(analytic[name]) != x.shape:   # named here rather than broadcast below
            raise ValueError(f"the gradient for {name} has shape {np.shape(analytic[name])}, but {name} has shape "
                             f"{x.shape}")
        a = np.asarray(analytic[name], dtype=np.float64)
        if x.size <= FULL_CHECK_ENTRIES:
            pairs[name] = (a, numerical_gradient(loss, x))
        else:
            idx = sampled_entries(a, np.random.default_rng(x.size))
            pairs[name] = (a.reshape(-1)[idx], numerical_gradient(loss, x, indices=idx).reshape(-1)[idx])
    return pairs


def _in(dtype, *arrays):
    """The arrays in the dtype the analytic backward runs in (the differences stay float64)."""
    return [np.ascontiguousarray(a, dtype=dtype) for a in arrays]


def sampled_entries(grad, r, n=SAMPLED_ENTRIES):
    """Flat positions of up to n entries of ``grad``: its largest one (so that ``relative_error``
    on the sample keeps the whole gradient's scale) and the others at random."""
    others = r.choice(grad.size, size=min(grad.size, n) - 1, replace=False)
    return np.unique(np.append(others, np.argmax(np.abs(grad))))


def random_dropout_masks(cfg, B, T, r):
    """One (attention, feed-forward) pair of inverted-dropout masks (B, T, D) per layer."""
    ones = np.ones((B, T, cfg.dim))
    return [tuple(dropout_forward(ones, cfg.dropout, r, True)[1] for _ in range(2)) for _ in range(cfg.n_layers)]


def random_params(cfg, r):
    """Every parameter of ``cfg`` by Hugging Face name, far from the init so every term matters:
    norm gains 1 + N(0, 0.3^2), matrices N(0, 1/fan_in), so attention scores and logits are O(1).
    (Much larger weights saturate the softmaxes, and then their gradients are tiny differences of
    near-equal numbers: right, but with few correct digits in any implementation.)"""
    return {name: 1 + 0.3 * r.normal(size=shape) if len(shape) == 1 else r.normal(size=shape) / np.sqrt(shape[1])
            for name, shape in parameter_layout(cfg)}


# ---- each layer: the reference function the docs teach, then the fast kernel against it -------------
# ``check_<layer>`` runs the functions npllama/reference.py calls (looked up there when the check
# runs, so a changed reference is what is checked): finite differences of the reference forward in
# float64 against its backward, run in ``dtype`` -- or against ``backward``, a function of the same
# signature (npllama/exercises.py grades a student's answer so).  ``fast_<layer>`` compares the
# engine's kernel with that reference on the same inputs (``FAST_CHECKS``), forward and backward:
# `npllama gradcheck` shows it on a row of its own, "<layer> (fast)", so that a kernel that matches
# a wrong reference, or a wrong kernel beside a right reference, is each reported for what it is.
FAST_TOLERANCE = 1e-12   # float64, max-normalised: the kernels differ from the reference in the order of sums


def _embedding_inputs(r, B, T, V, D):
    ids, w, dout = r.integers(0, V, size=(B, T)), r.normal(size=(V, D)), r.normal(size=(B, T, D))
    if B * T > 1:
        ids.reshape(-1)[-1] = ids.reshape(-1)[0]          # a repeated id: the scatter must add
    return ids, w, dout


def _embedding_backward_reference(dout, ids, vocab_size):
    """The reference's scatter-add into a zero table: dW[v] = sum of dout over the positions of v."""
    dweight = np.zeros((vocab_size, dout.shape[-1]), dtype=dout.dtype)
    reference.scatter_add_rows_reference(np.asarray(ids).reshape(-1), dout.reshape(-1, dout.shape[-1]), dweight)
    return dweight


def check_embedding(r, B=2, T=5, V=7, D=4, dtype=np.float64, backward=None):
    """backward(dout, ids, vocab_size) -> dweight."""
    ids, w, dout = _embedding_inputs(r, B, T, V, D)
    dw = (backward or _embedding_backward_reference)(*_in(dtype, dout), ids, V)
    return _fd(lambda: reference.embedding_forward(ids, w)[0], {"weight": w}, {"weight": dw}, dout)


def fast_embedding(r, B=2, T=5, V=7, D=4, dtype=np.float64):
    ids, w, dout = _embedding_inputs(r, B, T, V, D)
    fast = embedding_backward(*_in(dtype, dout), ids, np.zeros((V, D), dtype=dtype))
    return {"dweight": (fast, _embedding_backward_reference(dout, ids, V))}


def _linear_inputs(r, B, T, D, F):
    return r.normal(size=(B, T, D)), r.normal(size=(F, D)), r.normal(size=(B, T, F))


def check_linear(r, B=2, T=3, D=5, F=4, dtype=np.float64, backward=None):
    """backward(dy, cache) -> (dx, dweight); x has a batch and a time axis, as in the model."""
    x, w, dy = _linear_inputs(r, B, T, D, F)
    backward = backward or (lambda dy, cache: reference.linear_backward(dy, cache, reference.NO_HOOKS))
    _, cache = reference.linear_forward(*_in(dtype, x, w), reference.NO_HOOKS)
    dx, dw = backward(*_in(dtype, dy), cache)
    return _fd(lambda: reference.linear_forward(x, w, reference.NO_HOOKS)[0], {"x": x, "weight": w},
               {"x": dx, "weight": dw}, dy)


def fast_linear(r, B=2, T=3, D=5, F=4, dtype=np.float64):
    x, w, dy = _linear_inputs(r, B, T, D, F)
    y, cache = linear_forward(*_in(dtype, x, w))
    dx, dw = linear_backward(*_in(dtype, dy), cache)
    y_ref, cache_ref = reference.linear_forward(x, w, reference.NO_HOOKS)
    dx_ref, dw_ref = reference.linear_backward(dy, cache_ref, reference.NO_HOOKS)
    return {"y": (y, y_ref), "dx": (dx, dx_ref), "dweight": (dw, dw_ref)}


def _rmsnorm_inputs(r, N, D):
    return r.normal(size=(N, D)), 1 + 0.3 * r.normal(size=D), r.normal(size=(N, D))


def check_rmsnorm(r, N=6, D=8, dtype=np.float64, backward=None):
    x, w, dy = _rmsnorm_inputs(r, N, D)
    backward = backward or (lambda dy, cache: reference.rmsnorm_backward_reference(dy, cache))
    _, cache = reference.rmsnorm_forward_reference(*_in(dtype, x, w), np.dtype(dtype).type(1e-5))
    dx, dw = backward(*_in(dtype, dy), cache)
    return _fd(lambda: reference.rmsnorm_forward_reference(x, w, 1e-5)[0], {"x": x, "weight": w},
               {"x": dx, "weight": dw}, dy)


def fast_rmsnorm(r, N=6, D=8, dtype=np.float64):
    x, w, dy = _rmsnorm_inputs(r, N, D)
    y, cache = rmsnorm_forward(*_in(dtype, x, w), 1e-5)
    dx, dw = rmsnorm_backward(*_in(dtype, dy), cache)
    y_ref, cache_ref = reference.rmsnorm_forward_reference(x, w, 1e-5)
    dx_ref, dw_ref = reference.rmsnorm_backward_reference(dy, cache_ref)
    return {"y": (y, y_ref), "dx": (dx, dx_ref), "dweight": (dw, dw_ref)}


def _rope_inputs(r, B, H, T, hd):
    freqs = rope_frequencies(hd, 500000.0, LLAMA3_SCALING)
    return freqs, r.normal(size=(B, H, T, hd)), r.normal(size=(B, H, T, hd))


def check_rope(r, B=2, H=3, T=6, hd=8, dtype=np.float64, backward=None):
    """Llama-3 RoPE scaling; backward(dy, cache) -> dx."""
    freqs, x, dy = _rope_inputs(r, B, H, T, hd)
    cos, sin = rope_cos_sin(np.arange(T), freqs, np.float64)
    backward = backward or (lambda dy, cache: reference.rope_backward_reference(dy, cache))
    _, cache = reference.rope_forward_reference(*_in(dtype, x), *rope_cos_sin(np.arange(T), freqs, dtype))
    return _fd(lambda: reference.rope_forward_reference(x, cos, sin)[0], {"x": x},
               {"x": backward(*_in(dtype, dy), cache)}, dy)


def fast_rope(r, B=2, H=3, T=6, hd=8, dtype=np.float64):
    freqs, x, dy = _rope_inputs(r, B, H, T, hd)
    y, cache = rope_forward(*_in(dtype, x), *rope_cos_sin(np.arange(T), freqs, dtype))
    y_ref, cache_ref = reference.rope_forward_reference(x, *rope_cos_sin(np.arange(T), freqs, np.float64))
    return {"y": (y, y_ref),
            "dx": (rope_backward(*_in(dtype, dy), cache), reference.rope_backward_reference(dy, cache_ref))}


def _attention_inputs(r, B, H, K, T, hd):
    if H % K:
        raise InputError(f"attention: H ({H}) must be a multiple of K ({K})")
    q, k, v = r.normal(size=(B, H, T, hd)), r.normal(size=(B, K, T, hd)), r.normal(size=(B, K, T, hd))
    return q, k, v, r.normal(size=(B, H, T, hd))


def _attention_reference(q, k, v):
    return reference.attention_forward(q, k, v, reference.causal_visibility(q.shape[2]), reference.NO_HOOKS)


def check_attention(r, B=2, H=4, K=2, T=5, hd=3, dtype=np.float64, backward=None):
    """Causal, H query heads sharing K key/value heads; backward(do, cache) -> (dq, dk, dv)."""
    q, k, v, do = _attention_inputs(r, B, H, K, T, hd)
    backward = backward or (lambda do, cache: reference.attention_backward(do, cache, reference.NO_HOOKS))
    _, cache = _attention_reference(*_in(dtype, q, k, v))
    dq, dk, dv = backward(*_in(dtype, do), cache)
    return _fd(lambda: _attention_reference(q, k, v)[0], {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv}, do)


def fast_attention(r, B=2, H=4, K=2, T=5, hd=3, dtype=np.float64):
    q, k, v, do = _attention_inputs(r, B, H, K, T, hd)
    o, cache = attention_forward(*_in(dtype, q, k, v))
    dq, dk, dv = attention_backward(*_in(dtype, do), cache)
    o_ref, cache_ref = _attention_reference(q, k, v)
    dq_ref, dk_ref, dv_ref = reference.attention_backward(do, cache_ref, reference.NO_HOOKS)
    return {"o": (o, o_ref), "dq": (dq, dq_ref), "dk": (dk, dk_ref), "dv": (dv, dv_ref)}


def _swiglu_inputs(r, N, F):
    return 2 * r.normal(size=(N, F)), r.normal(size=(N, F)), r.normal(size=(N, F))


def check_swiglu(r, N=4, F=6, dtype=np.float64, backward=None):
    """The elementwise part, s = silu(g) * u (the projections around it are linear layers);
    backward(ds, cache) -> (dg, du)."""
    g, u, ds = _swiglu_inputs(r, N, F)
    backward = backward or (lambda ds, cache: reference.swiglu_backward_reference(ds, cache))
    _, cache = reference.swiglu_forward_reference(*_in(dtype, g, u))
    dg, du = backward(*_in(dtype, ds), cache)
    return _fd(lambda: reference.swiglu_forward_reference(g, u)[0], {"g": g, "u": u}, {"g": dg, "u": du}, ds)


def fast_swiglu(r, N=4, F=6, dtype=np.float64):
    g, u, ds = _swiglu_inputs(r, N, F)
    s, cache = swiglu_forward(*_in(dtype, np.concatenate([g, u], axis=1)))
    dgu = swiglu_backward(*_in(dtype, ds), cache)
    s_ref, cache_ref = reference.swiglu_forward_reference(g, u)
    dg_ref, du_ref = reference.swiglu_backward_reference(ds, cache_ref)
    return {"s": (s, s_ref), "dg": (dgu[:, :F], dg_ref), "du": (dgu[:, F:], du_ref)}


def _cross_entropy_inputs(r, N, V):
    logits, targets = r.normal(size=(N, V)), r.integers(0, V, size=N)
    targets[N // 3] = -100
    return logits, targets


def check_cross_entropy(r, N=6, V=9, dtype=np.float64, backward=None):
    """One target ignored (-100), the loss the mean over the others; backward(dloss, cache) -> dlogits."""
    logits, targets = _cross_entropy_inputs(r, N, V)
    backward = backward or (lambda dloss, cache: reference.cross_entropy_backward_reference(dloss, cache))
    _, cache = reference.cross_entropy_forward_reference(*_in(dtype, logits), targets)
    return _fd(lambda: reference.cross_entropy_forward_reference(logits, targets)[0], {"logits": logits},
               {"logits": backward(1.0, cache)}, 1.0)


def fast_cross_entropy(r, N=6, V=9, dtype=np.float64):
    logits, targets = _cross_entropy_inputs(r, N, V)
    loss, cache = cross_entropy_forward(*_in(dtype, logits), targets)
    loss_ref, cache_ref = reference.cross_entropy_forward_reference(logits, targets)
    return {"loss": (np.array(loss), np.array(loss_ref)),
            "dlogits": (cross_entropy_backward(1.0, cache), reference.cross_entropy_backward_reference(1.0, cache_ref))}


def check_dropout(r, N=4, D=6, dtype=np.float64):
    """One implementation, the engine's: a mask multiplied in, forward and backward."""
    x, dy = r.normal(size=(N, D)), r.normal(size=(N, D))
    _, mask = dropout_forward(*_in(dtype, x), 0.3, np.random.default_rng(0), True)
    return _fd(lambda: dropout_forward(x, 0.3, np.random.default_rng(0), True)[0], {"x": x},
               {"x": dropout_backward(*_in(dtype, dy), mask)}, dy)


def _lora_inputs(r, N, D, F, rank):
    x, w, dy = r.normal(size=(N, D)), r.normal(size=(F, D)), r.normal(size=(N, F))
    a, b = r.normal(size=(rank, D)), r.normal(size=(F, rank))
    mask = dropout_forward(x, 0.3, r, True)[1]
    return x, w, a, b, mask, dy


def check_lora(r, N=4, D=6, F=5, rank=2, dtype=np.float64):
    """A rank-2 adapter of a (F, D) projection, scale 4, a dropout mask on its input: the adapter's
    term and its backward (lora_adapter_forward_reference / lora_adapter_backward_reference), which
    npllama/reference.py's LoRA adds to the frozen projection's output and to its input's gradient."""
    x, _, a, b, mask, dy = _lora_inputs(r, N, D, F, rank)
    _, cache = reference.lora_adapter_forward_reference(*_in(dtype, x, a, b), 4.0, *_in(dtype, mask))
    dx, da, db = reference.lora_adapter_backward_reference(*_in(dtype, dy), cache)
    return _fd(lambda: reference.lora_adapter_forward_reference(x, a, b, 4.0, mask)[0],
               {"x": x, "lora_A": a, "lora_B": b}, {"x": dx, "lora_A": da, "lora_B": db}, dy)


def fast_lora(r, N=4, D=6, F=5, rank=2, dtype=np.float64):
    x, w, a, b, mask, dy = _lora_inputs(r, N, D, F, rank)
    y, cache = lora_forward(*_in(dtype, x, w, a, b), 4.0, *_in(dtype, mask))
    dx, da, db = lora_backward(*_in(dtype, dy), cache)
    y_ref, cache_ref = lora_forward_reference(x, w, a, b, 4.0, mask)
    dx_ref, da_ref, db_ref = lora_backward_reference(dy, cache_ref)
    return {"y": (y, y_ref), "dx": (dx, dx_ref), "dlora_A": (da, da_ref), "dlora_B": (db, db_ref)}


FAST_CHECKS = {"embedding": fast_embedding, "linear": fast_linear, "rmsnorm": fast_rmsnorm, "rope": fast_rope,
               "attention": fast_attention, "swiglu": fast_swiglu, "cross_entropy": fast_cross_entropy,
               "lora": fast_lora}


def check_decoder_block(r):
    """The block of npllama/reference.py (block_forward / block_backward), with dropout masks."""
    cfg = LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=6, max_seq_len=8,
                      dropout=0.25)
    w = layer_weights(random_params(cfg, r), 0)
    cos, sin = rope_cos_sin(np.arange(5), rope_frequencies(cfg.head_dim, cfg.rope_theta), np.float64)
    x, dout = r.normal(size=(2, 5, 8)), r.normal(size=(2, 5, 8))
    hooks = with_options(None, {}, random_dropout_masks(cfg, 2, 5, r)).layer(0)   # block 0's dropout masks
    _, cache = block_forward(x, w, cos, sin, cfg, hooks=hooks)
    dx, dw = block_backward(dout, cache, cfg)
    return _fd(lambda: block_forward(x, w, cos, sin, cfg, hooks=hooks)[0], {"x": x, **w}, {"x": dx, **dw}, dout)


def check_model(r, tie_embeddings=False):
    """The fast model, npllama.Llama.loss_and_grad; every entry of every gradient."""
    cfg = LlamaConfig(vocab_size=11, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=6, max_seq_len=8,
                      tie_embeddings=tie_embeddings)
    model = Llama(cfg, dtype=np.float64)
    model.flat_params[...] += r.normal(0.0, 0.5, model.flat_params.shape)
    tokens, targets = r.integers(0, 11, size=(2, 6)), r.integers(0, 11, size=(2, 6))
    targets[0, 2] = -100
    _, grads = model.loss_and_grad(tokens, targets)
    loss = lambda: model.loss(tokens, targets)
    return {name: (grads[name], numerical_gradient(loss, p)) for name, p in model.params.items()}


def check_reference(r, tie_embeddings=False):
    """The plain-NumPy model, npllama.reference.loss_and_grad: two layers, grouped-query attention
    (multi-query when tied), Llama-3 RoPE scaling, dropout masks, a -100 target; SAMPLED_ENTRIES
    entries of every gradient."""
    cfg = LlamaConfig(vocab_size=11, dim=8, n_layers=2, n_heads=4, n_kv_heads=1 if tie_embeddings else 2,
                      hidden_dim=6, max_seq_len=8, rope_theta=100.0, rope_scaling=LLAMA3_SCALING,
                      tie_embeddings=tie_embeddings, dropout=0.25)
    params = random_params(cfg, r)
    tokens, targets = r.integers(0, 11, size=(2, 6)), r.integers(0, 11, size=(2, 6))
    targets[0, 2] = -100
    masks = random_dropout_masks(cfg, 2, 6, r)
    _, grads = loss_and_grad(params, cfg, tokens, targets, masks)
    loss = lambda: loss_and_grad(params, cfg, tokens, targets, masks)[0]
    checked = {}
    for name, p in params.items():
        idx = sampled_entries(grads[name], r)
        numeric = numerical_gradient(loss, p, indices=idx).reshape(-1)[idx]
        checked[name] = (grads[name].reshape(-1)[idx], numeric)
    return checked


# The layers in the order the reference model's forward first calls them: a failing whole-model check
# is traced to the first of these whose own check fails.
FORWARD_ORDER = ("embedding", "rmsnorm", "linear", "rope", "attention", "dropout", "swiglu", "lora",
                 "cross_entropy")
LAYER_CHECKS = {
    "embedding": check_embedding, "rmsnorm": check_rmsnorm, "rope": check_rope, "attention": check_attention,
    "swiglu": check_swiglu, "linear": check_linear, "dropout": check_dropout, "cross_entropy": check_cross_entropy,
    "lora": check_lora, "decoder_block": check_decoder_block, "model": check_model,
    "model_tied": lambda r: check_model(r, tie_embeddings=True),
    "reference": check_reference, "reference_tied": lambda r: check_reference(r, tie_embeddings=True),
}


SHAPED_CHECKS = ("embedding", "rmsnorm", "rope", "attention", "swiglu", "linear", "dropout", "cross_entropy", "lora")


def sizes_of(layer) -> dict:
    """The sizes a layer's check takes, with their defaults: {"B": 2, "T": 5, ...}."""
    parameters = inspect.signature(LAYER_CHECKS[layer]).parameters
    return {k: p.default for k, p in parameters.items() if k not in ("r", "dtype", "backward")}


def parse_shape(text, layers) -> dict:
    """'B=2,T=300' -> {"B": 2, "T": 300}, checked against the one layer's sizes."""
    if len(layers) != 1 or layers[0] not in SHAPED_CHECKS:
        raise InputError(f"--shape needs exactly one --layer among {', '.join(SHAPED_CHECKS)}")
    known = sizes_of(layers[0])
    sizes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in known:
            raise InputError(f"--shape: {layers[0]} takes the sizes {', '.join(f'{k}={v}' for k, v in known.items())}"
                             f"; got {key!r}")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise InputError(f"--shape: {key} must be a positive integer, got {value!r}") from None
        if sizes[key] < 1:
            raise InputError(f"--shape: {key} must be a positive integer, got {sizes[key]}")
    return sizes


def add_arguments(parser):
    parser.add_argument("--layer", choices=sorted(LAYER_CHECKS), action="append",
                        help="check only this one (repeatable); default: all, i.e. every layer, the fast model "
                             "(model, model_tied) and the plain-NumPy reference model (reference, reference_tied)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    parser.add_argument("--shape", metavar="B=2,T=300,...",
                        help="sizes for one --layer (see SIZES below; e.g. --layer attention --shape "
                             "B=2,T=300,H=8,K=2,hd=64); inputs of more than %d entries have %d of them checked"
                             % (FULL_CHECK_ENTRIES, SAMPLED_ENTRIES))
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="the dtype the layer's backward runs in, against float64 differences "
                             "(default: %(default)s)")
    parser.add_argument("--tolerance", type=float,
                        help=f"largest max-normalised relative error that passes (default: {TOLERANCE} in "
                             f"float64, {FLOAT32_TOLERANCE} in float32)")
    from .exercises import add_arguments as add_exercise_arguments   # here: exercises imports this module
    add_exercise_arguments(parser)


def _print_rows(label, pairs, tolerance):
    """One row per gradient (or compared quantity); the number of those that fail."""
    failed = 0
    for i, (grad_name, (analytic, numeric)) in enumerate(pairs.items()):
        err = relative_error(analytic, numeric)
        ok = err <= tolerance
        failed += not ok
        print(f"{label if i == 0 else '':<22} {grad_name:<41} {err:>10.2e} "
              f"{elementwise_relative_error(analytic, numeric):>11.2e}  {'ok' if ok else 'FAIL'}")
    return failed


def failing_layers(seed=0, tolerance=TOLERANCE):
    """The layers of FORWARD_ORDER whose reference check fails, in that order."""
    def fails(name):
        pairs = LAYER_CHECKS[name](np.random.default_rng(seed))
        return any(relative_error(a, n) > tolerance for a, n in pairs.values())
    return [name for name in FORWARD_ORDER if fails(name)]


def run(args) -> int:
    """Print one row per gradient with both relative errors; exit code 1 on failure."""
    dtype = np.dtype(args.dtype)
    if args.tolerance is None:
        args.tolerance = TOLERANCE if dtype == np.float64 else FLOAT32_TOLERANCE
    if args.exercise:
        from .exercises import run as run_exercises   # here: exercises imports this module
        return run_exercises(args)
    names = args.layer or list(LAYER_CHECKS)
    sizes = parse_shape(args.shape, names) if args.shape else {}
    if dtype != np.float64 and set(names) - set(SHAPED_CHECKS):
        raise InputError(f"--dtype float32 applies to the layers ({', '.join(SHAPED_CHECKS)}), not to "
                         f"{', '.join(sorted(set(names) - set(SHAPED_CHECKS)))}")
    tolerance = args.tolerance
    fast_tolerance = FAST_TOLERANCE if dtype == np.float64 else FLOAT32_TOLERANCE
    print(f"float64 central differences (h = 1e-6) against the {dtype} backward; pass when the max-normalised "
          f"error <= {tolerance:.0e}")
    print("max-norm.: max|a - n| / max(|a|, |n|) over the gradient;  "
          "elementwise (CS231n): max over entries of |a - n| / (|a| + |n|)")
    print("a layer's rows check the reference function npllama/reference.py calls; its '(fast)' rows hold the")
    print(f"engine's kernel, in {dtype}, to the float64 reference on the same inputs (<= {fast_tolerance:.0e})")
    print(f"{'layer':<22} {'gradient':<41} {'max-norm.':>10} {'elementwise':>11}  result")
    failed, reference_failed = 0, False
    for name in names:
        extra = {**sizes, "dtype": dtype} if name in SHAPED_CHECKS else {}
        n_failed = _print_rows(name, LAYER_CHECKS[name](np.random.default_rng(args.seed), **extra), tolerance)
        failed += n_failed
        reference_failed |= bool(n_failed) and name.startswith("reference")
        if name in FAST_CHECKS:
            failed += _print_rows(f"{name} (fast)", FAST_CHECKS[name](np.random.default_rng(args.seed), **extra),
                                  fast_tolerance)
    if reference_failed:
        first = failing_layers(args.seed, tolerance)
        if first:
            print(f"the reference model fails; the first of its layers (in forward order) whose own check fails: "
                  f"{first[0]}  (npllama gradcheck --layer {first[0]})")
        else:
            print("the reference model fails while each of its layers passes alone: look at how "
                  "npllama/reference.py chains them (block_forward / block_backward / loss_and_grad)")
    print("all gradients match" if not failed else f"{failed} gradient(s) FAILED")
    return 1 if failed else 0
