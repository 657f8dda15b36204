"""Reading and writing the Hugging Face format: config.json + model.safetensors.

The safetensors reader is written out here rather than borrowed so that every way a file can be
wrong (truncated, a header claiming terabytes, overlapping or out-of-range offsets, a dtype or
shape that does not match) becomes a CheckpointError naming the file, before any large
allocation.  Nothing is ever unpickled.  Writes are atomic: temp file, fsync, rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import tempfile
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError, ConfigError, WriteError, one_line

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
MAX_JSON_BYTES = 256 * 1024 * 1024    # config.json, shard index, training state: far smaller in practice
# Metadata key holding the SHA-256 of everything after the header. Safetensors has no checksum of
# its own, so without it a flipped bit in the weights would load silently. Files from elsewhere
# lack the key and load unchecked.
CHECKSUM_KEY = "npllama.data_sha256"
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
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e}); the previous file, if any, "
                         "is unchanged") from e
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private (0600); give it the mode a plain open() would have.
            os.fchmod(f.fileno(), _new_file_mode(path))
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            # Disk full, quota, read-only remount...: the old file is untouched, say so in one line.
            raise WriteError(f"{path}: cannot write ({e.strerror or e}); the previous file, if any, "
                             "is unchanged") from e
        raise
    fsync_dir(path.parent)


def _new_file_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)   # replacing a file: keep its mode
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


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


# ---- reading files safely ----------------------------------------------------------------------
def open_regular_file(path, what="file"):
    """Open ``path`` for reading, refusing anything but a regular file (after symlinks): a FIFO
    would block forever, /dev/zero would never end. O_NONBLOCK makes even the open of a FIFO
    return at once, and fstat then checks the very file opened."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a {what}") from None
    except (OSError, ValueError) as e:  # permission, name too long, embedded NUL byte, ...
        raise CheckpointError(f"{path}: cannot open {what} ({getattr(e, 'strerror', None) or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (device, FIFO or socket)"
            raise CheckpointError(f"{path}: {what} is {kind}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _object_without_duplicate_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # json.loads would keep the last value: in a safetensors header one flipped bit in a layer
        # number makes two tensors share a name and one of them silently vanish
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:100]!r}")
            seen.add(key)
    return obj


def parse_json(raw: bytes, where: str, what: str = "JSON"):
    """json.loads that turns every way the text can be bad into one CheckpointError: invalid UTF-8
    or JSON, a key twice in one object, an integer with more digits than Python converts
    (ValueError), nesting deeper than the recursion limit (RecursionError)."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_object_without_duplicate_keys)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: corrupt {what} (not UTF-8: {e.reason} at byte {e.start})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: corrupt {what} (nested too deeply)") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError; so is the int digit limit
        raise CheckpointError(f"{where}: corrupt {what} ({one_line(e, 200)})") from None


# ---- a set of files replaced all at once -------------------------------------------------------
STAGING_DIR = ".checkpoint-staging"   # being written: thrown away after a crash
COMMIT_DIR = ".checkpoint-commit"     # complete: moved into place, after a crash too
COMMIT_LAST = ("training_state.json",)


def begin_staged_write(directory) -> Path:
    """An empty directory inside ``directory`` in which to write a set of files (a checkpoint) that
    must replace their namesakes in ``directory`` all together: see ``commit_staged_write``."""
    directory = Path(directory)
    recover_staged_write(directory)
    stage = directory / STAGING_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    except OSError as e:
        raise WriteError(f"{directory}: cannot write a checkpoint here ({e.strerror or e}); the previous "
                         "checkpoint, if any, is unchanged") from e
    return stage


def commit_staged_write(directory, stage, last=COMMIT_LAST):
    """Replace the files of ``directory`` by those of ``stage`` as one unit.

    Each staged file was written atomically (fsynced). Renaming the staging directory to
    ``COMMIT_DIR`` is the commit point: before it, a crash leaves the old set untouched (the
    staging directory is deleted by the next ``recover_staged_write``); after it,
    ``recover_staged_write`` finishes moving the files in. The files named in ``last`` move last,
    so a reader that never recovers sees the new training state only with the new files."""
    directory, stage = Path(directory), Path(stage)
    commit = directory / COMMIT_DIR
    try:
        fsync_dir(stage)
        os.replace(stage, commit)
        fsync_dir(directory)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise WriteError(f"{directory}: cannot commit the checkpoint ({e.strerror or e}); the previous "
                         "checkpoint is unchanged") from e
    _move_committed(directory, commit, last)


def _move_committed(directory: Path, commit: Path, last=COMMIT_LAST):
    names = sorted(p.name for p in commit.iterdir())
    names = [n for n in names if n not in last] + [n for n in last if n in names]
    try:
        for name in names:
            os.replace(commit / name, directory / name)
        fsync_dir(directory)
        commit.rmdir()
    except OSError as e:
        raise WriteError(f"{directory}: checkpoint committed but not all files moved into place "
                         f"({e.strerror or e}); they are in {commit} and the next resume moves them") from e


def recover_staged_write(directory, last=COMMIT_LAST) -> bool:
    """After a crash: finish a committed set of files, discard an uncommitted one. Returns whether
    a committed set was rolled forward. Does nothing (and writes nothing) when there is neither."""
    directory = Path(directory)
    commit = directory / COMMIT_DIR
    rolled = False
    if commit.is_dir() and not commit.is_symlink():
        _move_committed(directory, commit, last)
        rolled = True
    stage = directory / STAGING_DIR
    if stage.is_dir() and not stage.is_symlink():
        shutil.rmtree(stage, ignore_errors=True)
    return rolled


# ---- safetensors -------------------------------------------------------------------------------
def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write ``tensors`` as safetensors (atomically), with the SHA-256 of the data bytes in the
    metadata so that ``read_safetensors`` detects any later change to them."""
    header, offset, arrays = {}, 0, []
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
    chunks = [memoryview(a).cast("B") for a in arrays]
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[CHECKSUM_KEY] = digest.hexdigest()
    header = {"__metadata__": meta, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    atomic_write_bytes(path, [struct.pack("<Q", len(blob)), blob] + chunks)


def _check_header(path, header, data_len):
    """Validate a parsed safetensors header; -> (tensor entries, metadata)."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must be an object of strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {str(shape)[:100]}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise CheckpointError(f"{path}: tensor {name!r} has data offsets {str(offs)[:100]} outside the file "
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
    return header, metadata


def _read_header(f, path, size):
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise CheckpointError(f"{path}: safetensors header claims {n} bytes but the file has {size}")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: truncated while reading the safetensors header")
    header = parse_json(raw, str(path), "safetensors header")
    header, metadata = _check_header(path, header, size - 8 - n)
    return header, metadata, 8 + n


def read_safetensors_header(path):
    """-> (header dict without __metadata__, metadata, data start offset). Validates everything
    (dtypes, shapes, offsets inside the file, no overlaps) before anything is allocated."""
    path = Path(path)
    f, size = open_regular_file(path, "safetensors file")
    with f:
        return _read_header(f, path, size)


def read_safetensors(path, names=None) -> dict[str, tuple[str, np.ndarray]]:
    """-> {name: (safetensors dtype, array)}; BF16 arrays come back as their raw uint16 bits.

    The whole data section is read once (so memory is bounded by the file's size) and, when the
    file carries npllama's checksum, verified against it. Arrays are read-only views of it."""
    path = Path(path)
    f, size = open_regular_file(path, "safetensors file")
    with f:
        header, metadata, data_start = _read_header(f, path, size)
        data = f.read(size - data_start)
    if len(data) != size - data_start:
        raise CheckpointError(f"{path}: file shrank while being read")
    expected_digest = metadata.get(CHECKSUM_KEY)
    if expected_digest is not None and hashlib.sha256(data).hexdigest() != expected_digest:
        raise CheckpointError(f"{path}: checksum mismatch, the tensor data is corrupt (changed since it was "
                              "written)")
    out = {}
    for name, info in header.items():
        if names is not None and name not in names:
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data, dtype=SAFETENSORS_DTYPES[info["dtype"]], count=(end - start) //
                            SAFETENSORS_DTYPES[info["dtype"]].itemsize, offset=start).reshape(info["shape"])
        out[name] = (info["dtype"], arr)
    return out


def to_float(st_dtype, arr, dtype, where):
    if st_dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: expected a floating-point tensor, got {st_dtype}")
    if st_dtype == "BF16":  # bfloat16 is the top half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range -> inf, refused below
        out = arr.astype(dtype)
    if not np.all(np.isfinite(out)):
        raise CheckpointError(f"{where}: contains NaN or infinite values")
    return out


# ---- model directories -------------------------------------------------------------------------
def read_json(path, what="file", max_bytes=MAX_JSON_BYTES):
    """Parse a JSON file; every failure (missing, not a regular file, too big, not UTF-8, not JSON)
    is a CheckpointError naming ``path``."""
    path = Path(path)
    f, size = open_regular_file(path, what)
    with f:
        if size > max_bytes:
            raise CheckpointError(f"{path}: {what} is {size} bytes, more than the {max_bytes} allowed")
        try:
            raw = f.read(size)  # read(n) allocates n bytes up front: ask for what the file holds
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    return parse_json(raw, str(path))


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


IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
SMALLEST_FLOAT_BYTES = 2  # F16/BF16: the fewest bytes a stored weight can take


def load_pretrained(directory, dtype=np.float32):
    from .model import Llama

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg = load_config(directory)
    files = weight_files(directory)
    # Refuse a config whose parameters cannot be in the files before allocating them: a
    # config.json claiming a vocabulary of 10^12 must not get to ask for terabytes.
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
    model = Llama(cfg, dtype=dtype)
    expected = {name: shape for name, shape in model.layout}
    seen = {}
    for path in files:
        for name, (st_dtype, arr) in read_safetensors(path).items():
            if name.endswith(IGNORED_TENSOR_SUFFIXES):
                continue
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: the embedding is the output projection
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for this config")
            if name in seen:
                raise CheckpointError(f"{path}: tensor {name!r} is in both {seen[name].name} and {path.name}")
            if tuple(arr.shape) != expected[name]:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                      f"config.json implies {expected[name]}")
            model.params[name][...] = to_float(st_dtype, arr, model.dtype, f"{path}: tensor {name!r}")
            seen[name] = path
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    tok = directory / "tokenizer.json"
    if tok.exists() or tok.is_symlink():
        from .tokenizer import Tokenizer
        model.tokenizer = Tokenizer.from_file(tok)
        if model.tokenizer.vocab_size > cfg.vocab_size:
            raise CheckpointError(
                f"{tok}: tokenizer.json has {model.tokenizer.vocab_size} tokens but config.json's vocab_size is "
                f"{cfg.vocab_size}; the model has no embedding for the extra ids")
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
