"""The Hugging Face model directory: config.json, model.safetensors (or shards listed by
model.safetensors.index.json), tokenizer.json and tokenizer_config.json.

Loading is in steps, so that the model allocates its parameters itself and the weights are read
straight into them: ``open_pretrained`` (the config and the weight files, refusing a config whose
parameters cannot be in those files before anything is allocated), ``load_weights`` (every tensor
checked for name, shape and finiteness), ``load_tokenizer``.  ``Llama.from_pretrained`` and
``Llama.save_pretrained`` call them; nothing here needs the model class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import LlamaConfig
from ..errors import CheckpointError
from ..files import atomic_write_json, open_regular_file, read_json
from ..tokenizer import Tokenizer
from .safetensors import copy_float, iter_safetensors, write_safetensors

IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
SMALLEST_FLOAT_BYTES = 2  # F16/BF16: the fewest bytes a stored weight can take


def load_config(directory) -> LlamaConfig:
    path = Path(directory) / "config.json"
    return LlamaConfig.from_hf_dict(read_json(path, "config.json"), source=str(path))


def _check_inside(directory: Path, path: Path, source) -> Path:
    """The real path of ``path``, which must be a file directly in ``directory``: a symlink may
    point elsewhere only in the Hugging Face hub cache layout, where snapshots/<rev>/<file> links
    to ../../blobs/<hash>."""
    root = directory.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # symlink loop, name too long
        raise CheckpointError(f"{source}: cannot resolve {path.name!r} ({e})") from None
    hf_cache_blob = root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
    if real.parent != root and not hf_cache_blob:
        raise CheckpointError(f"{source}: {path.name!r} points outside {directory} (to {real})")
    return real


def _valid_shard_name(shard) -> bool:
    # control characters (a newline, say) are legal in Linux file names but never in a shard's,
    # and would break the one-line error naming the missing file
    return (isinstance(shard, str) and shard not in ("", ".", "..") and "/" not in shard and "\\" not in shard
            and shard.isprintable() and len(shard.encode("utf-8", "surrogatepass")) <= 255)


def weight_files(directory) -> list[Path]:
    """model.safetensors, or the shards listed by model.safetensors.index.json. Shard names must
    be plain file names in ``directory``; neither they nor symlinks may lead out of it."""
    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists() or single.is_symlink():
        return [_check_inside(directory, single, single)]
    if index.exists() or index.is_symlink():
        data = read_json(index, "shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map object")
        shards = []
        for tensor, shard in weight_map.items():
            if not _valid_shard_name(shard):
                if isinstance(shard, str) and (shard.startswith(("/", "\\")) or ".." in shard.replace("\\", "/").split("/")):
                    raise CheckpointError(f"{index}: shard {shard[:100]!r} of {tensor[:100]!r} points outside "
                                          f"{directory}")
                raise CheckpointError(f"{index}: invalid shard name {str(shard)[:100]!r} for tensor {tensor[:100]!r} "
                                      "(must be a file name in the same directory)")
            if shard not in shards:
                shards.append(shard)
        return [_check_inside(directory, directory / shard, index) for shard in sorted(shards)]
    if (directory / "pytorch_model.bin").exists():
        raise CheckpointError(f"{directory}: only pytorch_model.bin found; npllama never unpickles, "
                              "convert it to model.safetensors")
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def open_pretrained(directory) -> tuple[LlamaConfig, list[Path]]:
    """The config and the weight files of a model directory.

    Refuses a config whose parameters cannot be in the files before anything is allocated: a
    config.json claiming a vocabulary of 10^12 must not get to ask for terabytes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg = load_config(directory)
    files = weight_files(directory)
    n_params = cfg.num_parameters()
    file_bytes = 0
    for path in files:
        f, size = open_regular_file(path, "safetensors file")
        f.close()
        file_bytes += size
    if n_params * SMALLEST_FLOAT_BYTES > file_bytes:
        names = ", ".join(p.name for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise CheckpointError(
            f"{directory}: config.json implies {n_params:,} parameters (at least "
            f"{n_params * SMALLEST_FLOAT_BYTES:,} bytes) but {names} hold(s) only {file_bytes:,} bytes "
            "(truncated, or the wrong config.json?)")
    return cfg, files


def load_weights(directory, files: list[Path], cfg: LlamaConfig, params: dict[str, np.ndarray]) -> None:
    """Fill ``params`` (name -> array of the expected shape; converted to its dtype) from ``files``:
    every tensor must be expected, appear once, have the expected shape and be finite, and every
    expected one must be there.  The files are memory-mapped and each tensor is converted straight
    into its parameter (``iter_safetensors``, ``copy_float``): loading needs the parameters plus
    about one tensor."""
    seen = {}
    for path in files:
        for name, st_dtype, arr in iter_safetensors(path):
            if name.endswith(IGNORED_TENSOR_SUFFIXES):
                continue
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: the embedding is the output projection
            if name not in params:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for this config")
            if name in seen:
                raise CheckpointError(f"{path}: tensor {name!r} is in both {seen[name].name} and {path.name}")
            if tuple(arr.shape) != params[name].shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                      f"config.json implies {params[name].shape}")
            copy_float(st_dtype, arr, params[name], f"{path}: tensor {name!r}")
            seen[name] = path
    missing = sorted(set(params) - set(seen))
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def load_tokenizer(directory, cfg: LlamaConfig) -> Tokenizer | None:
    """The directory's tokenizer.json, or None when there is none."""
    tok = Path(directory) / "tokenizer.json"
    if not (tok.exists() or tok.is_symlink()):
        return None
    tokenizer = Tokenizer.from_file(tok)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{tok}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{cfg.vocab_size}; the model has no embedding for the extra ids")
    return tokenizer


def save_pretrained(directory, cfg: LlamaConfig, params: dict[str, np.ndarray], tokenizer: Tokenizer | None):
    """Write config.json, model.safetensors (``params`` as they are) and, with a tokenizer,
    tokenizer.json and tokenizer_config.json (bos/eos, add_bos, the chat template)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", params, {"format": "pt"})
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = np.result_type(*params.values()).name
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")
        tokenizer.save_config(directory)
        if tokenizer.eos_id is not None:
            hf.setdefault("eos_token_id", tokenizer.eos_id)
    atomic_write_json(directory / "config.json", hf)
