import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Numba compiles on first use, so the first example of a test can be slow: no deadline.
settings.register_profile("npllama", deadline=None, max_examples=20,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("npllama")

# No machine-wide corpus cache (npllama/train/corpus_cache.py): every run trains its tokenizer.
os.environ["NPLLAMA_CORPUS_CACHE"] = "0"
# No second process compiling ahead in a first training run (npllama/warmup.py): tests/test_warmup.py
# starts its own.
os.environ["NPLLAMA_WARMUP"] = "0"

# Every subprocess a test starts (`python -m npllama.cli ...`, examples, snippets) imports this
# checkout's package, as the tests themselves do (pyproject's pythonpath = ["src"]), whichever
# npllama pip installed.
SRC = str(Path(__file__).resolve().parent.parent / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
