"""GGUF in: the config, weights and metadata of a Llama checkpoint in llama.cpp's file format.

A GGUF file is a header of typed key/value metadata (``llama.block_count``, the tokenizer's
vocabulary, the chat template, ...) followed by tensors, each stored as float32/16, bfloat16 or
in blocks of quantized integers sharing a scale.  The parsing and the dequantization are
llama.cpp's own Python library, ``gguf`` (``GGUFReader`` memory-maps the file; ``quants.dequantize``
turns a run of blocks into float32 exactly as llama.cpp does); what is written here is the
translation into npllama's model:

* names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` etc. (``GGUF_NAMES``);
  no ``output.weight`` means the output projection is tied to the embedding;
* the rotary row order.  Hugging Face's Llama rotates the two halves of each head against each
  other, llama.cpp adjacent pairs; llama.cpp's converter reorders the rows of W_q and W_k within
  each head (npllama.formats.rope_rows) and reading undoes it.  Rows of one head never leave it,
  so the undoing works on any run of whole heads, which is what lets a tensor be dequantized in
  row chunks;
* the config, from the ``llama.*`` keys.

Memory: a tensor is read from the file (not through the memory map, whose pages would count in
the process) and dequantized a chunk of rows at a time straight into its destination array, or,
kept quantized, read straight into its blocks; the metadata's long arrays (the vocabulary) stay
in the file until asked for (``_Reader``).  So loading needs the final weights plus one chunk:
SmolLM2-135M's Q4_1 file (94 MB) loads quantized, tokenizer included, at a peak of 1.16x the
file's size above the process before (benchmarks/real_model.py).
"""
from __future__ import annotations

import os
import re
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
import gguf
import numpy as np

from ..config import LlamaConfig
from ..errors import CheckpointError, ConfigError, one_line
from .rope_rows import deinterleave_rope_rows
from .safetensors import require_finite

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
CHUNK_ELEMENTS = 1 << 22   # floats dequantized at a time: 16 MB of float32 scratch

GGUF_NAMES = {  # GGUF tensor name -> Hugging Face name; {i} is the layer
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None for a name npllama has no use for."""
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match is None:
        return GGUF_NAMES.get(gguf_name)
    layer, rest = match.groups()
    template = GGUF_NAMES.get("blk.{i}." + rest)
    return None if template is None else template.format(i=int(layer))


def is_gguf(path) -> bool:
    """True if ``path`` is a file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def find_gguf(path) -> Path:
    """``path`` itself if it is a file, else the one ``*.gguf`` file in the directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(p.name for p in found[:3])})"
        raise CheckpointError(f"{path}: {what}; name the file to load")
    return found[0]


class _Reader(gguf.GGUFReader):
    """``gguf.GGUFReader`` with two savings for a file holding a vocabulary:

    * it slices a plain ndarray view of its memory map: every slice of an ``np.memmap`` runs
      ``memmap.__array_finalize__``, and reading the ~100k strings of a vocabulary takes ~750k
      slices (4 s of the 5 s to open SmolLM2's file);
    * a metadata array of strings or numbers (the vocabulary's tokens, its merges, a type per
      token) is kept as the positions of its items in the file (``_ArrayItems``) and decoded when
      asked for.  The stock reader makes a few numpy views per item, ~300 bytes each: 72 MB for
      SmolLM2's 49k tokens and 49k merges, most of the 94 MB Q4_1 file's size again."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if type(self.data) is np.memmap:
            self.file_map = self.data._mmap          # the mmap.mmap under numpy's memmap (_ArrayItems)
            self.data = self.data.view(np.ndarray)   # same pages; keeps the map alive through .base
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs: int, count: int) -> int:
        """The stock ``_build_fields``, but with arrays of strings or numbers as ``_ArrayField``s."""
        for _ in range(count):
            orig_offs = offs
            key_length, key = self._get_str(offs)
            offs += int(key_length.nbytes + key.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            head = [key_length, key, raw_type]
            name = str(bytes(key), encoding="utf-8")
            items = _ArrayItems.read(self, name, head, offs) if raw_type[0] == gguf.GGUFValueType.ARRAY else None
            if items is not None:
                self._push_field(_ArrayField(orig_offs, name, items, items.data, items.types), skip_sum=True)
                offs = items.end
                continue
            size, parts, data, types = self._get_field_parts(offs, raw_type[0])
            self._push_field(gguf.ReaderField(orig_offs, name, head + parts, [i + len(head) for i in data], types),
                             skip_sum=True)
            offs += size
        return offs

    def byte_order_char(self) -> str:
        """struct's byte order character for the file's numbers."""
        little = (self.byte_order == "I") == (sys.byteorder == "little")
        return "<" if little else ">"


class _ArrayItems(Sequence):
    """A metadata array's ``parts`` as the stock reader lists them (the key's length and bytes, the
    value type, the item type, the count, then each item: a string as its length and its bytes, a
    number as a one-element array), each made when indexed; ``contents`` decodes the items."""

    def __init__(self, reader, head, types, count, end, positions=None, values=None):
        self.reader, self.head, self.types, self.count, self.end = reader, head, types, count, end
        self.positions = positions   # strings: where each one's length field starts, then the array's end
        self.values = values         # numbers: all of them, one view of the file
        self.per_item = 1 if positions is None else 2
        first = len(head) + self.per_item - 1
        self.data = range(first, first + self.per_item * count, self.per_item)   # (the items' strings or values)

    @classmethod
    def read(cls, reader, name, head, offs):
        """The array at ``offs`` (its item type and count, then the items), or None for an array of
        arrays (left to the stock reader).  Raises ValueError for one running past the file's end."""
        item_type, count = reader._get(offs, np.uint32), reader._get(offs + 4, np.uint64)
        gtype = gguf.GGUFValueType(item_type[0])
        head, types = head + [item_type, count], [gguf.GGUFValueType.ARRAY, gtype]
        n, start, size = int(count[0]), offs + 12, len(reader.data)
        if gtype in reader.gguf_scalar_to_np:
            values = reader._get(start, reader.gguf_scalar_to_np[gtype], n)
            if len(values) != n:
                raise ValueError(f"{name}: {n:,} values run past the end of the file")
            return cls(reader, head, types, n, start + values.nbytes, values=values)
        if gtype != gguf.GGUFValueType.STRING:
            return None
        if n > (size - start) // 8:
            raise ValueError(f"{name}: {n:,} strings cannot fit in the rest of the file")
        positions = np.empty(n + 1, dtype=np.int64)
        length, at = struct.Struct(reader.byte_order_char() + "Q"), start
        for k in range(n):
            if at + 8 > size:
                raise ValueError(f"{name}: string {k:,} starts past the end of the file")
            positions[k] = at
            at += 8 + length.unpack_from(reader.file_map, at)[0]
        if at > size:
            raise ValueError(f"{name}: its last string ends past the end of the file")
        positions[n] = at
        return cls(reader, head, types, n, at, positions=positions)

    def __len__(self):
        return len(self.head) + self.per_item * self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = range(len(self))[i]   # (negative indices; IndexError past the end)
        if i < len(self.head):
            return self.head[i]
        item, part = divmod(i - len(self.head), self.per_item)
        if self.positions is None:
            return self.values[item:item + 1]
        at = int(self.positions[item])
        length = self.reader._get(at, np.uint64)
        return self.reader._get(at + 8, np.uint8, length[0]) if part else length

    def contents(self, index_or_slice=slice(None)):
        """Item ``index_or_slice`` (a Python number or str), or a list of the items of a slice."""
        if self.positions is None:
            return self.values[index_or_slice].tolist()
        starts = self.positions[:-1][index_or_slice] + 8
        ends = self.positions[1:][index_or_slice]
        mapped = self.reader.file_map
        if isinstance(index_or_slice, slice):
            return [str(mapped[a:b], encoding="utf-8") for a, b in zip(starts.tolist(), ends.tolist())]
        return str(mapped[int(starts):int(ends)], encoding="utf-8")


class _ArrayField(gguf.ReaderField):
    """A ``gguf.ReaderField`` of an array whose ``parts`` are an ``_ArrayItems``."""
    __slots__ = ()

    def contents(self, index_or_slice=slice(None)):
        return self.parts.contents(index_or_slice)


class GGUFCheckpoint:
    """An open ``.gguf`` file: its metadata, the LlamaConfig it describes, and its tensors under
    Hugging Face names, dequantized on demand (``read_into``).

    Raises:
        CheckpointError: not a readable GGUF file, not a Llama (or one npllama cannot run), a tensor
            npllama has no use for or cannot dequantize; the message names the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            self.reader = _Reader(path)
        # gguf's parser reports a damaged file through whatever numpy raised on the way
        # (ValueError, IndexError, KeyError, struct errors...): all of them mean "not a GGUF".
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({one_line(e, 200)})") from None
        arch = self.value("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
        self.tensors = {}  # HF name -> gguf ReaderTensor
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                if t.name == "rope_freqs.weight":
                    raise CheckpointError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama-3.1 "
                                          "style scaling) are not supported yet")
                raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a Llama model")
            if t.tensor_type not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which npllama cannot "
                    f"dequantize (supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
            self.tensors[name] = t
        check_tensor_layout(self.reader, path)
        self.config = self._config()
        check_parameter_count(self.config, self.tensors.values(), path)

    # ---- metadata ---------------------------------------------------------------------------
    def value(self, key: str, default=None):
        """The metadata value under ``key`` (a number, a string, or a list of them), or ``default``."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: metadata {key!r} is unreadable ({one_line(e, 200)})") from None

    @property
    def metadata(self) -> dict:
        """Every metadata key with its value; the tokenizer's long arrays as their length only."""
        out = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            is_array = field.types and field.types[0] == gguf.GGUFValueType.ARRAY
            out[key] = f"<{len(field.data)} values>" if is_array and len(field.data) > 64 else self.value(key)
        return out

    def _int(self, key, default=None):
        value = self.value(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{self.path}: metadata {key} must be a positive integer, got {value!r}")
        return value

    def _config(self) -> LlamaConfig:
        if "model.embed_tokens.weight" not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor 'token_embd.weight'")
        vocab_size, dim = self.shape("model.embed_tokens.weight")
        n_heads = self._int("llama.attention.head_count")
        head_dim = self._int("llama.attention.key_length", self._int("llama.embedding_length") // n_heads)
        if self.value("llama.attention.value_length", head_dim) != head_dim:
            raise CheckpointError(f"{self.path}: value heads of another width than key heads are not supported")
        if self.value("llama.rope.dimension_count", head_dim) != head_dim:
            raise CheckpointError(f"{self.path}: RoPE on part of a head (rope.dimension_count "
                                  f"{self.value('llama.rope.dimension_count')} < head size {head_dim}) is not supported")
        scaling = self.value("llama.rope.scaling.type", "none")
        if scaling != "none":
            raise CheckpointError(f"{self.path}: RoPE scaling {scaling!r} is not supported")
        tokens = self.value_length("tokenizer.ggml.tokens")
        if tokens > vocab_size:
            raise CheckpointError(f"{self.path}: {tokens} tokens in the vocabulary but the embedding has "
                                  f"only {vocab_size} rows")
        bos, eos = self.value("tokenizer.ggml.bos_token_id"), self.value("tokenizer.ggml.eos_token_id")
        try:
            return LlamaConfig(
                vocab_size=vocab_size,
                dim=self._int("llama.embedding_length"),
                n_layers=self._int("llama.block_count"),
                n_heads=n_heads,
                n_kv_heads=self._int("llama.attention.head_count_kv", n_heads),
                hidden_dim=self._int("llama.feed_forward_length"),
                max_seq_len=self._int("llama.context_length", 2048),
                # The file holds eps as float32 (1e-5 reads back as 9.99999974e-06); llama.cpp and
                # transformers both use that value, so npllama does too.
                norm_eps=float(self.value("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self.value("llama.rope.freq_base", 10000.0)),
                tie_embeddings="lm_head.weight" not in self.tensors,
                head_dim=None if head_dim * n_heads == dim else head_dim,
                bos_token_id=bos if isinstance(bos, int) and bos < vocab_size else None,
                eos_token_id=eos if isinstance(eos, int) and eos < vocab_size else None,
            )
        except CheckpointError:   # (a metadata value, already named with the file)
            raise
        except (ConfigError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: {one_line(e)}") from None

    def value_length(self, key: str) -> int:
        """Number of values in the array under ``key`` (0 if absent), without decoding them."""
        field = self.reader.fields.get(key)
        return 0 if field is None else len(field.data)

    # ---- tensors ----------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        """NumPy shape (rows, columns) of a tensor: GGUF lists dimensions innermost first."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        """Dequantize tensor ``name`` (a Hugging Face name) into ``out``, Q/K rows unpermuted.  The
        bytes are read from the file a chunk of rows at a time, not through the memory map, whose
        pages would count in the process's memory (each page touched, and the kernel maps up to
        64 KB around it)."""
        t = self.tensors[name]
        rows, cols = self.shape(name) if len(t.shape) == 2 else (1, int(t.shape[0]))
        target = out.reshape(rows, cols)
        n_head = {"q_proj": self.config.n_heads, "k_proj": self.config.n_kv_heads}.get(name.split(".")[-2])
        hd = self.config.head_dim
        # Chunks of whole heads (see the module docstring), at least one head.
        step = max(hd, CHUNK_ELEMENTS // cols // hd * hd)
        stored = t.data.reshape(rows, -1)   # (the mapped view: its row shape and dtype)
        with open(self.path, "rb", buffering=0) as file:
            for r0 in range(0, rows, step):
                raw = read_rows(file, t, stored, r0, min(rows, r0 + step), self.path)
                with np.errstate(all="ignore"):   # (a scale that overflows is refused just below, by name)
                    w = gguf.quants.dequantize(raw, t.tensor_type)   # (r, cols) float32
                require_finite(w, f"{self.path}: tensor {t.name!r}")
                if n_head is None:
                    target[r0:r0 + step] = w
                else:
                    target[r0:r0 + step] = deinterleave_rope_rows(w, hd)
        return out


def read_rows(file, tensor, stored: np.ndarray, start: int, stop: int, path, out=None) -> np.ndarray:
    """Rows start .. stop-1 of ``tensor`` (``stored``: its rows as the reader maps them) read from
    the open ``file`` into ``out`` (default: a new array)."""
    out = np.empty((stop - start, *stored.shape[1:]), dtype=stored.dtype) if out is None else out
    row_bytes = stored[:1].nbytes
    file.seek(tensor.data_offset + start * row_bytes)
    if file.readinto(memoryview(out).cast("B")) != out.nbytes:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} ends past the end of the file (truncated?)")
    return out


def check_tensor_layout(reader: gguf.GGUFReader, path) -> None:
    """Refuse a file whose tensors do not tile its data section, from the header alone: each tensor
    starts on the alignment, none overlaps another, and between them and after the last there is
    only padding (less than the alignment) up to the end of the file.  A tensor count one short
    (every tensor read 64 bytes early, the last one dropped), an offset moved onto another tensor
    or a tensor retyped to another size all break the tiling; llama.cpp's and gguf's writers never do."""
    align, data_start, size = reader.alignment, reader.data_offset, len(reader.data)
    end, previous = data_start, None
    for t in sorted(reader.tensors, key=lambda t: (t.data_offset, t.n_bytes)):
        start = t.data_offset
        if (start - data_start) % align:
            raise CheckpointError(f"{path}: tensor {t.name!r} starts at byte {start:,}, not on the file's "
                                  f"{align}-byte alignment (corrupt header?)")
        if start < end:
            raise CheckpointError(f"{path}: tensor {t.name!r} overlaps tensor {previous!r} (corrupt header?)")
        if start - end >= align:
            raise CheckpointError(f"{path}: {start - end:,} bytes before tensor {t.name!r} belong to no tensor "
                                  "(a wrong tensor count or offset in the header?)")
        end, previous = start + t.n_bytes, t.name
    if end > size:
        raise CheckpointError(f"{path}: tensor {previous!r} ends at byte {end:,}, past the end of the file "
                              f"({size:,} bytes; truncated?)")
    if size - end >= align:
        raise CheckpointError(f"{path}: the last {size - end:,} bytes of the file belong to no tensor (a wrong "
                              "tensor count in the header, or trailing data?)")


def check_parameter_count(config: LlamaConfig, tensors, path) -> None:
    """Refuse metadata that implies more parameters than the file's tensors could hold, before
    anything is allocated for them (``llama.block_count`` = 10^6 must not ask for 50 GB); a mere
    mismatch is named tensor by tensor by ``load_weights``."""
    held = sum(int(t.n_elements) for t in tensors)
    implied = config.num_parameters()
    if implied > 2 * held:
        raise CheckpointError(f"{path}: the metadata implies {implied:,} parameters ({config.n_layers} layers, dim "
                              f"{config.dim}, hidden {config.hidden_dim}, vocab {config.vocab_size}) but the file's "
                              f"tensors hold {held:,} (corrupt metadata?)")


def open_gguf(path) -> GGUFCheckpoint:
    """The ``.gguf`` file ``path``, or the one in the directory ``path``, opened (see GGUFCheckpoint)."""
    return GGUFCheckpoint(find_gguf(path))


def load_weights(ckpt: GGUFCheckpoint, params: dict[str, np.ndarray], expected: dict | None = None) -> None:
    """Dequantize every tensor of ``ckpt`` into ``params`` (Hugging Face name -> the model's array,
    as ``Llama.params``), after checking that the names and shapes are exactly those of ``expected``
    (default ``params``; a subset of the names may be read: ``load_quantized``).

    Raises:
        CheckpointError: a tensor missing, unexpected or of the wrong shape.
    """
    path = ckpt.path
    wanted, expected = params, params if expected is None else expected
    params = expected
    missing = [n for n in params if n not in ckpt.tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, t in ckpt.tensors.items():
        if name not in params:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {ckpt.config.n_layers}-layer model")
        if ckpt.shape(name) != params[name].shape:
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {ckpt.shape(name)}, the metadata "
                                  f"implies {params[name].shape}")
    for name in wanted:
        ckpt.read_into(name, wanted[name])


# ---- weights kept quantized (layers/quantized_linear.py) --------------------------------------------
# Projections fused in the engine (buffers.layer_views): q, k, v one matrix, gate and up one matrix.
FUSED = {"wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "w_gate_up": ("mlp.gate_proj", "mlp.up_proj")}


def quantized_names(ckpt: GGUFCheckpoint) -> set[str]:
    """The matrices of ``ckpt`` that stay in their blocks: those stored as Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
    Q4_K, Q5_K or Q6_K whose fused partners (q/k/v, gate/up) are stored the same way, or all in
    Q8_0, Q4_0 and Q5_0 (kept as Q8_0 together: ``fused_qtype``); every other tensor is dequantized.
    (llama.cpp's Q4_K_M of a model whose width is not whole 256-weight super-blocks, SmolLM2-135M's
    576, stores q and k as Q5_0 and v as Q8_0 in some layers.)"""
    # (not at the top: quantized_linear loads Numba, and the tokenizer imports this module)
    from ..layers.quantized_linear import QUANTIZED_TYPES
    kind = {name: QUANTIZED_TYPES.get(t.tensor_type) for name, t in ckpt.tensors.items() if len(t.shape) == 2}
    names = {name for name, qtype in kind.items() if qtype is not None}
    for i in range(ckpt.config.n_layers):
        for parts in FUSED.values():
            full = [f"model.layers.{i}.{p}.weight" for p in parts]
            if fused_qtype([kind.get(n) for n in full]) is None:
                names -= set(full)
    return names


def fused_qtype(qtypes):
    """The format a fused matrix of parts stored as ``qtypes`` is kept in: theirs if they agree, Q8_0
    if they are all Q8_0, Q4_0 or Q5_0 (which are Q8_0 blocks in other words: QuantizedMatrix.as_q8_0),
    else None (dequantized)."""
    from ..layers.quantized_linear import WIDENS_TO_Q8_0   # (as in quantized_names)
    kinds = set(qtypes)
    if len(kinds) == 1:
        return qtypes[0]
    return "Q8_0" if kinds <= {"Q8_0", *WIDENS_TO_Q8_0} else None


def read_blocks_into(ckpt: GGUFCheckpoint, name: str, out: np.ndarray, file) -> np.ndarray:
    """Read tensor ``name``'s blocks (rows, row bytes) from the open ``file`` into ``out`` as they
    are in the file, Q/K rows in Hugging Face's order (a row permutation: each row is whole blocks)."""
    t = ckpt.tensors[name]
    read_rows(file, t, t.data.reshape(out.shape[0], -1).view(np.uint8), 0, out.shape[0], ckpt.path, out)
    n_head = {"q_proj": ckpt.config.n_heads, "k_proj": ckpt.config.n_kv_heads}.get(name.split(".")[-2])
    if n_head is not None:
        out[...] = deinterleave_rope_rows(out, ckpt.config.head_dim)
    check_block_scales(out, t.tensor_type, f"{ckpt.path}: tensor {t.name!r}")
    return out


# Byte offsets in a block of the float16 numbers that scale its codes (layers/quantized_linear.py):
# a scale d, and for Q4_1, Q5_1, Q4_K and Q5_K a minimum m (K-quants: dmin) after it; Q6_K's d ends
# its 210 bytes.  (The K-quants' 6-bit and int8 sub-block scales are integers: always finite.)
SCALE_OFFSETS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
                 Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def check_block_scales(blocks: np.ndarray, tensor_type, where) -> None:
    """Refuse blocks (rows, row bytes; uint8) one of whose float16 scales is NaN or infinite, as
    ``require_finite`` refuses a dequantized tensor: with the exponent bits all set, every weight of
    the block would be NaN or infinite.  (Finite scales make finite weights: |d c + m| < 2^24.)"""
    block_bytes = gguf.GGML_QUANT_SIZES[tensor_type][1]
    halves = blocks.view(np.uint16).reshape(blocks.shape[0], -1, block_bytes // 2)[
        :, :, [offset // 2 for offset in SCALE_OFFSETS[tensor_type]]]
    if (halves & 0x7C00).max(initial=0) == 0x7C00:   # (an exponent with every bit set)
        bad = (halves & 0x7C00) == 0x7C00
        row, block, which = (int(i) for i in np.argwhere(bad)[0])
        raise CheckpointError(f"{where}: block {block} of row {row} has a NaN or infinite "
                              f"{'minimum' if which else 'scale'} ({bad.sum():,} such blocks)")


def load_quantized(ckpt: GGUFCheckpoint, params: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Like ``load_weights``, but the matrices of ``quantized_names`` are read as QuantizedMatrix
    (their blocks copied from the file, never dequantized) instead of into ``params``.

    Returns (matrices by Hugging Face name, per layer the fused ones: {i: {"wqkv": ..., ...}}); the
    fused matrices own the blocks and the per-projection ones are row views of them."""
    from ..engine import quantized as engine                                 # (as in quantized_names)
    from ..layers.quantized_linear import QUANTIZED_TYPES, QuantizedMatrix
    keep = quantized_names(ckpt)
    load_weights(ckpt, {n: p for n, p in params.items() if n not in keep}, expected=params)
    matrices, fused = {}, {}

    def read(names):
        stored = [QUANTIZED_TYPES[ckpt.tensors[n].tensor_type] for n in names]
        qtype, cols = fused_qtype(stored), ckpt.shape(names[0])[1]
        rows = [ckpt.shape(n)[0] for n in names]
        blocks = np.empty((sum(rows), cols // engine.block_weights(qtype) * engine.BLOCK_BYTES[qtype]), dtype=np.uint8)
        start = 0
        for n, r, kind in zip(names, rows, stored):
            if kind == qtype:
                read_blocks_into(ckpt, n, blocks[start:start + r], file)
            else:    # (Q4_0 or Q5_0 beside Q8_0: read as they are, then the same numbers as Q8_0 blocks)
                part = np.empty((r, int(ckpt.tensors[n].n_bytes) // r), dtype=np.uint8)
                part = QuantizedMatrix(kind, read_blocks_into(ckpt, n, part, file), cols)
                blocks[start:start + r] = part.as_q8_0().blocks
            start += r
        whole = QuantizedMatrix(qtype, blocks, cols)
        start = 0
        for n, r in zip(names, rows):
            matrices[n] = whole.rows(start, start + r) if len(names) > 1 else whole
            start += r
        return whole

    with open(ckpt.path, "rb", buffering=0) as file:
        for i in range(ckpt.config.n_layers):
            for role, parts in FUSED.items():
                names = [f"model.layers.{i}.{p}.weight" for p in parts]
                if names[0] in keep:
                    fused.setdefault(i, {})[role] = read(names)
        for name in sorted(keep - set(matrices)):
            read([name])
    return matrices, fused


def quantize_weights(params: dict[str, np.ndarray], layers: list[dict], qtype: str) -> tuple[dict, dict]:
    """What ``load_quantized`` reads from a file stored as ``qtype``, made from a model's float
    weights (``params`` by Hugging Face name, ``layers`` the engine's fused views, buffers.layer_views)
    by the gguf package's quantizer: every matrix in rows of whole 32-weight blocks."""
    from ..layers.quantized_linear import QuantizedMatrix   # (as in quantized_names)
    matrices, fused = {}, {}
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}."
        for role, parts in FUSED.items():
            whole = fused.setdefault(i, {})[role] = QuantizedMatrix.from_float(layer[role], qtype)
            start = 0
            for part in parts:
                rows = params[p + part + ".weight"].shape[0]
                matrices[p + part + ".weight"] = whole.rows(start, start + rows)
                start += rows
        for part in ("self_attn.o_proj", "mlp.down_proj"):
            matrices[p + part + ".weight"] = QuantizedMatrix.from_float(params[p + part + ".weight"], qtype)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in params:
            matrices[name] = QuantizedMatrix.from_float(params[name], qtype)
    return matrices, fused


def use_quantized(model, matrices, fused):
    """Put QuantizedMatrix weights in place of ``model``'s float ones: ``matrices`` by Hugging Face name,
    ``fused`` per layer index the engine's fused ones ({"wqkv": ..., "w_gate_up": ...}).  The
    float parameters they replace stay zeros that are never written (untouched pages: no memory)."""
    for name, matrix in matrices.items():
        model.params[name] = matrix
    for i, layer in enumerate(model.layers):
        layer.update(fused.get(i, {}))
        p = f"model.layers.{i}."
        layer["wo"] = model.params[p + "self_attn.o_proj.weight"]
        layer["w_down"] = model.params[p + "mlp.down_proj.weight"]
    model.quantized = bool(matrices)
    return model
