"""Inverted dropout.

Forward (training):  mask_i = [u_i >= p] / (1 - p),  u_i ~ U[0, 1) from a seeded generator
                     y = x * mask          (E[y] = x, so nothing changes at eval time)
Forward (eval or p = 0): y = x, no mask.
Backward:            dx = dy * mask
"""
import numpy as np


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
def dropout_forward(x, p, rng, training):
    """x: any shape; rng: np.random.Generator. Returns (y, mask) where mask is None when inactive."""
    if not training or p == 0.0:
        return x, None
    mask = dropout_mask(x.shape, p, rng, x.dtype)
    return x * mask, mask


def dropout_backward(dy, cache):
    mask = cache
    return dy if mask is None else dy * mask


# ---- in place: what the engine calls, its outputs into given buffers -----------------------------
def dropout_mask(shape, p, rng, dtype):
    """A mask of entries 0 (probability p) or 1/(1-p), drawn with one ``rng.random(shape)``."""
    mask = (rng.random(shape) >= p).astype(dtype)
    mask *= 1.0 / (1.0 - p)
    return mask
