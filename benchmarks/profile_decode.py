#!/usr/bin/env python
"""Where does one decoding step go?  Per kind of matrix: time, bytes, GB/s; the other kernels; Python.

    python benchmarks/profile_decode.py [--gguf PATH] [--q8] [--dequantize] [--threads 1] [--position 160]

Loads the GGUF (default: SmolLM2-135M-Instruct Q4_1, as benchmarks/real_model.py; --q8 its Q8_0
copy) quantized (``Llama.from_pretrained(path, quantized=True)``, or float32 with --dequantize),
prefills --position tokens, then times, in this one process:

  * the whole step (``KVCacheDecoder.step``: one kernel on every thread, layers/decode_step.py),
    best of --repeats, and the step of kernels (a kernel call at a time, what a model with LoRA
    adapters runs);
  * each kind of matrix (q/k/v, o, gate/up, down over all layers, and the output head) through the
    step's own matvec functions, one pass over all layers as a step makes it (so from memory, not
    from a cache that holds one matrix), best of --repeats: ms, MB, GB/s;
  * the step of kernels' other kernels (RMSNorm, RoPE, the cache store, attention, SwiGLU, the
    embedding row): that step again with one kernel replaced by a no-op at a time, against the step
    with all of them no-ops; what is left then is its Python (its loop and calls, ~1 us each).

With one thread the times are the thread's CPU time (``time.thread_time``), which other processes
on a shared machine disturb far less than wall time; with more, wall time.  The bytes are those of
the weights as stored (blocks, or float32); "of read" divides GB/s by this machine's read rate at
the thread count (one thread: a vectorised sum over 256 MB, in the same CPU time; more:
benchmarks/real_model.py's measure).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

KINDS = ("wqkv", "wo", "w_gate_up", "w_down")
OTHER_KERNELS = ("rmsnorm_row", "rope_row", "kv_cache_store_kernel", "decode_attention_kernel", "swiglu_row",
                 "embedding_rows")


def read_rate(threads: int, clock) -> float:
    """GB/s at which this machine reads a 256 MB float32 array: with one thread, a vectorised sum on
    this thread in CPU time (the clock of the figures here); with more, real_model.py's measure."""
    if threads > 1:
        from benchmarks import real_model
        return real_model.read_rates([threads])[threads]
    import numba
    import numpy as np

    @numba.njit(fastmath=True)
    def total(a):
        s = np.float32(0.0)
        for i in range(a.size):
            s += a[i]
        return s

    a = np.ones(64 << 20, dtype=np.float32)
    total(a)
    best = float("inf")
    for _ in range(5):
        t = clock()
        total(a)
        best = min(best, clock() - t)
    return a.nbytes / best / 1e9


def model_arguments(description):
    """The parser of a profile of the real model: --gguf, --q8, --dequantize, --threads."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--q8", action="store_true", help="the Q8_0 copy of the file (real_model.py makes it)")
    p.add_argument("--dequantize", action="store_true", help="float32 weights instead of the blocks")
    p.add_argument("--threads", type=int, default=1)
    return p


def load_model(args):
    """Every thread count set to --threads, the model loaded as the arguments say: (path, model,
    clock), clock the thread's CPU time with one thread, else wall time."""
    from benchmarks import common, real_model
    common.set_thread_env(args.threads)
    from npllama import Llama
    from npllama.engine.threads import set_threads
    set_threads(args.threads)
    path = args.gguf or real_model.default_gguf()
    if args.q8:
        path = real_model.q8_copy(path)
    model = Llama.from_pretrained(path, quantized=not args.dequantize).eval()
    return path, model, time.thread_time if args.threads == 1 else time.perf_counter


def main(argv=None) -> int:
    p = model_arguments(__doc__.split("\n\n")[0])
    p.add_argument("--position", type=int, default=160, help="tokens in the cache when the steps are timed")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    path, model, clock = load_model(args)
    import numpy as np
    from npllama.generate import decoding
    dec = decoding.KVCacheDecoder(model, args.position + 8)
    dec.prefill(np.arange(1, args.position + 1) % model.config.vocab_size)

    def best(fn, repeats=args.repeats):
        fn()
        times = []
        for _ in range(repeats):
            t = clock()
            fn()
            times.append(clock() - t)
        return min(times)

    def step():
        dec.step(7)
        dec.length -= 1          # (the same position every time)

    total = best(step)
    fused, dec.fused = dec.fused, None
    of_kernels = best(step)
    rate = read_rate(args.threads, clock)
    weights = 0
    rows = []
    for k, kind in enumerate(KINDS):
        mats = [layer[0][kind] for layer in dec.layers]
        matvec = dec.layers[0][3 + k]
        x = np.random.default_rng(0).normal(size=mats[0].shape[1]).astype(model.dtype)
        y = np.empty(mats[0].shape[0], dtype=model.dtype)
        seconds = best(lambda: [matvec(w, x, y) for w in mats])
        nbytes = sum(w.nbytes for w in mats)
        rows.append((f"{kind} {mats[0].shape[0]}x{mats[0].shape[1]} x{len(mats)}", seconds, nbytes))
    head = dec.lm_head
    x, y = np.ones(head.shape[1], dtype=model.dtype), np.empty(head.shape[0], dtype=model.dtype)
    rows.append((f"output head {head.shape[0]}x{head.shape[1]}", best(lambda: dec.lm_head_matvec(head, x, y)),
                 head.nbytes))
    weights = sum(r[2] for r in rows)
    kind = "float32" if args.dequantize else ", ".join(sorted({getattr(layer[0]["wqkv"], "qtype", "?")
                                                               for layer in dec.layers}))
    print(f"{path.name} ({kind}), {args.threads} thread(s), position {args.position}; "
          f"{'CPU time of the thread' if args.threads == 1 else 'wall time'}; read rate {rate:.2f} GB/s")
    print(f"step {total * 1e3:.2f} ms ({1 / total:.1f} tok/s); weights {weights / 1e6:.1f} MB a token: "
          f"{weights / total / 1e9:.2f} GB/s = {weights / total / 1e9 / rate:.0%} of the read rate")
    print(f"the step of kernels (a call at a time) {of_kernels * 1e3:.2f} ms ({1 / of_kernels:.1f} tok/s)")
    print(f"{'matrices':34s} {'ms':>7s} {'MB':>7s} {'GB/s':>6s} {'of read':>7s}")
    for name, seconds, nbytes in rows:
        print(f"  {name:32s} {seconds * 1e3:7.2f} {nbytes / 1e6:7.1f} {nbytes / seconds / 1e9:6.2f} "
              f"{nbytes / seconds / 1e9 / rate:7.0%}")
    noop = lambda *a: None   # noqa: E731
    saved_layers, saved_head = dec.layers, dec.lm_head_matvec
    dec.layers = [(w, k, v, noop, noop, noop, noop) for (w, k, v, *_) in saved_layers]
    dec.lm_head_matvec = noop
    no_matvec = best(step)
    kernels = {name: getattr(decoding, name) for name in OTHER_KERNELS}
    for name in OTHER_KERNELS:
        setattr(decoding, name, noop)
    python = best(step)
    print(f"the step of kernels without its matrix products: {no_matvec * 1e3:.2f} ms, of which")
    try:
        for name in OTHER_KERNELS:
            setattr(decoding, name, kernels[name])
            print(f"  {name:32s} {(best(step) - python) * 1e3:7.2f}")
            setattr(decoding, name, noop)
    finally:
        for name in OTHER_KERNELS:
            setattr(decoding, name, kernels[name])
        dec.layers, dec.lm_head_matvec, dec.fused = saved_layers, saved_head, fused
    print(f"  {'Python (loop, calls, np.add)':32s} {python * 1e3:7.2f}   "
          f"({python / model.config.n_layers * 1e6:.1f} us a layer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
