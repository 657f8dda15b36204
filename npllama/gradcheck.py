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
