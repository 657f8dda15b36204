"""GGUF out: a Llama and its tokenizer as a ``.gguf`` that llama.cpp runs.

The file is written by llama.cpp's own writer (``gguf.GGUFWriter``); what is decided here is what
goes in, the way llama.cpp's converter (``convert_hf_to_gguf.py``, class LlamaModel) decides it:

* tensors under llama.cpp's names (npllama.formats.gguf.GGUF_NAMES), the rows of W_q and W_k
  put in llama.cpp's adjacent-pair RoPE order (npllama.formats.rope_rows), no ``output.weight``
  when the output projection is the embedding; matrices float32, float16 or quantized to Q8_0,
  Q4_0 or Q4_1 by the gguf package's quantizers (``dtype``), the RMSNorm gains always float32;
* the ``llama.*`` hyperparameters (the ones npllama.formats.gguf reads back);
* the tokenizer as llama.cpp's ``gpt2`` vocabulary (npllama.formats.byte_level): tokens, merges,
  token types (special added tokens CONTROL, other added tokens USER_DEFINED), BOS/EOS ids, whether
  a prompt starts with BOS, the pre-tokenizer's name and the chat template.  Embedding rows past
  the tokenizer's last id get ``[PAD<id>]`` tokens of type UNUSED, as the converter writes them.

The file appears whole or not at all: it is written under a temporary name beside ``path``,
flushed to disk and renamed.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from ..config import LlamaConfig
from ..errors import ConfigError, WriteError
from ..files import fsync_dir
from .byte_level import byte_level_vocabulary
from .gguf import GGUF_NAMES
from .rope_rows import interleave_rope_rows

DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
          # quantized by the gguf package's own quantizers (llama.cpp's rounding); a matrix whose rows are
          # not whole 32-weight blocks stays float16, as llama.cpp's converter does
          "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
          "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
          "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1)}
_HF_TO_GGUF = {hf: g for g, hf in GGUF_NAMES.items()}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face Llama tensor name."""
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return _HF_TO_GGUF["model.layers.{i}." + ".".join(parts[3:])].format(i=int(parts[2]))
    return _HF_TO_GGUF[hf_name]


def write_gguf(path, config: LlamaConfig, params: dict[str, np.ndarray], tokenizer, dtype: str = "f32",
               name: str = "npllama") -> Path:
    """Write the Llama ``config``/``params`` (Hugging Face names, as ``Llama.params``) with its
    ``tokenizer`` (an ``npllama.Tokenizer``) as the GGUF file ``path``; returns ``path``.

    Raises:
        ConfigError: ``dtype`` not f32/f16/q8_0/q4_0/q4_1; a model or tokenizer GGUF cannot express (RoPE
            scaling, a tokenizer that is not byte-level BPE, more tokens than embedding rows).
        WriteError: the file could not be written (any previous file is unchanged).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if config.rope_scaling is not None:
        raise ConfigError("RoPE scaling (Llama-3.1 style) cannot be exported to GGUF yet")
    vocab = byte_level_vocabulary(tokenizer)
    if len(vocab.tokens) > config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(vocab.tokens)} tokens but the model only {config.vocab_size} "
                          "embedding rows")
    path = Path(path)
    float_type, file_type = DTYPES[dtype]
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.n_heads != config.dim:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)

    pad = range(len(vocab.tokens), config.vocab_size)
    T = gguf.TokenType
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens + [f"[PAD{i}]" for i in pad])
    writer.add_token_types([T.CONTROL if i in vocab.special_ids else T.USER_DEFINED if i in vocab.added_ids
                            else T.NORMAL for i in range(len(vocab.tokens))] + [T.UNUSED] * len(pad))
    writer.add_token_merges([f"{left} {right}" for left, right in vocab.merges])
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)

    for hf_name, p in params.items():
        w = np.asarray(p)
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = interleave_rope_rows(w, config.head_dim)
        matrix_type = float_type
        if isinstance(float_type, gguf.GGMLQuantizationType):
            if w.ndim == 2 and w.shape[1] % 32 == 0:
                writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(np.asarray(w, np.float32), float_type),
                                  raw_dtype=float_type)
                continue
            matrix_type = np.float16
        writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(w, dtype=matrix_type if w.ndim == 2 else np.float32))

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, path)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"{path}: cannot write ({e.strerror or e}); the previous file, if any, is unchanged") from e
        raise
    fsync_dir(path.parent)
    return path
