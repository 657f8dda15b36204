"""Shared pieces of the benchmarks: configs, thread control, subprocess workers, FLOP counts, timing.

This module imports nothing heavy at import time (no numpy, no torch) so an entry point can import
it, read ``--threads`` and set the BLAS / OpenMP / Numba thread variables *before* numpy is loaded:
those libraries read their thread count once, when they are first imported.

Every measured framework runs in its own child process (``run_worker``), for three reasons:
thread variables are set in the child's environment before anything is imported, peak RSS
(VmHWM) belongs to that framework alone, and one framework's crash or missing module
cannot take the others down.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from npllama.memory import peak_rss_bytes   # (the standard library only: no NumPy started)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULT_MARKER = "BENCH_RESULT_JSON "

THREAD_ENV_VARS = ("NPLLAMA_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# The environment the benchmark was started with.  Children start from it rather than from
# os.environ as it is later (whatever the parent's imports set must not reach the workers).
LAUNCH_ENV = dict(os.environ)


# ---- model shapes ------------------------------------------------------------------------------

@dataclass
class ModelShape:
    """The shape of a Llama, with the same field names as ``npllama.LlamaConfig``.

    Kept here (rather than importing npllama's config) so the PyTorch workers never import npllama
    and the two frameworks' peak RSS stay separate.  What is derived from the shape (q_dim, kv_dim,
    the parameter count) is npllama's: ``npllama_config`` builds the LlamaConfig, which only the
    parent process and the npllama workers do.
    """
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = True
    head_dim: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    def npllama_kwargs(self) -> dict:
        """Keyword arguments for ``npllama.LlamaConfig``."""
        kw = asdict(self)
        if kw["head_dim"] == self.dim // self.n_heads:
            kw["head_dim"] = None
        return kw

    def npllama_config(self):
        """This shape as an ``npllama.LlamaConfig`` (imports npllama: never call it in a PyTorch worker)."""
        from npllama import LlamaConfig
        return LlamaConfig(**self.npllama_kwargs())

    def num_parameters(self) -> int:
        """All stored parameters (a tied embedding counted once), as npllama counts them."""
        return self.npllama_config().num_parameters()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelShape":
        return cls(**d)


@dataclass
class BenchConfig:
    name: str
    shape: ModelShape
    batch_size: int
    seq_len: int                      # training sequence length (= the model's context here)
    notes: str = ""


def _cfg(name, vocab, dim, layers, heads, kv_heads, hidden, context, batch, notes="", tied=True):
    shape = ModelShape(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                       hidden_dim=hidden, max_seq_len=context, tie_embeddings=tied)
    return BenchConfig(name=name, shape=shape, batch_size=batch, seq_len=context, notes=notes)


CONFIGS: dict[str, BenchConfig] = {
    c.name: c for c in (
        _cfg("default", 2048, 128, 4, 4, 4, 352, 128, 16, "`npllama train`'s default model (untied)", tied=False),
        _cfg("260K", 512, 64, 5, 8, 4, 172, 512, 8, "llama2.c's stories260K shape (GQA 8/4)"),
        _cfg("15M-v4k", 4096, 288, 6, 6, 6, 768, 256, 8, "stories15M body with a 4096-token vocab"),
        _cfg("15M", 32000, 288, 6, 6, 6, 768, 256, 8, "llama2.c's stories15M shape (Llama-2 vocab)"),
    )
}


def get_config(name: str) -> BenchConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise SystemExit(f"unknown --config {name!r}; choose one of {', '.join(CONFIGS)}") from None


# ---- threads --------------------------------------------------------------------------------------

def set_thread_env(threads: int, env: dict | None = None) -> dict:
    """Set npllama's thread variable and every BLAS/OpenMP one to ``threads`` in ``env`` (default os.environ).

    Must happen before numpy / numba / torch are imported in the process that uses ``env``.
    """
    env = os.environ if env is None else env
    for var in THREAD_ENV_VARS:
        env[var] = str(threads)
    return env


def child_env(threads: int) -> dict:
    env = set_thread_env(threads, dict(LAUNCH_ENV))
    # Let children import both `benchmarks` and `npllama` from the repository checkout.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def set_torch_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # only settable once, before any parallel work
    except RuntimeError:
        pass


# ---- child processes ------------------------------------------------------------------------------

def run_worker(script: Path, argv: list[str], threads: int, timeout: float = 3600.0,
               stream_stderr: bool = False) -> dict:
    """Run ``python script --worker ...`` in a fresh process; return its result dict.

    The worker prints one line ``BENCH_RESULT_JSON {...}``; anything else it prints is passed
    through to our stderr so warnings stay visible. A crash becomes ``{"error": ...}``.
    ``stream_stderr``: the worker's stderr goes straight to ours as it runs (a long worker's progress),
    instead of being kept for the error message.
    """
    cmd = [sys.executable, str(script), *argv]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=child_env(threads), stdout=subprocess.PIPE,
                              stderr=None if stream_stderr else subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s: {' '.join(cmd)}"}
    wall = time.perf_counter() - t0
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
        elif line.strip():
            print(f"  [{argv[1] if len(argv) > 1 else 'worker'}] {line}", file=sys.stderr)
    if result is None:
        tail = ("(its output is above)" if stream_stderr
                else "\n".join((proc.stderr or "").strip().splitlines()[-15:]))
        return {"error": f"worker exited with code {proc.returncode} and no result:\n{tail}"}
    result["process_wall_s"] = wall
    return result


def emit_result(result: dict) -> None:
    """Called in a worker: add its peak RSS and print the result line for the parent."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(RESULT_MARKER + json.dumps(result), flush=True)


def worker_main(fn, args) -> None:
    """Run ``fn(args)`` in a worker; turn an exception into an error result (with a clear message)."""
    try:
        result = fn(args)
    except Exception as e:  # reported to the parent, which prints it in the table
        import traceback
        traceback.print_exc(file=sys.stderr)
        result = {"error": f"{type(e).__name__}: {e}"}
    emit_result(result)


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB (npllama.memory.peak_rss_bytes: VmHWM on
    Linux, the figure of this framework's own process)."""
    return (peak_rss_bytes() or 0) / 2**20


def reset_peak_rss_mb() -> float:
    """Reset this process's peak resident memory to its current size (Linux: /proc/self/clear_refs)
    and return that size in MB: a later peak_rss_mb() minus it is what came after, not what an
    import's transient peak left.  Elsewhere (no /proc) the peak so far, unchanged."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return peak_rss_mb()


def import_npllama():
    """Import npllama or raise a RuntimeError that says what is missing."""
    try:
        import npllama
    except Exception as e:
        raise RuntimeError(f"npllama cannot be imported ({type(e).__name__}: {e})") from e
    missing = [name for name in ("Llama",) if not hasattr(npllama, name)]
    if missing:
        raise RuntimeError(f"npllama does not provide {missing} yet")
    return npllama


def import_framework(framework: str, threads: int):
    """In a worker: import numpy and then npllama, or PyTorch with ``benchmarks.torch_reference``
    (its thread counts set), timed.  Returns (npllama or torch_reference, seconds, peak RSS MB after)."""
    t0 = time.perf_counter()
    import numpy  # noqa: F401  (part of either framework's import cost)
    if framework == "npllama-after-torch":   # a notebook that compares: torch is imported first
        import torch  # noqa: F401
    if framework == "npllama-numpy-blas":    # npllama's matmuls by NumPy's BLAS even with MKL installed
        os.environ["NPLLAMA_BLAS"] = "numpy"
    if framework.startswith("npllama"):
        module = import_npllama()
    else:
        import torch  # noqa: F401
        from benchmarks import torch_reference as module
        set_torch_threads(threads)
    return module, time.perf_counter() - t0, peak_rss_mb()


def load_run(workdir: Path) -> tuple[dict, ModelShape]:
    """In a worker: the ``run.json`` the parent wrote, and its model shape."""
    run = json.loads((workdir / "run.json").read_text())
    return run, ModelShape.from_json(run["shape"])


def bench_parser(doc: str, config: str, threads: int) -> argparse.ArgumentParser:
    """An entry point's argument parser (its description: the first paragraph of ``doc``), with
    --config (default ``config``) and --threads (default ``threads``); ``parse_bench_args`` adds the
    other shared options after the script's own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=config, choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=threads,
                   help=f"threads for BLAS/OpenMP/Numba/torch (default {threads})")
    return p


def parse_bench_args(p: argparse.ArgumentParser, argv, frameworks) -> argparse.Namespace:
    """Add the options every benchmark shares (--frameworks, a comma-separated subset of
    ``frameworks``; --wait-idle; --json; and --worker/--workdir, which the parent passes to its
    children), parse ``argv`` and split --frameworks into a list (an unknown name is a usage error)."""
    p.add_argument("--frameworks", default=",".join(frameworks),
                   help=f"comma-separated subset of {','.join(frameworks)}")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each measured run, wait up to SECONDS for other processes to leave the CPUs "
                        "idle (< 0.3 CPU busy over 2 s); for shared machines")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write results as JSON to PATH (or stdout with no PATH; the table then goes to stderr)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    bad = [f for f in args.frameworks if f not in frameworks]
    if bad:
        p.error(f"unknown framework(s) {bad}; choose from {','.join(frameworks)}")
    return args


def npllama_model(npllama, shape: ModelShape, weights: dict | None = None):
    """``npllama.Llama`` of ``shape`` (float32); its parameters overwritten in place by ``weights``.

    Uses only the documented API: ``model.params`` are views into ``model.flat_params``, so
    assigning into them sets the model's weights.
    """
    import numpy as np
    model = npllama.Llama(shape.npllama_config(), seed=0, dtype=np.float32)
    if weights is not None:
        extra = sorted(set(weights) - set(model.params))
        missing = sorted(set(model.params) - set(weights))
        if extra or missing:
            raise RuntimeError(f"npllama model.params names differ from HF's: missing {missing[:5]}, "
                               f"unexpected {extra[:5]}")
        for name, value in weights.items():
            model.params[name][...] = value
    return model


def printer(args):
    """The entry point's ``say``: print to stdout, or to stderr when ``--json`` with no path sends
    the JSON to stdout."""
    out = sys.stderr if args.json == "-" else sys.stdout
    return lambda *a: print(*a, file=out, flush=True)


def say_header(say, bc: BenchConfig, run_line: str, threads: int) -> None:
    """What an entry point prints before it measures: the config (shape, parameter count), the
    script's ``run_line`` and, if other processes already use the CPUs, a warning."""
    s = bc.shape
    say(f"config {bc.name}: vocab {s.vocab_size}, dim {s.dim}, {s.n_layers} layers, "
        f"{s.n_heads}/{s.n_kv_heads} heads, hidden {s.hidden_dim}, tied={s.tie_embeddings}; "
        f"{s.num_parameters() / 1e6:.2f} M params")
    say(run_line)
    warning = busy_warning(threads)
    if warning:
        say(warning)


# ---- machine peak ---------------------------------------------------------------------------------

def matmul_peak_gflops(lib: str = "numpy", n: int = 2048, repeats: int = 20) -> dict:
    """Best-of-``repeats`` float32 GEMM rate (2·n³ FLOP per n×n @ n×n), in GFLOP/s.

    Uses whatever thread count the process was started with, so run it in a worker with the same
    ``--threads`` as the model it is compared with.
    """
    if lib == "numpy":
        import numpy as np
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        c = np.empty((n, n), dtype=np.float32)
        np.matmul(a, b, out=c)
        run = lambda: np.matmul(a, b, out=c)  # noqa: E731
    elif lib == "torch":
        import torch
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        c = torch.empty(n, n)
        torch.matmul(a, b, out=c)
        run = lambda: torch.matmul(a, b, out=c)  # noqa: E731
    else:
        raise ValueError(lib)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"lib": lib, "n": n, "gflops": 2 * n ** 3 / best / 1e9, "best_s": best}


def memory_read_gbs(mb: int = 256, repeats: int = 5) -> dict:
    """Best-of-``repeats`` rate at which one thread reads a ``mb`` MB float32 array from memory.

    The ceiling of batch-1 decoding, which reads every weight once per token: a Numba loop that
    only sums the array, far larger than any cache, in eight streams an eighth of it apart (one
    stream reaches ~11 GB/s on the project machine, four or eight ~17: more cache-line fetches in
    flight).  Single-threaded whatever the thread settings."""
    import numba
    import numpy as np

    @numba.njit(fastmath=True)
    def sum_in_eight_streams(a):
        q = a.size // 8
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
        for i in range(q):
            s0 += a[i]
            s1 += a[q + i]
            s2 += a[2 * q + i]
            s3 += a[3 * q + i]
            s4 += a[4 * q + i]
            s5 += a[5 * q + i]
            s6 += a[6 * q + i]
            s7 += a[7 * q + i]
        return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7

    a = np.ones(mb * (1 << 20) // 4, dtype=np.float32)
    sum_in_eight_streams(a)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sum_in_eight_streams(a)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"mb": mb, "gbs": a.nbytes / best / 1e9, "best_s": best}


# ---- FLOP counts ------------------------------------------------------------------------------------

def matmul_weight_count(shape: ModelShape) -> int:
    """Weights that take part in a matrix multiply, per token.

    All attention and MLP projections plus the output head (V·dim, whether tied or not). The input
    embedding is a row lookup (no FLOPs) and RMSNorm gains are elementwise, so neither is counted.
    """
    c = shape.npllama_config()
    d = c.dim
    per_layer = d * (c.q_dim + 2 * c.kv_dim) + c.q_dim * d + 3 * d * c.hidden_dim
    return c.n_layers * per_layer + c.vocab_size * d


def train_flops_per_token(shape: ModelShape, seq_len: int) -> int:
    """Model FLOPs of one training token (forward + backward), PaLM's formula (Chowdhery et al. 2022, App. B).

        6·N + 12·L·H·hd·T

    N = ``matmul_weight_count`` (2 FLOP per weight forward, 4 backward: grads of inputs and weights).
    12·L·H·hd·T counts QKᵀ and A·V (2·2·H·hd·T per token forward, ×3 with backward) over the
    *full* T×T score matrix: it is NOT halved for the causal mask (PaLM and nanoGPT's MFU do the
    same). Counting only the causal half would subtract 6·L·H·hd·T. Elementwise work (norms,
    RoPE, softmax, SiLU, loss, optimizer) is not counted: these are "model FLOPs", not
    hardware FLOPs, so recomputation or wasted work earns nothing.
    """
    return 6 * matmul_weight_count(shape) + 12 * shape.n_layers * shape.npllama_config().q_dim * seq_len


def decode_flops_per_token(shape: ModelShape, context_len: float) -> float:
    """Forward FLOPs of one decoded token that attends to ``context_len`` cached positions.

        2·N + 4·L·H·hd·t      (QKᵀ and A·V against t keys; causal by construction)
    """
    return 2 * matmul_weight_count(shape) + 4 * shape.n_layers * shape.npllama_config().q_dim * context_len


# ---- timing ---------------------------------------------------------------------------------------------

@dataclass
class StepTimes:
    warmup_s: list = field(default_factory=list)   # first calls: Numba JIT / torch.compile / caches
    step_s: list = field(default_factory=list)     # timed calls after warm-up (wall clock)
    cpu_s: list = field(default_factory=list)      # CPU time of this process (all threads) per timed call
    others_cpus: float | None = None               # mean CPUs used by *other* processes while timing

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    def to_json(self) -> dict:
        return {"warmup_s": self.warmup_s, "step_s": self.step_s, "median_s": self.median_s,
                "min_s": min(self.step_s), "max_s": max(self.step_s),
                "warmup_total_s": sum(self.warmup_s),
                "cpu_s": self.cpu_s, "median_cpu_s": statistics.median(self.cpu_s),
                "others_cpus": self.others_cpus, "loadavg_after": os.getloadavg()[0]}


def time_calls(fn, warmup: int, steps: int, sync=None) -> StepTimes:
    """Call ``fn(i)`` ``warmup`` times then ``steps`` times, timing each call with perf_counter.

    CPU time (time.process_time, summed over the process's threads) is kept too: on a machine that
    other jobs share, wall time grows with their load while CPU time per step mostly does not.
    """
    out = StepTimes()
    busy0 = None
    for i in range(warmup + steps):
        if i == warmup:
            busy0, own0, wall0 = system_busy_seconds(), time.process_time(), time.perf_counter()
        c0, t0 = time.process_time(), time.perf_counter()
        fn(i)
        if sync is not None:
            sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i < warmup:
            out.warmup_s.append(dt)
        else:
            out.step_s.append(dt)
            out.cpu_s.append(dc)
    busy1 = system_busy_seconds()
    if busy0 is not None and busy1 is not None:
        wall = time.perf_counter() - wall0
        others = (busy1 - busy0) - (time.process_time() - own0)
        out.others_cpus = max(others, 0.0) / wall if wall > 0 else None
    return out


def system_busy_seconds() -> float | None:
    """CPU-seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere.

    busy = user + nice + system + irq + softirq + steal (steal: time the hypervisor gave to others).
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait_s: float, busy_cpus: float = 0.3, window_s: float = 2.0) -> float | None:
    """Wait (at most ``max_wait_s``) until the machine's CPUs are used less than ``busy_cpus`` CPUs'
    worth over a ``window_s`` window; return the last measured usage (CPUs), None if unmeasurable."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = system_busy_seconds(), time.perf_counter()
        if b0 is None:
            return None
        time.sleep(window_s)
        used = (system_busy_seconds() - b0) / (time.perf_counter() - t0)
        if used < busy_cpus or time.monotonic() >= deadline:
            return used


# ---- reporting ------------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "loadavg": os.getloadavg()}


def busy_warning(threads: int) -> str | None:
    """A warning when other processes already use the CPUs (timings would then be low and noisy)."""
    used = wait_for_idle(0.0, window_s=1.0)
    if used is None:
        used = os.getloadavg()[0]
    if (os.cpu_count() or 1) - used < threads - 0.25:
        return (f"WARNING: other processes are using {used:.1f} of {os.cpu_count()} CPUs: wall-clock figures will "
                f"be low and noisy (see the 'others' column; --wait-idle SECONDS waits for a quiet machine)")
    return None


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). Missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                line.append("-")
            else:
                line.append(format(v, fmt) if fmt else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """The rows as a Markdown table; columns as in ``format_table``. Missing values print as '-'."""
    def cell(r, key, fmt):
        v = r.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return (format(v, fmt) if fmt else str(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if fmt in ("", "s") else "---:" for _, _, fmt in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, key, fmt) for key, _, fmt in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    """Write JSON atomically ('-' = stdout)."""
    text = json.dumps(payload, indent=2, sort_keys=False)
    if path == "-":
        print(text)
        return
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


# ---- weights shared by every framework -------------------------------------------------------------------

def make_weights(shape: ModelShape, seed: int = 0, zero_bos_logit: bool = False) -> dict:
    """Random Llama weights in Hugging Face names/shapes (float32 numpy), the same for every framework.

    N(0, 0.02) for embeddings and projections, o_proj/down_proj scaled by 1/sqrt(2·L) (GPT-2),
    RMSNorm gains 1. ``zero_bos_logit`` zeroes row 1 of the (tied) output head so token 1 (BOS) is
    never the argmax: llama2.c's run.c stops generating at BOS, the others do not, and a decode
    benchmark must generate the same number of tokens everywhere.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    d, h, L = shape.dim, shape.hidden_dim, shape.n_layers
    cfg = shape.npllama_config()
    q_dim, kv_dim = cfg.q_dim, cfg.kv_dim

    def normal(*s, std=0.02):
        return (rng.standard_normal(s, dtype=np.float32) * np.float32(std)).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(shape.vocab_size, d)}
    out_std = 0.02 / math.sqrt(2 * L)
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(q_dim, d)
        w[p + "self_attn.k_proj.weight"] = normal(kv_dim, d)
        w[p + "self_attn.v_proj.weight"] = normal(kv_dim, d)
        w[p + "self_attn.o_proj.weight"] = normal(d, q_dim, std=out_std)
        w[p + "mlp.gate_proj.weight"] = normal(h, d)
        w[p + "mlp.up_proj.weight"] = normal(h, d)
        w[p + "mlp.down_proj.weight"] = normal(d, h, std=out_std)
        w[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
    w["model.norm.weight"] = np.ones(d, np.float32)
    if not shape.tie_embeddings:
        w["lm_head.weight"] = normal(shape.vocab_size, d)
    if zero_bos_logit:
        w["model.embed_tokens.weight"][1] = 0.0
        if "lm_head.weight" in w:
            w["lm_head.weight"][1] = 0.0
    return w


def save_weights(path: Path, weights: dict) -> None:
    from safetensors.numpy import save_file
    tmp = Path(str(path) + ".tmp")
    save_file(weights, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_weights(path: Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(path))


def random_batches(vocab_size: int, batch_size: int, seq_len: int, count: int, seed: int = 1234):
    """``count`` (inputs, targets) pairs of random int64 tokens, shape (B, T); targets = inputs shifted."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        toks = rng.integers(0, vocab_size, size=(batch_size, seq_len + 1), dtype=np.int64)
        out.append((np.ascontiguousarray(toks[:, :-1]), np.ascontiguousarray(toks[:, 1:])))
    return out
