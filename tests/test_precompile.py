"""The second compiling process of a first training run (npllama/train/precompile.py): it compiles
exactly the kernels a step needs after its forward, into Numba's on-disk cache, so that the run then
compiles only its forward's kernels; and it leaves a marker so that later runs start none."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from npllama.train import precompile

# The kernels the forward pass compiles (the stand-ins of precompile.forward_only), by Numba name.
FORWARD_KERNELS = {"rmsnorm_forward_rows", "rope_rows", "swiglu_forward_rows", "attention_forward_kernel",
                   "pack_key_tiles", "cross_entropy_rows",
                   "_spin_until_changed", "_finish_then_watch"}   # (the helper threads', from the first matmul on)

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from numba.core import event
    from npllama import Llama, LlamaConfig
    from npllama.optim import AdamW, clip_grad_norm
    from npllama.train import precompile

    spec = json.loads(sys.argv[1])
    second = precompile.start(spec, threads=2)
    assert second is not None, "no second process on a cold cache"
    second.wait("step")
    assert second.step_done and second.process.poll() is None, "it said a step was done only at its end"
    second.wait("all")
    assert second.process.returncode == 0, second.process.returncode
    second.stop()
    assert second.marker.exists()
    assert precompile.start(spec, threads=2) is None, "a second process although the marker says done"

    compiled, depth = [], [0]
    class Names(event.Listener):   # the kernels called from Python (not what compiles inside them)
        def on_start(self, ev):
            if depth[0] == 0:
                compiled.append(ev.data["dispatcher"].py_func.__name__)
            depth[0] += 1
        def on_end(self, ev):
            depth[0] -= 1
    event.register("numba:compile", Names())
    # a real step, AdamW with clipping and a sample, of a model of the same dtype, options, other sizes
    cfg = LlamaConfig(vocab_size=40, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, max_seq_len=16,
                      dropout=0.1 if spec["dropout"] else 0.0)
    model = Llama(cfg, dtype=np.dtype(spec["dtype"]), seed=1).train()
    tokens = np.random.default_rng(0).integers(0, 40, size=(3, 12))
    loss, grads = model.loss_and_grad(tokens, tokens, copy=False)
    clip_grad_norm(model.flat_grads, 1.0)
    AdamW(model.trainable_params, 1e-3, flat_params=model.flat_trainable).step(flat_grads=model.flat_grads, lr=1e-3)
    model.eval()
    model.loss(tokens, tokens)
    model.generate(np.array([3, 4]), 3, temperature=0.8, top_k=5, seed=0)
    print(json.dumps(sorted(set(compiled))))
""")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32"])
def test_second_process_leaves_only_the_forward_to_compile(tmp_path, dtype):
    spec = precompile.kernel_spec(dtype, 0.1, None, "", 0.0, 0.8, 40)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), NPLLAMA_THREADS="2")
    env.pop("NPLLAMA_PRECOMPILE", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert compiled <= FORWARD_KERNELS, f"compiled after the second process: {sorted(compiled - FORWARD_KERNELS)}"
    assert {"attention_forward_kernel", "rmsnorm_forward_rows"} <= compiled   # (the stand-ins kept these out)


def test_no_second_process_for_one_thread_or_when_switched_off(monkeypatch):
    spec = precompile.kernel_spec("float32", 0.0, None, "", 0.0, 0.8, 40)
    monkeypatch.delenv(precompile.ENV_SWITCH, raising=False)
    assert precompile.start(spec, threads=1) is None
    monkeypatch.setenv(precompile.ENV_SWITCH, "0")
    assert precompile.start(spec, threads=2) is None


def test_marker_depends_on_what_decides_the_kernels():
    base = dict(dtype="float32", dropout=0.0, lora_rank=None, lora_targets="q_proj", lora_dropout=0.0,
                sample_temperature=0.8, sample_top_k=40)
    markers = {precompile.marker_path(precompile.kernel_spec(**{**base, **change}))
               for change in ({}, {"dtype": "float64"}, {"lora_rank": 4}, {"dropout": 0.1}, {"sample_top_k": None})}
    assert len(markers) == 5
    # sizes do not decide which kernels compile: a bigger dropout or another LoRA rank is the same marker
    assert precompile.marker_path(precompile.kernel_spec(**{**base, "dropout": 0.1})) == \
        precompile.marker_path(precompile.kernel_spec(**{**base, "dropout": 0.3}))


def test_a_failing_second_process_is_noticed_not_waited_for(tmp_path, monkeypatch):
    """It only compiles: when it dies (here: a dtype no kernel takes), the run goes on at once and
    says so, and no marker claims the kernels are cached."""
    monkeypatch.delenv(precompile.ENV_SWITCH, raising=False)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    spec = precompile.kernel_spec("float16", 0.0, None, "", 0.0, 0.8, 40)
    second = precompile.start(spec, threads=2)
    try:
        second.wait("step", timeout=120)
        assert second.failed not in (None, 0)
        second.wait("all")
        assert not second.marker.exists()
    finally:
        second.stop()
