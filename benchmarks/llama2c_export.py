"""Write HF-named Llama weights as a llama2.c legacy (version 0) checkpoint, plus a matching tokenizer.bin.

Only the file formats are reproduced here (from reading karpathy/llama2.c's run.c and export.py);
no llama2.c code is part of this repository. The benchmark runs a ``run`` binary you build yourself
(see benchmarks/README.md).

Checkpoint (``model.bin``), all little-endian:
    7 × int32 header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
        (vocab_size > 0 means the output head shares the embedding; negative means a separate
        classifier follows at the end of the file)
    float32, in this order, each layer stacked along a leading n_layers axis, HF (out, in) layout:
        embed (V, d); attention RMSNorm gains (L, d); wq (L, H·hd, d); wk (L, KV·hd, d); wv (L, KV·hd, d);
        wo (L, d, H·hd); FFN RMSNorm gains (L, d); w1=gate (L, h, d); w2=down (L, d, h); w3=up (L, h, d);
        final norm (d,); freq_cis_real (seq_len, hd/2); freq_cis_imag (seq_len, hd/2) (unused by run.c);
        [classifier (V, d) when untied]

RoPE layouts differ: HF rotates the pairs (x_i, x_{i+hd/2}) of each head ("rotate_half"); run.c
rotates adjacent pairs (x_{2i}, x_{2i+1}) with the same frequency θ^(-2i/hd). So the rows of
wq and wk are permuted within each head, row i ↦ 2i and row i + hd/2 ↦ 2i + 1 (llama2.c's
export.py calls this ``permute_reverse``); q·k is unchanged because both sides get the same
permutation. run.c hard-codes θ = 10000, RMSNorm eps = 1e-5 and head_dim = dim / n_heads.

Tokenizer (``tokenizer.bin``): int32 max_token_length, then per id: float32 score, int32 byte
length, the UTF-8 bytes. Ours is synthetic: id 1 is BOS ("\\n<s>\\n"), id SPACE_ID is " " (run.c's
encoder always starts a prompt with the token of " "), every other id is one distinct CJK-range
character, so a prompt string maps to exactly the ids we want (no two pieces concatenate into a
third, so no BPE merges happen) and the printed output maps back to ids one character per token.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

BOS_ID = 1
SPACE_ID = 3
_FIRST_CHAR = 0x4E00          # CJK Unified Ideographs; 0x4E00 + 32000 stays below the surrogates


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """(n_heads·hd, d) rows in HF rotate_half order -> run.c's interleaved-pair order."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _atomic_write(path: Path, chunks) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(path, shape, weights: dict) -> None:
    if shape.head_dim * shape.n_heads != shape.dim:
        raise ValueError("llama2.c needs head_dim == dim / n_heads")
    if shape.rope_theta != 10000.0 or shape.rope_scaling or abs(shape.norm_eps - 1e-5) > 1e-12:
        raise ValueError("llama2.c's run.c hard-codes rope_theta=10000, no rope scaling, norm_eps=1e-5")
    L, V = shape.n_layers, shape.vocab_size
    w = lambda name: np.ascontiguousarray(weights[name], dtype="<f4")  # noqa: E731
    layer = lambda suffix: [w(f"model.layers.{i}.{suffix}") for i in range(L)]  # noqa: E731
    header = struct.pack("<7i", shape.dim, shape.hidden_dim, L, shape.n_heads, shape.n_kv_heads,
                         V if shape.tie_embeddings else -V, shape.max_seq_len)
    hd = shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    angles = np.outer(np.arange(shape.max_seq_len), inv_freq)
    parts = [w("model.embed_tokens.weight")]
    parts += layer("input_layernorm.weight")
    parts += [permute_rope_rows(a, shape.n_heads) for a in layer("self_attn.q_proj.weight")]
    parts += [permute_rope_rows(a, shape.n_kv_heads) for a in layer("self_attn.k_proj.weight")]
    parts += layer("self_attn.v_proj.weight")
    parts += layer("self_attn.o_proj.weight")
    parts += layer("post_attention_layernorm.weight")
    parts += layer("mlp.gate_proj.weight")
    parts += layer("mlp.down_proj.weight")
    parts += layer("mlp.up_proj.weight")
    parts += [w("model.norm.weight"), np.cos(angles).astype("<f4"), np.sin(angles).astype("<f4")]
    if not shape.tie_embeddings:
        parts.append(w("lm_head.weight"))
    _atomic_write(Path(path), [header] + [np.ascontiguousarray(p, dtype="<f4").tobytes() for p in parts])


def piece(token_id: int) -> str:
    if token_id == BOS_ID:
        return "\n<s>\n"
    if token_id == SPACE_ID:
        return " "
    return chr(_FIRST_CHAR + token_id)


def write_tokenizer(path, vocab_size: int) -> None:
    pieces = [piece(i).encode("utf-8") for i in range(vocab_size)]
    chunks = [struct.pack("<i", max(len(p) for p in pieces))]
    for p in pieces:
        chunks.append(struct.pack("<fi", 0.0, len(p)) + p)
    _atomic_write(Path(path), chunks)


def prompt_text(prompt_ids) -> str:
    """The ``-i`` string that run.c encodes to ``prompt_ids``, which must be [BOS, SPACE_ID, ...]."""
    ids = list(prompt_ids)
    if ids[:2] != [BOS_ID, SPACE_ID] or any(i in (BOS_ID, SPACE_ID) for i in ids[2:]):
        raise ValueError("prompt must be [BOS, SPACE_ID, ids not in {BOS, SPACE_ID}...] for llama2.c")
    return "".join(piece(i) for i in ids[2:])


def parse_output(stdout: str, prompt_ids) -> list[int]:
    """Generated ids from run.c's stdout (which echoes the prompt after BOS, minus the leading space)."""
    text = stdout[:-1] if stdout.endswith("\n") else stdout
    ids = []
    for ch in text:
        if ch == " ":
            ids.append(SPACE_ID)
        else:
            ids.append(ord(ch) - _FIRST_CHAR)
    echoed = len(prompt_ids) - 2
    if [i for i in ids[:echoed]] != list(prompt_ids[2:]):
        raise ValueError("llama2.c's output does not start with the prompt; tokenizer mismatch?")
    return ids[echoed:]
