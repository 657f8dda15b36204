"""Write your own layer with a hand-written backward, and check it the way npllama checks its own.

    python examples/check_my_layer.py                  # LayerNorm and GELU: both pass
    python examples/check_my_layer.py --bug            # a classic LayerNorm mistake: caught

The recipe (docs/00-conventions.md explains it): pick a random upstream gradient ``dout`` and turn
the layer into the scalar  L = sum(dout * forward(x)).  Then dL/dx is exactly what
``backward(dout)`` must return, and ``npllama.gradcheck.numerical_gradient`` estimates it with
central differences in float64.  ``relative_error`` compares the two: below 1e-6 is right,
above ~1e-4 is a bug.
"""
import argparse
import math

import numpy as np

from npllama.gradcheck import numerical_gradient, relative_error

TOLERANCE = 1e-6


# ---- LayerNorm (Ba et al. 2016): the norm of GPT-2, which Llama replaced by RMSNorm ------------
def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Per row x of width D:
        mu = mean(x),  xc = x - mu,  r = (mean(xc^2) + eps)^(-1/2),  xhat = xc r,  y = gamma xhat + beta
    x: (N, D); gamma, beta: (D,) -> y: (N, D)."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    r = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps)
    xhat = xc * r
    return gamma * xhat + beta, (xhat, gamma, r)


def layernorm_backward(dy, cache, bug=False):
    """With g = dy gamma (the gradient reaching xhat):
        dgamma = sum_rows dy xhat,   dbeta = sum_rows dy
        dx = r (g - mean(g) - xhat mean(g xhat))
    The two means come from x reaching xhat through mu (every x_i shifts every xc_j) and through
    r (every x_i changes the variance).  RMSNorm's backward is this without mu: docs/02-rmsnorm.md."""
    xhat, gamma, r = cache
    g = dy * gamma
    if bug:  # forget the path through the variance: looks plausible, is wrong
        dx = r * (g - g.mean(axis=-1, keepdims=True))
    else:
        dx = r * (g - g.mean(axis=-1, keepdims=True) - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    return dx, np.sum(dy * xhat, axis=0), np.sum(dy, axis=0)


# ---- GELU, tanh form (Hendrycks & Gimpel 2016), as in GPT-2 -------------------------------------
C = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    """y = x/2 (1 + tanh(u)),  u = C (x + 0.044715 x^3)."""
    t = np.tanh(C * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    """dy/dx = (1 + t)/2 + x/2 (1 - t^2) du/dx,  du/dx = C (1 + 3 * 0.044715 x^2)."""
    x, t = cache
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3 * 0.044715 * x * x))


# ---- the checks ---------------------------------------------------------------------------------
def check_layernorm(rng, bug=False):
    x, gamma, beta = rng.normal(size=(4, 6)), 1 + 0.3 * rng.normal(size=6), rng.normal(size=6)
    dout = rng.normal(size=(4, 6))
    _, cache = layernorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = layernorm_backward(dout, cache, bug=bug)
    loss = lambda: float(np.sum(dout * layernorm_forward(x, gamma, beta)[0]))  # L = sum(dout * y)
    return {"x": relative_error(dx, numerical_gradient(loss, x)),
            "gamma": relative_error(dgamma, numerical_gradient(loss, gamma)),
            "beta": relative_error(dbeta, numerical_gradient(loss, beta))}


def check_gelu(rng, bug=False):
    x, dout = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    _, cache = gelu_forward(x)
    loss = lambda: float(np.sum(dout * gelu_forward(x)[0]))
    return {"x": relative_error(gelu_backward(dout, cache), numerical_gradient(loss, x))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bug", action="store_true", help="use a LayerNorm backward with a classic mistake")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    results = {}
    for name, check in (("layernorm", check_layernorm), ("gelu", check_gelu)):
        for grad, err in check(np.random.default_rng(args.seed), bug=args.bug).items():
            results[f"{name}.{grad}"] = err
            print(f"{name:<10} d{grad:<6} relative error {err:.2e}  {'ok' if err <= TOLERANCE else 'FAIL'}")
    failed = [k for k, e in results.items() if e > TOLERANCE]
    print("all gradients match" if not failed else f"FAILED: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    raise SystemExit(1 if any(e > TOLERANCE for e in main().values()) else 0)
