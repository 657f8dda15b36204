"""llama2.c's files: the ``.bin`` checkpoint (read and write) and the ``tokenizer.bin`` (write; read
back when it is the byte-level layout npllama's export writes).

The formats are those of karpathy/llama2.c's ``export.py`` (which writes them) and ``run.c``
(which runs them); no llama2.c code is part of npllama.  All numbers are little-endian.

Checkpoint, version 0 ("legacy", what ``run.c`` reads)::

    7 x int32    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
                 vocab_size > 0: the output projection is the embedding (tied);
                 vocab_size < 0: a separate classifier of |vocab_size| rows ends the file
    float32      embedding (V, d); attention RMSNorm gains (L, d); W_q (L, H hd, d); W_k (L, KV hd, d);
                 W_v (L, KV hd, d); W_o (L, d, H hd); FFN RMSNorm gains (L, d); W_gate (L, h, d);
                 W_down (L, d, h); W_up (L, h, d); final RMSNorm gain (d,); cos and sin of the RoPE
                 angles (seq_len, hd/2) each (unused by run.c); [classifier (V, d)]

Version 1 (``export.py --version 1``)::

    uint32 0x616b3432 ("ak42"), int32 version = 1, the same 7 x int32 (vocab_size > 0),
    uint8 shared_classifier, zeros up to byte 256;
    float32      attention gains (L, d); FFN gains (L, d); final gain (d,); embedding (V, d); W_q; W_k;
                 W_v; W_o; W_gate; W_down; W_up (each (L, ...) as above); [classifier (V, d)]

Every matrix is (out, in), as in Hugging Face and npllama.  llama2.c's RoPE turns adjacent pairs
of a head's coordinates, so the rows of W_q and W_k are in that order (npllama.formats.rope_rows),
and run.c hard-codes theta = 10000, RMSNorm eps = 1e-5 and head size dim / n_heads.

Tokenizer (``tokenizer.bin``): int32 max_token_length, then per token id a float32 score, an int32
byte length and the bytes.  run.c encodes a prompt by starting from BOS (id 1), then the token of
" " (SentencePiece's dummy prefix), then the token of each UTF-8 character, or byte b as id b + 3
when the character is not a token; then it merges, again and again, the adjacent pair whose
concatenation is the token of highest score.  It prints each piece (a piece after BOS loses a
leading space; one-byte pieces that are not printable or whitespace are skipped) and stops when it
generates id 1.  ``llama2c_vocabulary`` makes a byte-level BPE tokenizer fit those rules.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import LlamaConfig
from ..errors import CheckpointError, ConfigError, one_line
from ..files import atomic_write_bytes, release_pages
from .byte_level import byte_level_vocabulary
from .rope_rows import deinterleave_rope_rows, interleave_rope_rows
from .safetensors import require_finite

MAGIC = 0x616B3432            # "ak42" as a big-endian uint32, stored little-endian
V1_HEADER_BYTES = 256
ROPE_THETA, NORM_EPS = 10000.0, 1e-5   # what run.c computes with
BOS_ID, EOS_ID = 1, 2         # run.c: BOS starts every prompt and ends generation; EOS ends a chat turn
FIRST_BYTE_ID = 3             # run.c's byte fallback: byte b is token b + 3
NEVER_MERGED = -1e30          # a score run.c's merge loop never picks (it starts from -1e10)

_LAYER = "model.layers.{i}."
_EMBED, _FINAL_NORM, _CLASSIFIER = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_FREQS = "rope angles"        # v0's cos/sin tables: written, skipped when read
# File order of each version; a name with {i} stands for all layers, stacked.
_ORDER = {
    0: [_EMBED, _LAYER + "input_layernorm.weight", _LAYER + "self_attn.q_proj.weight",
        _LAYER + "self_attn.k_proj.weight", _LAYER + "self_attn.v_proj.weight", _LAYER + "self_attn.o_proj.weight",
        _LAYER + "post_attention_layernorm.weight", _LAYER + "mlp.gate_proj.weight",
        _LAYER + "mlp.down_proj.weight", _LAYER + "mlp.up_proj.weight", _FINAL_NORM, _FREQS, _FREQS],
    1: [_LAYER + "input_layernorm.weight", _LAYER + "post_attention_layernorm.weight", _FINAL_NORM, _EMBED,
        _LAYER + "self_attn.q_proj.weight", _LAYER + "self_attn.k_proj.weight", _LAYER + "self_attn.v_proj.weight",
        _LAYER + "self_attn.o_proj.weight", _LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.down_proj.weight",
        _LAYER + "mlp.up_proj.weight"],
}


def _sections(config: LlamaConfig, version: int):
    """(name, shape) of each float32 run of the file, in file order (one per layer for {i})."""
    shapes = dict(_parameter_shapes(config))
    for name in _ORDER[version]:
        if name == _FREQS:
            yield name, (config.max_seq_len, config.head_dim // 2)
        elif "{i}" in name:
            for i in range(config.n_layers):
                yield name.format(i=i), shapes[name.format(i=i)]
        else:
            yield name, shapes[name]
    if not config.tie_embeddings:
        yield _CLASSIFIER, shapes[_CLASSIFIER]


def _parameter_shapes(config: LlamaConfig):
    # model.parameter_layout's shapes, lm_head included; not imported: the model imports the formats
    D, F, q, kv, V = config.dim, config.hidden_dim, config.q_dim, config.kv_dim, config.vocab_size
    yield _EMBED, (V, D)
    yield _FINAL_NORM, (D,)
    yield _CLASSIFIER, (V, D)
    for i in range(config.n_layers):
        p = _LAYER.format(i=i)
        yield from [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
                    (p + "self_attn.q_proj.weight", (q, D)), (p + "self_attn.k_proj.weight", (kv, D)),
                    (p + "self_attn.v_proj.weight", (kv, D)), (p + "self_attn.o_proj.weight", (D, q)),
                    (p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
                    (p + "mlp.down_proj.weight", (D, F))]


def _header(config: LlamaConfig, version: int) -> bytes:
    V = config.vocab_size
    dims = (config.dim, config.hidden_dim, config.n_layers, config.n_heads, config.n_kv_heads,
            V if config.tie_embeddings or version == 1 else -V, config.max_seq_len)
    if version == 0:
        return struct.pack("<7i", *dims)
    head = struct.pack("<Ii7iB", MAGIC, 1, *dims, int(config.tie_embeddings))
    return head + bytes(V1_HEADER_BYTES - len(head))


# ---- checkpoint out ------------------------------------------------------------------------------
def check_llama2c_config(config: LlamaConfig) -> None:
    """Raise ConfigError unless run.c computes exactly this model (theta, eps, head size, no scaling)."""
    if config.head_dim * config.n_heads != config.dim:
        raise ConfigError(f"llama2.c needs head_dim = dim / n_heads; this model has head_dim {config.head_dim}, "
                          f"dim {config.dim}, {config.n_heads} heads")
    if config.rope_theta != ROPE_THETA or config.rope_scaling is not None:
        raise ConfigError(f"llama2.c's run.c computes RoPE with theta {ROPE_THETA:g} and no scaling; this model has "
                          f"theta {config.rope_theta:g}{' and scaling' if config.rope_scaling else ''}")
    if np.float32(config.norm_eps) != np.float32(NORM_EPS):
        raise ConfigError(f"llama2.c's run.c uses RMSNorm eps {NORM_EPS:g}; this model has {config.norm_eps:g}")
    if config.vocab_size >= 2 ** 31 or config.max_seq_len >= 2 ** 31:
        raise ConfigError("llama2.c's header holds sizes below 2^31")


def write_llama2c(path, config: LlamaConfig, params: dict[str, np.ndarray], version: int = 0,
                  token_order=None) -> Path:
    """Write ``config``/``params`` (Hugging Face names) as a llama2.c checkpoint of ``version`` 0 or
    1, atomically; returns ``path``.  ``token_order[i]`` is the model's id of llama2.c's token i
    (``Llama2cVocabulary.order``): the rows of the embedding and classifier are written in that order.

    Raises:
        ConfigError: a version other than 0/1, or a model run.c does not compute (check_llama2c_config).
        WriteError: the file could not be written (any previous file is unchanged).
    """
    if version not in _ORDER:
        raise ConfigError(f"llama2.c version must be 0 or 1, got {version!r}")
    check_llama2c_config(config)
    rows = slice(None) if token_order is None else np.asarray(token_order)
    hd = config.head_dim
    angles = np.outer(np.arange(config.max_seq_len), ROPE_THETA ** (-np.arange(0, hd, 2) / hd))

    def chunks():
        yield _header(config, version)
        freqs = iter([np.cos(angles), np.sin(angles)])
        for name, _ in _sections(config, version):
            if name == _FREQS:
                w = next(freqs)
            elif name in (_EMBED, _CLASSIFIER):
                w = params[name][rows]
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                w = interleave_rope_rows(params[name], hd)
            else:
                w = params[name]
            yield np.ascontiguousarray(w, dtype="<f4").tobytes()

    path = Path(path)
    atomic_write_bytes(path, chunks())
    return path


# ---- checkpoint in -------------------------------------------------------------------------------
class Llama2cCheckpoint:
    """An open llama2.c checkpoint (version 0 or 1): its LlamaConfig, and its tensors under Hugging
    Face names read on demand from the memory-mapped file (``read_into``).

    Raises:
        CheckpointError: not a version 0/1 llama2.c checkpoint (bad header, or a size that does not
            match the header), naming the file.
    """

    def __init__(self, path):
        self.path = path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(V1_HEADER_BYTES)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        if len(head) >= 8 and struct.unpack_from("<I", head)[0] == MAGIC:
            self.version = struct.unpack_from("<i", head, 4)[0]
            if self.version != 1:
                what = "int8-quantized (runq.c's)" if self.version == 2 else "unknown"
                raise CheckpointError(f"{path}: llama2.c checkpoint version {self.version} ({what}) is not "
                                      "supported (0 and 1 are)")
            if len(head) < V1_HEADER_BYTES:
                raise CheckpointError(f"{path}: truncated llama2.c header")
            *dims, shared = struct.unpack_from("<7iB", head, 8)
            tied, offset = bool(shared), V1_HEADER_BYTES
            if dims[5] <= 0:
                raise CheckpointError(f"{path}: version 1 header with vocab_size {dims[5]} <= 0")
        else:
            self.version = 0
            if len(head) < 28:
                raise CheckpointError(f"{path}: too short for a llama2.c checkpoint ({size} bytes)")
            dims = list(struct.unpack_from("<7i", head))
            tied, offset = dims[5] > 0, 28
            dims[5] = abs(dims[5])
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = dims
        what = (f"llama2.c version {self.version} header (dim {dim}, hidden_dim {hidden_dim}, n_layers {n_layers}, "
                f"n_heads {n_heads}, n_kv_heads {n_kv_heads}, vocab_size {vocab_size}, seq_len {seq_len})")
        try:
            self.config = LlamaConfig(
                vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                hidden_dim=hidden_dim, max_seq_len=seq_len, norm_eps=NORM_EPS, rope_theta=ROPE_THETA,
                tie_embeddings=tied, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        except ConfigError as e:
            raise CheckpointError(f"{path}: not a {what}: {one_line(e)}") from None
        # Checked before anything is allocated (nor the list of sections, one per layer, built): a
        # header claiming terabytes, or 2^31 layers, must not get them.
        rope_tables = 2 * seq_len * (self.config.head_dim // 2) if self.version == 0 else 0
        expected = offset + 4 * (self.config.num_parameters() + rope_tables)
        if size != expected:
            raise CheckpointError(f"{path}: {size:,} bytes, but its {what} implies {expected:,} "
                                  f"({'truncated' if size < expected else 'trailing data'}; not a llama2.c checkpoint?)")
        sections = list(_sections(self.config, self.version))
        data = np.memmap(path, dtype="<f4", mode="r", offset=offset)
        # numpy maps from the allocation boundary below ``offset``: where the file's bytes sit in the map
        self._map, map_start = data._mmap, offset - offset % mmap.ALLOCATIONGRANULARITY
        self.tensors, self._spans, start = {}, {}, 0   # HF name -> its float32 values, in the file's row order
        for name, shape in sections:
            n = math.prod(shape)
            if name != _FREQS:
                self.tensors[name] = data[start:start + n].reshape(shape)
                self._spans[name] = (offset - map_start + 4 * start, offset - map_start + 4 * (start + n))
            start += n

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        """Copy tensor ``name`` (a Hugging Face name) into ``out``, W_q/W_k rows in HF's RoPE order;
        then the file's pages of the tensor are released from the process (``files.release_pages``)."""
        w = self.tensors[name]
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w = deinterleave_rope_rows(w, self.config.head_dim)
        out[...] = w
        require_finite(out, f"{self.path}: tensor {name!r}")
        release_pages(self._map, *self._spans[name])
        return out


def is_llama2c(path) -> bool:
    """True if ``path`` is a file named ``*.bin``: llama2.c's version 0 has no magic number to look
    for, so the name decides (``open_llama2c`` then checks the header against the file's size)."""
    path = Path(path)
    return path.suffix == ".bin" and path.is_file()


def open_llama2c(path) -> Llama2cCheckpoint:
    """The llama2.c checkpoint ``path``, opened (see Llama2cCheckpoint)."""
    return Llama2cCheckpoint(path)


def load_weights(ckpt: Llama2cCheckpoint, params: dict[str, np.ndarray]) -> None:
    """Copy every tensor of ``ckpt`` into ``params`` (Hugging Face name -> the model's array, as
    ``Llama.params`` of a model built from ``ckpt.config``).

    Raises:
        CheckpointError: ``params`` are not the checkpoint's names and shapes (another config).
    """
    if {n: p.shape for n, p in params.items()} != {n: t.shape for n, t in ckpt.tensors.items()}:
        raise CheckpointError(f"{ckpt.path}: the model's parameters are not this checkpoint's tensors "
                              "(a model of another config?)")
    for name in ckpt.tensors:
        ckpt.read_into(name, params[name])


def read_llama2c(path, dtype=np.float32) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """The config and Hugging Face-named weights (``dtype``, W_q/W_k rows in HF's RoPE order) of a
    llama2.c checkpoint of version 0 or 1 (see Llama2cCheckpoint for the errors)."""
    ckpt = open_llama2c(path)
    tensors = {name: np.empty(t.shape, dtype=dtype) for name, t in ckpt.tensors.items()}
    load_weights(ckpt, tensors)
    return ckpt.config, tensors


# ---- tokenizer -----------------------------------------------------------------------------------
@dataclass
class Llama2cVocabulary:
    """A tokenizer as run.c sees it.  ``order[i]`` is the tokenizer's (and model's) id of llama2.c's
    token i; ``pieces``/``scores`` are what ``tokenizer.bin`` holds for llama2.c's ids."""
    order: list[int]
    pieces: list[bytes]
    scores: list[float]


def llama2c_vocabulary(tokenizer, vocab_size: int) -> Llama2cVocabulary:
    """A byte-level BPE ``tokenizer`` (an ``npllama.Tokenizer``) laid out for run.c, for a model of
    ``vocab_size`` embedding rows.

    run.c's ids are not free: 1 is BOS (every prompt starts with it, generation stops at it), 2 is
    EOS, byte b is b + 3 when a character is not a token.  So the vocabulary is reordered: the
    tokenizer's BOS, or its end-of-text token when it has no BOS (npllama's ``<|endoftext|>``,
    which separates documents, so run.c starts like a fresh document and stops where one ends) at
    1; its EOS at 2 when it has both; the one-byte tokens at 3..258 (a byte without a token of its
    own leaves its place to another token, which run.c's fallback then picks); everything else
    after, in order.  A token is written as the bytes it stands for, its score is minus the rank of the
    merge that builds it (run.c then merges like BPE: lower rank first), and tokens no merge
    builds (bytes, added tokens) get NEVER_MERGED.  Embedding rows past the tokenizer are
    ``[PAD<id>]``.

    Raises:
        ConfigError: not a byte-level BPE tokenizer, more tokens than
            ``vocab_size``, or a token run.c would misread (a NUL byte inside, or spelled like
            run.c's ``<0xNN>`` byte pieces).
    """
    vocab = byte_level_vocabulary(tokenizer)
    n = len(vocab.tokens)
    if n > vocab_size:
        raise ConfigError(f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows")
    pieces = [vocab.token_bytes(i) for i in range(n)] + [f"[PAD{i}]".encode() for i in range(n, vocab_size)]
    for i, piece in enumerate(pieces):
        if (len(piece) > 1 and b"\0" in piece) or (len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">")):
            raise ConfigError(f"token {i} ({piece!r}) would be misread by run.c (a NUL byte inside, or spelled like "
                              "its <0xNN> byte pieces)")
    rank = {left + right: r for r, (left, right) in reversed(list(enumerate(vocab.merges)))}
    scores = [-float(rank[t]) if t in rank and i not in vocab.added_ids else NEVER_MERGED
              for i, t in enumerate(vocab.tokens)] + [NEVER_MERGED] * (vocab_size - n)

    if vocab_size < FIRST_BYTE_ID + 256:
        raise ConfigError(f"run.c's byte tokens take ids 3..258; this model has only {vocab_size} tokens")
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    fixed = {FIRST_BYTE_ID + b: i for b, i in enumerate(vocab.byte_token_ids()) if i is not None}
    for j, i in ((BOS_ID, bos if bos is not None else eos), (EOS_ID, eos if bos is not None else None)):
        if i is not None and i not in fixed.values():
            fixed[j] = i
    placed = set(fixed.values())
    rest = iter(i for i in range(vocab_size) if i not in placed)
    order = [fixed[j] if j in fixed else next(rest) for j in range(vocab_size)]
    return Llama2cVocabulary(order=order, pieces=[pieces[i] for i in order], scores=[scores[i] for i in order])


def write_tokenizer_bin(path, pieces: list[bytes], scores: list[float]) -> Path:
    """Write llama2.c's ``tokenizer.bin`` of ``pieces`` (token bytes by llama2.c id) atomically."""
    def chunks():
        yield struct.pack("<i", max(len(p) for p in pieces))
        for piece, score in zip(pieces, scores, strict=True):
            yield struct.pack("<fi", score, len(piece)) + piece

    path = Path(path)
    atomic_write_bytes(path, chunks())
    return path


def read_tokenizer_bin(path, vocab_size: int):
    """The npllama Tokenizer of a ``tokenizer.bin`` that ``npllama export --to llama2c`` wrote (ids
    in llama2.c's order, as the model.bin beside it), or raise CheckpointError naming the file.

    The pieces are the tokens' bytes; a token with a score was made by merging, and, as run.c
    encodes, any split of it into two tokens may merge into it, the best-scored first
    (``sentencepiece_merges``); the multi-byte pieces without one are the special tokens.  Id 1
    is the BOS, or the end-of-text token when the tokenizer had no BOS, id 2 then the EOS.
    llama2.c's own SentencePiece ``tokenizer.bin`` (byte pieces spelled ``<0x00>``) is not read.
    """
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from ..tokenizer import Tokenizer     # (here: the tokenizer module imports formats, which imports this one)
    from .gguf_tokenizer import BYTE_SPELLING, sentencepiece_merges   # (as above: it imports the tokenizer's)

    path = Path(path)
    raw = path.read_bytes()
    pieces, scores, at = [], [], 4
    try:
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", raw, at)
            if n < 0 or at + 8 + n > len(raw):
                raise struct.error(f"a token of {n} bytes past the end")
            pieces.append(raw[at + 8:at + 8 + n])
            scores.append(score)
            at += 8 + n
    except struct.error as e:
        raise CheckpointError(f"{path}: not a llama2.c tokenizer.bin for {vocab_size} tokens ({one_line(e, 120)})") from None
    if at != len(raw):
        raise CheckpointError(f"{path}: {len(raw) - at} bytes after the {vocab_size} tokens the model has")
    if any(len(p) == 6 and p.startswith(b"<0x") for p in pieces[FIRST_BYTE_ID:FIRST_BYTE_ID + 256]):
        raise CheckpointError(f"{path}: a SentencePiece tokenizer.bin (llama2.c's own), which npllama does not "
                              "read; give the model as a Hugging Face directory with its tokenizer.json")
    special = {i for i, (p, sc) in enumerate(zip(pieces, scores)) if sc == NEVER_MERGED and len(p) > 1}
    tokens = [p.decode("utf-8", "replace") if i in special else "".join(BYTE_SPELLING[b] for b in p)
              for i, p in enumerate(pieces)]
    if len(set(tokens)) != len(tokens):
        raise CheckpointError(f"{path}: the same token twice; not a tokenizer.bin npllama wrote")
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = {t: sc for i, (t, sc) in enumerate(zip(tokens, scores)) if i not in special and sc != NEVER_MERGED}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(vocab, ranked), dropout=None,
                                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)   # as Tokenizer.train's
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in sorted(special)
                           if not tokens[i].startswith("[PAD")])
    both = EOS_ID in special
    return Tokenizer(hf, bos_token=tokens[BOS_ID] if both else None,
                     eos_token=tokens[EOS_ID] if both else tokens[BOS_ID])
