#!/usr/bin/env python
"""Data-parallel training on MPI: measured on this machine, modelled for many machines.

    python benchmarks/mpi_scaling.py                       # default `npllama train` model and 15M-v4k
    python benchmarks/mpi_scaling.py --configs default --steps 20 --json results.json

Measured (each in fresh processes, threads set before NumPy starts):
  1. tokens/s of the real training step (npllama.train: this rank's share of the batch,
     forward_backward with its bucketed all-reduce, clipping, AdamW) on 1 rank x 2 threads and on
     2 ranks x 1 thread (`mpiexec -n 2`), same global batch; bytes all-reduced and seconds waited
     per step;
  2. all-reduce bandwidth between two ranks (MPI_Allreduce of float32 buffers from 4 kB to 64 MB):
     algorithm bandwidth = bytes / time.

Modelled: R machines, each with this machine's step time t_c for its own batch (weak scaling, as
`mpiexec -n R npllama train --batch-size B*R`), joined by a link of L Gbit/s.  A ring all-reduce of
S gradient bytes sends 2 (R-1)/R S bytes per machine, so t_comm = 2 (R-1)/R S / (L/8) + 2 (R-1) a
(a = latency per message, 50 us).  Without overlap the step takes t_c + t_comm; the bucketed
reduction hides up to the backward's share (~2/3 of t_c), so t_c + max(0, t_comm - 2/3 t_c) is the
optimistic bound.  --grad-accum K does K micro-batches per all-reduce: K t_c of work for the same S.
Efficiency = (R x one machine's tokens/s) / (the job's tokens/s) = t_c K / (t_c K + exposed comm).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from benchmarks import common  # noqa: E402  (imports nothing heavy)

SCRIPT = Path(__file__).resolve()
LATENCY_S = 50e-6
MACHINES = (2, 4, 8, 16, 32, 64)


def step_setup(name: str, batch_size: int | None, seq_len: int | None):
    """(LlamaConfig, batch, seq_len) of a benchmark config; "default" is `npllama train`'s own."""
    from npllama.train.config import TrainConfig, model_config
    if name == "default":
        cfg = TrainConfig()
        shape, batch, seq = model_config(cfg, cfg.vocab_size), cfg.batch_size, cfg.seq_len
    else:
        bc = common.get_config(name)
        shape, batch, seq = bc.shape.npllama_config(), bc.batch_size, bc.seq_len
    return shape, batch_size or batch, seq_len or seq


def worker_step(args) -> dict | None:
    """Training steps under this process's World (one rank, or a rank of mpiexec)."""
    import numpy as np

    from npllama import Llama
    from npllama.data import BatchSampler
    from npllama.engine.threads import get_threads
    from npllama.optim import AdamW, clip_grad_norm
    from npllama.train.distributed import current_world, local_batches
    from npllama.train.loop import forward_backward

    world = current_world()
    shape, batch, seq = step_setup(args.config, args.batch_size, args.seq_len)
    model = Llama(shape, seed=0, dtype=np.float32)
    tokens = np.random.default_rng(0).integers(0, shape.vocab_size, 200_000).astype(np.uint16)
    sampler = BatchSampler(tokens, batch, seq, seed=1)
    optimizer = AdamW(model.params, 1e-3, flat_params=model.flat_params)
    grad_buffer = np.empty_like(model.flat_params) if args.grad_accum > 1 else None
    times, waits, sent = [], [], []
    for i in range(args.warmup + args.steps):
        world.sum_int(0, "lining the ranks up")
        world.step_report()
        t0 = time.perf_counter()
        _, grads = forward_backward(model, local_batches(sampler, args.grad_accum, world), grad_buffer, world)
        clip_grad_norm(grads, 1.0)
        optimizer.step(flat_grads=grads, lr=1e-3)
        seconds = time.perf_counter() - t0
        report = world.step_report()
        if i >= args.warmup:
            times.append(seconds)
            waits.append(report.get("comm_wait_seconds", 0.0))
            sent.append(report.get("comm_bytes", 0))
    if not world.root:
        return None
    step = float(np.median(times))
    return {"config": args.config, "ranks": world.size, "threads": get_threads(),
            "tokens_per_step": batch * seq * args.grad_accum, "step_seconds": step,
            "tokens_per_second": batch * seq * args.grad_accum / step, "comm_wait_seconds": float(np.median(waits)),
            "comm_bytes": int(np.median(sent)), "gradient_bytes": int(model.flat_grads.nbytes),
            "parameters": int(model.num_parameters())}


def worker_allreduce(args) -> dict | None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    sizes = [4 << 10 << (2 * i) for i in range(8)]   # 4 kB .. 64 MB
    out = []
    for nbytes in sizes:
        buf = np.ones(nbytes // 4, dtype=np.float32)
        repeats = max(3, min(200, (64 << 20) // nbytes))
        times = []
        for _ in range(repeats + 1):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - t0)
        t = float(np.median(times[1:]))
        out.append({"bytes": nbytes, "seconds": t, "gbytes_per_second": nbytes / t / 1e9})
    return {"allreduce": out} if comm.Get_rank() == 0 else None


def launch(args, worker: str, ranks: int, threads: int, extra=()) -> dict:
    """Run a worker on ``ranks`` processes of ``threads`` threads each; rank 0's result."""
    cmd = [sys.executable, str(SCRIPT), "--worker", worker, "--config", args.config_name, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--grad-accum", str(args.grad_accum), *extra]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.seq_len:
        cmd += ["--seq-len", str(args.seq_len)]
    if ranks > 1:
        cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, env=common.child_env(threads), capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith(common.RESULT_MARKER):
            return json.loads(line[len(common.RESULT_MARKER):])
    tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
    raise SystemExit(f"{worker} on {ranks} rank(s) failed (code {proc.returncode}):\n{tail}")


def model_efficiency(step_seconds: float, gradient_bytes: int, machines: int, gbit: float, accum: int,
                     overlap: bool) -> float:
    """Modelled efficiency of ``machines`` machines (see the module docstring)."""
    compute = accum * step_seconds
    comm = 2 * (machines - 1) / machines * gradient_bytes / (gbit * 1e9 / 8) + 2 * (machines - 1) * LATENCY_S
    exposed = max(0.0, comm - 2 / 3 * step_seconds) if overlap else comm
    return compute / (compute + exposed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="default,15M-v4k", help="comma-separated: default (npllama train's model) "
                   f"and/or {', '.join(common.CONFIGS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (Numba compiles)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch")
    p.add_argument("--seq-len", type=int, default=None, help="override the config's context")
    p.add_argument("--links", default="10,25", help="link speeds to model, Gbit/s")
    p.add_argument("--json", metavar="PATH", default=None, help="write all results as JSON")
    p.add_argument("--worker", choices=("step", "allreduce"), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        fn = worker_step if args.worker == "step" else worker_allreduce
        result = fn(args)
        if result is not None:
            common.emit_result(result)
        return
    results = {"machine": common.machine_info(2), "configs": []}
    for name in args.configs.split(","):
        args.config_name = name
        one = launch(args, "step", ranks=1, threads=2)
        two = launch(args, "step", ranks=2, threads=1)
        results["configs"].append({"name": name, "1x2": one, "2x1": two})
        print(f"{name}: {one['parameters'] / 1e6:.2f}M parameters, {one['tokens_per_step']} tokens/step, "
              f"gradient {one['gradient_bytes'] / 1e6:.1f} MB")
        print(f"  1 rank x 2 threads: {one['tokens_per_second']:9,.0f} tokens/s  ({one['step_seconds'] * 1e3:.1f} ms/step)")
        print(f"  2 ranks x 1 thread: {two['tokens_per_second']:9,.0f} tokens/s  ({two['step_seconds'] * 1e3:.1f} ms/step, "
              f"waiting {two['comm_wait_seconds'] * 1e3:.1f} ms on {two['comm_bytes'] / 1e6:.1f} MB all-reduced)")
    args.config_name = args.configs.split(",")[0]
    bandwidth = launch(args, "allreduce", ranks=2, threads=1)["allreduce"]
    results["allreduce"] = bandwidth
    print("all-reduce between two ranks on this machine:")
    for row in bandwidth:
        print(f"  {row['bytes'] / 1e6:8.3f} MB  {row['seconds'] * 1e3:8.3f} ms  {row['gbytes_per_second']:6.2f} GB/s")
    print("modelled efficiency, R machines like this one (weak scaling: each its own batch), "
          "no overlap / overlap with the backward:")
    rows = []
    for c in results["configs"]:
        one = c["1x2"]
        for gbit in map(float, args.links.split(",")):
            for accum in (1, 4, 16):
                effs = [(model_efficiency(one["step_seconds"], one["gradient_bytes"], r, gbit, accum, False),
                         model_efficiency(one["step_seconds"], one["gradient_bytes"], r, gbit, accum, True))
                        for r in MACHINES]
                rows.append({"config": c["name"], "gbit": gbit, "grad_accum": accum,
                             "efficiency": dict(zip(MACHINES, effs))})
                print(f"  {c['name']:>8} {gbit:4.0f} Gbit/s  grad-accum {accum:2d}: " + "  ".join(
                    f"{r}: {a:4.0%}/{b:4.0%}" for r, (a, b) in zip(MACHINES, effs)))
    results["model"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
