#!/usr/bin/env python
"""Where does a prompt's prefill go?  Per kind of matrix: time, GFLOP/s against this machine's sgemm; the other kernels.

    python benchmarks/profile_prefill.py [--gguf PATH] [--q8] [--dequantize] [--threads 1] [--prompt-tokens 128]

Loads the GGUF (default: SmolLM2-135M-Instruct Q4_1, as benchmarks/real_model.py; --q8 its Q8_0
copy) quantized (``Llama.from_pretrained(path, quantized=True)``, or float32 with --dequantize)
and times, in this one process, ``KVCacheDecoder.prefill`` of --prompt-tokens tokens (the blocks
of layers/block.py over the prompt, each layer's keys and values into the cache, the output head
on the last position only), best of --repeats; then the same prefills again with each function the
block calls wrapped in a timer, summed over the layers (mean of --repeats):

  * the projections (``matmuls``), by kind of matrix, with their GFLOP/s (2 x rows x weights) and
    the same product's rate on this thread with the weights already in the cache ("of sgemm": a
    float32 copy of the matrix, ``matmul_one_thread``; for quantized weights that is what their
    panels are multiplied by);
  * attention, RMSNorm, RoPE, SwiGLU, the cache store, the embedding rows;
  * the output head on the last position's row (a matrix-vector product, as a decoding step's);
  * the rest: the final RMSNorm, Python.

With one thread the times are the thread's CPU time (``time.thread_time``), which other processes
on a shared machine disturb far less than wall time; with more, wall time (and then the kernels'
times include waiting for the other threads).
"""
from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

BLOCK_KERNELS = ("attention_forward", "rmsnorm_forward_kernel", "rope_kernel", "swiglu_forward_kernel")
KINDS = ("wqkv", "wo", "w_gate_up", "w_down")


def main(argv=None) -> int:
    from benchmarks.profile_decode import load_model, model_arguments
    p = model_arguments(__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    path, model, clock = load_model(args)
    import numpy as np
    from npllama.engine.blas import BLAS, matmul_one_thread
    from npllama.generate import decoding
    from npllama.layers import block
    from npllama.layers.quantized_linear import dense
    P = args.prompt_tokens
    ids = np.arange(1, P + 1) % model.config.vocab_size
    dec = decoding.KVCacheDecoder(model, P)
    dec.prefill(ids)
    times = []
    for _ in range(args.repeats):
        t = clock()
        dec.prefill(ids)
        times.append(clock() - t)
    total = min(times)

    spent = collections.Counter()
    originals = {name: getattr(block, name) for name in BLOCK_KERNELS + ("matmuls",)}
    originals["kv_cache_store_kernel"] = decoding.kv_cache_store_kernel
    originals["embedding_rows"] = model_embedding = sys.modules["npllama.model"].embedding_rows
    kind_of = {tuple(model.layers[0][k].shape): k for k in KINDS}    # (the four shapes differ)

    def timed(name, fn):
        def wrapper(*a, **k):
            t = clock()
            out = fn(*a, **k)
            spent[name] += clock() - t
            return out
        return wrapper

    def matmuls(*products):
        t = clock()
        originals["matmuls"](*products)
        spent[kind_of.get(tuple(products[0][1].shape[::-1]), "other product")] += clock() - t
    try:
        for name in BLOCK_KERNELS:
            setattr(block, name, timed(name, originals[name]))
        block.matmuls = matmuls
        decoding.kv_cache_store_kernel = timed("kv_cache_store_kernel", originals["kv_cache_store_kernel"])
        sys.modules["npllama.model"].embedding_rows = timed("embedding_rows", model_embedding)
        t = clock()
        for _ in range(args.repeats):
            dec.prefill(ids)
        wrapped = (clock() - t) / args.repeats
    finally:
        for name in BLOCK_KERNELS + ("matmuls",):
            setattr(block, name, originals[name])
        decoding.kv_cache_store_kernel = originals["kv_cache_store_kernel"]
        sys.modules["npllama.model"].embedding_rows = model_embedding
    spent = {k: v / args.repeats for k, v in spent.items()}

    rng = np.random.default_rng(0)
    kind = "float32" if args.dequantize else ", ".join(sorted({getattr(layer["wqkv"], "qtype", "?")
                                                               for layer in model.layers}))
    print(f"{path.name} ({kind}), {args.threads} thread(s), {P}-token prefill; "
          f"{'CPU time of the thread' if args.threads == 1 else 'wall time'}; BLAS: {BLAS}")
    print(f"prefill {total * 1e3:.1f} ms ({P / total:.0f} tok/s, {total / P * 1e3:.2f} ms a token); "
          f"timed kernel by kernel {wrapped * 1e3:.1f} ms")
    print(f"{'':34s} {'ms':>8s} {'GFLOP/s':>8s} {'of sgemm':>8s}")
    flops_total = 0.0
    for k in KINDS:
        w = model.layers[0][k]
        shape = getattr(w, "shape")
        flops = 2.0 * P * shape[0] * shape[1] * len(model.layers)
        flops_total += flops
        dense_w = np.ascontiguousarray(dense(w, model.dtype))
        x = rng.standard_normal((P, shape[1])).astype(model.dtype)
        out = np.empty((P, shape[0]), dtype=model.dtype)
        matmul_one_thread(x, dense_w.T, out)
        hot = []
        for _ in range(10):
            t = time.thread_time()
            matmul_one_thread(x, dense_w.T, out)
            hot.append(time.thread_time() - t)
        sgemm = 2.0 * P * shape[0] * shape[1] / min(hot) / 1e9
        seconds = spent.get(k, 0.0)
        rate = flops / seconds / 1e9 if seconds else float("nan")
        label = f"{k} {shape[0]}x{shape[1]} x{len(model.layers)}"
        print(f"  {label:32s} {seconds * 1e3:8.1f} {rate:8.1f} "
              f"{rate / sgemm / args.threads:8.0%}")
    products = sum(spent.get(k, 0.0) for k in KINDS)
    print(f"  {'all projections':32s} {products * 1e3:8.1f} {flops_total / products / 1e9:8.1f}")
    for name in BLOCK_KERNELS + ("kv_cache_store_kernel", "embedding_rows", "other product"):
        if name in spent:
            print(f"  {name:32s} {spent[name] * 1e3:8.1f}")
    head, row = dec.lm_head, np.ones(model.config.dim, dtype=model.dtype)
    head_s = []
    for _ in range(args.repeats):
        t = clock()
        dec.lm_head_matvec(head, row, dec.logits)
        head_s.append(clock() - t)
    head_s = sum(head_s) / len(head_s)
    print(f"  {f'output head {head.shape[0]}x{head.shape[1]}, last row':32s} {head_s * 1e3:8.1f}")
    rest = wrapped - sum(spent.values()) - head_s
    print(f"  {'the rest (final norm, Python)':32s} {rest * 1e3:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
