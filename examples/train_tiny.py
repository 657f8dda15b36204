"""Train a tiny Llama on the bundled Shakespeare from Python: tokenizer, data, model, AdamW, schedule.

    python examples/train_tiny.py                      # 300 steps, about 30 s
    python examples/train_tiny.py --steps 30 --dim 32  # a few seconds

At these tiny sizes one thread is fastest (threads cost more to start than they save):
``python examples/train_tiny.py --threads 1`` (``npllama.set_threads(1)``).

The heart of it is the loop in ``main``: draw a batch, ``loss_and_grad``, clip, one AdamW step at
the learning rate the schedule gives for this step.  ``npllama train`` does the same with
checkpoints, evaluation and a progress bar; docs/walkthrough.md follows one of these steps
through every layer.
"""
import argparse

import numpy as np

import npllama
from npllama.data import BatchSampler, TokenDataset, load_text
from npllama.optim import AdamW, clip_grad_norm, lr_at
from npllama.tokenizer import Tokenizer


def held_out_loss(model, data, seq_len, max_batches=4):
    """Mean cross-entropy (nats per token) over the first windows of the validation split."""
    total = count = 0.0
    for i, (x, y) in enumerate(data.iter_val_batches(batch_size=8, seq_len=seq_len)):
        if i == max_batches:
            break
        n = int(np.count_nonzero(y != -100))
        total += model.loss(x, y) * n
        count += n
    return total / count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chars", type=int, default=300_000, help="characters of the corpus to use")
    p.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size (>= 257)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sample-tokens", type=int, default=60, help="tokens to generate at the end")
    p.add_argument("--threads", type=int, default=None, help="threads npllama runs on (default: all cores)")
    args = p.parse_args(argv)
    if args.threads is not None:
        npllama.set_threads(args.threads)

    # ---- the ~20 lines: text -> tokens -> model -> AdamW + schedule loop ----------------------
    text = load_text(None)[:args.chars]                       # None = the bundled Shakespeare
    tokenizer = Tokenizer.train(text, vocab_size=args.vocab)  # byte-level BPE
    data = TokenDataset.from_text(text, tokenizer)            # 95% train / 5% held out
    cfg = npllama.LlamaConfig(vocab_size=tokenizer.vocab_size, dim=args.dim, n_layers=args.layers,
                              n_heads=4, n_kv_heads=2, hidden_dim=int(8 * args.dim / 3),
                              max_seq_len=args.seq_len)
    model = npllama.Llama(cfg, seed=0, dtype=np.float32)
    optimizer = AdamW(model.params, lr=args.lr, weight_decay=0.1, flat_params=model.flat_params)
    batches = BatchSampler(data.train_tokens, args.batch, args.seq_len, seed=0)
    val_before = held_out_loss(model, data, args.seq_len)
    losses = []
    for step in range(args.steps):
        x, y = batches.next_batch()                           # int64 (B, T); y is x shifted by one
        loss, _ = model.loss_and_grad(x, y)                   # fills model.flat_grads
        clip_grad_norm(model.flat_grads, max_norm=1.0)
        lr = lr_at(step, max_lr=args.lr, warmup_steps=max(1, args.steps // 10),
                   total_steps=args.steps, min_lr=args.lr / 10)
        optimizer.step(flat_grads=model.flat_grads, lr=lr)
        losses.append(loss)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss:.3f}  lr {lr:.2e}")
    # --------------------------------------------------------------------------------------------

    val_after = held_out_loss(model, data, args.seq_len)
    print(f"held-out loss {val_before:.3f} -> {val_after:.3f} nats/token "
          f"({model.num_parameters():,} parameters, vocab {tokenizer.vocab_size})")
    prompt = tokenizer.encode("ROMEO:")
    sample = model.generate(prompt, max_new_tokens=args.sample_tokens, temperature=0.8, top_k=40, seed=0)
    print("sample: " + tokenizer.decode(np.concatenate([prompt, sample])))
    return {"losses": losses, "val_before": val_before, "val_after": val_after, "model": model,
            "tokenizer": tokenizer}


if __name__ == "__main__":
    main()
