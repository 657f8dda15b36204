"""npllama: a Llama-2/Llama-3 decoder-only transformer in NumPy, every backward pass by hand."""
from .config import LlamaConfig
from .errors import CheckpointError, ConfigError, InputError, NpllamaError
from .model import Llama

__version__ = "0.1.0"
__all__ = ["LlamaConfig", "Llama", "NpllamaError", "ConfigError", "CheckpointError", "InputError"]
