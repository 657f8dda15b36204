#!/usr/bin/env python
"""Where does one npllama training step go?  Time per kind of work, in one process.

    python benchmarks/profile_step.py --config 15M-v4k --threads 2 --steps 5 --warmup 2

One step = model.loss_and_grad(x, y, copy=False) + AdamW.step(flat_grads=...), as in train_throughput.py.
After the warm-up (Numba compilation), the script wraps, in npllama.model and every
npllama.layers module:

  * every Numba kernel (a dispatcher in the module's globals), sorted into a category by the
    layer file that defines it (rmsnorm, rope, swiglu, cross_entropy, embedding, attention, ...);
  * the attention entry points ``attention_forward`` / ``attention_backward`` (category attention,
    whatever they do inside: attention.py is timed as a whole), and the functions that run a row
    kernel on the threads (``rmsnorm_forward_kernel`` runs ``rmsnorm_forward_rows``: the wait for
    the helper thread's share is in their category);
  * ``matmuls`` (layers/linear.py: every matmul of the step, one call per product or per backward
    pair dW, dx) is "matmul (BLAS)"; every NumPy function called through ``np.`` elsewhere is
    "numpy other" (allocations, copies, sums);
  * the optimizer step ("optimizer").

Times are exclusive (a wrapped call inside another wrapped call counts only once, in the inner
category); "python + glue" is the step's wall time minus everything wrapped: interpreter overhead,
array methods (``.reshape``, fancy indexing) and the timers' own cost (~1 us per wrapped call,
counted in "calls/step").  Wrapping adds a little time, so the total is a bit above
train_throughput.py's figure.

How far each part is from the machine's limit.  Every wrapped call also counts its work: FLOPs for
matmuls (2·M·K·N per product) and attention (causal: forward 2·B·H·T²·hd, backward 5·B·H·T²·hd,
the products its tiles compute), bytes for everything else (the sizes of its array arguments, each
read or written once: a lower bound on its memory traffic; AdamW 7 x the buffer).  The "limit ms"
column is that work at the machine's measured rate -- FLOPs at the float32 2048² sgemm rate, bytes
at the rate ``threads`` Numba threads read an array of the category's typical call size (so a
call whose arrays fit in the caches is held to the cache's rate, a bigger one to memory's; never
less than memory's rate, which small reads miss by the cost of starting the threads) -- and
"x limit" is the measured time over it: 1.0 would be at the machine's limit.

With n threads a step runs as n parts of the batch at once, one per thread (npllama/model.py,
``_batch_parts``): the script then times the calling thread's part (its 1/n of the batch, while
the other threads do theirs), and its limits are one thread's: the 2048² sgemm rate and read rates
of one thread.  The optimizer, which runs on all threads, keeps the n threads' limit.

On a shared machine use the median over several steps (printed) and compare runs made at the same
time; "cpu s/step" (all threads) is steadier than wall time when other processes compete.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
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


def _arrays(args, kwargs):
    import numpy as np
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, np.ndarray):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from (x for x in a if isinstance(x, np.ndarray))


def work_of(category, name, args, kwargs):
    """(FLOPs, bytes) of one wrapped call (see the module docstring)."""
    if name == "matmuls":
        flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b, _ in args)
        return flops, sum(a.nbytes + b.nbytes + c.nbytes for a, b, c in args)
    if name == "attention_forward":
        B, H, T, hd = args[0].shape
        return 2 * B * H * T * T * hd, 4 * args[0].nbytes
    if name == "attention_backward":
        B, H, T, hd = args[1][0].shape
        return 5 * B * H * T * T * hd, 8 * args[1][0].nbytes
    if category == "optimizer":
        return 0, 7 * kwargs["flat_grads"].nbytes
    return 0, sum(a.nbytes for a in _arrays(args, kwargs))


ENGINE_MODULES = {"jit", "pool", "fastmath", "simd", "matmul", "blas", "batch", "threads"}   # (npllama/engine/)


def _no_unit_left(args):
    """Whether this is run_on_threads's first call of a kernel, with no unit of work left (it only makes
    sure the kernel is compiled on the calling thread): not counted."""
    from npllama.engine.pool import NO_UNIT_LEFT
    last = args[-1] if args else None
    return getattr(last, "shape", None) == (1,) and last.dtype.kind == "i" and last[0] >= NO_UNIT_LEFT


class Profiler:
    """Exclusive wall time per category, with a stack so nested wrapped calls are not counted twice;
    and each category's work (``work_of``)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.flops = defaultdict(float)
        self.bytes = defaultdict(float)
        self.stack = []  # per open call: time spent in wrapped children so far
        self.enabled = False
        self.matmul_shapes = False  # True: one category per matmul shape and layout
        self.thread = threading.get_ident()   # the thread whose calls are timed

    def wrap(self, fn, category):
        prof = self

        def timed(*args, **kwargs):
            # (calls on other threads -- a kernel's share of work on a pool thread -- run inside a
            # call of this thread, which counts their time)
            if not prof.enabled or threading.get_ident() != prof.thread or _no_unit_left(args):
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
                name = getattr(fn, "__name__", "")
                # a call around wrapped calls leaves its work to them, but for attention, counted as a whole
                if name in ("attention_forward", "attention_backward") or (not children and category != "attention"):
                    flops, nbytes = work_of(category, name, args, kwargs)
                    prof.flops[category] += flops
                    prof.bytes[category] += nbytes
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
    import types

    import numba.core.registry
    import numpy as np

    import npllama.layers
    modules = [importlib.import_module("npllama.model")]
    modules += [importlib.import_module(f"npllama.layers.{m.name}")
                for m in pkgutil.iter_modules(npllama.layers.__path__)]   # (not the engine's: its helper
    # threads' plumbing is counted in the calls around it)
    proxy = numpy_proxy(np, prof)
    patched = 0
    for mod in modules:
        for name, val in list(vars(mod).items()):
            if isinstance(val, numba.core.registry.CPUDispatcher):
                # by the module that defines the kernel (attention.py's helpers are attention), else by name
                home = val.py_func.__module__.rsplit(".", 1)[-1]
                setattr(mod, name, prof.wrap(val, category_of(home if home not in ENGINE_MODULES else name)))
                patched += 1
            elif name in ("attention_forward", "attention_backward") and callable(val):
                setattr(mod, name, prof.wrap(val, "attention"))
                patched += 1
            elif name.endswith("_kernel") and isinstance(val, types.FunctionType):
                # a row kernel run on the threads (``swiglu_forward_kernel`` runs ``swiglu_forward_rows``):
                # its wait for the helper thread's share counts in its category too
                setattr(mod, name, prof.wrap(val, category_of(val.__module__.rsplit(".", 1)[-1])))
                patched += 1
            elif name == "matmuls":
                setattr(mod, name, _matmuls_timed(val, prof))
                patched += 1
            elif val is np:
                setattr(mod, name, proxy)
                patched += 1
    return patched


def read_gbs(nbytes: int, threads: int) -> float:
    """GB/s at which ``threads`` Numba threads read a float32 array of ``nbytes`` (best of several
    reads; the array is read once before, so one that fits in the caches is read from them)."""
    import numpy as np

    kernel = _parallel_sum_kernel()
    a = np.ones(max(nbytes // 4, 4096 * threads), dtype=np.float32)
    per = a.size // threads
    kernel(a, threads, per)
    best = float("inf")
    for _ in range(20 if a.nbytes < (64 << 20) else 3):
        t = time.perf_counter()
        kernel(a, threads, per)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


_KERNEL = None


def _parallel_sum_kernel():
    """One sum per thread over its share of the array (compiled on first use)."""
    global _KERNEL
    if _KERNEL is None:
        import numba
        import numpy as np

        @numba.njit(parallel=True, fastmath=True)
        def parallel_sum(a, threads, per):
            total = np.zeros(threads, dtype=np.float32)
            for t in numba.prange(threads):
                part = a[t * per:(t + 1) * per]   # (indexed from 0: no wraparound check, so it vectorises)
                s = np.float32(0.0)
                for i in range(per):
                    s += part[i]
                total[t] = s
            return total.sum()
        _KERNEL = parallel_sum
    return _KERNEL


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

    from npllama.engine.batch import batch_parts
    parts = len(batch_parts(B))

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
        for counter in (prof.seconds, prof.calls, prof.flops, prof.bytes):
            counter.clear()
        prof.enabled = True
        c0, t0 = time.process_time(), time.perf_counter()
        step(i)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        prof.enabled = False
        per_step.append((wall, cpu, dict(prof.seconds), dict(prof.calls), dict(prof.flops), dict(prof.bytes)))

    walls = [s[0] for s in per_step]
    cats = sorted({c for s in per_step for c in s[2]})
    med = {c: statistics.median(s[2].get(c, 0.0) for s in per_step) for c in cats}
    glue = statistics.median(s[0] - sum(s[2].values()) for s in per_step)
    calls = {c: statistics.median(s[3].get(c, 0) for s in per_step) for c in cats}
    total = statistics.median(walls)

    print(f"config {args.config}: B={B} T={T} vocab={cfg.vocab_size} dim={cfg.dim} layers={cfg.n_layers} "
          f"heads={cfg.n_heads}/{cfg.n_kv_heads} hidden={cfg.hidden_dim} {args.dtype}, "
          f"{args.threads} thread(s)")
    print(f"warm-up {warmup_s:.1f} s ({args.warmup} steps); {n_patched} names instrumented; "
          f"steps: wall {', '.join(f'{w:.3f}' for w in walls)} s; "
          f"cpu/step {statistics.median(s[1] for s in per_step):.3f} s")
    busy = common.busy_warning(args.threads) if hasattr(common, "busy_warning") else None
    if busy:
        print(busy)
    sgemm = {args.threads: common.matmul_peak_gflops("numpy")["gflops"]}   # GFLOP/s by thread count
    threads_of = lambda c: args.threads if parts == 1 or c == "optimizer" else 1   # noqa: E731
    if parts > 1:
        from npllama.engine.threads import thread_limit
        with thread_limit(1):
            sgemm[1] = common.matmul_peak_gflops("numpy")["gflops"]
        print(f"the step runs as {parts} parts of the batch at once, one per thread: the times below are the "
              f"calling thread's, on its part ({B // parts} of the {B} sequences); the limits one thread's")
    flops = {c: statistics.median(s[4].get(c, 0.0) for s in per_step) for c in cats}
    nbytes = {c: statistics.median(s[5].get(c, 0.0) for s in per_step) for c in cats}
    memory_gbs = {n: read_gbs(256 << 20, n) for n in sgemm}
    bandwidth = {}   # GB/s at each category's typical call size (at least memory's: the caches are not slower)
    for c in cats:
        if not flops[c] and nbytes[c] and calls[c]:
            n = threads_of(c)
            bandwidth[c] = max(read_gbs(int(nbytes[c] / calls[c]), n), memory_gbs[n])
    for n in sorted(memory_gbs, reverse=True):
        print(f"limits ({n} thread{'s' if n > 1 else ''}): float32 2048² sgemm {sgemm[n]:.0f} GFLOP/s; read rate "
              f"{read_gbs(1 << 20, n):.0f} GB/s for 1 MB (caches), {memory_gbs[n]:.0f} GB/s for 256 MB (memory)")
    rows = sorted(med.items(), key=lambda kv: -kv[1]) + [("python + glue", glue)]
    width = max(16, max(len(c) for c, _ in rows))
    print(f"\n{'category':<{width}} {'ms/step':>9} {'share':>7} {'calls/step':>11} {'work/step':>12} "
          f"{'rate':>13} {'limit ms':>9} {'x limit':>8}")
    limit_total = 0.0
    for c, sec in rows:
        work = rate = limit = ratio = ""
        if flops.get(c):
            limit_s = flops[c] / sgemm[threads_of(c)] / 1e9
            work, rate = f"{flops[c] / 1e9:.2f} GFLOP", f"{flops[c] / sec / 1e9:.0f} GFLOP/s"
        elif nbytes.get(c) and c in bandwidth:
            limit_s = nbytes[c] / bandwidth[c] / 1e9
            work, rate = f"{nbytes[c] / 1e6:.1f} MB", f"{nbytes[c] / sec / 1e9:.1f} GB/s"
        else:
            limit_s = None
        if limit_s is not None:
            limit_total += limit_s
            limit, ratio = f"{1e3 * limit_s:.2f}", f"{sec / limit_s:.1f}"
        print(f"{c:<{width}} {1e3 * sec:9.1f} {100 * sec / total:6.1f}% {calls.get(c, ''):>11} {work:>12} "
              f"{rate:>13} {limit:>9} {ratio:>8}")
    print(f"{'total (median)':<{width}} {1e3 * total:9.1f}         -> {B * T / total:,.0f} tokens/s; "
          f"at the limits {1e3 * limit_total:.1f} ms -> {B * T / limit_total:,.0f} tokens/s")
    print(f"peak RSS {common.peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
