"""A first run's Numba kernels compiled on two cores instead of one.

The first run on a machine (or after npllama's kernels changed) compiles ~20 Numba kernels, ~10 s
of one core before its first step; later runs load them from Numba's on-disk cache in well under a
second.  Numba compiles one function at a time in a process (its compiler lock), but a kernel that
one process compiled and saved is loaded, not compiled, by another process that asks for it later.
So a fresh run whose kernels are not all cached yet starts a second process (``start``) that
compiles the kernels the run needs *last* -- the backward's, AdamW's and generation's -- while the
run itself tokenizes the corpus and compiles the forward's (its step-0 evaluation).  Before its
first backward the run waits for that process to say that the training step's kernels are done
(``Precompiler.wait("step")``), and before its first sample for the rest (``wait("all")``); it
loads what the process made.

How the second process gets exactly the kernels the run will ask for (Numba compiles one version
per argument types: dtype, number of dimensions, memory layout, which optional arguments are
None): it runs the real code -- one training step, AdamW, one sample -- of a tiny model of the
run's dtype, dropout and LoRA settings, with the forward-only kernels swapped for stand-ins that
compile nothing (``FORWARD_ONLY``: the run compiles those itself; the values are garbage, only the
types matter).  tests/test_precompile.py checks that after it a real step compiles only forward
kernels.

A marker file next to Numba's cache (``marker_path``) records that the second process finished
for this npllama source, Numba, Python, dtype and options; with it, later runs start no second
process.  It is skipped for one thread (``--threads 1`` asks for one core), under MPI (each rank
compiles on its own core anyway) and with ``NPLLAMA_PRECOMPILE=0``.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np

from .. import model
from ..caches import numba_cache_dir
from ..config import LlamaConfig
from ..generate import decoding
from ..layers import block, cross_entropy
from ..layers.attention import block_size
from ..layers.kv_cache import matvec_kernel, matvec_parallel_kernel
from ..optim import AdamW, clip_grad_norm

PACKAGE_DIR = Path(__file__).resolve().parent.parent
ENV_SWITCH = "NPLLAMA_PRECOMPILE"


# ---- the run's side ----------------------------------------------------------------------------
def kernel_spec(dtype: str, dropout: float, lora_rank: int | None, lora_targets, lora_dropout: float,
                sample_temperature: float, sample_top_k: int | None) -> dict:
    """What decides which kernel versions a run compiles (not its sizes: Numba compiles per type)."""
    lora = None
    if lora_rank is not None:
        targets = lora_targets.split(",") if isinstance(lora_targets, str) else list(lora_targets)
        lora = {"targets": sorted(targets), "dropout": lora_dropout > 0}
    return {"dtype": dtype, "dropout": dropout > 0, "lora": lora,
            "sample": {"temperature": sample_temperature > 0, "top_k": sample_top_k is not None}}


def marker_path(spec: dict) -> Path:
    """The file that says the kernels of ``spec`` are cached: in Numba's cache directory
    (caches.numba_cache_dir).  Where it cannot be written every run starts
    the second process, which then only loads what is cached."""
    stamps = sorted((str(p.relative_to(PACKAGE_DIR)), p.stat().st_mtime_ns, p.stat().st_size)
                    for p in PACKAGE_DIR.rglob("*.py"))
    key = json.dumps([spec, stamps, str(PACKAGE_DIR), numba.__version__, sys.version,
                      str(numba_cache_dir()), os.environ.get("NUMBA_CPU_FEATURES", "")], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return numba_cache_dir() / f"npllama-precompiled-{digest}"


STEP_DONE = b"step\n"   # what the second process prints once a training step's kernels are cached


class Precompiler:
    """The second process, while it runs."""

    def __init__(self, process: subprocess.Popen, marker: Path):
        self.process, self.marker = process, marker
        self.waited_seconds = 0.0
        self.step_done = False
        self.failed: int | None = None   # its exit code, when it ended without doing its work

    def wait(self, what: str = "all", timeout: float = 300.0) -> None:
        """Until the second process has compiled a training step's kernels (``what="step"``) or
        everything and exited ("all").  It only compiles: if it fails or takes longer than
        ``timeout``, the run compiles the rest itself.  The seconds spent here add to
        ``waited_seconds``."""
        t0 = time.monotonic()
        if what == "step" and not self.step_done:
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            self.step_done = True   # (or it ended, or timed out: no more waiting for this)
            if not ready or self.process.stdout.readline() != STEP_DONE:
                self._give_up()
        elif what == "all" and self.process.poll() is None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._give_up()
        if self.failed is None and self.process.poll():
            self.failed = self.process.returncode
        self.waited_seconds += time.monotonic() - t0

    def _give_up(self) -> None:
        self.stop()
        self.failed = self.process.returncode

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def start(spec: dict, threads: int) -> Precompiler | None:
    """Start the second process when it can help: two threads or more, not every kernel of ``spec``
    cached yet (no marker), and not switched off (NPLLAMA_PRECOMPILE=0)."""
    if threads < 2 or os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    marker = marker_path(spec)
    if marker.exists():
        return None
    env = dict(os.environ, NPLLAMA_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_DIR.parent)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    process = subprocess.Popen([sys.executable, "-m", "npllama.train.precompile", json.dumps(spec), str(marker)],
                               env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    return Precompiler(process, marker)


# ---- the second process's side -------------------------------------------------------------------
def _attention_forward_types_only(q, k, v, o, tiles):
    """attention_forward's outputs and cache, of the right types, with no kernel run."""
    for t in tiles:
        t[...] = 0.0
    o[...] = 0.0
    return o, (q, tuple(tiles), block_size(q.shape[3], q.shape[2]), o, np.zeros(q.shape[:3], dtype=q.dtype))


def _nothing(*args, **kwargs):
    return None


def forward_only():
    """(module, name, stand-in) of every kernel the forward pass calls and no later part of a step
    needs with other types: the run compiles these itself, the second process skips them."""
    return [(block, "rmsnorm_forward_kernel", _nothing), (model, "rmsnorm_forward_kernel", _nothing),
            (block, "rope_kernel", _nothing), (block, "swiglu_forward_kernel", _nothing),
            (block, "attention_forward", _attention_forward_types_only),
            (cross_entropy, "cross_entropy_kernel", _nothing),
            # a decoding step runs the same row kernels on one row, with the same types
            (decoding, "rmsnorm_row", _nothing), (decoding, "rope_row", _nothing),
            (decoding, "swiglu_row", _nothing)]


def compile_late_kernels(spec: dict, on_step_done=lambda: None) -> None:
    """Compile (or load from the cache) what a run of ``spec`` needs after its forward: one training
    step of a tiny model with the forward-only kernels swapped out and AdamW with clipping (then
    ``on_step_done()``), and a sample."""
    dtype = np.dtype(spec["dtype"])
    cfg = LlamaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8, max_seq_len=8,
                      dropout=0.5 if spec["dropout"] else 0.0)
    tiny = model.Llama(cfg, dtype=dtype, seed=0)
    if spec["lora"] is not None:
        tiny.add_lora(2, 4.0, spec["lora"]["targets"], 0.5 if spec["lora"]["dropout"] else 0.0, seed=0)
    tiny.train()
    tokens = np.arange(8, dtype=np.int64).reshape(2, 4)
    swapped = [(module, name, getattr(module, name), stand_in) for module, name, stand_in in forward_only()]
    with np.errstate(all="ignore"):
        try:
            for module, name, _, stand_in in swapped:
                setattr(module, name, stand_in)
            tiny.loss_and_grad(tokens, tokens, copy=False)
            tiny.flat_grads[:] = 1.0             # (a norm above 1.0: clipping scales, compiling that too)
            clip_grad_norm(tiny.flat_grads, 1.0)
            AdamW(tiny.trainable_params, 1e-3, weight_decay=0.1, flat_params=tiny.flat_trainable).step(
                flat_grads=tiny.flat_grads, lr=1e-3)
            on_step_done()
            tiny.eval()
            sample = spec["sample"]
            tiny.generate(np.array([1]), 2, temperature=0.8 if sample["temperature"] else 0.0,
                           top_k=4 if sample["top_k"] else None, seed=0)
        finally:
            for module, name, kernel, _ in swapped:
                setattr(module, name, kernel)
        w, x, out = np.zeros((4, 4), dtype=dtype), np.zeros(4, dtype=dtype), np.zeros(4, dtype=dtype)
        matvec_kernel(w, x, out)            # which of the two a run's sample takes depends on its sizes
        matvec_parallel_kernel(w, x, out)


def main(argv: list[str]) -> int:
    spec, marker = json.loads(argv[0]), Path(argv[1])

    def say_step_done():
        sys.stdout.buffer.write(STEP_DONE)
        sys.stdout.flush()
    compile_late_kernels(spec, say_step_done)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(spec) + "\n", encoding="utf-8")
    except OSError:
        pass   # (no marker: the next run starts this again, and finds everything cached)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
