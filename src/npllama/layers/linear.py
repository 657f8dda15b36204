"""Linear layer without bias, weights in the Hugging Face layout (out_features, in_features).

Forward:   y = x W^T                      x: (N, in), W: (out, in), y: (N, out)
Backward:  dx = dy W                      (N, out) @ (out, in) -> (N, in)
           dW = dy^T x                    (out, N) @ (N, in)   -> (out, in)
Leading dimensions of x are flattened into N.

The engine's passes do these products through engine/matmul.py's ``matmuls`` (split across the
threads, into the model's buffers); these functions are the reference's and gradcheck's.
"""
import numpy as np


# ---- reference: the maths in plain NumPy (npllama/reference.py calls these) ----------------------
def linear_forward(x, weight, out=None):
    """x: (..., in), weight: (out, in) -> y: (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = np.matmul(x2, weight.T, out=out)
    cache = (x, weight)
    return y.reshape(*x.shape[:-1], weight.shape[0]), cache


def linear_backward(dy, cache, dweight=None):
    """Returns (dx, dW). dW is written into ``dweight`` when given (a view of the flat grad buffer)."""
    x, weight = cache
    dy2 = dy.reshape(-1, weight.shape[0])
    x2 = x.reshape(-1, weight.shape[1])
    dw = np.matmul(dy2.T, x2, out=dweight)
    dx = (dy2 @ weight).reshape(x.shape)
    return dx, dw
