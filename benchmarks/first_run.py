"""A first run's wall time from cold caches: ``npllama train --steps 3`` with an empty Numba cache
(NUMBA_CACHE_DIR a fresh directory), the corpus cache off and a fresh run directory, so it compiles
every kernel and trains the tokenizer, as the very first run on a machine does.

    python benchmarks/first_run.py                      # this tree, 3 rounds
    python benchmarks/first_run.py --trees A B --rounds 3   # alternate two source trees (A/B)

Each run is a process of its own.  Printed per run: the wall seconds, the run's own setup line
(where the time before the first step went), the CPU seconds of the run and every process it
started, and the load average before it (the machine may be shared: alternate A and B and read the
ratios).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_root(tree: Path) -> Path:
    """The directory to put on PYTHONPATH: the tree's src/ in the src layout, else the tree."""
    return tree / "src" if (tree / "src" / "npllama").is_dir() else tree


def cold_run(tree: Path, steps: int, threads: int | None, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="npllama-first-run-") as tmp:
        env = dict(os.environ, PYTHONPATH=str(package_root(tree)), NUMBA_CACHE_DIR=f"{tmp}/numba",
                   NPLLAMA_CACHE=f"{tmp}/cache", NPLLAMA_CORPUS_CACHE="0")
        cmd = [sys.executable, "-m", "npllama.cli", "train", "--steps", str(steps), "--no-progress",
               "--out-dir", f"{tmp}/run", *extra]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: npllama train failed:\n{proc.stderr[-2000:]}")
    setup = re.search(r"^setup .*$", proc.stdout + proc.stderr, re.M)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": load, "setup": setup.group(0) if setup else "?"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="source trees, run in turn each round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("extra", nargs="*", help="more arguments for npllama train (after --)")
    args = ap.parse_args(argv)
    walls = {tree: [] for tree in args.trees}
    for r in range(args.rounds):
        for tree in args.trees:
            res = cold_run(tree, args.steps, args.threads, args.extra)
            walls[tree].append(res["wall"])
            print(f"round {r + 1} {tree}: wall {res['wall']:.1f}s  cpu {res['cpu']:.1f}s  "
                  f"load {res['load']:.2f}  | {res['setup']}", flush=True)
    for tree, w in walls.items():
        print(f"{tree}: wall s {', '.join(f'{x:.1f}' for x in w)}; median {sorted(w)[len(w) // 2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
