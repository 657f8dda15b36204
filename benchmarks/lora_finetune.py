#!/usr/bin/env python
"""LoRA vs full fine-tuning of one pretrained model: tokens/s and peak RSS (issue 14, point 2).

    python benchmarks/lora_finetune.py MODEL_DIR --threads 2 --batch-size 4 --seq-len 256 \
        --steps 5 --warmup 1 [--rank 8] [--targets q_proj,...] [--modes lora,full,peft] [--json [PATH]]

MODEL_DIR: a Hugging Face directory (config.json + safetensors), e.g. SmolLM2-135M dequantized.
One step = forward + mean cross-entropy + backward + AdamW update on a (batch, seq-len) block of
random tokens (seeded, the same blocks for every mode):
    lora:  model.add_lora(rank, alpha, targets); AdamW over model.flat_trainable (the adapters only);
           the backward skips every frozen weight's gradient
    full:  AdamW over model.flat_params; every weight's gradient
    peft:  transformers + PEFT (same rank, alpha, targets), torch.optim.AdamW over the adapters
Each mode runs in its own child process with its thread counts set before anything is imported, so
its peak RSS (VmHWM) is its own: model, gradients, optimizer state and activations.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402  (imports nothing heavy)

MODES = ("lora", "full", "peft")
SCRIPT = Path(__file__).resolve()
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="Hugging Face model directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (Numba JIT)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=DEFAULT_TARGETS)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--modes", default="lora,full", help=f"comma-separated among {','.join(MODES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    if args.model is None or not set(args.modes) <= set(MODES) or args.steps < 1 or args.warmup < 0:
        p.error(f"give MODEL_DIR, --modes among {','.join(MODES)}, --steps >= 1 and --warmup >= 0")
    return args


# ---- workers (child processes) -----------------------------------------------------------------------
def worker_npllama(args):
    import numpy as np
    import npllama
    from npllama.optim import AdamW
    model = npllama.Llama.from_pretrained(args.model, dtype=np.float32)
    rss_loaded = common.peak_rss_mb()
    if args.worker == "lora":
        model.add_lora(args.rank, args.alpha, args.targets.split(","), seed=args.seed)
    opt = AdamW(model.trainable_params, args.lr, flat_params=model.flat_trainable)
    batches = common.random_batches(model.config.vocab_size, args.batch_size, args.seq_len,
                                    args.warmup + args.steps, seed=args.seed + 1)
    losses = []

    def step(i):
        loss, _ = model.loss_and_grad(*batches[i], copy=False)
        opt.step(flat_grads=model.flat_grads)
        losses.append(float(loss))

    times = common.time_calls(step, args.warmup, args.steps)
    return {"times": times.to_json(), "tokens_per_s": args.batch_size * args.seq_len / times.median_s,
            "trainable_parameters": int(model.flat_trainable.size), "gradient_bytes": int(model.flat_grads.nbytes),
            "optimizer_bytes": int(2 * model.flat_trainable.nbytes), "rss_after_load_mb": rss_loaded,
            "losses": losses}


def worker_peft(args):
    import peft
    import torch
    import transformers
    common.set_torch_threads(args.threads)
    base = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rss_loaded = common.peak_rss_mb()
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=args.targets.split(","),
                             lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    batches = common.random_batches(base.config.vocab_size, args.batch_size, args.seq_len,
                                    args.warmup + args.steps, seed=args.seed + 1)
    losses = []

    def step(i):
        x, y = (torch.from_numpy(a) for a in batches[i])
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())

    times = common.time_calls(step, args.warmup, args.steps)
    return {"times": times.to_json(), "tokens_per_s": args.batch_size * args.seq_len / times.median_s,
            "trainable_parameters": int(sum(p.numel() for p in params)), "rss_after_load_mb": rss_loaded,
            "losses": losses}


# ---- parent ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        common.worker_main(worker_peft if args.worker == "peft" else worker_npllama, args)
        return 0
    passthrough = [args.model, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank), "--alpha", str(args.alpha),
                   "--targets", args.targets, "--lr", str(args.lr), "--seed", str(args.seed), "--threads",
                   str(args.threads)]
    warning = common.busy_warning(args.threads)
    if warning:
        print(warning, file=sys.stderr)
    results = {mode: common.run_worker(SCRIPT, [*passthrough, "--worker", mode], args.threads) for mode in args.modes}
    rows = []
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode}: {r['error']}", file=sys.stderr)
            continue
        rows.append({"mode": mode, "tokens_per_s": r["tokens_per_s"], "peak_rss_mb": r["peak_rss_mb"],
                     "trainable_m": r["trainable_parameters"] / 1e6,
                     "gradient_mb": r.get("gradient_bytes", float("nan")) / 1e6})
    print(common.format_table(rows, [("mode", "mode", "s"), ("tokens_per_s", "tokens/s", ".1f"),
                                     ("peak_rss_mb", "peak RSS MB", ".0f"), ("trainable_m", "trained M", ".2f"),
                                     ("gradient_mb", "grad MB", ".1f")]))
    if args.json is not None:
        common.write_json(args.json, {"args": vars(args), "machine": common.machine_info(args.threads),
                                      "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
