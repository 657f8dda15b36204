#!/usr/bin/env python
"""Where does one npllama training step go?  Time per kind of work, in one process.

    python benchmarks/profile_step.py --config 15M-v4k --threads 2 --steps 5 --warmup 2

One step = model.loss_and_grad(x, y, copy=False) + AdamW.step(flat_grads=...), as in train_throughput.py.
After the warm-up (Numba compilation), the script wraps, in npllama.model and every
npllama.layers module:

  * every Numba kernel (a dispatcher in the module's globals), sorted into a category by the
    layer file that defines it (rmsnorm, rope, swiglu, cross_entropy, embedding, attention, ...);
  * the attention entry points ``attention_forward`` / ``attention_backward`` (category attention,
    whatever they do inside: attention.py is timed as a whole);
  * ``matmuls`` (layers/linear.py: every matmul of the step, one call per product or per backward
    pair dW, dx) is "matmul (BLAS)"; every NumPy function called through ``np.`` elsewhere is
    "numpy other" (allocations, copies, sums);
  * the optimizer step ("optimizer").

Times are exclusive (a wrapped call inside another wrapped call counts only once, in the inner
category); "python + glue" is the step's wall time minus everything wrapped: interpreter overhead,
array methods (``.reshape``, fancy indexing) and the timers' own cost (~1 us per wrapped call,
counted in "calls/step").  Wrapping adds a little time, so the total is a bit above
train_throughput.py's figure.

On a shared machine use the median over several steps (printed) and compare runs made at the same
time; "cpu s/step" (all threads) is steadier than wall time when other processes compete.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402  (imports nothing heavy)

CATEGORY_BY_NAME = (  # first substring of the (lower-case) function name that matches wins
    ("attention", "attention"),
    ("rmsnorm", "rmsnorm"),
    ("rope", "rope"),
    ("swiglu", "swiglu"),
    ("cross_entropy", "cross-entropy"),
    ("scatter", "embedding"),
    ("embedding", "embedding"),
    ("gather", "embedding"),
    ("dropout", "dropout"),
    ("optim", "optimizer"),
)


def category_of(name: str) -> str:
    low = name.lower()
    for key, cat in CATEGORY_BY_NAME:
        if key in low:
            return cat
    return "other kernels"


class Profiler:
    """Exclusive wall time per category, with a stack so nested wrapped calls are not counted twice."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.stack = []  # per open call: time spent in wrapped children so far
        self.enabled = False
        self.matmul_shapes = False  # True: one category per matmul shape and layout

    def wrap(self, fn, category):
        prof = self

        def timed(*args, **kwargs):
            if not prof.enabled:
                return fn(*args, **kwargs)
            prof.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                children = prof.stack.pop()
                prof.seconds[category] += dt - children
                prof.calls[category] += 1
                if prof.stack:
                    prof.stack[-1] += dt
        timed.__wrapped__ = fn
        timed.__name__ = getattr(fn, "__name__", "wrapped")
        return timed


def _matmuls_timed(matmuls, prof):
    """npllama.layers.linear.matmuls timed as "matmul (BLAS)", or per shape with --matmul-shapes:
    "mm MxK@N TN" per product (T = transposed operand; a backward pair counts once, named by its
    first product, dW)."""
    whole = prof.wrap(matmuls, "matmul (BLAS)")

    def timed(*products):
        if not prof.matmul_shapes:
            return whole(*products)
        a, b, _ = products[0]
        lay = ("T" if not a.flags.c_contiguous else "N") + ("T" if not b.flags.c_contiguous else "N")
        pair = " +dx" if len(products) > 1 else ""
        return prof.wrap(matmuls, f"mm {a.shape[0]}x{a.shape[1]}@{b.shape[1]} {lay}{pair}")(*products)
    return timed


def numpy_proxy(np, prof):
    """A stand-in for the ``np`` global of a module: same attributes, NumPy functions timed."""
    import types
    proxy = types.ModuleType("numpy_profiled")
    callables = (np.ufunc, types.FunctionType, types.BuiltinFunctionType)
    for name in dir(np):
        try:
            val = getattr(np, name)
        except AttributeError:
            continue
        if isinstance(val, callables) and not isinstance(val, type):
            val = prof.wrap(val, "matmul (BLAS)" if name in ("matmul", "dot") else "numpy other")
        setattr(proxy, name, val)
    return proxy


def instrument(prof):
    """Patch the globals of npllama.model and npllama.layers.*; returns the number of patched names."""
    import importlib
    import pkgutil

    import numba.core.registry
    import numpy as np

    import npllama.layers
    modules = [importlib.import_module("npllama.model")]
    modules += [importlib.import_module(f"npllama.layers.{m.name}")
                for m in pkgutil.iter_modules(npllama.layers.__path__)]
    proxy = numpy_proxy(np, prof)
    patched = 0
    for mod in modules:
        for name, val in list(vars(mod).items()):
            if isinstance(val, numba.core.registry.CPUDispatcher):
                # by the module that defines the kernel (attention.py's helpers are attention), else by name
                home = val.py_func.__module__.rsplit(".", 1)[-1]
                setattr(mod, name, prof.wrap(val, category_of(home if home != "_numba" else name)))
                patched += 1
            elif name in ("attention_forward", "attention_backward") and callable(val):
                setattr(mod, name, prof.wrap(val, "attention"))
                patched += 1
            elif name == "matmuls" and mod.__name__ != "npllama.layers.linear":
                setattr(mod, name, _matmuls_timed(val, prof))
                patched += 1
            elif val is np and mod.__name__ != "npllama.layers.linear":  # its matmuls may run on pool threads
                setattr(mod, name, proxy)
                patched += 1
    return patched


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="15M-v4k", choices=list(common.CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="profiled steps (median per category)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--no-optimizer", action="store_true", help="profile loss_and_grad only")
    p.add_argument("--matmul-shapes", action="store_true", help="split matmul time by shape and layout")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.set_thread_env(args.threads)  # before numpy / numba are imported
    import numpy as np

    import npllama
    from npllama.optim import AdamW

    bench = common.get_config(args.config)
    B = args.batch_size or bench.batch_size
    T = args.seq_len or bench.seq_len
    kw = bench.shape.npllama_kwargs()
    kw["max_seq_len"] = max(kw["max_seq_len"], T)
    cfg = npllama.LlamaConfig(**kw, dropout=args.dropout)
    model = npllama.Llama(cfg, seed=0, dtype=np.dtype(args.dtype)).train()
    opt = AdamW(model.params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                flat_params=model.flat_params)
    batches = common.random_batches(cfg.vocab_size, B, T, args.warmup + args.steps, seed=1)

    prof = Profiler()
    opt_step = prof.wrap(opt.step, "optimizer")

    def step(i):
        x, y = batches[i]
        loss, _ = model.loss_and_grad(x, y, copy=False)
        if not args.no_optimizer:
            opt_step(flat_grads=model.flat_grads)
        return loss

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    warmup_s = time.perf_counter() - t0
    prof.matmul_shapes = args.matmul_shapes
    n_patched = instrument(prof)

    per_step = []  # (wall, cpu, {category: seconds}, {category: calls})
    for i in range(args.warmup, args.warmup + args.steps):
        prof.seconds.clear()
        prof.calls.clear()
        prof.enabled = True
        c0, t0 = time.process_time(), time.perf_counter()
        step(i)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        prof.enabled = False
        per_step.append((wall, cpu, dict(prof.seconds), dict(prof.calls)))

    walls = [s[0] for s in per_step]
    cats = sorted({c for s in per_step for c in s[2]})
    med = {c: statistics.median(s[2].get(c, 0.0) for s in per_step) for c in cats}
    glue = statistics.median(s[0] - sum(s[2].values()) for s in per_step)
    calls = {c: statistics.median(s[3].get(c, 0) for s in per_step) for c in cats}
    total = statistics.median(walls)

    print(f"config {args.config}: B={B} T={T} vocab={cfg.vocab_size} dim={cfg.dim} layers={cfg.n_layers} "
          f"heads={cfg.n_heads}/{cfg.n_kv_heads} hidden={cfg.hidden_dim} {args.dtype}, "
          f"{args.threads} thread(s) (numba {os.environ.get('NUMBA_NUM_THREADS')})")
    print(f"warm-up {warmup_s:.1f} s ({args.warmup} steps); {n_patched} names instrumented; "
          f"steps: wall {', '.join(f'{w:.3f}' for w in walls)} s; "
          f"cpu/step {statistics.median(s[1] for s in per_step):.3f} s")
    busy = common.busy_warning(args.threads) if hasattr(common, "busy_warning") else None
    if busy:
        print(busy)
    rows = sorted(med.items(), key=lambda kv: -kv[1]) + [("python + glue", glue)]
    print(f"\n{'category':<16} {'ms/step':>9} {'share':>7} {'calls/step':>11}")
    for c, s in rows:
        print(f"{c:<16} {1e3 * s:9.1f} {100 * s / total:6.1f}% {calls.get(c, ''):>11}")
    print(f"{'total (median)':<16} {1e3 * total:9.1f}         -> {B * T / total:,.0f} tokens/s")
    print(f"peak RSS {common.peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
