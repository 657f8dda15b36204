"""The safetensors format, read and written here rather than borrowed.

    [8 bytes: n, little-endian] [n bytes: JSON header] [data: every tensor's bytes, back to back]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [start, end]} (offsets into
the data section), plus an optional "__metadata__" object of strings.  Writing the reader out lets
every way a file can be wrong (truncated, a header claiming terabytes, overlapping or out-of-range
offsets, a dtype or shape that does not match) become a CheckpointError naming the file, before
any large allocation.  Nothing is ever unpickled.  Writes are atomic (``files.atomic_write_bytes``).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..files import atomic_write_bytes, open_regular_file, parse_json, release_pages

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
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
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header claims {n:,} bytes, more than the format's limit of "
                              f"{MAX_HEADER_BYTES:,}")
    if n > size - 8:
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


def iter_safetensors(path):
    """Yield (name, safetensors dtype, array) for every tensor, in file order; BF16 arrays come as
    their raw uint16 bits.  The header is validated before anything is mapped.

    The file is memory-mapped, not read: each array is a read-only view of the map, and once the
    caller has moved on to the next tensor the pages of the ones before are released from this
    process (madvise DONTNEED: the page cache keeps them, a later access reads them again), so
    loading holds one tensor of the file at a time beside the caller's own copy.  When the file
    carries npllama's checksum it is verified as the tensors go by, and a mismatch raises once
    the last one has been yielded: consume the whole iterator before trusting what it gave."""
    path = Path(path)
    f, size = open_regular_file(path, "safetensors file")
    with f:
        header, metadata, data_start = _read_header(f, path, size)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if len(mapped) != size:
        raise CheckpointError(f"{path}: file changed size while being read")
    expected_digest = metadata.get(CHECKSUM_KEY)
    digest = hashlib.sha256() if expected_digest is not None else None
    hashed = released = data_start   # file offsets: hashed up to, pages released below
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        start, end = (data_start + o for o in info["data_offsets"])
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        if digest is not None:
            digest.update(memoryview(mapped)[hashed:end])
            hashed = end
        yield name, info["dtype"], np.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize,
                                                 offset=start).reshape(info["shape"])
        release_pages(mapped, released, end)
        released = end
    if digest is not None:
        digest.update(memoryview(mapped)[hashed:])
        if digest.hexdigest() != expected_digest:
            raise CheckpointError(f"{path}: checksum mismatch, the tensor data is corrupt (changed since it "
                                  "was written)")


def read_safetensors(path, names=None) -> dict[str, tuple[str, np.ndarray]]:
    """-> {name: (safetensors dtype, array)} of every tensor (or those in ``names``), copied out
    of the file (``iter_safetensors``, checksum verified); BF16 arrays as their raw uint16 bits."""
    return {name: (st_dtype, arr.copy()) for name, st_dtype, arr in iter_safetensors(path)
            if names is None or name in names}


def copy_float(st_dtype, arr, out: np.ndarray, where) -> np.ndarray:
    """Write the floating-point tensor ``arr`` (BF16 as raw bits) into ``out``, converted to its
    dtype in place (no temporary of the tensor's size for F32/F16/F64, nor for BF16 into float32).

    Raises:
        CheckpointError: not a floating-point tensor, or NaN / infinite values (float64 beyond
            float32's range among them)."""
    if st_dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: expected a floating-point tensor, got {st_dtype}")
    if st_dtype == "BF16" and out.dtype == np.float32:  # bfloat16 is the top half of a float32
        bits = out.view(np.uint32)
        bits[...] = arr
        bits <<= 16
    elif st_dtype == "BF16":
        out[...] = (arr.astype(np.uint32) << 16).view(np.float32)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(out, arr, casting="unsafe")
    return require_finite(out, where)


def require_finite(arr: np.ndarray, where) -> np.ndarray:
    """``arr``, if every value is finite; else a CheckpointError (every loader refuses NaN and
    infinite weights: a model holding one computes NaN logits for every text)."""
    if not np.isfinite(arr).all():
        raise CheckpointError(f"{where}: contains NaN or infinite values")
    return arr
