"""Exercises: write each layer's backward yourself and let finite differences grade it.

CS231n's way: ``exercises/backward.py`` (in the repository) holds, for every layer of the reference
model, the backward function with its body blanked out -- its docstring says what ``cache`` holds
(exactly what the layer's ``*_reference`` forward returns) and what to return.  Fill one in, then

    npllama gradcheck --exercise rmsnorm              # grades exercises/backward.py's rmsnorm_backward
    npllama gradcheck --exercise rmsnorm --solution   # the same check on npllama's own function
    npllama gradcheck --exercise attention --mistake no_psi   # what a classic slip looks like

The grader runs the layer's reference forward (npllama/layers/<layer>.py, ``*_forward_reference``)
on random float64 inputs, calls your backward on its cache with a random upstream gradient, and
compares every gradient you return with central finite differences of  sum(dout * forward(...))
(npllama/gradcheck.py).  The solutions are the ``*_backward_reference`` functions that
npllama/reference.py calls, linked from docs/exercises.md, where the derivations are.

Each exercise also lists the common mistakes (``Mistake``): a wrong backward, and which of the
gradients it makes fail.  tests/test_exercises.py holds every mistake to its symptom and every
solution to passing, and docs/exercises.md's table shows the same symptoms.

The checks are npllama/gradcheck.py's (``check_<layer>``), which `npllama gradcheck --layer NAME`
runs with the reference's own backward: the very functions the docs teach and npllama/reference.py
calls.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import reference
from .errors import ConfigError
from . import gradcheck
from .gradcheck import TOLERANCE, elementwise_relative_error, relative_error
from .layers.cross_entropy import cross_entropy_backward_reference
from .layers.embedding import scatter_add_rows_reference
from .layers.rmsnorm import rmsnorm_backward_reference
from .layers.rope import rope_forward_reference

ANSWERS = Path("exercises") / "backward.py"     # the blanked-out file, relative to a clone's root


# ---- the checks: gradcheck's, with the student's backward in place of the reference's ---------------
def _graded(check):
    """check(backward, r): npllama/gradcheck.py's check of a layer (the reference forward, finite
    differences) with ``backward`` as the backward."""
    def graded(backward, r):
        return check(r, backward=backward)
    graded.__name__ = check.__name__
    return graded


# ---- the solutions: what npllama/reference.py calls, in the exercises' signatures ------------------
def embedding_backward_solution(dout, ids, vocab_size):
    """dweight (V, D): row v is the sum of dout over the positions whose id is v (a scatter-add)."""
    dweight = np.zeros((vocab_size, dout.shape[-1]))
    scatter_add_rows_reference(np.asarray(ids).reshape(-1), dout.reshape(-1, dout.shape[-1]), dweight)
    return dweight


def _calls_reference(name, hooks=False):
    """The reference's function ``name``, looked up when called (so a changed reference is graded);
    ``hooks``: it takes the reference's hooks last (none here)."""
    def solution(*args):
        return getattr(reference, name)(*args, *([reference.NO_HOOKS] if hooks else []))
    solution.__name__, solution.__qualname__ = name, name
    solution.__module__ = "npllama.reference"
    return solution


# ---- the common mistakes -------------------------------------------------------------------------
@dataclass(frozen=True)
class Mistake:
    name: str
    what: str                    # the slip, in words
    backward: Callable
    fails: frozenset             # the gradients that fail the check; the others pass


def _embedding_assigns(dout, ids, vocab_size):
    dweight = np.zeros((vocab_size, dout.shape[-1]))
    dweight[ids.reshape(-1)] = dout.reshape(-1, dout.shape[-1])    # a repeated id keeps one row only
    return dweight


def _linear_dw_transposed(dy, cache):
    x, w = cache
    x2, dy2 = x.reshape(-1, w.shape[1]), dy.reshape(-1, w.shape[0])
    return (dy2 @ w).reshape(x.shape), x2.T @ dy2                    # (in, out), not (out, in)


def _linear_dw_last_row(dy, cache):
    x, w = cache
    return (dy @ w), dy[-1, -1][:, None] * x[-1, -1][None, :]        # one position's outer product


def _rmsnorm_no_mean_term(dy, cache):
    x, w, r = cache
    r = r[..., None]
    return r * dy * w, np.sum((dy * x * r).reshape(-1, x.shape[-1]), axis=0)


def _rmsnorm_no_gain(dy, cache):
    x, w, r = cache
    r = r[..., None]
    xhat = x * r
    dx = r * (dy - xhat * np.mean(dy * xhat, axis=-1, keepdims=True))   # g = dy, not dy * w
    return dx, np.sum((dy * xhat).reshape(-1, x.shape[-1]), axis=0)


def _rmsnorm_dw_unnormalised(dy, cache):
    x, w, r = cache
    dx, _ = rmsnorm_backward_reference(dy, cache)
    return dx, np.sum((dy * x).reshape(-1, x.shape[-1]), axis=0)      # x where xhat belongs


def _rope_same_rotation(dy, cache):
    return rope_forward_reference(dy, *cache)[0]                      # by +theta, not -theta


def _rope_interleaved(dy, cache):
    cos, sin = cache
    dy1, dy2 = dy[..., 0::2], dy[..., 1::2]                            # pairs (2i, 2i+1): Meta's layout
    dx = np.empty_like(dy)
    dx[..., 0::2], dx[..., 1::2] = dy1 * cos + dy2 * sin, -dy1 * sin + dy2 * cos
    return dx


def _attention_mistaken(do, cache, mistake):
    q, k_all, v_all, probs, scale, G = cache
    B, H, T, hd = q.shape
    dprobs = do @ v_all.transpose(0, 1, 3, 2)
    dv_all = probs.transpose(0, 1, 3, 2) @ do
    if mistake == "no_psi":
        dscores = probs * dprobs
    elif mistake == "softmax_diagonal":
        dscores = probs * (1.0 - probs) * dprobs       # only the diagonal of softmax's Jacobian
    else:
        dscores = probs * (dprobs - np.sum(probs * dprobs, axis=-1, keepdims=True))
    c = 1.0 if mistake == "no_scale" else scale
    dq, dk_all = dscores @ k_all * c, dscores.transpose(0, 1, 3, 2) @ q * c
    dk, dv = dk_all.reshape(B, H // G, G, T, hd), dv_all.reshape(B, H // G, G, T, hd)
    if mistake == "no_group_sum":
        return dq, dk[:, :, 0], dv[:, :, 0]      # only the first query head of each group
    return dq, dk.sum(axis=2), dv.sum(axis=2)


def _swiglu_no_sigmoid_derivative(ds, cache):
    g, u = cache
    sig = 1.0 / (1.0 + np.exp(-g))
    return ds * u * sig, ds * g * sig                                  # silu' taken as sigma


def _swiglu_sigmoid_prime(ds, cache):
    g, u = cache
    sig = 1.0 / (1.0 + np.exp(-g))
    return ds * u * sig * (1.0 - sig), ds * g * sig                    # sigma' where silu' belongs


def _cross_entropy_no_mean(dloss, cache):
    logits, targets, lse, count, ignore_index = cache
    return cross_entropy_backward_reference(dloss, cache) * count     # the sum's gradient, not the mean's


def _cross_entropy_ignored_rows_kept(dloss, cache):
    logits, targets, lse, count, ignore_index = cache
    keep = targets != ignore_index
    dlogits = np.exp(logits - lse[:, None])
    dlogits[np.arange(len(targets))[keep], targets[keep]] -= 1.0
    return dlogits * (dloss / count)                                   # ignored rows get softmax, not 0


# ---- the exercises -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exercise:
    name: str
    function: str                # what to write in exercises/backward.py
    page: str                    # the docs page that derives it
    check: Callable              # check(backward, rng) -> {gradient: (analytic, numeric)}
    solution: Callable           # npllama's own backward, in the exercise's signature
    mistakes: tuple = field(default_factory=tuple)
    in_reference: str = ""       # the name npllama/reference.py calls it by (``train_with``)


EXERCISES = {e.name: e for e in (
    Exercise("embedding", "embedding_backward", "01-embedding.md", _graded(gradcheck.check_embedding),
             embedding_backward_solution, (
        Mistake("assign_not_add", "dW[ids] = dout: a token seen twice keeps one position's gradient",
                _embedding_assigns, frozenset({"weight"})),), "scatter_add_rows_reference"),
    Exercise("linear", "linear_backward", "03-linear.md", _graded(gradcheck.check_linear),
             _calls_reference("linear_backward", hooks=True), (
        Mistake("dw_transposed", "dW = x^T dy, the (in, out) transpose of W's shape", _linear_dw_transposed,
                frozenset({"shape"})),
        Mistake("dw_one_position", "dW from one position's outer product, not summed over all (b, t)",
                _linear_dw_last_row, frozenset({"weight"}))), "linear_backward"),
    Exercise("rmsnorm", "rmsnorm_backward", "02-rmsnorm.md", _graded(gradcheck.check_rmsnorm),
             _calls_reference("rmsnorm_backward_reference"), (
        Mistake("no_mean_term", "dx = r g: r's own dependence on x (the mean term) dropped",
                _rmsnorm_no_mean_term, frozenset({"x"})),
        Mistake("no_gain", "g = dy instead of dy * w", _rmsnorm_no_gain, frozenset({"x"})),
        Mistake("dw_unnormalised", "dw = sum dy * x instead of dy * xhat", _rmsnorm_dw_unnormalised,
                frozenset({"weight"}))), "rmsnorm_backward_reference"),
    Exercise("rope", "rope_backward", "04-rope.md", _graded(gradcheck.check_rope),
             _calls_reference("rope_backward_reference"), (
        Mistake("same_rotation", "rotating dy by +theta (the forward) instead of -theta (its transpose)",
                _rope_same_rotation, frozenset({"x"})),
        Mistake("interleaved_pairs", "pairs (x_2i, x_2i+1) (Meta's layout) where the forward pairs the halves",
                _rope_interleaved, frozenset({"x"}))), "rope_backward_reference"),
    Exercise("attention", "attention_backward", "05-attention.md", _graded(gradcheck.check_attention),
             _calls_reference("attention_backward", hooks=True), (
        Mistake("no_psi", "dS = P dP: the softmax's psi_i = sum_j P_ij dP_ij term dropped",
                lambda do, cache: _attention_mistaken(do, cache, "no_psi"), frozenset({"q", "k"})),
        Mistake("softmax_diagonal", "dS = P (1 - P) dP: only the diagonal of the softmax's Jacobian",
                lambda do, cache: _attention_mistaken(do, cache, "softmax_diagonal"), frozenset({"q", "k"})),
        Mistake("no_scale", "the 1/sqrt(hd) of the scores left out of dq and dk",
                lambda do, cache: _attention_mistaken(do, cache, "no_scale"), frozenset({"q", "k"})),
        Mistake("no_group_sum", "a key/value head's gradient from one query head of its group, not the sum",
                lambda do, cache: _attention_mistaken(do, cache, "no_group_sum"), frozenset({"k", "v"}))),
        "attention_backward"),
    Exercise("swiglu", "swiglu_backward", "06-swiglu.md", _graded(gradcheck.check_swiglu),
             _calls_reference("swiglu_backward_reference"), (
        Mistake("no_sigmoid_derivative", "silu'(g) taken as sigma(g), the g sigma' term dropped",
                _swiglu_no_sigmoid_derivative, frozenset({"g"})),
        Mistake("sigmoid_prime", "sigma'(g) = sigma (1 - sigma) where silu'(g) belongs",
                _swiglu_sigmoid_prime, frozenset({"g"}))), "swiglu_backward_reference"),
    Exercise("cross_entropy", "cross_entropy_backward", "09-cross-entropy.md", _graded(gradcheck.check_cross_entropy),
             _calls_reference("cross_entropy_backward_reference"), (
        Mistake("no_mean", "the gradient of the sum over rows, not of the mean", _cross_entropy_no_mean,
                frozenset({"logits"})),
        Mistake("ignored_rows_kept", "rows with target -100 not zeroed", _cross_entropy_ignored_rows_kept,
                frozenset({"logits"}))), "cross_entropy_backward_reference"),
)}



# ---- grading --------------------------------------------------------------------------------------
def grade(exercise: Exercise, backward: Callable, seed: int = 0, tolerance: float = TOLERANCE):
    """{gradient: (max-normalised error, elementwise error, passed, "")}, or
    {"shape": (nan, nan, False, message)} when a returned gradient has the wrong shape."""
    try:
        pairs = exercise.check(backward, np.random.default_rng(seed))
    except ValueError as e:
        if "has shape" not in str(e):
            raise
        return {"shape": (float("nan"), float("nan"), False, str(e))}
    rows = {}
    for name, (analytic, numeric) in pairs.items():
        err = relative_error(analytic, numeric)
        rows[name] = (err, elementwise_relative_error(analytic, numeric), err <= tolerance, "")
    return rows


@contextlib.contextmanager
def train_with(module, names):
    """Inside the block, npllama/reference.py calls ``module``'s backward for each exercise in
    ``names`` instead of its own: examples/train_reference.py --answers FILE --exercise NAME."""
    saved = {}
    try:
        for name in names:
            exercise = EXERCISES[name]
            mine = getattr(module, exercise.function)
            if name == "embedding":       # the reference scatters into a table it allocated
                def mine(ids, rows, table, _yours=mine):
                    table += _yours(rows, ids.reshape(-1), table.shape[0])
            elif name in ("linear", "attention"):    # the reference's take hooks too (unused here)
                def mine(dy, cache, hooks, _yours=mine):
                    return _yours(dy, cache)
            saved[exercise.in_reference] = getattr(reference, exercise.in_reference)
            setattr(reference, exercise.in_reference, mine)
        yield
    finally:
        for attr, f in saved.items():
            setattr(reference, attr, f)


def failing(rows) -> frozenset:
    return frozenset(name for name, row in rows.items() if not row[2])


def load_answers(path):
    """The student's module (exercises/backward.py or a copy), imported from its file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; run from the root of your npllama clone (the exercises are "
                          f"exercises/backward.py there) or pass --answers FILE")
    spec = importlib.util.spec_from_file_location(f"npllama_exercise_answers_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser):
    parser.add_argument("--exercise", choices=sorted(EXERCISES), action="append",
                        help="grade your backward for this layer in exercises/backward.py (repeatable; "
                             "docs/exercises.md)")
    parser.add_argument("--answers", metavar="FILE", default=str(ANSWERS),
                        help="with --exercise: the file of your answers (default: %(default)s)")
    parser.add_argument("--solution", action="store_true", help="with --exercise: grade npllama's own backward")
    parser.add_argument("--mistake", metavar="NAME", default=None,
                        help="with --exercise: grade one of the common mistakes (docs/exercises.md lists them)")


def run(args) -> int:
    """`npllama gradcheck --exercise NAME ...`: one table per exercise; exit code 1 unless all pass."""
    module = None if (args.solution or args.mistake) else load_answers(args.answers)
    failed = 0
    for name in args.exercise:
        exercise = EXERCISES[name]
        if args.solution:
            backward, source = exercise.solution, f"the solution, {_qualified(exercise.solution)}"
        elif args.mistake:
            mistakes = {m.name: m for m in exercise.mistakes}
            if args.mistake not in mistakes:
                raise ConfigError(f"no mistake {args.mistake!r} for {name}; its mistakes: {', '.join(mistakes)}")
            backward, source = mistakes[args.mistake].backward, f"the mistake {args.mistake}: " \
                                                                f"{mistakes[args.mistake].what}"
        else:
            backward = getattr(module, exercise.function, None)
            source = f"{exercise.function} in {args.answers}"
            if backward is None:
                raise ConfigError(f"{args.answers} has no function {exercise.function}")
        print(f"exercise {name}: {source}")
        try:
            rows = grade(exercise, backward, args.seed, args.tolerance)
        except NotImplementedError:
            print(f"  {exercise.function} is not written yet (it raises NotImplementedError): fill it in, "
                  f"then run this again.  Derivation: docs/{exercise.page}")
            failed += 1
            continue
        except Exception:   # the student's code raised: show where, as Python would
            traceback.print_exc(file=sys.stdout)
            print(f"  FAIL: {exercise.function} raised an exception (above)")
            failed += 1
            continue
        for grad_name, (err, elementwise, ok, message) in rows.items():
            if message:
                print(f"  FAIL: {message}")
            else:
                print(f"  d{grad_name:<10} max-norm. {err:.2e}  elementwise {elementwise:.2e}  "
                      f"{'ok' if ok else 'FAIL'}")
        bad = failing(rows)
        failed += bool(bad)
        print(f"  {'all gradients match finite differences' if not bad else 'wrong: ' + ', '.join(sorted(bad))}"
              f" (pass: max-norm. <= {args.tolerance:.0e})")
    return 1 if failed else 0


def _qualified(f):
    return f"{f.__module__}.{f.__name__}"
