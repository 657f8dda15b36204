"""`npllama train --dry-run`: what a run would be, before it is started -- the model's parameters, the
tokens of a step, the corpus's training tokens, a few real steps timed on this machine now, and so
the steps and passes over the data that the time budget (or --steps) gives.  Nothing is written but
the machine-wide corpus cache (the tokenizer and tokens the real run then reads).

A rule of thumb (measured on a 2-core AVX-512 Xeon, README "Size and budget"): about 10-20 passes over
a corpus is where held-out loss stops improving for these small models; under one pass, a smaller
preset learns more in the same time.
"""
from __future__ import annotations

import time

import numpy as np

from ..data import get_batch
from ..errors import ConfigError
from ..model import Llama
from ..optim import AdamW
from ..engine.threads import get_threads
from . import corpus_cache
from .best import format_passes
from .config import TrainConfig, model_config
from .planner import plan_steps
from .progress import hms
from .run import read_split
from .session import sgemm_gflops

TIMED_STEPS = 3
OVERFIT_PASSES = 10     # more passes than this: the warning about learning the corpus by heart
FEW_PASSES = 1          # fewer: a smaller model would see more of the data


def dry_run(cfg: TrainConfig) -> dict:
    """Plan ``cfg`` without training; returns the figures it prints (see the module docstring)."""
    if cfg.init_from is not None:
        raise ConfigError("--dry-run plans a fresh model; with --init-from the model is the checkpoint's (its size "
                          "is in its config.json)")
    t0 = time.monotonic()
    _, split, described = read_split(cfg)
    print(described)
    tokenizer, _, how = corpus_cache.tokenizer_for(split, cfg.vocab_size)
    train_ids = tokenizer.encode_long(split.train_text)
    train_tokens, val_tokens = len(train_ids), len(tokenizer.encode_long(split.val_text))
    setup = time.monotonic() - t0
    print(f"{how}; {train_tokens:,} training and {val_tokens:,} held-out tokens "
          f"({len(split.train_text.encode()) / max(train_tokens, 1):.2f} bytes a token) in {setup:.1f}s")

    model = Llama(model_config(cfg, tokenizer.vocab_size), seed=cfg.seed)
    model.train()
    opt = AdamW(model.trainable_params, cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                weight_decay=cfg.weight_decay, flat_params=model.flat_trainable)
    data = train_ids if len(train_ids) > cfg.seq_len else np.resize(train_ids, cfg.seq_len + 1)
    rng = np.random.default_rng(cfg.seed)
    times = []
    for i in range(TIMED_STEPS + 1):   # (the first compiles or loads the kernels: not counted)
        t = time.perf_counter()
        for _ in range(cfg.grad_accum):
            x, y = get_batch(data, cfg.batch_size, cfg.seq_len, rng)
            model.loss_and_grad(x, y, copy=False)
        opt.step(flat_grads=model.flat_grads, lr=cfg.lr)
        times.append(time.perf_counter() - t)
    step_seconds = float(np.median(times[1:]))
    c = model.config
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters (dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads, "
          f"vocab {c.vocab_size}); batch {cfg.batch_size} x {cfg.grad_accum} x {cfg.seq_len} = "
          f"{cfg.tokens_per_step:,} tokens/step")
    print(f"this machine now: {step_seconds:.3f}s a step, {cfg.tokens_per_step / step_seconds:,.0f} tokens/s "
          f"({get_threads()} threads; float32 matrices multiplied at {sgemm_gflops():.0f} GFLOP/s, which steps "
          "scale with)")

    # evaluations cost a forward pass (about a third of a step) per token
    eval_seconds = min(cfg.eval_tokens, val_tokens) / cfg.tokens_per_step * step_seconds / 3
    final_seconds = (val_tokens if cfg.final_eval_tokens is None else min(cfg.final_eval_tokens, val_tokens)) \
        / cfg.tokens_per_step * step_seconds / 3
    checkpoint_seconds = 0.3 + 4 * model.flat_trainable.nbytes / 200e6
    if cfg.steps is not None:
        steps = cfg.steps
        seconds = steps * step_seconds + (steps // cfg.eval_interval if cfg.eval_interval else 0) * eval_seconds \
            + final_seconds + checkpoint_seconds
        plan = f"--steps {steps:,}: about {hms(seconds)} of training"
    else:
        setup_later = 1.0   # the corpus cache now holds the tokenizer and the kernels are compiled
        steps = plan_steps(cfg.time_budget - setup_later, step_seconds, eval_seconds, cfg.eval_interval,
                           final_seconds, checkpoint_seconds, cfg.checkpoint_interval)
        plan = f"--time-budget {cfg.time_budget:.0f}s: about {steps:,} steps"
    seen = steps * cfg.tokens_per_step / max(train_tokens, 1)
    print(f"{plan}, {steps * cfg.tokens_per_step:,} tokens = {format_passes(seen)} passes over the training tokens")
    if seen > OVERFIT_PASSES:
        print(f"note: more than {OVERFIT_PASSES} passes: a model this size may learn this corpus by heart; watch "
              "for the held-out warning (best/ keeps the best weights), or --early-stop N, a smaller --preset")
    elif seen < FEW_PASSES:
        print("note: under one pass over the data in this budget: a smaller --preset takes more steps in the same "
              "time, a longer --time-budget sees more of the data")
    return {"parameters": model.num_parameters(), "tokens_per_step": cfg.tokens_per_step, "step_seconds": step_seconds,
            "train_tokens": train_tokens, "val_tokens": val_tokens, "steps": steps, "passes": seen}
