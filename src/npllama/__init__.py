"""npllama: a Llama-2/Llama-3 decoder-only transformer in NumPy, every backward pass by hand.

The names below load on first use (PEP 562), so that ``import npllama`` starts neither NumPy nor
Numba (the command line answers --help and usage errors without them).  ``set_threads(n)``: npllama's
thread count (its own threads and the BLAS under NumPy; also ``--threads`` and NPLLAMA_THREADS).
"""
import importlib

__version__ = "0.1.0"
_LAZY = {"LlamaConfig": ".config", "Llama": ".model", "Tokenizer": ".tokenizer", "NpllamaError": ".errors",
         "ConfigError": ".errors", "CheckpointError": ".errors", "InputError": ".errors", "DataError": ".errors",
         "compare": ".divergence", "set_threads": ".engine.threads", "get_threads": ".engine.threads"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'npllama' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value   # the next lookup does not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
