"""`npllama compare GOLDEN MINE`: the first tensor where an implementation parts from the reference.

Both files (safetensors or .npz) hold tensors by name (npllama.golden describes the golden file).
MINE's names are first translated by the rules of an optional map (``--map FILE.toml``, below);
then every name both files hold is compared, in the model's order: the forward's activations in
the order they are computed, then their gradients in the order the backward computes them, then
the parameters' gradients.  Per tensor:

    max abs = max |mine - golden|,    max rel = max abs / max |golden|

(relative to the tensor's largest entry: entries that are 0 up to rounding do not dominate; -inf
scores equal in both files count as equal).  A tensor diverges when max rel > rtol; the first that
does is the bug's place: the forward's first wrong activation, or (a right forward) the backward's
first wrong gradient.  rtol defaults by MINE's dtype (its metadata's "npllama.dtype", else its
tensors'): ``DEFAULT_RTOL``, from the precision table in docs/check-your-implementation.md.

The map, TOML: an array of rules applied in order to each of MINE's names (a "grad." prefix is
taken off first and put back after); a rule acts on the names its regular expression ``match``
finds (re.search):

    [[rule]]                                  # rename (Python re.sub, \\1 for groups)
    match = '^layers\\.(\\d+)\\.attention\\.wo\\.weight$'
    rename = 'model.layers.\\1.self_attn.o_proj.weight'

    [[rule]]                                  # split a fused tensor along an axis
    match = '^layers\\.(\\d+)\\.attention\\.wqkv\\.weight$'
    split = ['model.layers.\\1.self_attn.q_proj.weight', 'model.layers.\\1.self_attn.k_proj.weight',
             'model.layers.\\1.self_attn.v_proj.weight']
    axis = 0
    sizes = [64, 16, 16]                      # optional: equal parts

    [[rule]]                                  # transpose (axes = [...] for another order)
    match = '...'
    transpose = true

    [[rule]]                                  # Meta's interleaved rotary pairs (x0, x1), (x2, x3), ...
    match = '...q_proj.weight$'               #   -> Hugging Face's halves, head by head
    rope = "interleaved"
    head_dim = 16
    axis = 0
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import numpy as np

from .errors import InputError
from .golden import read_tensors
from .reference import BLOCK_ACTIVATIONS

DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 1e-1}   # docs/check-your-implementation.md
PARAMETERS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
              "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
              "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
INPUTS = ("tokens", "targets", "segment_ids", "position_ids", "attention_mask")


# ---- the model's order --------------------------------------------------------------------------
def _position(name, top, inner):
    """Where ``name`` sits: in ``top`` (name -> tuple), or "model.layers.{i}.<one of inner>": a
    sortable tuple, or None."""
    if name in top:
        return top[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in inner:
        return (1, int(m.group(1)), inner.index(m.group(2)))
    return None


def _forward_position(name):
    """Where the forward computes activation ``name``, or None if it is not an activation."""
    top = {"model.embed_tokens": (0,), "inputs_embeds": (0,), "model.norm": (2,), "lm_head": (3,), "loss": (4,)}
    return _position(name, top, BLOCK_ACTIVATIONS)


def _parameter_position(name):
    top = {"model.embed_tokens.weight": (0,), "model.norm.weight": (2,), "lm_head.weight": (3,)}
    return _position(name, top, PARAMETERS)


def order_key(name):
    """Sort key: inputs, activations (forward order), their gradients (backward order), the
    parameters' gradients, anything else by name."""
    if name in INPUTS:
        return (0, INPUTS.index(name))
    if name.startswith("grad."):
        base = name[len("grad."):]
        pos = _forward_position(base)
        if pos is not None:
            return (2, tuple(-p for p in pos))
        pos = _parameter_position(base)
        if pos is not None:
            return (3, pos)
    else:
        pos = _forward_position(name)
        if pos is not None:
            return (1, pos)
    return (4, name)


# ---- the map --------------------------------------------------------------------------------------
def read_map(path) -> list[dict]:
    """The rules of a map file, checked."""
    path = Path(path)
    try:
        rules = tomllib.loads(path.read_text()).get("rule", [])
    except FileNotFoundError:
        raise InputError(f"{path}: no such map file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a TOML file ({e})") from None
    return check_rules(rules, str(path))


def check_rules(rules, where="map") -> list[dict]:
    if not isinstance(rules, list):
        raise InputError(f"{where}: 'rule' must be an array of tables ([[rule]])")
    actions = ("rename", "split", "transpose", "rope")
    for i, rule in enumerate(rules):
        here = f"{where}: rule {i + 1}"
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
            raise InputError(f"{here} needs match = '<regular expression>'")
        try:
            rule["_re"] = re.compile(rule["match"])
        except re.error as e:
            raise InputError(f"{here}: match is not a regular expression ({e})") from None
        given = [a for a in actions if a in rule]
        if len(given) != 1:
            raise InputError(f"{here} needs exactly one of {', '.join(actions)}, got {given or 'none'}")
        if "split" in rule and not (isinstance(rule["split"], list) and len(rule["split"]) >= 2):
            raise InputError(f"{here}: split must list two or more names")
        if "sizes" in rule and len(rule["sizes"]) != len(rule.get("split", ())):
            raise InputError(f"{here}: sizes must have one size per split name")
        if "rope" in rule and (rule["rope"] != "interleaved" or not isinstance(rule.get("head_dim"), int)):
            raise InputError(f"{here}: rope = 'interleaved' needs head_dim = <int>")
    return rules


def _apply_rule(rule, name, value, match):
    where = f"map rule '{rule['match']}' on {name}"
    if "rename" in rule:
        return [(match.re.sub(rule["rename"], name), value)]
    axis = rule.get("axis", 0 if "split" in rule or "rope" in rule else None)
    if "split" in rule:
        n = value.shape[axis] if -value.ndim <= axis < value.ndim else None
        sizes = rule.get("sizes") or ([n // len(rule["split"])] * len(rule["split"]) if n else [])
        if n is None or sum(sizes) != n:
            raise InputError(f"{where}: cannot split axis {axis} of shape {value.shape} into {sizes}")
        parts = np.split(value, np.cumsum(sizes)[:-1], axis=axis)
        return [(match.expand(new), part) for new, part in zip(rule["split"], parts)]
    if "transpose" in rule:
        axes = rule.get("axes") or [*range(value.ndim - 2), value.ndim - 1, value.ndim - 2]
        return [(name, np.transpose(value, axes))]
    hd = rule["head_dim"]                    # rope: (..., heads, hd/2, 2) -> (..., heads, 2, hd/2) on ``axis``
    moved = np.moveaxis(value, axis, -1)
    if moved.shape[-1] % hd:
        raise InputError(f"{where}: axis {axis} of shape {value.shape} is not whole heads of {hd}")
    halves = moved.reshape(*moved.shape[:-1], -1, hd // 2, 2).swapaxes(-1, -2).reshape(moved.shape)
    return [(name, np.moveaxis(halves, -1, axis))]


def apply_map(tensors: dict, rules: list[dict]) -> dict:
    """``tensors`` with every rule applied in order (see the module's docstring)."""
    out = {}
    for name, value in tensors.items():
        prefix = "grad." if name.startswith("grad.") else ""
        items = [(name[len(prefix):], np.asarray(value))]
        for rule in rules:
            next_items = []
            for n, v in items:
                m = rule["_re"].search(n)
                next_items += _apply_rule(rule, n, v, m) if m else [(n, v)]
            items = next_items
        for n, v in items:
            out[prefix + n] = v
    return out


# ---- the comparison --------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    name: str
    max_abs: float
    max_rel: float
    diverges: bool
    note: str = ""


@dataclasses.dataclass
class Comparison:
    """``rows`` in the model's order; ``first_divergence``: the first diverging row's name (or None);
    ``missing``: the golden file's names MINE lacks; ``unknown``: MINE's names the golden file lacks."""
    rows: list
    rtol: float
    missing: list
    unknown: list

    @property
    def first_divergence(self):
        return next((r.name for r in self.rows if r.diverges), None)

    @property
    def ok(self):
        return self.first_divergence is None

    def report(self) -> str:
        width = max([len(r.name) for r in self.rows] + [10])
        lines = [f"{'tensor':<{width}}  {'max abs':>9}  {'max rel':>9}"]
        for r in self.rows:
            lines.append(f"{r.name:<{width}}  {r.max_abs:>9.2e}  {r.max_rel:>9.2e}"
                         + ("  DIVERGES" if r.diverges else "") + (f"  ({r.note})" if r.note else ""))
        if self.missing:
            lines.append(f"missing from MINE ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unknown:
            lines.append(f"not in GOLDEN, ignored ({len(self.unknown)}): {', '.join(self.unknown)}")
        first = next((r for r in self.rows if r.diverges), None)
        if first is None:
            lines.append(f"no divergence: {len(self.rows)} tensors within rtol {self.rtol:.0e}")
        else:
            detail = first.note or f"max rel {first.max_rel:.2e} > rtol {self.rtol:.0e}"
            lines.append(f"first divergence: {first.name} ({detail})")
        return "\n".join(lines)


def _compare_one(name, golden, mine, rtol):
    golden, mine = np.asarray(golden), np.asarray(mine)
    if golden.size == mine.size == 1:           # a scalar (the loss) stored as () or (1,)
        golden, mine = golden.reshape(()), mine.reshape(())
    if golden.shape != mine.shape:
        return Row(name, np.inf, np.inf, True, f"shape {mine.shape}, golden {golden.shape}")
    if name in INPUTS:
        same = np.array_equal(golden, mine)
        return Row(name, 0.0 if same else np.inf, 0.0 if same else np.inf, not same,
                   "" if same else "the files were made from different inputs")
    golden, mine = golden.astype(np.float64), mine.astype(np.float64)
    both_inf = np.isinf(golden) & (golden == mine)            # masked scores: -inf in both
    with np.errstate(invalid="ignore"):                       # inf - inf, replaced just after
        diff = np.where(both_inf, 0.0, np.abs(mine - golden))
    if np.isnan(diff).any():
        return Row(name, np.nan, np.nan, True, "NaN or infinity where the golden file has a number")
    max_abs = float(diff.max(initial=0.0))
    scale = float(np.abs(np.where(np.isinf(golden), 0.0, golden)).max(initial=0.0))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)
    return Row(name, max_abs, max_rel, max_rel > rtol)


def _dtype_of(tensors, metadata):
    if metadata.get("npllama.dtype") in DEFAULT_RTOL:
        return metadata["npllama.dtype"]
    kinds = {np.asarray(v).dtype for k, v in tensors.items() if k not in INPUTS and np.asarray(v).dtype.kind == "f"}
    return "float64" if not kinds or kinds == {np.dtype(np.float64)} else "float32"


def compare(golden, mine, map=None, rtol=None) -> Comparison:
    """Compare MINE against GOLDEN.  golden, mine: paths (safetensors, .npz) or dicts of arrays;
    map: a map file's path or a list of rules (dicts as in the TOML); rtol: default by MINE's dtype."""
    golden_tensors, _ = read_tensors(golden) if isinstance(golden, (str, Path)) else (golden, {})
    mine_tensors, mine_meta = read_tensors(mine) if isinstance(mine, (str, Path)) else (mine, {})
    if map is not None:
        rules = read_map(map) if isinstance(map, (str, Path)) else check_rules([dict(r) for r in map])
        mine_tensors = apply_map(mine_tensors, rules)
    if rtol is None:
        rtol = DEFAULT_RTOL[_dtype_of(mine_tensors, mine_meta)]
    common = sorted(set(golden_tensors) & set(mine_tensors), key=order_key)
    rows = [_compare_one(n, golden_tensors[n], mine_tensors[n], rtol) for n in common]
    missing = sorted(set(golden_tensors) - set(mine_tensors), key=order_key)
    unknown = sorted(set(mine_tensors) - set(golden_tensors), key=order_key)
    if not rows:
        raise InputError("the two files have no tensor name in common (a --map may translate MINE's names)")
    return Comparison(rows, rtol, missing, unknown)


# ---- `npllama compare` ----------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("golden", help="the golden file (`npllama reference ... --out`)")
    parser.add_argument("mine", help="your implementation's tensors under the same names (safetensors or .npz)")
    parser.add_argument("--map", metavar="FILE.toml", help="rules translating MINE's names and layouts "
                        "(renames, fused weights split, transposes, Meta's RoPE order; see docs/"
                        "check-your-implementation.md)")
    parser.add_argument("--rtol", type=float, help="largest max rel that passes; default by MINE's dtype: "
                        + ", ".join(f"{k} {v:.0e}" for k, v in DEFAULT_RTOL.items()))


def run(args) -> int:
    """Print one line per tensor and the first divergence; exit code 1 on divergence."""
    result = compare(args.golden, args.mine, args.map, args.rtol)
    print(result.report())
    return 0 if result.ok else 1
