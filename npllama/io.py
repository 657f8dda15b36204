"""Reading and writing the Hugging Face format: config.json + model.safetensors.

The safetensors reader is written out here rather than borrowed so that every way a file can be
wrong (truncated, a header claiming terabytes, overlapping or out-of-range offsets, a dtype or
shape that does not match) becomes a CheckpointError naming the file, before any large
allocation.  Nothing is ever unpickled.  Writes are atomic: temp file, fsync, rename.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError, ConfigError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
NUMPY_TO_SAFETENSORS = {np.dtype(v).newbyteorder("<") if v.byteorder != "|" else v: k
                        for k, v in SAFETENSORS_DTYPES.items() if k != "BF16"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


# ---- atomic writes -----------------------------------------------------------------------------
def atomic_write_bytes(path, chunks):
    """Write the byte strings ``chunks`` to ``path`` so that a crash leaves either the old file or
    the complete new one: write a temp file in the same directory, fsync it, rename over."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, [json.dumps(obj, indent=2).encode() + b"\n"])


# ---- safetensors -------------------------------------------------------------------------------
def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    header, offset, arrays = {}, 0, []
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder not in ("|", "<", "=") else arr.dtype
        key = NUMPY_TO_SAFETENSORS.get(np.dtype(dt.str.replace("=", "<")))
        if key is None:
            raise TypeError(f"cannot store dtype {arr.dtype} in safetensors ({name})")
        arr = np.ascontiguousarray(arr, dtype=dt.newbyteorder("<") if dt.byteorder != "|" else dt)
        header[name] = {"dtype": key, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    atomic_write_bytes(path, [struct.pack("<Q", len(blob)), blob] + [memoryview(a).cast("B") for a in arrays])


def read_safetensors_header(path):
    """-> (header dict without __metadata__, metadata, data start offset). Validates everything."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{path}: safetensors header claims {n} bytes but the file has {size}")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise CheckpointError(f"{path}: tensor {name!r} has data offsets {offs!r} outside the file "
                                  f"({data_len} data bytes; truncated?)")
        expected = int(np.prod(shape, dtype=object)) * SAFETENSORS_DTYPES[dtype].itemsize
        if offs[1] - offs[0] != expected:
            raise CheckpointError(f"{path}: tensor {name!r} has {offs[1] - offs[0]} bytes, "
                                  f"but shape {shape} of {dtype} needs {expected}")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return header, metadata, data_start


def read_safetensors(path, names=None) -> dict[str, tuple[str, np.ndarray]]:
    """-> {name: (safetensors dtype, array)}; BF16 arrays come back as their raw uint16 bits."""
    header, _, data_start = read_safetensors_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            start, end = info["data_offsets"]
            f.seek(data_start + start)
            raw = f.read(end - start)
            if len(raw) != end - start:
                raise CheckpointError(f"{path}: truncated while reading tensor {name!r}")
            arr = np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
            out[name] = (info["dtype"], arr)
    return out


def to_float(st_dtype, arr, dtype, where):
    if st_dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: expected a floating-point tensor, got {st_dtype}")
    if st_dtype == "BF16":  # bfloat16 is the top half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    out = arr.astype(dtype)
    if not np.all(np.isfinite(out)):
        raise CheckpointError(f"{where}: contains NaN or infinite values")
    return out


# ---- model directories -------------------------------------------------------------------------
def read_json(path, what="file"):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def load_config(directory) -> LlamaConfig:
    path = Path(directory) / "config.json"
    return LlamaConfig.from_hf_dict(read_json(path, "config.json"), source=str(path))


def weight_files(directory) -> list[Path]:
    """model.safetensors, or the shards listed by model.safetensors.index.json."""
    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        data = read_json(index, "shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map object")
        files = []
        root = directory.resolve()
        for shard in sorted(set(weight_map.values()), key=str):
            if not isinstance(shard, str) or not shard:
                raise CheckpointError(f"{index}: invalid shard name {shard!r}")
            p = (directory / shard).resolve()
            if p.parent != root:
                raise CheckpointError(f"{index}: shard {shard!r} points outside {directory}")
            files.append(p)
        return files
    if (directory / "pytorch_model.bin").exists():
        raise CheckpointError(f"{directory}: only pytorch_model.bin found; npllama never unpickles, "
                              "convert it to model.safetensors")
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def load_pretrained(directory, dtype=np.float32):
    from .model import Llama

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg = load_config(directory)
    model = Llama(cfg, dtype=dtype)
    expected = {name: shape for name, shape in model.layout}
    seen = set()
    for path in weight_files(directory):
        for name, (st_dtype, arr) in read_safetensors(path).items():
            if name.endswith(IGNORED_TENSOR_SUFFIXES):
                continue
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: the embedding is the output projection
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for this config")
            if tuple(arr.shape) != expected[name]:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                      f"config.json implies {expected[name]}")
            model.params[name][...] = to_float(st_dtype, arr, model.dtype, f"{path}: tensor {name!r}")
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    tok = directory / "tokenizer.json"
    if tok.exists():
        from .tokenizer import Tokenizer
        model.tokenizer = Tokenizer.from_file(tok)
    return model


def save_pretrained(model, directory):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: model.params[name] for name, _ in model.layout}
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    hf = model.config.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = "float32" if model.dtype == np.float32 else "float64"
    if model.tokenizer is not None:
        model.tokenizer.save(directory / "tokenizer.json")
        if model.tokenizer.eos_id is not None:
            hf.setdefault("eos_token_id", model.tokenizer.eos_id)
    atomic_write_json(directory / "config.json", hf)
