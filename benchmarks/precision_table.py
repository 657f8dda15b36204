"""How far a correct float32 or bfloat16 Llama lands from float64: the table in
docs/check-your-implementation.md, measured with the reference model itself.

For each size, random weights (npllama.gradcheck.random_params: matrices N(0, 1/fan_in), norm gains
1 + N(0, 0.3^2)) and random tokens; ``reference.run_with_cache`` in float64, in float32, and in
float32 with bfloat16 matmul inputs; per kind of tensor the largest

    max |x - x_float64| / max |x_float64|        (npllama compare's "max rel")

over the tensors of that kind.  A correct implementation in that precision shows errors of this
size (other summation orders move them by a small factor); a bug usually shows far larger ones.

    python benchmarks/precision_table.py            # ~1 minute
"""
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import npllama  # noqa: E402
from npllama import reference  # noqa: E402
from npllama.golden import next_token_targets  # noqa: E402
from npllama.gradcheck import random_params  # noqa: E402

SIZES = {   # name: (config, batch, positions)
    "D=64, L=2, T=32": (dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172), 2, 32),
    "D=128, L=4, T=128": (dict(vocab_size=512, dim=128, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=344),
                          2, 128),
    "D=288, L=6, T=256": (dict(vocab_size=1024, dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768),
                          1, 256),
}
KINDS = [   # (kind, pattern on the name without "grad.")
    ("residual stream", r"embed_tokens$|resid_(pre|mid|post)$"),
    ("RMSNorm outputs", r"layernorm$|^model\.norm$"),
    ("q/k/v/o projections", r"_proj$|_rope$"),
    ("attention scores", r"scores$"),
    ("attention probs", r"probs$"),
    ("attention context", r"context$"),
    ("SwiGLU (gate, up, product, down)", r"(gate_proj|up_proj|swiglu|down_proj)$"),
    ("logits", r"^lm_head$"),
]


def kind_of(name):
    if name == "loss":
        return "loss"
    if name.startswith("grad.") and name.endswith(".weight"):
        return "parameter gradients"
    base = name.removeprefix("grad.")
    for kind, pattern in KINDS:
        if re.search(pattern, base):
            if "q/k/v/o" in kind and ("gate" in base or "up_proj" in base or "down_proj" in base):
                continue
            return ("grad. " if name.startswith("grad.") else "") + kind
    return None


def max_rel(x, ref):
    finite = np.isfinite(ref)
    scale = np.abs(ref[finite]).max(initial=0.0)
    return float(np.abs(x[finite] - ref[finite]).max(initial=0.0) / scale) if scale else 0.0


def measure():
    table = {}
    for size, (kw, B, T) in SIZES.items():
        cfg = npllama.LlamaConfig(max_seq_len=T, **kw)
        r = np.random.default_rng(0)
        params = random_params(cfg, r)
        tokens = r.integers(0, cfg.vocab_size, size=(B, T))
        targets = next_token_targets(tokens)
        runs = {d: reference.run_with_cache(params, cfg, tokens, targets, dtype=d) for d in reference.DTYPES}
        gold = runs["float64"].tensors() | {"loss": np.array(runs["float64"].loss)}
        for d in ("float32", "bfloat16"):
            mine = runs[d].tensors() | {"loss": np.array(runs[d].loss)}
            for name, ref in gold.items():
                kind = kind_of(name)
                if kind is not None:
                    key = (kind, d, size)
                    table[key] = max(table.get(key, 0.0), max_rel(np.asarray(mine[name], np.float64), ref))
        print(f"measured {size}", file=sys.stderr)
    return table


def main():
    table = measure()
    kinds = list(dict.fromkeys(k for k, _, _ in table))
    sizes = list(SIZES)
    print("| tensor kind | " + " | ".join(f"float32 {s}" for s in sizes) + " | "
          + " | ".join(f"bfloat16 {s}" for s in sizes) + " |")
    print("|---|" + "---:|" * (2 * len(sizes)))
    for kind in kinds:
        cells = [f"{table[(kind, d, s)]:.1e}" for d in ("float32", "bfloat16") for s in sizes]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    worst = {d: max(v for (k, dd, s), v in table.items() if dd == d) for d in ("float32", "bfloat16")}
    print(f"\nworst: float32 {worst['float32']:.1e}, bfloat16 {worst['bfloat16']:.1e}")


if __name__ == "__main__":
    main()
