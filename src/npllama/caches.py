"""Where npllama keeps what it can make again: one directory per user, the platform's cache directory.

    cache_dir()        $NPLLAMA_CACHE, else the platform's user cache directory for npllama:
                       $XDG_CACHE_HOME/npllama (default ~/.cache/npllama) on Linux,
                       ~/Library/Caches/npllama on macOS, %LOCALAPPDATA%\\npllama\\Cache on Windows
                       (platformdirs' user_cache_dir)
    numba_cache_dir()  Numba's compiled kernels: $NUMBA_CACHE_DIR, else cache_dir()/numba (never the
                       source tree, which may be read-only or a git clone)

The corpus cache (train/corpus_cache.py) is cache_dir()/corpora.  Deleting any of them costs only
time: the next run compiles or tokenizes again.
"""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """npllama's cache directory (see the module docstring); not created here."""
    chosen = os.environ.get("NPLLAMA_CACHE")
    return Path(chosen) if chosen else Path(platformdirs.user_cache_dir("npllama", appauthor=False))


def numba_cache_dir() -> Path:
    """Where Numba caches npllama's compiled kernels: $NUMBA_CACHE_DIR, else cache_dir()/numba."""
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    return Path(chosen) if chosen else cache_dir() / "numba"
