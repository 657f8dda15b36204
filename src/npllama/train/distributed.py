"""Data-parallel training on MPI (through mpi4py): R processes ("ranks"), on one machine or many,
train one model and get the numbers of one process.

    mpiexec -n 4 npllama train --threads 1 ...          # 4 ranks, one thread each
    mpiexec -n 8 -f hostfile npllama train ...          # the same across machines

The global batch.  An optimizer step takes K*B windows (``--grad-accum`` K x ``--batch-size`` B).
Every rank draws the starts of all K*B windows from its copy of the one data sampler, so the data
order does not depend on R, and cuts out its own share, windows [r*KB/R, (r+1)*KB/R)
(``local_batches``), in micro-batches of at most B windows.  The loss is the mean over the N kept
targets of the global batch; micro-batch k, on whichever rank, holds M_k of them:

    L = sum_k (M_k/N) L_k          g = sum_k (M_k/N) g_k          (N = sum_k M_k, all-reduced first)

So each rank back-propagates its micro-batches with ``dloss = M_k/N``, sums them, and the
all-reduce adds the ranks' sums (``loop.forward_backward``).  Every rank then holds the same g and
takes the same AdamW step: the weights stay identical (checked at every checkpoint).  In float64
the result equals one process's to rounding (~1e-16 per operation); see tests/test_distributed.py.

Overlap.  The all-reduce of the gradient runs in buckets while the backward goes on
(``GradientReduction``): the model reports each range of ``flat_grads`` as soon as it is final (the
head, the blocks from last to first, the embedding), and once ``BUCKET_BYTES`` are ready they are
summed in place with a non-blocking MPI_Iallreduce.  The step then waits only for what is left.
Per step, rank 0 records the bytes reduced and the seconds spent waiting on the other ranks.

Rank 0 does everything else: the tokenizer, the token cache (the other ranks memory-map it, or
receive the tokens when they cannot see the run directory), evaluations, samples, progress,
metrics.jsonl and checkpoints; it decides the time-budget plan and the others follow
(``from_root``).  The run itself is sent from rank 0 to the others (npllama/train/ranks.py).

Faults.  An exception on any rank ends the whole job with one line naming the rank and the reason
(``end_job_on_error``); an error that every rank meets alike (a diverged loss, a mismatch between
ranks) is reported by rank 0 only.  A rank killed outright is seen by the MPI launcher, which ends
the others at once (the start-up line lists every rank's host and process id, which the launcher's
report names).  A rank that neither answers nor dies is caught by the timeout on every wait
(``NPLLAMA_MPI_TIMEOUT`` seconds, default 600: longer than rank 0's longest evaluation or save).
Ctrl-C on mpiexec reaches every rank; they agree to stop after the same step and rank 0 saves.

mpi4py is imported only when the process was started by an MPI launcher with more than one
process (``launched_size``); a job of one process has no communicator and every collective below
is then the identity, so training runs the same code either way.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ..data import windows_at
from ..errors import ConfigError, NpllamaError

SIZE_ENV_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")     # set by MPICH's / Open MPI's launchers
RANK_ENV_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
TIMEOUT_ENV_VAR = "NPLLAMA_MPI_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
BUCKET_BYTES = 1 << 20        # all-reduce the gradient in pieces of about this size
DIVERGED_EXIT_GRACE = 10.0    # seconds a silent rank waits for rank 0 to report a shared error
MESSAGE_GRACE = 1.0           # seconds between printing the error and ending the job


class CommunicationTimeout(NpllamaError):
    """The other ranks did not answer within the timeout."""


class JobError(ConfigError):
    """A job that cannot run as set up, which every rank finds alike: rank 0 alone reports it."""
    same_on_every_rank = True


class RanksDiffer(JobError):
    """The ranks of one job were started with different settings or code."""


def _env_int(names) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def launched_size() -> int:
    """How many processes the MPI launcher started (1 when not started by one)."""
    return _env_int(SIZE_ENV_VARS) or 1


class World:
    """The ranks of this job and the few collectives training needs, each waited for with a
    timeout.  ``World()`` is a job of one process: no communicator, every collective the identity."""

    def __init__(self, comm=None, mpi=None):
        self.comm, self.mpi = comm, mpi
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.timeout = float(os.environ.get(TIMEOUT_ENV_VAR, DEFAULT_TIMEOUT))
        self.bytes_reduced = 0          # since the last step_report()
        self.wait_seconds = 0.0
        self.members: list[dict] = [{"host": socket.gethostname(), "pid": os.getpid()}]

    @property
    def root(self) -> bool:
        return self.rank == 0

    # ---- waiting -------------------------------------------------------------------------------
    def wait(self, requests, what: str) -> None:
        """Wait for non-blocking MPI operations.  It polls (the CPU stays free for the other ranks
        on the machine) and gives up after ``timeout`` seconds: a rank that neither answers nor
        dies must not hang the job."""
        t0 = time.perf_counter()
        pause = 0.0
        while not self.mpi.Request.Testall(requests):
            waited = time.perf_counter() - t0
            if waited > self.timeout:
                raise CommunicationTimeout(f"no answer from the other ranks for {waited:.0f}s while {what} "
                                           f"(a rank is stuck; {TIMEOUT_ENV_VAR} sets the limit)")
            time.sleep(pause)
            pause = min(2 * pause + 1e-5, 2e-4)   # short: MPI progresses only inside Testall
        self.wait_seconds += time.perf_counter() - t0

    # ---- collectives ---------------------------------------------------------------------------
    def sum_(self, array: np.ndarray, what: str) -> np.ndarray:
        """Sum ``array`` over the ranks, in place."""
        if self.size > 1:
            self.wait([self.comm.Iallreduce(self.mpi.IN_PLACE, array, op=self.mpi.SUM)], what)
        return array

    def sum_float(self, x: float, what: str) -> float:
        return float(self.sum_(np.array([x], dtype=np.float64), what)[0])

    def sum_int(self, x: int, what: str) -> int:
        return int(self.sum_(np.array([x], dtype=np.int64), what)[0])

    def max_int(self, x: int, what: str) -> int:
        a = np.array([x], dtype=np.int64)
        if self.size > 1:
            self.wait([self.comm.Iallreduce(self.mpi.IN_PLACE, a, op=self.mpi.MAX)], what)
        return int(a[0])

    def bcast_(self, array: np.ndarray, what: str) -> np.ndarray:
        """Rank 0's ``array`` into every rank's, in place."""
        if self.size > 1:
            self.wait([self.comm.Ibcast(array, root=0)], what)
        return array

    def from_root(self, value, what: str = "receiving rank 0's decision"):
        """Rank 0's ``value`` (anything JSON can carry) on every rank: rank 0 decides, all follow."""
        if self.size == 1:
            return value
        data = np.frombuffer(json.dumps(value).encode("utf-8"), dtype=np.uint8) if self.root else None
        length = self.bcast_(np.array([0 if data is None else data.size], dtype=np.int64), what)
        buffer = data.copy() if self.root else np.empty(int(length[0]), dtype=np.uint8)
        self.bcast_(buffer, what)
        return json.loads(buffer.tobytes().decode("utf-8"))

    def all_gather(self, value, what: str) -> list:
        """Every rank's ``value`` (JSON), in rank order, on every rank.  JSON rather than pickle:
        nothing that arrives is ever unpickled."""
        if self.size == 1:
            return [value]
        data = np.frombuffer(json.dumps(value).encode("utf-8"), dtype=np.uint8).copy()
        lengths = np.empty(self.size, dtype=np.int64)
        self.wait([self.comm.Iallgather(np.array([data.size], dtype=np.int64), lengths)], what)
        out = np.empty(int(lengths.sum()), dtype=np.uint8)
        self.wait([self.comm.Iallgatherv(data, [out, lengths])], what)
        ends = np.cumsum(lengths)
        return [json.loads(out[end - n:end].tobytes().decode("utf-8")) for n, end in zip(lengths, ends)]

    # ---- the parts of a step -------------------------------------------------------------------
    def share(self, n: int) -> tuple[int, int]:
        """This rank's items [lo, hi) of n, split as evenly as possible."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def check_batch(self, batch_size: int, grad_accum: int) -> None:
        if batch_size * grad_accum < self.size:
            raise JobError(f"a global batch of {batch_size * grad_accum} windows (batch_size x grad_accum) cannot "
                           f"feed {self.size} ranks; give every rank at least one window")

    def gradient_reduction(self, grads: np.ndarray, accumulate_from: np.ndarray | None = None):
        return GradientReduction(self, grads, accumulate_from)

    def step_report(self) -> dict:
        """What communication cost since the last call: bytes all-reduced and seconds waited
        (empty for one process, whose records stay as they were)."""
        report = {} if self.size == 1 else {"comm_bytes": self.bytes_reduced,
                                             "comm_wait_seconds": self.wait_seconds}
        self.bytes_reduced, self.wait_seconds = 0, 0.0
        return report

    def describe(self) -> str:
        where = ", ".join(f"{r}={m['host']}:{m['pid']}" for r, m in enumerate(self.members))
        return f"data parallel over {self.size} MPI ranks (rank=host:pid {where})"

    # ---- start and checkpoints -----------------------------------------------------------------
    def check_same_everywhere(self, request: dict) -> None:
        """Refuse to start when the ranks differ in what they were asked to do or in the code and
        libraries that would do it (each rank must compute the same step)."""
        mine = {"request": request, "code": code_sha256(), "python": sys.version.split()[0],
                "numpy": np.__version__, "host": socket.gethostname(), "pid": os.getpid()}
        everyone = self.all_gather(mine, "comparing the ranks' settings")
        self.members = [{"host": f["host"], "pid": f["pid"]} for f in everyone]
        for rank, theirs in enumerate(everyone):
            difference = _first_difference(everyone[0], theirs)
            if difference:
                raise RanksDiffer(f"rank {rank} differs from rank 0 in {difference}; every rank must run "
                                  "the same npllama code and command")

    def gather_rank_states(self, model) -> list[dict] | None:
        """For a checkpoint: every rank's dropout generator state, in rank order, on rank 0 (None
        on the others), after checking that all ranks hold the very same weights."""
        digest = hashlib.sha256(model.flat_params.data)
        if model.lora is not None:
            digest.update(model.flat_trainable.data)
        mine = {"dropout_rng": model.dropout_rng.bit_generator.state, "weights_sha256": digest.hexdigest()}
        everyone = self.all_gather(mine, "gathering the ranks' states for a checkpoint")
        for rank, theirs in enumerate(everyone):
            if theirs["weights_sha256"] != everyone[0]["weights_sha256"]:
                raise NpllamaError(f"rank {rank}'s weights differ from rank 0's: the ranks no longer train "
                                   "the same model (not saved)")
        return [s["dropout_rng"] for s in everyone] if self.root else None


def _first_difference(a: dict, b: dict) -> str | None:
    """The first thing two ranks' fingerprints (``check_same_everywhere``) differ in, in words."""
    request_a, request_b = a["request"], b["request"]
    for key in ("resume", "config"):
        if (request_a[key] is None) != (request_b[key] is None):
            return "whether it resumes a run"
    named = [(f"--{k.replace('_', '-')}", (request_a["config"] or {}).get(k), (request_b["config"] or {}).get(k))
             for k in sorted(set(request_a["config"] or {}) | set(request_b["config"] or {}))]
    named += [("--resume", request_a["resume"], request_b["resume"]), ("the npllama code (SHA-256)", a["code"], b["code"]),
              ("Python", a["python"], b["python"]), ("NumPy", a["numpy"], b["numpy"])]
    for name, x, y in named:
        if x != y:
            return f"{name} ({str(y)[:40]} instead of {str(x)[:40]})"
    return None


@functools.cache
def code_sha256() -> str:
    """SHA-256 over npllama's source files: ranks running different code are refused."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def current_world() -> World:
    """This process's World: MPI's COMM_WORLD when an MPI launcher started more than one process."""
    size = launched_size()
    if size <= 1:
        return World()
    try:
        import mpi4py   # only under an MPI launcher: a plain `import npllama` never loads MPI
        mpi4py.rc.thread_level = "funneled"   # only the main thread calls MPI
        from mpi4py import MPI
    except ImportError:
        raise ConfigError(f"started by an MPI launcher with {size} processes, but mpi4py is not installed: "
                          "pip install 'npllama[mpi]'") from None
    return World(MPI.COMM_WORLD, MPI)


class GradientReduction:
    """Sums a flat gradient buffer over the ranks, in buckets started while the backward runs.

    The model reports ranges [lo, hi) of ``flat_grads`` as they become final, from the end of the
    buffer towards its start (``Llama.loss_and_grad(on_grads_ready=...)``).  ``ready`` adds the
    range into ``grads`` first when accumulating micro-batches (``accumulate_from``), and once the
    final-but-unsent part holds ``BUCKET_BYTES`` it is all-reduced in place (MPI_Iallreduce, non
    blocking); each report also lets MPI move the buckets in flight along.  ``finish`` sends the
    rest and waits: that wait is all the step loses to communication.  One process: only the
    accumulation."""

    def __init__(self, world: World, grads: np.ndarray, accumulate_from: np.ndarray | None = None):
        self.world, self.grads, self.accumulate_from = world, grads, accumulate_from
        self.final_from = self.unsent_to = grads.size   # grads[final_from:unsent_to] final, not yet sent
        self.requests = []

    def ready(self, lo: int, hi: int) -> None:
        if hi != self.final_from:
            raise ValueError(f"gradient range [{lo}, {hi}) reported out of order (expected one ending at "
                             f"{self.final_from})")
        if self.accumulate_from is not None:
            np.add(self.grads[lo:hi], self.accumulate_from[lo:hi], out=self.grads[lo:hi])
        self.final_from = lo
        if self.world.size == 1:
            return
        if (self.unsent_to - lo) * self.grads.itemsize >= BUCKET_BYTES:
            self._send(lo)
        elif self.requests:
            self.world.mpi.Request.Testall(self.requests)

    def _send(self, lo: int) -> None:
        bucket = self.grads[lo:self.unsent_to]
        self.requests.append(self.world.comm.Iallreduce(self.world.mpi.IN_PLACE, bucket, op=self.world.mpi.SUM))
        self.world.bytes_reduced += bucket.nbytes
        self.unsent_to = lo

    def finish(self) -> None:
        if self.final_from != 0:
            raise ValueError(f"the backward reported gradients down to {self.final_from}, not to 0")
        if self.world.size > 1:
            if self.unsent_to > 0:
                self._send(0)
            self.world.wait(self.requests, "summing the gradients")


def local_batches(sampler, grad_accum: int, world: World) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's micro-batches of the next global batch (``grad_accum`` x the sampler's batch):
    every rank draws all the window starts, keeps its share, and cuts it in micro-batches of at
    most ``batch_size`` windows.  One process: the ``grad_accum`` batches ``next_batch`` gives."""
    starts = np.concatenate([sampler.next_starts() for _ in range(grad_accum)])
    lo, hi = world.share(starts.size)
    mine = starts[lo:hi]
    n_micro = -(-mine.size // sampler.batch_size)
    return [windows_at(sampler.tokens, part, sampler.seq_len) for part in np.array_split(mine, n_micro)]


def end_job_on_error(func):
    """Under MPI, an exception on one rank ends the whole job at once with one line on stderr,
    ``npllama: error: rank R of N: <reason>`` (plus the traceback of an unexpected exception), and
    MPI_Abort; the other ranks would otherwise wait in their next collective.  Errors that every
    rank meets alike (``same_on_every_rank``) are reported by rank 0 alone."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if launched_size() <= 1:
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except BaseException as e:   # noqa: BLE001 -- whatever it is, the other ranks must not hang
            _end_job(e)
    return wrapper


def _end_job(error: BaseException) -> None:
    rank, size = _env_int(RANK_ENV_VARS) or 0, launched_size()
    if getattr(error, "same_on_every_rank", False) and rank != 0:
        time.sleep(DIVERGED_EXIT_GRACE)   # rank 0 reports it and its end stops this rank
    elif isinstance(error, KeyboardInterrupt):
        reason = "interrupted"
    elif isinstance(error, (NpllamaError, OSError, MemoryError)):
        reason = str(error) or type(error).__name__
    else:
        traceback.print_exception(error, file=sys.stderr)
        reason = f"{type(error).__name__}: {error}"
    if not getattr(error, "same_on_every_rank", False):
        print(f"npllama: error: rank {rank} of {size}: {reason}", file=sys.stderr, flush=True)
    elif rank == 0:
        print(f"npllama: error: {reason}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    time.sleep(MESSAGE_GRACE)   # the launcher forwards output asynchronously: let the line out first
    world = current_world() if "mpi4py.MPI" in sys.modules else None
    if world is not None and world.comm is not None:
        # MPI_Abort ends every rank, whatever the launcher; its own banner would be a second message
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        world.comm.Abort(130 if isinstance(error, KeyboardInterrupt) else 1)
    os._exit(130 if isinstance(error, KeyboardInterrupt) else 1)
