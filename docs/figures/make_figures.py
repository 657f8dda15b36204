"""Draw every picture the docs show, from the code (npllama/pictures.py), into this folder.

    python docs/figures/make_figures.py                   # trains the reference model (~2-4 min), draws all
    python docs/figures/make_figures.py --quick --out /tmp/figures     # a tiny model, seconds (CI does this)

The trained pictures (attention.png, loss.png) come from examples/train_reference.py: the plain
NumPy reference model trained on the bundled Shakespeare, the model the docs teach.  The others
are drawn from the code's own numbers: RoPE's frequencies (``rope_frequencies``), the default
model's head counts (``npllama.train`` defaults), the reference block's steps.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples"))

import train_reference  # noqa: E402  (examples/train_reference.py)

from npllama import pictures  # noqa: E402

PROMPT = "ROMEO: But soft, what light through yonder window breaks?"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE), help="folder of the PNGs (default: docs/figures)")
    p.add_argument("--steps", type=int, default=400, help="training steps of the reference model")
    p.add_argument("--chars", type=int, default=300_000)
    p.add_argument("--quick", action="store_true", help="a tiny model for a few steps: checks the drawing only")
    args = p.parse_args(argv)
    size = ["--steps", "3", "--chars", "20000", "--vocab", "280", "--dim", "16", "--seq-len", "32", "--batch", "2"] \
        if args.quick else ["--steps", str(args.steps), "--chars", str(args.chars)]
    out = Path(args.out)

    pictures.draw_gqa(n_heads=8, n_kv_heads=2, out=out / "gqa.png")
    pictures.draw_rope_pairs(head_dim=8, theta=10000.0, positions=range(0, 8), out=out / "rope_pairs.png")
    pictures.draw_block_graph(out / "block_graph.png")

    run = train_reference.main(size + ["--sample-tokens", "0"])
    steps = len(run["losses"])
    pictures.draw_loss_curve(run["losses"], out / "loss.png", held_out={0: run["val_before"], steps: run["val_after"]},
                             title=f"the reference model (examples/train_reference.py), {steps} steps")
    tokenizer, cfg = run["tokenizer"], run["cfg"]
    ids = tokenizer.encode(PROMPT)[:cfg.max_seq_len]
    probs = pictures.attention_patterns(run["params"], cfg, ids)
    labels = [tokenizer.decode([i]) for i in ids]
    pictures.draw_attention(probs, labels, out / "attention.png", kv_heads=cfg.n_kv_heads,
                            title=f"attention of the trained reference model: {PROMPT!r}")
    for row in pictures.head_summary(probs):
        print("layer {layer} head {head}: first {first:.2f}, self {self:.2f}, previous {previous:.2f}, "
              "mean distance back {distance:.1f}".format(**row))
    print(f"figures in {out}")
    return probs


if __name__ == "__main__":
    main()
