"""Micro-benchmark of causal GQA attention, forward and backward, at the training shapes.

    python benchmarks/attention_micro.py                 # both shapes, 1 and 2 threads, + torch
    python benchmarks/attention_micro.py --shape 260K --threads 2 --no-torch
    python benchmarks/attention_micro.py --impl-file old_attention.py   # time another version

Times ``npllama.layers.attention.attention_forward`` / ``attention_backward`` in float32 on the
tensors the model hands them: q and k contiguous (RoPE output), v a strided view into the fused
qkv activation, do a strided view of the merged-heads gradient and dv written into a strided view
of the dqkv buffer.  When torch is importable, ``F.scaled_dot_product_attention(is_causal=True,
enable_gqa=True)`` forward and backward is timed beside it on the same shapes.

Each (framework, thread count) runs in its own child process with every thread variable set
before numpy / numba / torch are imported: the libraries read them once, and an OpenMP pool left
spinning by one framework would otherwise slow the other.  Reported: median milliseconds over
``--repeats`` calls after a warm-up that includes Numba compilation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# name -> (B, H, K, T, hd): the attention shapes of the default, 260K and 15M training configs
SHAPES = {
    "default": (16, 4, 4, 128, 32),
    "260K": (8, 8, 4, 512, 8),
    "15M": (8, 6, 6, 256, 48),
}
THREAD_ENV_VARS = ("NPLLAMA_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def median_ms(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def model_layout_inputs(np, shape, dtype, seed=0):
    """q, k contiguous (as ``rope_forward`` returns them); v, do strided views of one q/k/v array.
    (``decoder_block_forward_rows`` passes q and k as strided views too, rotated in place.)"""
    B, H, K, T, hd = shape
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, (H + 2 * K) * hd)).astype(dtype)
    q = np.ascontiguousarray(qkv[..., :H * hd].reshape(B, T, H, hd).transpose(0, 2, 1, 3))
    k = np.ascontiguousarray(qkv[..., H * hd:(H + K) * hd].reshape(B, T, K, hd).transpose(0, 2, 1, 3))
    v = qkv[..., (H + K) * hd:].reshape(B, T, K, hd).transpose(0, 2, 1, 3)
    do = rng.standard_normal((B, T, H * hd)).astype(dtype).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    dqkv = np.empty_like(qkv)
    dv = dqkv[..., (H + K) * hd:].reshape(B, T, K, hd).transpose(0, 2, 1, 3)
    return q, k, v, do, dv


def load_attention(impl_file):
    """npllama's attention module, or the module in ``impl_file`` (same two functions) to compare."""
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(REPO_ROOT / "src"))
    if not impl_file:
        from npllama.layers import attention
        return attention
    import importlib.util
    spec = importlib.util.spec_from_file_location("attention_under_test", impl_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # (Numba's cache looks the module up by name)
    spec.loader.exec_module(module)
    return module


def worker_npllama(shape, repeats, impl_file=None):
    import numpy as np

    from npllama.engine.threads import get_threads
    attention = load_attention(impl_file)
    attention_forward, attention_backward = attention.attention_forward, attention.attention_backward
    q, k, v, do, dv = model_layout_inputs(np, shape, np.float32)
    _, cache = attention_forward(q, k, v)
    fwd = median_ms(lambda: attention_forward(q, k, v), repeats)
    bwd = median_ms(lambda: attention_backward(do, cache, dv=dv), repeats)
    return {"fwd_ms": fwd, "bwd_ms": bwd, "threads": get_threads()}


def worker_torch(shape, repeats):
    import numpy as np
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    q, k, v, do, _ = (torch.from_numpy(np.ascontiguousarray(a)) if a is not None else None
                      for a in model_layout_inputs(np, shape, np.float32))
    # torch's own layout for this: (B, T, 3 heads-blocks) projections viewed as (B, H, T, hd)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    with torch.no_grad():
        fwd = median_ms(sdpa, repeats)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        sdpa().backward(do)
    both = median_ms(fwd_bwd, repeats)
    # backward alone = (forward with graph + backward) - forward
    return {"fwd_ms": fwd, "bwd_ms": both - fwd, "threads": torch.get_num_threads()}


def run_child(impl, shape_name, threads, repeats, impl_file=None):
    env = dict(os.environ)
    for var in THREAD_ENV_VARS:
        env[var] = str(threads)
    cmd = [sys.executable, __file__, "--worker", impl, "--shape", shape_name, "--repeats", str(repeats)]
    if impl_file:
        cmd += ["--impl-file", impl_file]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), action="append")
    ap.add_argument("--threads", type=int, action="append")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--impl-file", help="time the attention_forward/backward of this file instead")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", choices=["npllama", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        if args.worker == "npllama":
            result = worker_npllama(SHAPES[args.shape[0]], args.repeats, args.impl_file)
        else:
            result = worker_torch(SHAPES[args.shape[0]], args.repeats)
        print(json.dumps(result))
        return

    impls = ["npllama"]
    if not args.no_torch:
        try:
            import importlib.util
            if importlib.util.find_spec("torch") is not None:
                impls.append("torch")
        except Exception:
            pass
    rows = []
    print(f"{'shape':6} {'(B,H,K,T,hd)':20} {'impl':8} {'thr':>3} {'fwd ms':>9} {'bwd ms':>9} {'total':>9}")
    for shape_name in args.shape or ["default", "260K", "15M"]:
        for threads in args.threads or [1, 2]:
            for impl in impls:
                r = run_child(impl, shape_name, threads, args.repeats, args.impl_file)
                r.update(shape=shape_name, impl=impl, requested_threads=threads)
                rows.append(r)
                if "error" in r:
                    print(f"{shape_name:6} {str(SHAPES[shape_name]):20} {impl:8} {threads:3} error: {r['error']}")
                else:
                    print(f"{shape_name:6} {str(SHAPES[shape_name]):20} {impl:8} {threads:3} "
                          f"{r['fwd_ms']:9.2f} {r['bwd_ms']:9.2f} {r['fwd_ms'] + r['bwd_ms']:9.2f}", flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
