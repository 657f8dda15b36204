"""Loading is memory-lean: Llama.from_pretrained's peak memory, measured in a fresh process on a
generated model of ~50 MB of float32 weights stored as float32 (the file as large as the weights,
the worst case) in each format it reads (safetensors, GGUF, llama2.c), stays within 1.5x the final
weights.

The measure: (VmHWM after loading - VmRSS just before) / bytes of the loaded parameters, in a
subprocess whose peak is reset (/proc/self/clear_refs) after the imports.  Without the lean path a
load would hold the random initial weights' float64 draw, or the whole file (read, or mapped and
kept resident) beside the weights: 2.37 for this model with the loader before this change.  (SmolLM2-135M from its Q4_1 GGUF: 1.20, and 1.41
for the whole process, interpreter included.)"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import test_gguf
from npllama import Llama, LlamaConfig
from npllama.formats.llama2c import write_llama2c

ROOT = Path(__file__).resolve().parent.parent
CFG = LlamaConfig(vocab_size=4096, dim=512, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=2048, max_seq_len=64,
                  tie_embeddings=False)
BOUND = 1.5
MEASURE = """
import json, sys
import numpy as np
from npllama import Llama
from npllama.formats import gguf, hf

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")   # reset the peak to the current size
before = status("VmRSS")
model = Llama.from_pretrained(sys.argv[1])
print(json.dumps({"ratio": (status("VmHWM") - before) / model.flat_params.nbytes,
                  "checksum": float(np.sum(model.flat_params, dtype=np.float64))}))
"""


def peak_ratio(path):
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def source():
    model = Llama(CFG, seed=3)
    assert 40e6 < model.flat_params.nbytes < 60e6
    return model


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "llama2c"])
def test_peak_memory_while_loading_is_within_one_and_a_half_times_the_weights(tmp_path, source, fmt):
    if fmt == "safetensors":
        source.save_pretrained(tmp_path)
        path = tmp_path
    elif fmt == "gguf":
        path = tmp_path / "m.gguf"
        test_gguf.write_gguf(path, source.params, CFG)
    else:
        path = write_llama2c(tmp_path / "m.bin", CFG, source.params)
    measured = peak_ratio(path)
    assert measured["checksum"] == pytest.approx(float(np.sum(source.flat_params, dtype=np.float64)), rel=1e-12)
    assert measured["ratio"] <= BOUND, measured


def test_a_model_made_without_init_is_all_zeros_until_loaded():
    model = Llama(CFG, init=False)
    assert not model.flat_params.any()
