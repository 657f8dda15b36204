"""Exercises: the backward pass of every layer of the reference model, for you to write.

Each function below is blanked out.  Its docstring says what ``cache`` holds -- exactly what the
layer's ``*_forward_reference`` in npllama/layers/ returns -- and what to return.  Write the body
in plain NumPy (it may use the inputs' shapes as it likes), then grade it:

    npllama gradcheck --exercise rmsnorm          # this file's rmsnorm_backward, from the clone's root

The grader calls the layer's reference forward on random float64 inputs, your function on its
cache, and compares what you return with finite differences; a wrong answer prints which gradient
is wrong and by how much.  docs/exercises.md gives the order to do them in, hints, the symptom of
each common mistake, and links to the solutions (npllama's own functions).  Derivations: docs/.

Shapes: B batch, T positions, D width, V vocabulary, H query heads, K key/value heads, hd head width.
"""
import numpy as np


def embedding_backward(dout, ids, vocab_size):
    """Forward: out[b, t] = W[ids[b, t]], W: (V, D).

    dout: (B, T, D); ids: int (B, T).  Return dW: (V, D).
    Hint: a token id can appear at several positions.  (docs/01-embedding.md)"""
    # ---- your code here ----
    raise NotImplementedError


def linear_backward(dy, cache):
    """Forward: y = x W^T, W: (out, in), x: (..., in) (here (B, T, in)).

    dy: (..., out); cache = (x, W).  Return (dx, dW) with the shapes of x and W.  (docs/03-linear.md)"""
    x, w = cache
    # ---- your code here ----
    raise NotImplementedError


def rmsnorm_backward(dy, cache):
    """Forward, per row x of width D: r = (mean(x^2) + eps)^(-1/2),  y = w * x * r.

    dy: (..., D); cache = (x, w, r) with x: (..., D), w: (D,), r: (...,) (one r per row).
    Return (dx, dw) with the shapes of x and w.  Hint: r depends on x too.  (docs/02-rmsnorm.md)"""
    x, w, r = cache
    # ---- your code here ----
    raise NotImplementedError


def rope_backward(dy, cache):
    """Forward: each head vector x (hd,) is split into halves x1 = x[:hd/2], x2 = x[hd/2:], and pair
    (x1_i, x2_i) at position t is rotated by the angle t f_i:
        y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin.

    dy: (B, heads, T, hd); cache = (cos, sin), each (T, hd/2).  Return dx: (B, heads, T, hd).
    (docs/04-rope.md)"""
    cos, sin = cache
    # ---- your code here ----
    raise NotImplementedError


def attention_backward(do, cache):
    """Forward, per query head, causal, c = 1/sqrt(hd):
        scores = c q k^T (entries j > i are -inf),  probs = softmax(scores) row by row,  o = probs v.
    The H query heads share K key/value heads in groups of G = H / K: query head h reads kv head h // G.

    do: (B, H, T, hd); cache = (q, k_all, v_all, probs, scale, G) with q: (B, H, T, hd); k_all,
    v_all: (B, H, T, hd), each kv head repeated for the G query heads of its group
    (np.repeat(k, G, axis=1)); probs: (B, H, T, T), 0 above the diagonal; scale = c.
    Return (dq, dk, dv) with dq: (B, H, T, hd) and dk, dv: (B, K, T, hd).  (docs/05-attention.md)"""
    q, k_all, v_all, probs, scale, G = cache
    # ---- your code here ----
    raise NotImplementedError


def swiglu_backward(ds, cache):
    """Forward, elementwise: s = silu(g) * u, silu(g) = g sigma(g), sigma(g) = 1 / (1 + exp(-g)).

    ds: (N, F); cache = (g, u), each (N, F).  Return (dg, du).  (docs/06-swiglu.md)"""
    g, u = cache
    # ---- your code here ----
    raise NotImplementedError


def cross_entropy_backward(dloss, cache):
    """Forward: per row n, l_n = log sum_v exp(z_nv) - z_n,y_n; the loss is the mean of l_n over the
    rows whose target is not ignore_index (-100).

    dloss: a float (1.0 when the loss is the last step); cache = (logits, targets, lse, count,
    ignore_index) with logits: (N, V), targets: int (N,), lse: (N,) = log sum_v exp(logits[n, v]),
    count: the number of kept rows.  Return dlogits: (N, V).  (docs/09-cross-entropy.md)"""
    logits, targets, lse, count, ignore_index = cache
    # ---- your code here ----
    raise NotImplementedError
