"""Write tests/fixtures/adamw_trajectory.safetensors: a short torch.optim.AdamW run in float64.

Three parameters (two matrices with weight decay, one 1-D norm weight without), 10 steps with
fixed random gradients and a changing learning rate.  The file holds, per parameter <name>:

    init.<name>        the starting values
    grads.<name>       (STEPS, *shape) the gradient fed at each step
    params.<name>      (STEPS, *shape) the parameter after each step
    exp_avg.<name>     torch's first moment after the last step
    exp_avg_sq.<name>  torch's second moment after the last step
    lrs                (STEPS,) the learning rate of each step

and in the safetensors metadata "config" (JSON: betas, eps, weight_decay, decayed names, torch
version).  tests/test_optim.py replays the run with npllama.optim.AdamW and compares.

Run once (needs torch):  python scripts/make_adamw_fixture.py
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "adamw_trajectory.safetensors"
STEPS = 10
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
# Warmup over 3 steps to 0.05, then down towards 0.005 -- and one repeated value -- so the test sees
# the per-step lr override do something.
LRS = [0.05 / 3, 0.1 / 3, 0.05, 0.05, 0.045, 0.035, 0.025, 0.015, 0.008, 0.005]
SHAPES = {
    "model.embed_tokens.weight": (6, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.norm.weight": (4,),
}
DECAYED = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    assert len(LRS) == STEPS
    rng = np.random.default_rng(20240601)
    init = {}
    for name, shape in SHAPES.items():
        # norm weights start near 1 as in a real model; matrices are small random values
        init[name] = (1.0 + 0.1 * rng.standard_normal(shape)) if len(shape) == 1 else 0.5 * rng.standard_normal(shape)
    grads = {}
    for name, shape in SHAPES.items():
        # gradient scale changes from step to step, so the moments do more than track one value
        scales = np.exp(rng.uniform(-2, 1, size=(STEPS,) + (1,) * len(shape)))
        grads[name] = scales * rng.standard_normal((STEPS,) + shape)
    grads["model.embed_tokens.weight"][:, 5, :] = 0.0  # an unused token row: only decay moves it

    tensors = {name: torch.tensor(init[name], dtype=torch.float64, requires_grad=True) for name in SHAPES}
    optimizer = torch.optim.AdamW(
        [{"params": [tensors[n] for n in DECAYED], "weight_decay": WEIGHT_DECAY},
         {"params": [tensors[n] for n in SHAPES if n not in DECAYED], "weight_decay": 0.0}],
        lr=LRS[0], betas=BETAS, eps=EPS, foreach=False)
    trajectory = {name: np.zeros((STEPS,) + shape) for name, shape in SHAPES.items()}
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = LRS[step]
        for name, t in tensors.items():
            t.grad = torch.tensor(grads[name][step], dtype=torch.float64)
        optimizer.step()
        for name, t in tensors.items():
            trajectory[name][step] = t.detach().numpy()

    out = {"lrs": np.array(LRS, dtype=np.float64)}
    for name, t in tensors.items():
        state = optimizer.state[t]
        out[f"init.{name}"] = init[name]
        out[f"grads.{name}"] = grads[name]
        out[f"params.{name}"] = trajectory[name]
        out[f"exp_avg.{name}"] = state["exp_avg"].numpy().copy()
        out[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].numpy().copy()
    config = {"betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY, "decayed": DECAYED,
              "steps": STEPS, "torch_version": torch.__version__, "foreach": False}
    out = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}
    atomic_write_bytes(OUT, save(out, metadata={"config": json.dumps(config)}))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
