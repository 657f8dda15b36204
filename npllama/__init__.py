"""npllama: a Llama-2/Llama-3 decoder-only transformer in NumPy, every backward pass by hand."""
from .config import LlamaConfig
from .errors import CheckpointError, ConfigError, DataError, InputError, NpllamaError
from .model import Llama
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["LlamaConfig", "Llama", "Tokenizer", "NpllamaError", "ConfigError", "CheckpointError", "InputError",
           "DataError"]
