"""Where npllama's caches live (npllama/caches.py): $NPLLAMA_CACHE, else the platform's cache
directory ($XDG_CACHE_HOME/npllama on Linux); Numba's compiled kernels there too, never in the
source tree; the corpus cache beside them."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npllama.caches import cache_dir, numba_cache_dir
from npllama.train.corpus_cache import cache_root

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_CACHE_HOME is the Linux convention")
def test_cache_dir_follows_xdg_cache_home_unless_npllama_cache_is_set(tmp_path, monkeypatch):
    for name in ("NPLLAMA_CACHE", "NPLLAMA_CORPUS_CACHE", "NUMBA_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "npllama"
    assert cache_root() == tmp_path / "xdg" / "npllama" / "corpora"
    assert numba_cache_dir() == tmp_path / "xdg" / "npllama" / "numba"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "npllama"
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" / "corpora"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert numba_cache_dir() == tmp_path / "numba"


COMPILE = """
import numba, numpy as np
from npllama.optim import clip_grad_norm
g = np.ones(100_000, dtype=np.float32)
clip_grad_norm(g, 1.0)                      # compiles (and caches) the sum-of-squares and scaling kernels
print(numba.core.config.CACHE_DIR)
"""


def test_numba_caches_kernels_in_the_cache_dir_not_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NPLLAMA_CACHE", "NUMBA_CACHE_DIR")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    start = time.time() - 1
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    numba_dir = tmp_path / "xdg" / "npllama" / "numba"
    assert done.stdout.strip() == str(numba_dir)
    cached = list(numba_dir.rglob("optim.*.nbi"))
    assert cached and list(numba_dir.rglob("optim.*.nbc")), sorted(numba_dir.rglob("*"))
    in_source = [p for p in (ROOT / "src" / "npllama").rglob("*.nb[ic]") if p.stat().st_mtime >= start]
    assert in_source == []
