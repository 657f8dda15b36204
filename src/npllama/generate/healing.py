"""Token healing: a prompt that ends inside what the model learned as one token.

A prompt such as ``"def fibonacci(n):\n    "`` ends in whitespace that the training text never
shows as a token of its own: there the indent is ``'ĊĠĠĠ'`` (newline, three spaces) and the fourth
space starts the next word, ``'Ġreturn'``.  Encoded alone, the prompt ends in ``'ĊĠĠĠĠ'``, after
which the model has mostly seen more spaces: it writes 9-space indents.

Healing backs up over the prompt's trailing tokens that are only whitespace (at least its last
token; never the whole prompt), keeps their text ``r`` (as vocabulary strings, which for byte-level
BPE spell its bytes), and constrains the next tokens to spell ``r`` the way the model prefers: while
``r`` is not yet covered, a token ``t`` is allowed when it is a prefix of what remains of ``r`` (the
next is then constrained by the rest) or extends it (``t`` starts with the rest).  The original
tokens are always one allowed path, so there is always a choice; special tokens never are.

    healing = TokenHealing.of(tokenizer, ids)       # None when there is nothing to heal
    ids = ids[:len(ids) - healing.n_removed]
    stream(model, ids, ..., healing=healing)
"""
from __future__ import annotations

import numpy as np


class TokenHealing:
    def __init__(self, vocab: list[str | None], removed: str, n_removed: int, removed_text: str):
        self.vocab = vocab                  # id -> vocabulary string (None: special / unusable)
        self.remaining = removed            # what the next tokens must still spell
        self.n_removed = n_removed
        self.removed_text = removed_text    # the removed tokens' text, as the prompt shows it

    @classmethod
    def of(cls, tokenizer, ids, whitespace_only: bool = True) -> "TokenHealing | None":
        """The healing of the prompt ``ids``: back over its trailing whitespace-only tokens (with
        ``whitespace_only=False``, over its last token whatever it is), keeping at least one token.
        None for a prompt of fewer than two tokens."""
        ids = [int(i) for i in ids]
        if len(ids) < 2:
            return None
        n = 1
        if whitespace_only:
            if tokenizer.decode(ids[-1:]).strip():
                return None
            while n < len(ids) - 1 and not tokenizer.decode(ids[-n - 1:-n]).strip():
                n += 1
        special = set(tokenizer.hf_tokenizer.get_added_tokens_decoder())
        vocab = [None if i in special else tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
        removed = "".join(vocab[i] or "" for i in ids[-n:])
        if not removed:
            return None
        return cls(vocab, removed, n, tokenizer.decode(ids[-n:]))

    @property
    def active(self) -> bool:
        return bool(self.remaining)

    def allowed_ids(self) -> np.ndarray:
        """Ids of the tokens that may come next (never empty while active)."""
        r = self.remaining
        return np.array([i for i, t in enumerate(self.vocab) if t and (t.startswith(r) or r.startswith(t))],
                        dtype=np.int64)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` with every disallowed token at -inf."""
        masked = np.full_like(logits, -np.inf)
        allowed = self.allowed_ids()
        masked[allowed] = logits[allowed]
        return masked

    def advance(self, token: int) -> None:
        """The token chosen: what of the removed text is still to spell."""
        t = self.vocab[int(token)] or ""
        self.remaining = self.remaining[len(t):] if self.remaining.startswith(t) else ""
