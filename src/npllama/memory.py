"""This process's peak resident memory, as `npllama train` reports it and the benchmarks measure it.

Imports nothing but the standard library: the benchmarks read it in processes that must not start
NumPy or Numba before their thread counts are set.
"""
from __future__ import annotations

import sys


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far: VmHWM on Linux (since it exec'd; ru_maxrss would
    start at the parent's peak at fork time), else getrusage's ru_maxrss (kilobytes on Linux, bytes
    on macOS); None where neither exists (Windows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
