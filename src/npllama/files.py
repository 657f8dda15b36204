"""File primitives: atomic writes, a set of files replaced as one unit, and safe reading.

Writes are atomic (temp file in the same directory, fsync, rename), so a crash leaves either the
old file or the complete new one.  Reads refuse anything but a regular file (a FIFO would block
forever, /dev/zero would never end), and JSON is parsed with a size limit, a nesting limit and no
duplicate keys, every failure becoming one CheckpointError naming the file.  Nothing here knows
what the files hold; this module imports nothing from npllama but its errors.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from .errors import CheckpointError, WriteError, one_line

MAX_JSON_BYTES = 256 * 1024 * 1024    # config.json, shard index, training state: far smaller in practice


# ---- atomic writes -----------------------------------------------------------------------------
def atomic_write_bytes(path, chunks):
    """Write the byte strings ``chunks`` to ``path`` so that a crash leaves either the old file or
    the complete new one: write a temp file in the same directory, fsync it, rename over.

    The temp file is named ``.NAME.HOST-PID.RANDOM.tmp``; those of ``path`` that a process killed
    mid-write left (its pid no longer runs on this host) are removed first."""
    path = Path(path)
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp")
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


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}-"


def remove_stale_temps(path) -> None:
    """Remove the temp files of atomic writes to ``path`` whose writer is gone (a SIGKILL during an
    export leaves hundreds of MB): npllama's naming only, a pid not running on this host."""
    path = Path(path)
    prefix = _temp_prefix(path)
    try:
        entries = [e.name for e in os.scandir(path.parent) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return
    for name in entries:
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True   # (another user's process; or no such pid to ask about: keep the file)
    return True


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


def small_pages(array) -> None:
    """Ask Linux to back the not-yet-touched pages of a large ``array`` with 4 KB pages, not 2 MB
    transparent huge pages (madvise MADV_NOHUGEPAGE; nowhere else does anything).  For a model whose
    big buffer is mostly never written (quantized weights live elsewhere): each norm gain written
    into it would otherwise make a whole 2 MB page resident (measured: SmolLM2's 61 gains, +120 MB)."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux") or array.nbytes < (4 << 20):
        return
    page = mmap.PAGESIZE
    start = -(-array.ctypes.data // page) * page
    length = (array.ctypes.data + array.nbytes - start) // page * page
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 15)   # 15: MADV_NOHUGEPAGE
    except (OSError, AttributeError):
        pass


def release_pages(mapped: mmap.mmap, start: int, stop: int) -> None:
    """Drop the whole pages of bytes [start, stop) of the read-only file mapping ``mapped`` from this
    process (madvise DONTNEED: the page cache keeps them, and a later access reads them again).
    A loader calls it on each tensor once copied, so that the file's pages do not stay counted in
    the process's memory beside the weights until the file is closed."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = stop // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


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


# ---- a set of files replaced all at once -------------------------------------------------------
STAGING_DIR = ".checkpoint-staging"   # being written: thrown away after a crash
COMMIT_DIR = ".checkpoint-commit"     # complete: moved into place, after a crash too


def begin_staged_write(directory, last=()) -> Path:
    """An empty directory inside ``directory`` in which to write a set of files (a checkpoint) that
    must replace their namesakes in ``directory`` all together: see ``commit_staged_write``."""
    directory = Path(directory)
    recover_staged_write(directory, last)
    stage = directory / STAGING_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    except OSError as e:
        raise WriteError(f"{directory}: cannot write a checkpoint here ({e.strerror or e}); the previous "
                         "checkpoint, if any, is unchanged") from e
    return stage


def commit_staged_write(directory, stage, last=()):
    """Replace the files of ``directory`` by those of ``stage`` as one unit.

    Each staged file was written atomically (fsynced). Renaming the staging directory to
    ``COMMIT_DIR`` is the commit point: before it, a crash leaves the old set untouched (the
    staging directory is deleted by the next ``recover_staged_write``); after it,
    ``recover_staged_write`` finishes moving the files in. The files named in ``last`` (a
    checkpoint's training state) move last, so a reader that never recovers sees them only with
    the rest of the new set."""
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


def _move_committed(directory: Path, commit: Path, last=()):
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


def recover_staged_write(directory, last=()) -> bool:
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


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
