"""Model file formats: the Hugging Face directory (hf.py, its weights in safetensors.py), GGUF
(gguf.py, gguf_tokenizer.py, gguf_writer.py), llama2.c's .bin (llama2c.py) and PEFT's LoRA adapter
directory (peft.py); each module checks everything it reads.  ``load`` picks the format of a path
(``Llama.from_pretrained`` calls it)."""
from pathlib import Path

import numpy as np

from ..config import LORA_TARGETS
from ..errors import CheckpointError
from ..files import small_pages


def load(path, dtype=np.float32, quantized=False):
    """A Llama, with its tokenizer, from

    * a Hugging Face directory or a run directory of `npllama train` (config.json, safetensors
      weights, tokenizer.json and tokenizer_config.json if any);
    * a ``.gguf`` file, or a directory holding one and no config.json (gguf.py: weights
      dequantized, config, tokenizer and chat template from its metadata, if any);
    * a llama2.c checkpoint, a ``.bin`` file of version 0 or 1 (llama2c.py), with the tokenizer.bin
      beside it when ``npllama export --to llama2c`` wrote it (else no tokenizer);
    * a PEFT LoRA adapter directory (adapter_config.json): its base model (any of the above, found
      through base_model_name_or_path, relative to the adapter directory first) with the adapter
      applied, and the adapter directory's tokenizer.json if it has one.

    The parameters are allocated once, left at zero (``init=False``), and the weights read
    straight into them from the memory-mapped file, so loading needs the final weights plus
    about one tensor: tests/test_load_memory.py holds the peak to 1.5x the weights.

    ``quantized=True``: a GGUF file's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K matrices stay
    in their blocks (gguf.load_quantized, layers/quantized_linear.py); other tensors and formats
    load as above.

    Raises:
        CheckpointError: none of these, or a checkpoint that cannot be read (naming the file).
    """
    from . import gguf, hf, llama2c, peft   # (not at the top: hf imports the tokenizer, which imports formats.gguf)
    from ..model import Llama               # (the model imports this package)
    from ..tokenizer import Tokenizer       # (as hf above)
    path = Path(path)
    if peft.is_adapter_dir(path):
        config = peft.read_adapter_config(path)
        base = peft.base_model_path(path, config)
        model = load(base, dtype=dtype, quantized=quantized)
        targets = config["target_modules"]
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown:
            raise CheckpointError(f"{path}: target_modules {unknown} are not projections npllama adapts "
                                  f"({', '.join(LORA_TARGETS)})")
        model.add_lora(config["r"], config["lora_alpha"], targets, config.get("lora_dropout") or 0.0)
        peft.load_adapter_weights(path, model.lora_params)
        model.lora_base = base
        model.tokenizer = hf.load_tokenizer(path, model.config) or model.tokenizer
        return model
    if gguf.is_gguf(path) or (path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))):
        ckpt = gguf.open_gguf(path)
        # The tokenizer first: building it takes Python lists of the whole vocabulary for a moment,
        # and that moment then comes before the weights are in memory, not on top of them.
        tokenizer = Tokenizer.from_gguf(ckpt) if ckpt.value_length("tokenizer.ggml.tokens") else None
        model = Llama(ckpt.config, dtype=dtype, init=False)
        if quantized:
            small_pages(model.flat_params)     # (only the norm gains are written into it)
            gguf.use_quantized(model, *gguf.load_quantized(ckpt, model.params))
        else:
            gguf.load_weights(ckpt, model.params)
        model.tokenizer = tokenizer
        return model
    if llama2c.is_llama2c(path):
        ckpt = llama2c.open_llama2c(path)
        model = Llama(ckpt.config, dtype=dtype, init=False)
        llama2c.load_weights(ckpt, model.params)
        beside = path.parent / "tokenizer.bin"     # (npllama export --to llama2c writes both)
        model.tokenizer = llama2c.read_tokenizer_bin(beside, ckpt.config.vocab_size) if beside.is_file() else None
        return model
    if path.is_file():
        raise CheckpointError(f"{path}: neither a GGUF file nor a llama2.c .bin (give one of those, a Hugging "
                              "Face directory or a run directory)")
    cfg, files = hf.open_pretrained(path)
    model = Llama(cfg, dtype=dtype, init=False)
    hf.load_weights(path, files, cfg, model.params)
    model.tokenizer = hf.load_tokenizer(path, cfg)
    return model
