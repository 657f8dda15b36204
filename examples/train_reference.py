"""Train the plain-NumPy reference model (npllama/reference.py) on the bundled Shakespeare.

    python examples/train_reference.py                  # 400 steps, a few minutes on one core
    python examples/train_reference.py --steps 20       # seconds
    python examples/train_reference.py --out my_model   # save it: npllama inspect / generate read it
    python examples/train_reference.py --exercise rmsnorm --exercise attention
                                     # with your backward from exercises/backward.py (docs/exercises.md)

Every step runs ``reference.loss_and_grad``: the forward and backward you read top to bottom in
npllama/reference.py, each layer one call to its ``*_reference`` function in npllama/layers/.
No Numba kernel and no preallocated buffer is involved, so whatever you change there (a layer's
backward from the exercises, docs/exercises.md; a different mask; a new layer) is what trains
here.  It is ~20x slower than `npllama train`, which runs the fast engine held equal to this model.

The parameters are a plain dict of float64 arrays keyed by their Hugging Face names
(``npllama.model.parameter_layout``), initialised as `npllama train` initialises them; AdamW and
the warmup + cosine schedule are npllama's (docs/10-adamw.md).  ``--out`` writes a Hugging Face
directory (config.json, model.safetensors, tokenizer.json), so `npllama inspect DIR --text ...`
draws its attention patterns and `npllama generate DIR` samples from it.
"""
import argparse
import time

import numpy as np

import npllama
from npllama import reference
from npllama.data import BatchSampler, TokenDataset, load_text
from npllama.exercises import EXERCISES, load_answers, train_with
from npllama.optim import AdamW, clip_grad_norm, lr_at
from npllama.tokenizer import Tokenizer


def initial_params(cfg, seed=0):
    """The parameters `npllama train` starts from (npllama.Llama's initialisation), as a dict of
    float64 arrays the reference model reads: nothing of the fast model is kept."""
    model = npllama.Llama(cfg, seed=seed, dtype=np.float64)
    return {name: np.array(p) for name, p in model.params.items()}


def held_out_loss(params, cfg, data, seq_len, max_batches=4):
    """Mean cross-entropy (nats per token) over the first windows of the validation split."""
    total = count = 0.0
    for i, (x, y) in enumerate(data.iter_val_batches(batch_size=8, seq_len=seq_len)):
        if i == max_batches:
            break
        logits = reference.forward(params, cfg, x)                        # (B, T, V)
        keep = y != -100
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = np.take_along_axis(logits, np.where(keep, y, 0)[..., None], axis=-1)[..., 0]
        total += float(np.sum((lse - picked)[keep]))
        count += int(keep.sum())
    return total / count


def sample(params, cfg, prompt, n_tokens, temperature=0.8, seed=0):
    """Sample n_tokens after ``prompt`` with the reference forward, the whole window each time (no
    KV cache: docs/11-kv-cache.md shows why the cache gives the same logits)."""
    rng = np.random.default_rng(seed)
    ids = list(prompt)
    for _ in range(n_tokens):
        window = np.array([ids[-cfg.max_seq_len:]])
        logits = reference.forward(params, cfg, window)[0, -1] / temperature
        p = np.exp(logits - logits.max())
        ids.append(int(rng.choice(cfg.vocab_size, p=p / p.sum())))
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chars", type=int, default=300_000, help="characters of the corpus to use")
    p.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size (>= 257)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sample-tokens", type=int, default=40, help="tokens to generate at the end")
    p.add_argument("--out", default=None, help="save the trained model to this directory (Hugging Face format)")
    p.add_argument("--exercise", action="append", default=[], choices=sorted(EXERCISES),
                   help="train with your backward for this layer from --answers (repeatable)")
    p.add_argument("--answers", default="exercises/backward.py", help="your answers (default: %(default)s)")
    args = p.parse_args(argv)
    if args.exercise:
        print(f"with your {', '.join(args.exercise)} backward from {args.answers}")
        with train_with(load_answers(args.answers), args.exercise):
            return train(args)
    return train(args)


def train(args):
    """The run of ``main``, once its backward functions are chosen."""
    text = load_text(None)[:args.chars]                       # None = the bundled Shakespeare
    tokenizer = Tokenizer.train(text, vocab_size=args.vocab)  # byte-level BPE
    data = TokenDataset.from_text(text, tokenizer)            # 95% train / 5% held out
    cfg = npllama.LlamaConfig(vocab_size=tokenizer.vocab_size, dim=args.dim, n_layers=args.layers,
                              n_heads=args.heads, n_kv_heads=args.kv_heads, hidden_dim=int(8 * args.dim / 3),
                              max_seq_len=args.seq_len)
    params = initial_params(cfg)
    optimizer = AdamW(params, lr=args.lr, weight_decay=0.1)
    batches = BatchSampler(data.train_tokens, args.batch, args.seq_len, seed=0)
    val_before = held_out_loss(params, cfg, data, args.seq_len)

    # ---- the loop: the reference model's loss and gradients, clipping, one AdamW step -------------
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = batches.next_batch()                           # int64 (B, T); y is x shifted by one
        loss, grads = reference.loss_and_grad(params, cfg, x, y)   # grads: a dict like params
        clip_grad_norm(grads, max_norm=1.0)
        lr = lr_at(step, max_lr=args.lr, warmup_steps=max(1, args.steps // 10),
                   total_steps=args.steps, min_lr=args.lr / 10)
        optimizer.step(grads, lr=lr)                          # updates params in place
        losses.append(loss)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss:.3f}  lr {lr:.2e}  ({time.perf_counter() - start:.0f} s)")
    # -------------------------------------------------------------------------------------------------

    val_after = held_out_loss(params, cfg, data, args.seq_len)
    n_params = sum(p.size for p in params.values())
    print(f"held-out loss {val_before:.3f} -> {val_after:.3f} nats/token "
          f"({n_params:,} parameters, vocab {tokenizer.vocab_size})")
    prompt = tokenizer.encode("ROMEO:")
    print("sample: " + tokenizer.decode(sample(params, cfg, prompt, args.sample_tokens)))
    if args.out:
        model = npllama.Llama(cfg, dtype=np.float32)
        for name, value in params.items():
            model.params[name][...] = value
        model.tokenizer = tokenizer
        model.save_pretrained(args.out)
        print(f"saved to {args.out}")
    return {"losses": losses, "val_before": val_before, "val_after": val_after, "params": params, "cfg": cfg,
            "tokenizer": tokenizer}


if __name__ == "__main__":
    main()
