"""npllama: a Llama-2/Llama-3 decoder-only transformer in NumPy, every backward pass by hand.

The names below load on first use (PEP 562), so that ``import npllama`` starts neither NumPy nor
Numba: the `npllama` command must set their thread counts (``--threads``) before they start.
"""
import importlib

__version__ = "0.1.0"
_LAZY = {"LlamaConfig": ".config", "Llama": ".model", "Tokenizer": ".tokenizer", "NpllamaError": ".errors",
         "ConfigError": ".errors", "CheckpointError": ".errors", "InputError": ".errors", "DataError": ".errors",
         "compare": ".divergence"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'npllama' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value   # the next lookup does not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
