"""Pictures for the docs, drawn from the code's own numbers (matplotlib, the [plot] extra).

* ``attention_patterns``: every head's causal T x T attention probabilities for a text, from the
  reference model (``reference.run_with_cache``'s "model.layers.{i}.self_attn.probs"), and
  ``draw_attention`` to draw them: `npllama inspect RUN --text ...` and docs/figures/attention.png;
* ``draw_gqa``: which query heads share which key/value head (grouped-query attention);
* ``draw_rope_pairs``: RoPE's half-split pairs (entry i with entry i + hd/2), each a 2-D vector
  turning with the position at its own frequency (``rope_frequencies``);
* ``draw_block_graph``: the decoder block's forward graph, and where the backward sums gradients;
* ``draw_loss_curve``: a training run's loss per step with its moving average.

docs/figures/make_figures.py draws every picture the docs show; CI runs it (tests/test_pictures.py),
so a picture cannot drift from the code that it shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import reference
from .errors import ConfigError, InputError
from .layers.rope import rope_frequencies
from .plot import moving_average

MISSING_MATPLOTLIB = ("drawing needs matplotlib, which is not installed: pip install -e \".[plot]\" in your npllama "
                      "clone (or pip install matplotlib)")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a clear error naming the extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(MISSING_MATPLOTLIB) from None
    return plt


def _save(fig, out, dpi=110) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return out


# ---- attention patterns -----------------------------------------------------------------------------
def attention_patterns(params, cfg, tokens) -> np.ndarray:
    """(n_layers, H, T, T): query i's attention probabilities over keys j, every head of every
    layer, for one sequence of token ids, computed by the reference model in float64."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
    params = {name: np.asarray(p, dtype=np.float64) for name, p in params.items()}
    run = reference.run_with_cache(params, cfg, tokens)
    return np.stack([run.activations[f"model.layers.{i}.self_attn.probs"][0] for i in range(cfg.n_layers)])


def head_summary(probs: np.ndarray) -> list[dict]:
    """Per head: the mean attention on the first position, on the query's own position and on the
    one before it, and the mean distance looked back (rows after the first, where there is a choice)."""
    L, H, T, _ = probs.shape
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    rows = slice(1, None)
    out = []
    for layer in range(L):
        for head in range(H):
            p = probs[layer, head][rows]
            out.append({"layer": layer, "head": head,
                        "first": float(p[:, 0].mean()),
                        "self": float(np.diagonal(probs[layer, head])[1:].mean()),
                        "previous": float(np.diagonal(probs[layer, head], -1).mean()),
                        "distance": float((p * (i - j)[rows]).sum(axis=1).mean())})
    return out


def draw_attention(probs, labels, out, title="", kv_heads=None) -> Path:
    """One T x T heat map per head, a row of heads per layer: row i of a map is query position i's
    attention over the keys (columns), zero above the diagonal (causal).  ``labels``: the T tokens;
    ``kv_heads``: with grouped-query attention, each head's title names the key/value head it reads."""
    plt = pyplot()
    from matplotlib.colors import PowerNorm       # square-root colour scale: small weights stay visible
    L, H, T, _ = probs.shape
    size = 1.2 + 0.12 * T
    fig, axes = plt.subplots(L, H, figsize=(size * H, size * L), squeeze=False)
    show_labels = T <= 40
    for layer in range(L):
        for head in range(H):
            ax = axes[layer, head]
            ax.imshow(probs[layer, head], cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                      interpolation="nearest")
            name = f"layer {layer}, head {head}"
            if kv_heads:
                name += f" (kv {head // (H // kv_heads)})"
            ax.set_title(name, fontsize=8)
            if show_labels:
                ticks = np.arange(T)
                ax.set_xticks(ticks, labels if head == 0 or layer == L - 1 else [""] * T, rotation=90, fontsize=6)
                ax.set_yticks(ticks, labels if head == 0 else [""] * T, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.supxlabel("key position j (attended to)")
    fig.supylabel("query position i (attending)")
    fig.tight_layout()
    return _save(fig, out)


# ---- grouped-query attention ----------------------------------------------------------------------------
def draw_gqa(n_heads, n_kv_heads, out) -> Path:
    """Query heads (top) joined to the key/value head they read (bottom): head h reads h // G."""
    if n_heads % n_kv_heads:
        raise InputError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    plt = pyplot()
    G = n_heads // n_kv_heads
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * n_heads), 3.2))
    kv_x = [(kv + 0.5) * G - 0.5 for kv in range(n_kv_heads)]
    for h in range(n_heads):
        kv = h // G
        ax.annotate("", xy=(kv_x[kv], 0.35), xytext=(h, 1.65),
                    arrowprops=dict(arrowstyle="-", color=colors(kv % 10), lw=1.5))
        ax.add_patch(plt.Rectangle((h - 0.4, 1.65), 0.8, 0.5, color=colors(kv % 10), alpha=0.85))
        ax.text(h, 1.9, f"q{h}", ha="center", va="center", color="white", fontsize=9)
    for kv in range(n_kv_heads):
        ax.add_patch(plt.Rectangle((kv_x[kv] - 0.6, -0.15), 1.2, 0.5, color=colors(kv % 10)))
        ax.text(kv_x[kv], 0.1, f"k{kv}, v{kv}", ha="center", va="center", color="white", fontsize=9)
    ax.text(-0.9, 1.9, f"{n_heads} query heads", ha="right", va="center")
    ax.text(-0.9, 0.1, f"{n_kv_heads} key/value heads", ha="right", va="center")
    ax.set_xlim(-4.5, n_heads)
    ax.set_ylim(-0.4, 2.4)
    ax.axis("off")
    ax.set_title(f"grouped-query attention: query head h reads key/value head h // {G}; in the backward "
                 f"dk, dv of a kv head are the sums over its {G} query heads", fontsize=9)
    return _save(fig, out)


# ---- RoPE ------------------------------------------------------------------------------------------------
def draw_rope_pairs(head_dim, theta, positions, out, vector=None) -> Path:
    """Top: a head vector's entries, entry i paired with entry i + hd/2 (the Hugging Face layout).
    Below: each pair as a 2-D vector (x_i, x_{i+hd/2}) at the positions given, turned by t f_i."""
    plt = pyplot()
    half = head_dim // 2
    freqs = rope_frequencies(head_dim, theta)
    vector = np.ones(head_dim) if vector is None else np.asarray(vector, dtype=np.float64)
    positions = np.asarray(positions)
    fig = plt.figure(figsize=(2.2 * half, 4.2))
    grid = fig.add_gridspec(2, half, height_ratios=[1, 2.4])
    top = fig.add_subplot(grid[0, :])
    colors = plt.get_cmap("tab10")
    for d in range(head_dim):
        top.add_patch(plt.Rectangle((d, 0), 0.9, 0.9, color=colors(d % half % 10), alpha=0.85))
        top.text(d + 0.45, 0.45, f"x{d}", ha="center", va="center", color="white", fontsize=9)
    for i in range(half):
        top.annotate("", xy=(i + half + 0.45, 0.95), xytext=(i + 0.45, 0.95),
                     arrowprops=dict(arrowstyle="<->", color=colors(i % 10), connectionstyle="arc3,rad=-0.25"))
    top.set_xlim(-0.2, head_dim)
    top.set_ylim(-0.2, 1.9)
    top.axis("off")
    top.set_title(f"head_dim {head_dim}: pair i = (x_i, x_(i+{half})), rotated by the angle t f_i "
                  f"(theta = {theta:g})", fontsize=9)
    for i in range(half):
        ax = fig.add_subplot(grid[1, i])
        a, b = vector[i], vector[i + half]
        for t in positions:
            c, s = np.cos(t * freqs[i]), np.sin(t * freqs[i])
            x, y = a * c - b * s, b * c + a * s
            ax.annotate("", xy=(x, y), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="->", color=colors(i % 10),
                                        alpha=0.25 + 0.75 * (t - positions.min()) / max(1, np.ptp(positions))))
            ax.text(1.12 * x, 1.12 * y, str(t), fontsize=7, ha="center", va="center")
        r = 1.35 * np.hypot(a, b)
        ax.set_xlim(-r, r)
        ax.set_ylim(-r, r)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"pair {i}: f = {freqs[i]:.3g}", fontsize=8)
    fig.supxlabel("positions t = " + ", ".join(map(str, positions)) + " (darker: later); the fast pairs "
                  "tell near positions apart, the slow ones barely turn: they carry far ones", fontsize=8)
    return _save(fig, out)


# ---- the decoder block -------------------------------------------------------------------------------------
BLOCK_NODES = {   # name: (x, y, label): one decoder block, reference.block_forward's steps
    "x": (0, 0, "x  (B, T, D)"), "norm1": (2, 1.2, "RMSNorm"), "q": (1, 2.4, "W_q"), "k": (2, 2.4, "W_k"),
    "v": (3, 2.4, "W_v"), "rope": (1.5, 3.5, "RoPE on q, k"), "attn": (2, 4.6, "causal GQA\nattention"),
    "o": (2, 5.7, "W_o"), "add1": (0, 6.6, "+"), "norm2": (2, 7.6, "RMSNorm"), "gate": (1.5, 8.7, "W_gate"),
    "up": (2.5, 8.7, "W_up"), "swiglu": (2, 9.8, "SwiGLU"), "down": (2, 10.9, "W_down"), "add2": (0, 11.9, "+"),
    "out": (0, 13, "out  (B, T, D)"),
}
BLOCK_EDGES = [("x", "norm1"), ("norm1", "q"), ("norm1", "k"), ("norm1", "v"), ("q", "rope"), ("k", "rope"),
               ("rope", "attn"), ("v", "attn"), ("attn", "o"), ("o", "add1"), ("x", "add1"), ("add1", "norm2"),
               ("norm2", "gate"), ("norm2", "up"), ("gate", "swiglu"), ("up", "swiglu"), ("swiglu", "down"),
               ("down", "add2"), ("add1", "add2"), ("add2", "out")]
# where one value feeds several consumers: the backward adds the gradients coming back from each
GRADIENT_SUMS = {"x": "dx = dh + dx_attn\n(residual + branch)", "norm1": "dn1 = dn1_q + dn1_k + dn1_v",
                 "add1": "dh = dout + dh_ffn\n(residual + branch)", "norm2": "dn2 = dn2_gate + dn2_up",
                 "attn": "dk, dv: sums over the\nG query heads of a group"}


def draw_block_graph(out) -> Path:
    """The forward graph of one decoder block (reference.block_forward), and in red the points where
    block_backward sums gradients: every value that feeds more than one step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 9.5))
    for a, b in BLOCK_EDGES:
        (xa, ya, _), (xb, yb, _) = BLOCK_NODES[a], BLOCK_NODES[b]
        ax.annotate("", xy=(xb, yb - 0.3), xytext=(xa, ya + 0.3),
                    arrowprops=dict(arrowstyle="->", color="0.35", lw=1.2))
    for name, (x, y, label) in BLOCK_NODES.items():
        summed = name in GRADIENT_SUMS
        ax.text(x, y, label, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="circle" if label == "+" else "round,pad=0.35",
                          fc="#fde0dd" if summed else "#deebf7", ec="#c51b8a" if summed else "#3182bd"))
        if summed:
            ax.text(x - (1.1 if name == "x" else 0.45) if x == 0 else x + 0.65, y, GRADIENT_SUMS[name],
                    ha="right" if x == 0 else "left",
                    va="center", fontsize=7.5, color="#c51b8a")
    ax.set_xlim(-3.2, 5.2)
    ax.set_ylim(-0.6, 13.6)
    ax.axis("off")
    ax.set_title("one decoder block, forward from bottom to top;\nred: a value used twice or more, "
                 "where the backward adds the gradients", fontsize=9)
    return _save(fig, out)


# ---- the loss curve ---------------------------------------------------------------------------------------
def draw_loss_curve(losses, out, held_out=None, title="") -> Path:
    """Training loss per step (faint) and its moving average; ``held_out``: {step: loss} points."""
    plt = pyplot()
    losses = np.asarray(losses, dtype=np.float64)
    steps = np.arange(len(losses))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
    window = max(1, len(losses) // 25)
    ax.plot(steps, moving_average(losses, window), color="tab:blue", lw=1.8, label=f"train (mean of {window})")
    if held_out:
        ax.plot(list(held_out), list(held_out.values()), "o", color="tab:red", label="held-out")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)
