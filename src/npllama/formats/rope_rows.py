"""The two row orders of the rotary query/key projections.

RoPE turns pairs of a head's coordinates by an angle that depends on the position and the pair.
Which coordinates form a pair is a convention:

* Hugging Face (and npllama) pair coordinate j with j + hd/2 (``rotate_half``: the two halves of
  the head turn against each other);
* llama.cpp (GGUF) and llama2.c's ``run.c`` pair 2j with 2j + 1 (adjacent coordinates).

Pair j turns at the same frequency theta^(-2j/hd) in both, so one model is the other with the rows
of W_q and W_k reordered within each head: HF row (half i, index j) is row 2j + i in the adjacent
order.  q.k is unchanged because queries and keys get the same reordering, and W_v, W_o and
everything else are untouched.  Rows never leave their head, so both functions work on any run of
whole heads (a chunk of a tensor, or all of it).
"""
from __future__ import annotations

import numpy as np


def interleave_rope_rows(w: np.ndarray, head_dim: int) -> np.ndarray:
    """(n·hd, ...) rows in Hugging Face's half-and-half order -> adjacent-pair order (a new array)."""
    return np.ascontiguousarray(w.reshape(-1, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2)).reshape(w.shape)


def deinterleave_rope_rows(w: np.ndarray, head_dim: int) -> np.ndarray:
    """The inverse of ``interleave_rope_rows``: adjacent-pair order -> Hugging Face's order."""
    return np.ascontiguousarray(w.reshape(-1, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2)).reshape(w.shape)
