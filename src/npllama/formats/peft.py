"""PEFT's LoRA adapter directory, read and written: what ``peft.PeftModel.from_pretrained(base, DIR)``
loads and ``PeftModel.save_pretrained`` writes.

    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules",
                                "base_model_name_or_path", ...}
    adapter_model.safetensors  "base_model.model.<module>.lora_A.weight" (r, in),
                               "base_model.model.<module>.lora_B.weight" (out, r), per adapted module

<module> is the projection's Hugging Face name ("model.layers.0.self_attn.q_proj"); the adapter's
scale is lora_alpha / r.  Variants npllama does not compute (DoRA, rsLoRA, per-module ranks, biases,
fan_in_fan_out, a subset of layers) are refused with the key that asks for them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..files import atomic_write_json, read_json
from .safetensors import copy_float, read_safetensors, read_safetensors_header, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# keys whose non-default values ask for something else than plain LoRA on whole projections
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None,
                "lora_bias": False}


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory) -> dict:
    """adapter_config.json, checked: a plain LoRA adapter with r, lora_alpha, lora_dropout,
    target_modules (a list of names) and base_model_name_or_path."""
    path = Path(directory) / ADAPTER_CONFIG
    config = read_json(path, ADAPTER_CONFIG)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    for key, default in _UNSUPPORTED.items():
        if config.get(key) not in (None, default):
            raise CheckpointError(f"{path}: {key} = {config[key]!r} is not supported (plain LoRA only)")
    r, alpha, p = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0)
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1 and isinstance(alpha, (int, float))
            and math.isfinite(alpha) and alpha > 0 and isinstance(p, (int, float)) and 0 <= p < 1):
        raise CheckpointError(f"{path}: needs r >= 1, a finite lora_alpha > 0 and 0 <= lora_dropout < 1, "
                              f"got {str(r)[:50]}, {str(alpha)[:50]}, {str(p)[:50]}")
    targets = config.get("target_modules")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise CheckpointError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    if not isinstance(config.get("base_model_name_or_path"), str):
        raise CheckpointError(f"{path}: no base_model_name_or_path")
    _check_rank_against_weights(Path(directory) / ADAPTER_FILE, r)
    return config


def _check_rank_against_weights(weights, r: int) -> None:
    """The adapter matrices' shapes in the weights file's header must have rank ``r``, checked before
    anything of size r is allocated (a 7 KB adapter claiming r = 10^6 must not ask for gigabytes)."""
    header, _, _ = read_safetensors_header(weights)
    for name, info in header.items():
        shape, side = info["shape"], {".lora_A.weight": 0, ".lora_B.weight": 1}.get(name[-len(".lora_A.weight"):])
        if side is not None and (len(shape) != 2 or shape[side] != r):
            raise CheckpointError(f"{weights}: tensor {name!r} has shape {shape}, not of the rank r = {r} that "
                                  f"{ADAPTER_CONFIG} gives")


def base_model_path(directory, config) -> Path:
    """Where the base model is: base_model_name_or_path relative to the adapter directory first
    (how a fixture or a moved run directory refers to it), then as given."""
    given = config["base_model_name_or_path"]
    for candidate in (Path(directory) / given, Path(given)):
        if candidate.exists():
            if is_adapter_dir(candidate):   # (itself, or an adapter on an adapter: a loop, or a stack npllama does not build)
                raise CheckpointError(f"{Path(directory) / ADAPTER_CONFIG}: base model {given!r} is a LoRA adapter "
                                      f"directory{' (this one)' if candidate.resolve() == Path(directory).resolve() else ''}; "
                                      "the base must be a model (Hugging Face or run directory, .gguf, llama2.c .bin)")
            return candidate.resolve()
    raise CheckpointError(f"{Path(directory) / ADAPTER_CONFIG}: base model {given!r} not found (neither "
                          f"relative to {directory} nor as given); npllama needs a local directory or file")


def load_adapter_weights(directory, lora_params: dict[str, np.ndarray]) -> None:
    """Fill ``lora_params`` ("<module>.lora_A.weight" -> array) from adapter_model.safetensors:
    every tensor expected, of the expected shape, finite, and none missing."""
    path = Path(directory) / ADAPTER_FILE
    seen = set()
    for key, (st_dtype, arr) in read_safetensors(path).items():
        name = key.removeprefix(PEFT_PREFIX)
        if name not in lora_params:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} for this adapter config and base model")
        if tuple(arr.shape) != lora_params[name].shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(arr.shape)}, expected "
                                  f"{lora_params[name].shape}")
        copy_float(st_dtype, arr, lora_params[name], f"{path}: tensor {key!r}")
        seen.add(name)
    missing = sorted(set(lora_params) - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}")


def save_adapter(directory, settings, lora_params: dict[str, np.ndarray], base_path) -> None:
    """Write adapter_config.json and adapter_model.safetensors (``settings``: the model's
    LoraSettings; ``base_path``: the base model, stored as base_model_name_or_path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / ADAPTER_FILE, {PEFT_PREFIX + name: p for name, p in lora_params.items()},
                      {"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_path),
              "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
              "target_modules": list(settings.targets), "init_lora_weights": True, "inference_mode": True,
              **_UNSUPPORTED}
    atomic_write_json(directory / ADAPTER_CONFIG, config)
