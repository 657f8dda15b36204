"""AdamW, learning-rate schedules and gradient-norm clipping, written from scratch.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), exactly as
``torch.optim.AdamW`` computes it (amsgrad=False, maximize=False).  For step t = 1, 2, ... with
gradient g, learning rate lr and weight decay wd (0 for parameters that are not decayed):

    p   <- p * (1 - lr * wd)                       decoupled decay: not part of the gradient
    m   <- m + (1 - beta1) * (g - m)               = beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**t)                     bias correction: m, v start at 0
    v_hat = v / (1 - beta2**t)
    p   <- p - lr * m_hat / (sqrt(v_hat) + eps)

and, like torch, the last line is evaluated as  p - (lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps))
with bc1 = 1 - beta1**t and bc2 = 1 - beta2**t, so that float64 runs agree with torch to the last bit
or so.  m and v are kept in the parameter's dtype.

The update runs in a Numba kernel (``adamw_update_kernel``) that reads each element of p, g, m, v
once and writes p, m, v once, with no temporary arrays.  ``adamw_update_reference`` is the same
arithmetic in plain NumPy, in the same order, kept as the readable definition and for tests.
With ``flat_params`` a step runs it on every thread (``adamw_update_units``: the flat buffers in
units of UNIT elements, each unit one kernel call), as clipping's sum of squares and scaling do.

Why one module of ~520 lines: AdamW (flat-buffer and per-array modes), its state's save/load with
field-by-field validation (a resumed run must refuse a foreign or torn file), gradient clipping and
the learning-rate schedules are the optimizer's one job; half of the length is that validation.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, NamedTuple

import numpy as np

from .engine.jit import array, jit_rows, jit_rows_reassoc, jit_with, scalar
from .engine.pool import UNIT_COUNTER, claim_unit, run_on_threads
from .errors import CheckpointError, ConfigError, InputError

STATE_FORMAT = "npllama-adamw"
STATE_VERSION = 1
SCHEDULE_KINDS = ("cosine", "linear", "constant")

# torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6); we do the same.
CLIP_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# The elementwise update: NumPy reference and Numba kernel, sharing one set of coefficients.
# ---------------------------------------------------------------------------------------------

class AdamWCoefficients(NamedTuple):
    """The scalars of one AdamW step, already cast to the parameter dtype.

    Casting here (not inside the loop) keeps float32 arithmetic in float32 in both the kernel and
    the reference, so the two agree bit for bit.
    """
    decay_factor: np.floating          # 1 - lr * wd
    one_minus_beta1: np.floating       # 1 - beta1
    beta2: np.floating
    one_minus_beta2: np.floating       # 1 - beta2
    step_size: np.floating             # lr / (1 - beta1**t)
    bias_correction2_sqrt: np.floating  # sqrt(1 - beta2**t)
    eps: np.floating


def adamw_coefficients(dtype, *, lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float, step: int) -> AdamWCoefficients:
    """Coefficients of AdamW step number ``step`` (1-based), computed in float64 then cast to ``dtype``.

    bc1 = 1 - beta1**step,  bc2 = 1 - beta2**step,  step_size = lr / bc1,  and sqrt(bc2) as
    ``bc2 ** 0.5`` -- the same Python-float expressions torch uses.
    """
    if step < 1:
        raise ValueError(f"AdamW step numbers start at 1, got {step}")
    cast = np.dtype(dtype).type
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return AdamWCoefficients(
        decay_factor=cast(1.0 - lr * weight_decay),
        one_minus_beta1=cast(1.0 - beta1),
        beta2=cast(beta2),
        one_minus_beta2=cast(1.0 - beta2),
        step_size=cast(lr / bias_correction1),
        bias_correction2_sqrt=cast(bias_correction2 ** 0.5),
        eps=cast(eps),
    )


def adamw_update_reference(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray,
                           decay_factor, one_minus_beta1, beta2, one_minus_beta2,
                           step_size, bias_correction2_sqrt, eps) -> None:
    """One AdamW step on arrays of any (equal) shape, in place on p, m, v; plain NumPy.

        p <- p * decay_factor
        m <- m + (1 - beta1) * (g - m)
        v <- v * beta2 + (1 - beta2) * g * g
        p <- p - step_size * (m / (sqrt(v) / sqrt(bc2) + eps))
    """
    p *= decay_factor
    m += one_minus_beta1 * (g - m)
    v *= beta2
    v += one_minus_beta2 * g * g
    denom = np.sqrt(v) / bias_correction2_sqrt + eps
    p -= step_size * (m / denom)


# error_model="numpy": division follows IEEE (x/0 -> inf, 0/0 -> nan, as in the NumPy reference)
# instead of raising ZeroDivisionError; the per-element zero check would otherwise cost ~5x.
@jit_with(error_model="numpy")
def adamw_update_kernel(p, g, m, v, decay_factor, one_minus_beta1, beta2, one_minus_beta2,
                        step_size, bias_correction2_sqrt, eps):  # pragma: no cover - compiled
    """Numba version of ``adamw_update_reference`` for 1-D contiguous float32/float64 arrays.

    One pass: per element, read p, g, m, v and write p, m, v; no temporaries.  The operations are
    those of the reference in the same order, so results are identical (no fastmath, no FMA).
    """
    for i in range(p.size):
        gi = g[i]
        mi = m[i] + one_minus_beta1 * (gi - m[i])
        vi = v[i] * beta2 + one_minus_beta2 * gi * gi
        m[i] = mi
        v[i] = vi
        denom = np.sqrt(vi) / bias_correction2_sqrt + eps
        p[i] = p[i] * decay_factor - step_size * (mi / denom)


# The flat step and the gradient norm run on every thread (npllama's, ``run_on_threads``): the
# buffer is cut into units of UNIT elements that the threads take in turn.  Measured, 7.2M float32
# parameters, two threads against one: the update 6.7 -> 3.2 ms, the sum of squares 4.4 -> 2.0 ms.
UNIT = 1 << 15


@jit_rows
def adamw_update_units(p, g, m, v, unit_bounds, unit_decayed, decay_factors, one_minus_beta1, beta2,
                       one_minus_beta2, step_size, bias_correction2_sqrt, eps, next_unit):  # pragma: no cover
    """``adamw_update_kernel`` on each unit [unit_bounds[u, 0], unit_bounds[u, 1]) of the flat
    buffers, with decay factor decay_factors[unit_decayed[u]] (a unit lies within one run of equal
    weight decay).  Elementwise: the results are those of one call over each run, bit for bit,
    whatever the number of threads."""
    while True:
        u = claim_unit(next_unit)
        if u >= unit_bounds.shape[0]:
            break
        lo, hi = unit_bounds[u, 0], unit_bounds[u, 1]
        adamw_update_kernel(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], decay_factors[unit_decayed[u]],
                            one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps)


@jit_rows_reassoc
def sum_of_squares_units(x, partial, next_unit):  # pragma: no cover - compiled
    """partial[u] = sum of x_i^2 over unit u of a 1-D array, accumulated in float64 whatever x's
    dtype.  "reassoc" lets LLVM split each unit's sum into vector lanes (partial sums that also
    round less than one running sum); units of a fixed size and their sum in a fixed order make the
    result independent of the number of threads."""
    n = x.size
    while True:
        u = claim_unit(next_unit)
        if u >= partial.size:
            break
        total = 0.0
        for i in range(u * UNIT, min(n, (u + 1) * UNIT)):
            xi = np.float64(x[i])
            total += xi * xi
        partial[u] = total


def sum_of_squares(x: np.ndarray) -> float:
    """sum(x_i^2) of a 1-D contiguous array, in float64, on every thread."""
    partial = np.empty(-(-x.size // UNIT), dtype=np.float64)
    run_on_threads(sum_of_squares_units, x, partial, n_units=partial.size)
    return float(np.sum(partial))


@jit_with(nogil=True)
def scale_units(x, factor, next_unit):  # pragma: no cover - compiled
    """x *= factor (x 1-D, factor of x's dtype), a unit of UNIT elements at a time."""
    n = x.size
    while True:
        lo = claim_unit(next_unit) * UNIT
        if lo >= n:
            break
        for i in range(lo, min(n, lo + UNIT)):
            x[i] *= factor


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------

def decay_matrices(name: str, array: np.ndarray) -> bool:
    """Default decay rule: decay parameters with 2 or more dimensions (matrices), not 1-D ones."""
    return array.ndim >= 2


def _byte_address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class AdamW:
    """AdamW over a dict of named NumPy arrays, updated in place.

    Args:
        params: name -> float32/float64 array, C-contiguous and writeable; updated in place.
        lr: learning rate used when ``step`` is not given one.
        betas: (beta1, beta2), the decay rates of the first and second moment averages.
        eps: added to sqrt(v_hat) in the denominator.
        weight_decay: decoupled decay coefficient wd; each step multiplies a decayed p by (1 - lr*wd).
        decay: which parameters are decayed: ``None`` (default: every parameter with ndim >= 2),
            a predicate ``decay(name, array) -> bool``, or a collection of names.
        flat_params: optionally the one contiguous 1-D buffer that every array of ``params`` is a
            view of (``model.flat_params``).  Then m and v are flat buffers too and ``step`` can take
            ``flat_grads`` and update everything in a few long kernel calls.

    Why only matrices are decayed by default: weight decay pulls weights towards 0 -- a prior that
    suits the embedding and projection matrices (it keeps their norms, and so the logits and the
    attention scores, from growing without need).  The 1-D weights are RMSNorm gains whose natural
    value is 1: pulling them towards 0 shrinks every normalised activation, a bias the loss has to
    fight every step rather than a limit on capacity.  GPT-2/nanoGPT and the Llama recipes therefore
    decay only the 2-D weights.

    State: ``t`` (steps taken), ``m`` and ``v`` (name -> array, same shape and dtype as the param).
    """

    def __init__(self, params: Mapping[str, np.ndarray], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1,
                 decay: Callable[[str, np.ndarray], bool] | Iterable[str] | None = None,
                 *, flat_params: np.ndarray | None = None):
        if not params:
            raise ConfigError("AdamW: no parameters to optimize")
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype not in (np.float32, np.float64):
                raise ConfigError(f"AdamW: parameter {name!r} must be a float32 or float64 ndarray, "
                                  f"got {getattr(p, 'dtype', type(p))}")
            if not p.flags.c_contiguous or not p.flags.writeable:
                raise ConfigError(f"AdamW: parameter {name!r} must be C-contiguous and writeable "
                                  "so it can be updated in place")
        self.params = dict(params)
        self.lr = _check_hyper("lr", lr, ConfigError)
        self.betas = _check_betas(betas, ConfigError)
        self.eps = _check_hyper("eps", eps, ConfigError)
        self.weight_decay = _check_hyper("weight_decay", weight_decay, ConfigError)
        self.decayed = self._decayed_names(decay)
        self.t = 0

        self.flat_params = flat_params
        if flat_params is None:
            self._flat_m = self._flat_v = None
            self.m = {name: np.zeros_like(p) for name, p in self.params.items()}
            self.v = {name: np.zeros_like(p) for name, p in self.params.items()}
        else:
            self._offsets = self._offsets_in(flat_params)
            self._flat_m = np.zeros_like(flat_params)
            self._flat_v = np.zeros_like(flat_params)
            self.m, self.v = {}, {}
            for name, p in self.params.items():
                start = self._offsets[name]
                self.m[name] = self._flat_m[start:start + p.size].reshape(p.shape)
                self.v[name] = self._flat_v[start:start + p.size].reshape(p.shape)
        self._build_runs()

    # ---- construction helpers -------------------------------------------------------------
    def _decayed_names(self, decay) -> frozenset[str]:
        if decay is None:
            decay = decay_matrices
        if callable(decay):
            return frozenset(name for name, p in self.params.items() if decay(name, p))
        if isinstance(decay, str):
            raise ConfigError("AdamW: decay must be a predicate or a collection of names, not a string")
        names = frozenset(decay)
        unknown = sorted(names - self.params.keys())
        if unknown:
            raise ConfigError(f"AdamW: decay names not among the parameters: {unknown}")
        return names

    def _offsets_in(self, flat: np.ndarray) -> dict[str, int]:
        """Element offset of each parameter inside ``flat``; checks they are non-overlapping views."""
        if not isinstance(flat, np.ndarray) or flat.ndim != 1 or not flat.flags.c_contiguous:
            raise ConfigError("AdamW: flat_params must be a 1-D C-contiguous ndarray")
        offsets = {}
        base = _byte_address(flat)
        for name, p in self.params.items():
            if p.dtype != flat.dtype:
                raise ConfigError(f"AdamW: parameter {name!r} is {p.dtype} but flat_params is {flat.dtype}")
            delta = _byte_address(p) - base
            start, rem = divmod(delta, flat.itemsize)
            if rem or start < 0 or start + p.size > flat.size:
                raise ConfigError(f"AdamW: parameter {name!r} is not a view into flat_params")
            offsets[name] = start
        spans = sorted((offsets[n], offsets[n] + p.size, n) for n, p in self.params.items())
        for (_, stop_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < stop_a:
                raise ConfigError(f"AdamW: parameters {a!r} and {b!r} overlap in flat_params")
        return offsets

    def _build_runs(self) -> None:
        """Precompute what each step loops over.

        Always: (name, wd) per parameter, for steps given a dict of grads.  Flat mode also: maximal runs [start, stop) of the flat
        buffer whose parameters are adjacent and share the same weight decay, cut into units of UNIT
        elements that the threads share out (``adamw_update_units``) instead of one call per tensor.
        """
        def wd_of(name):
            return self.weight_decay if name in self.decayed else 0.0
        self._runs = [(name, wd_of(name)) for name in self.params]
        if self.flat_params is None:
            return
        runs: list[list] = []
        for start, stop, name in sorted((self._offsets[n], self._offsets[n] + p.size, n)
                                        for n, p in self.params.items()):
            wd = wd_of(name)
            if runs and runs[-1][1] == start and runs[-1][2] == wd:
                runs[-1][1] = stop
            else:
                runs.append([start, stop, wd])
        self._flat_runs = [tuple(r) for r in runs]
        # the runs cut into units for ``adamw_update_units``: bounds, and whether the unit is decayed
        units = [(lo, min(lo + UNIT, stop), wd != 0.0) for start, stop, wd in self._flat_runs
                 for lo in range(start, stop, UNIT)]
        self._unit_bounds = np.array([u[:2] for u in units], dtype=np.int64).reshape(-1, 2)
        self._unit_decayed = np.array([u[2] for u in units], dtype=np.int64)

    # ---- the step ---------------------------------------------------------------------------
    def step(self, grads: Mapping[str, np.ndarray] | None = None, lr: float | None = None, *,
             flat_grads: np.ndarray | None = None) -> None:
        """Apply one AdamW step (see the module docstring for the math); t is incremented first.

        Args:
            grads: name -> gradient, the same names and shapes as the parameters.
            lr: learning rate for this step only (a schedule's value); ``None`` uses ``self.lr``.
            flat_grads: instead of ``grads`` (flat mode only): the 1-D buffer laid out like
                ``flat_params`` (``model.flat_grads``).

        Non-finite gradients are not checked here (that would cost a pass); ``clip_grad_norm``
        returns the total norm for the caller to check.
        """
        lr = self.lr if lr is None else _check_hyper("lr", lr, InputError)
        if (grads is None) == (flat_grads is None):
            raise InputError("AdamW.step: pass exactly one of grads and flat_grads")
        if flat_grads is not None:
            self._step_flat(flat_grads, lr)
        else:
            self._step_arrays(grads, lr)

    def _coefficients(self, dtype, lr, wd, step):
        return adamw_coefficients(dtype, lr=lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                                  weight_decay=wd, step=step)

    def _step_arrays(self, grads, lr):
        missing = sorted(self.params.keys() - grads.keys())
        unexpected = sorted(grads.keys() - self.params.keys())
        if missing or unexpected:
            raise InputError(f"AdamW.step: gradient names do not match the parameters "
                             f"(missing {missing}, unexpected {unexpected})")
        for name, p in self.params.items():
            if np.shape(grads[name]) != p.shape:
                raise InputError(f"AdamW.step: gradient {name!r} has shape {np.shape(grads[name])}, "
                                 f"parameter has {p.shape}")
        step = self.t + 1
        for name, wd in self._runs:
            p = self.params[name]
            g = np.ascontiguousarray(grads[name], dtype=p.dtype)  # no copy in the usual case
            adamw_update_kernel(p.reshape(-1), g.reshape(-1), self.m[name].reshape(-1),
                                self.v[name].reshape(-1), *self._coefficients(p.dtype, lr, wd, step))
        self.t = step

    def _step_flat(self, flat_grads, lr):
        if self.flat_params is None:
            raise InputError("AdamW.step: flat_grads needs an optimizer built with flat_params")
        fp = self.flat_params
        if (not isinstance(flat_grads, np.ndarray) or flat_grads.shape != fp.shape
                or flat_grads.dtype != fp.dtype or not flat_grads.flags.c_contiguous):
            raise InputError(f"AdamW.step: flat_grads must be a C-contiguous {fp.dtype} array of shape "
                             f"{fp.shape}, got {getattr(flat_grads, 'dtype', type(flat_grads))} "
                             f"{getattr(flat_grads, 'shape', '')}")
        step = self.t + 1
        plain, decayed = (self._coefficients(fp.dtype, lr, wd, step) for wd in (0.0, self.weight_decay))
        decay_factors = np.array([plain.decay_factor, decayed.decay_factor], dtype=fp.dtype)
        run_on_threads(adamw_update_units, fp, flat_grads, self._flat_m, self._flat_v, self._unit_bounds,
                       self._unit_decayed, decay_factors, *plain[1:], n_units=len(self._unit_bounds))
        self.t = step

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """The optimizer state as (arrays, meta).

        arrays: ``"m.<name>"`` and ``"v.<name>"`` -> copies of the moment arrays (safetensors-ready).
        meta: JSON-able values: format, version, t, lr, betas, eps, weight_decay and the sorted list
        of decayed names.  Python floats survive a JSON round trip exactly, so a resumed run is
        bit-identical to an uninterrupted one.
        """
        arrays = {}
        for name in self.params:
            arrays[f"m.{name}"] = self.m[name].copy()
            arrays[f"v.{name}"] = self.v[name].copy()
        meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "t": self.t, "lr": self.lr,
                "betas": [self.betas[0], self.betas[1]], "eps": self.eps,
                "weight_decay": self.weight_decay, "decayed": sorted(self.decayed)}
        return arrays, meta

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Restore what ``state_dict`` returned, after checking it fits these parameters.

        Like torch, the hyperparameters (lr, betas, eps, weight_decay, decayed names) are restored too.
        Raises CheckpointError naming the first problem found; on error nothing is changed.
        """
        if not isinstance(meta, Mapping) or meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"optimizer state: not an {STATE_FORMAT} state "
                                  f"(format {meta.get('format') if isinstance(meta, Mapping) else meta!r})")
        if meta.get("version") != STATE_VERSION:
            raise CheckpointError(f"optimizer state: unsupported version {meta.get('version')!r} "
                                  f"(expected {STATE_VERSION})")
        t = meta.get("t")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise CheckpointError(f"optimizer state: step count t must be a non-negative integer, got {t!r}")
        lr = _check_hyper("lr", meta.get("lr"), CheckpointError)
        betas = _check_betas(meta.get("betas"), CheckpointError)
        eps = _check_hyper("eps", meta.get("eps"), CheckpointError)
        weight_decay = _check_hyper("weight_decay", meta.get("weight_decay"), CheckpointError)
        decayed = meta.get("decayed")
        if not isinstance(decayed, (list, tuple)) or not all(isinstance(n, str) for n in decayed):
            raise CheckpointError(f"optimizer state: 'decayed' must be a list of names, got {decayed!r}")
        unknown = sorted(set(decayed) - self.params.keys())
        if unknown:
            raise CheckpointError(f"optimizer state: decayed names not among the parameters: {unknown}")

        expected = {f"{kind}.{name}" for name in self.params for kind in ("m", "v")}
        missing = sorted(expected - arrays.keys())
        unexpected = sorted(arrays.keys() - expected)
        if missing:
            raise CheckpointError(f"optimizer state: missing arrays {missing}")
        if unexpected:
            raise CheckpointError(f"optimizer state: unexpected arrays {unexpected} "
                                  "(saved for a different model?)")
        for name, p in self.params.items():
            for kind in ("m", "v"):
                key = f"{kind}.{name}"
                a = arrays[key]
                if not isinstance(a, np.ndarray):
                    raise CheckpointError(f"optimizer state: {key!r} is a {type(a).__name__}, not an ndarray")
                if a.shape != p.shape:
                    raise CheckpointError(f"optimizer state: {key!r} has shape {a.shape}, parameter has {p.shape}")
                if a.dtype != p.dtype:
                    raise CheckpointError(f"optimizer state: {key!r} is {a.dtype}, parameter is {p.dtype}")
                if not np.all(np.isfinite(a)):
                    raise CheckpointError(f"optimizer state: {key!r} contains non-finite values")
                if kind == "v" and np.any(a < 0):
                    raise CheckpointError(f"optimizer state: {key!r} has negative second moments")

        for name in self.params:
            np.copyto(self.m[name], arrays[f"m.{name}"])
            np.copyto(self.v[name], arrays[f"v.{name}"])
        self.t = t
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.decayed = frozenset(decayed)
        self._build_runs()


def _check_hyper(what: str, value, error: type[Exception]) -> float:
    """A finite, non-negative float (lr, eps, weight_decay)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise error(f"AdamW: {what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise error(f"AdamW: {what} must be finite and >= 0, got {value!r}")
    return value


def _check_betas(betas, error: type[Exception]) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise error(f"AdamW: betas must be a pair (beta1, beta2), got {betas!r}")
    out = []
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float, np.floating)) or not 0.0 <= float(b) < 1.0:
            raise error(f"AdamW: betas[{i}] must be in [0, 1), got {b!r}")
        out.append(float(b))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------

def clip_grad_norm(grads: Mapping[str, np.ndarray] | np.ndarray, max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``; return the norm.

        total = sqrt(sum over every element g_i of every gradient of g_i^2)     (float64 accumulation)
        if total > max_norm:  g <- g * max_norm / (total + 1e-6)                (in place)

    as torch.nn.utils.clip_grad_norm_ (which multiplies by min(1, max_norm / (total + 1e-6)); a
    factor of 1 is a no-op, so we skip it).  ``grads`` is a dict of arrays or one flat array
    (``model.flat_grads``).  The returned norm is the one before clipping.  If it is not finite
    (inf/nan gradients) nothing is scaled and the caller should skip the step.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, np.floating)) \
            or not (math.isfinite(max_norm) and max_norm > 0):
        raise ConfigError(f"clip_grad_norm: max_norm must be a finite number > 0, got {max_norm!r}")
    arrays = [grads] if isinstance(grads, np.ndarray) else list(grads.values())
    sum_sq = 0.0
    for g in arrays:
        sum_sq += sum_of_squares(np.ascontiguousarray(g).reshape(-1))
    total = math.sqrt(sum_sq)
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + CLIP_EPS)
        for g in arrays:
            if g.flags.c_contiguous:
                run_on_threads(scale_units, g.reshape(-1), g.dtype.type(scale), n_units=-(-g.size // UNIT))
            else:
                g *= g.dtype.type(scale)
    return total


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------

def lr_at(step: int, *, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float,
          kind: str = "cosine") -> float:
    """Learning rate for 0-based optimizer step ``step`` of a run of ``total_steps`` steps.

    Warmup (steps 0 .. W-1, W = warmup_steps), as nanoGPT:

        lr = max_lr * (step + 1) / W

    so step 0 already learns (max_lr / W) and step W-1 reaches max_lr exactly.  After warmup, with
    the decay running over steps W .. L where L = total_steps - 1 is the last step:

        progress = (step - W) / (L - W)                 in [0, 1]; 1 when L == W
        cosine:   lr = min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr)
        linear:   lr = min_lr + (1 - progress) * (max_lr - min_lr)
        constant: lr = max_lr                           (min_lr is not used)

    so step W gives max_lr and the last step gives exactly min_lr.  Steps past the last one keep the
    final value.  If W == total_steps every step is warmup.  Raises ConfigError on negative or
    non-integer step counts, warmup_steps > total_steps, min_lr > max_lr or an unknown kind.
    """
    for what, value in (("step", step), ("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"lr_at: {what} must be a non-negative integer, got {value!r}")
    if total_steps < 1:
        raise ConfigError(f"lr_at: total_steps must be >= 1, got {total_steps}")
    if warmup_steps > total_steps:
        raise ConfigError(f"lr_at: warmup_steps ({warmup_steps}) > total_steps ({total_steps})")
    for what, value in (("max_lr", max_lr), ("min_lr", min_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                or not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"lr_at: {what} must be a finite number >= 0, got {value!r}")
    if kind not in SCHEDULE_KINDS:
        raise ConfigError(f"lr_at: unknown schedule kind {kind!r} (expected one of {list(SCHEDULE_KINDS)})")
    if kind != "constant" and min_lr > max_lr:
        raise ConfigError(f"lr_at: min_lr ({min_lr}) > max_lr ({max_lr})")
    max_lr, min_lr = float(max_lr), float(min_lr)

    if step < warmup_steps:
        return max_lr * ((step + 1) / warmup_steps)
    if kind == "constant" or warmup_steps == total_steps:
        return max_lr
    last = total_steps - 1
    if step >= last:
        return min_lr
    progress = (step - warmup_steps) / (last - warmup_steps)
    if progress == 0.0:
        return max_lr
    if kind == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    return min_lr + (1.0 - progress) * (max_lr - min_lr)


# ---- the versions a training run calls (npllama/warmup.py compiles them ahead) -------------------
def kernel_versions(dtype):
    """AdamW's flat step and clipping's (the sums of squares in float64 whatever the dtype)."""
    flat, f = array(dtype, 1), scalar(dtype)
    return [(adamw_update_units, (flat, flat, flat, flat, array(np.int64, 2), array(np.int64, 1), flat,
                                  f, f, f, f, f, f, UNIT_COUNTER)),
            (sum_of_squares_units, (flat, array(np.float64, 1), UNIT_COUNTER)),
            (scale_units, (flat, f, UNIT_COUNTER))]
