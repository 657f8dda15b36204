"""Exceptions raised by npllama.

Every error a user can cause (bad input, a bad file, a bad config) is a subclass of
``NpllamaError``, which is itself a ``ValueError`` so callers may catch either.
"""


class NpllamaError(ValueError):
    """Base class of npllama's errors."""


class ConfigError(NpllamaError):
    """A model or training config that npllama cannot honour."""


class CheckpointError(NpllamaError):
    """A checkpoint file that is missing, corrupt, foreign or inconsistent."""


class InputError(NpllamaError):
    """Model inputs (token ids, targets) of the wrong type, shape or range."""


class DataError(NpllamaError):
    """A training corpus or token stream that cannot be used (missing, empty, binary, too short)."""


class WriteError(NpllamaError, OSError):
    """A file could not be written (disk full, directory read-only, ...). The previous version of
    the file, if any, is left as it was. Also an ``OSError``, so ``except OSError`` still catches it."""


def one_line(text, limit: int = 300) -> str:
    """``text`` (say, another library's error message, which may quote the bad input) made fit for
    a one-line error: control characters escaped (a newline becomes ``\\n``), cut at ``limit``."""
    text = str(text)
    cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return cut + (" ..." if len(text) > limit else "")
