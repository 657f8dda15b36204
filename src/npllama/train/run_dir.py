"""The run directory a training run writes into: which directories it may use, a lock that keeps a
second process out, and the record of what this run created there -- all that a run which fails
before its first checkpoint removes again, so that nothing of the user's is ever deleted.

A run marks its directory with a small file, ``.npllama-run``, and holds an exclusive ``flock`` on
it while it trains.  A fresh run uses a directory that does not exist, an empty one, or one
marked by an earlier run that never saved (a kill during setup); any other non-empty directory is
the user's and is refused unless ``--force``.  The lock dies with its process (the kernel drops a
``flock`` when the process ends, however it ends), so a crashed run leaves no lock to clear.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import ConfigError, WriteError

MARKER = ".npllama-run"


class RunDirectory:
    """A run directory held by this process (``claim``): its lock, and the paths this run created."""

    def __init__(self, path: Path, lock_fd: int, created: list[Path]):
        self.path, self._lock_fd, self.created = path, lock_fd, created

    @classmethod
    def claim(cls, path, *, own_names=(), fresh: bool, force: bool = False) -> RunDirectory:
        """Lock ``path`` for this process (refused when another process holds it).  A ``fresh`` run
        may use a missing, empty or npllama-marked directory, any other only with ``force``; it then
        records which of ``own_names`` (paths relative to ``path`` that a run writes before its first
        checkpoint, directories before their contents) do not exist yet: the ones ``discard`` removes.
        Refuses a directory where any of them, or a checkpoint's staging directories, is a symbolic
        link (npllama writes only inside the run directory)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out-dir {path}: is a file, not a directory")
        names = (MARKER, *own_names)
        for name in names:
            if (path / name).is_symlink():
                raise ConfigError(f"{path / name}: is a symbolic link; npllama writes a run's files only inside "
                                  "its run directory (remove the link, or choose another --out-dir)")
        if fresh and path.is_dir() and not (path / MARKER).exists() and not force:
            entries = sorted(p.name for p in path.iterdir())
            if entries:
                shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
                raise ConfigError(f"--out-dir {path}: not empty ({shown}) and not an npllama run directory; "
                                  "choose a new or empty directory, or pass --force to write the run's files "
                                  "into it (replacing files of the same names)")
        created = [] if path.exists() else [path]
        created += [path / name for name in names if fresh and not (path / name).exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / MARKER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if created and created[0] == path:
                _remove_empty_dir(path)
            raise WriteError(f"--out-dir {path}: cannot write there ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{path}: in use by another npllama process{holder}; wait for it to end, or "
                                  "choose another --out-dir") from None
            raise WriteError(f"{path / MARKER}: cannot lock the run directory ({e.strerror or e})") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"format": "npllama-run", "pid": os.getpid(), "host": socket.gethostname()})
                  .encode() + b"\n", 0)
        return cls(path, fd, created)

    def discard(self) -> None:
        """Remove what this run created (files, then its directories if they are empty again); nothing
        that was there before is touched."""
        for p in reversed(self.created):   # (contents before their directories, the run directory last)
            if p.is_dir() and not p.is_symlink():
                _remove_empty_dir(p)   # (a directory holding something this run did not make stays)
            else:
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # (drops the flock)
            self._lock_fd = None


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _holder(fd: int) -> str:
    """`` (pid N on HOST)`` from the marker of the process holding the lock, when readable."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f" (pid {int(info['pid'])} on {str(info['host'])[:100]})"
    except (OSError, ValueError, TypeError, KeyError):
        return ""
