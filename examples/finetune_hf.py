"""Fine-tune a Hugging Face Llama checkpoint directory on a text, then save it in the same format.

    python examples/finetune_hf.py                               # tiny test checkpoint, bundled text
    python examples/finetune_hf.py path/to/hf-llama --text my.txt --steps 200 --out runs/finetuned/

The checkpoint is any directory with config.json + model.safetensors (or shards), for example one
downloaded from the Hugging Face Hub.  Its tokenizer.json is used when it has one.  A checkpoint
without a tokenizer (like the tiny test fixture tests/fixtures/hf_gqa, vocabulary 64) gets a
character-level tokenizer instead: '<unk>' plus the most frequent characters of the text, as many
as the vocabulary holds.  That tokenizer gives the embedding rows a new meaning, so on a real
pretrained model it would throw away what the embeddings knew -- it is there so the example runs
on a checkpoint that has no tokenizer at all.

The result is written with ``save_pretrained`` (config.json + model.safetensors + tokenizer.json),
so ``Llama.from_pretrained``, ``npllama generate`` and ``transformers`` all load it.
"""
import argparse
import collections
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

import npllama
from npllama.data import BatchSampler, TokenDataset, load_text
from npllama.optim import AdamW, clip_grad_norm, lr_at
from npllama.tokenizer import Tokenizer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf_gqa"


def char_tokenizer(text, vocab_size):
    """id 0 = '<unk>', then the vocab_size - 1 most frequent characters of ``text`` (ties by code point)."""
    counts = collections.Counter(text)
    chars = sorted(counts, key=lambda c: (-counts[c], c))[:vocab_size - 1]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")  # one token per character
    hf.decoder = decoders.Fuse()                                                  # join them back, no spaces
    return Tokenizer(hf)


def mean_loss(model, batches):
    """Mean cross-entropy over the non-ignored targets of ``batches`` (nats per token)."""
    total = count = 0.0
    for x, y in batches:
        n = int(np.count_nonzero(y != -100))
        total += model.loss(x, y) * n
        count += n
    return total / count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CHECKPOINT),
                   help="Hugging Face Llama directory (default: the tiny test fixture)")
    p.add_argument("--text", default=None, help="UTF-8 text file or folder of .txt (default: bundled Shakespeare)")
    p.add_argument("--chars", type=int, default=200_000, help="use at most this many characters of the text")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64, help="capped at the checkpoint's max_position_embeddings")
    p.add_argument("--out", default="runs/finetuned", help="directory to save the fine-tuned model in (default "
                   "runs/finetuned, beside the runs of npllama train)")
    args = p.parse_args(argv)

    model = npllama.Llama.from_pretrained(args.checkpoint, dtype=np.float32)
    text = load_text(args.text)[:args.chars]
    if model.tokenizer is None:
        model.tokenizer = char_tokenizer(text, model.config.vocab_size)
        print(f"{args.checkpoint} has no tokenizer.json: using {model.tokenizer.vocab_size} characters as tokens")
    if model.tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"the tokenizer has {model.tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embedding rows")
    seq_len = min(args.seq_len, model.config.max_seq_len)
    data = TokenDataset.from_text(text, model.tokenizer)
    val_batches = list(data.iter_val_batches(batch_size=8, seq_len=seq_len))[:4]

    # Fine-tuning: a constant-after-warmup learning rate, weight decay on matrices only, clipping.
    optimizer = AdamW(model.params, lr=args.lr, weight_decay=0.1, flat_params=model.flat_params)
    batches = BatchSampler(data.train_tokens, args.batch, seq_len, seed=0)
    val_before = mean_loss(model, val_batches)
    model.train()
    for step in range(args.steps):
        x, y = batches.next_batch()
        loss, _ = model.loss_and_grad(x, y)
        clip_grad_norm(model.flat_grads, max_norm=1.0)
        optimizer.step(flat_grads=model.flat_grads,
                       lr=lr_at(step, max_lr=args.lr, warmup_steps=min(10, args.steps), total_steps=args.steps,
                                min_lr=args.lr, kind="constant"))
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss:.3f}")
    model.eval()
    val_after = mean_loss(model, val_batches)
    model.save_pretrained(args.out)
    print(f"held-out loss {val_before:.3f} -> {val_after:.3f} nats/token; saved to {args.out}")
    return {"val_before": val_before, "val_after": val_after, "out": args.out, "val_batches": val_batches}


if __name__ == "__main__":
    main()
