"""What a run measures and shows besides its loss: the held-out loss in bits per byte
(``evaluate``) and a short sample of the model's text (``generate_sample``).

Evaluation: mean held-out cross-entropy and bits per byte, bpb = (sum of -ln p over the held-out
tokens) / (UTF-8 bytes of that text) / ln 2, which does not depend on the tokenizer.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..data import iter_eval_batches


def evaluate(model, tokens: np.ndarray, context_token: int | None, n_bytes: int, batch_size: int,
             seq_len: int, should_stop: Callable[[], bool] = lambda: False) -> dict | None:
    """Held-out loss over ``tokens``, every token predicted exactly once (``iter_eval_batches``).

        val_loss = N / n   (mean nats per token)      val_bpb = N / n_bytes / ln 2

    where N is the total nats and n the number of tokens.  Dropout is off.  Returns None if
    ``should_stop()`` became true midway (an interrupt is being served).
    """
    was_training = model.training
    model.eval()
    try:
        nats, count = 0.0, 0
        for x, y in iter_eval_batches(tokens, batch_size, seq_len, context_token=context_token):
            if should_stop():
                return None
            nats += float(model.loss(x, y, reduction="sum"))
            count += int(np.count_nonzero(y != -100))
    finally:
        model.training = was_training
    return {"val_loss": nats / count, "val_bpb": nats / n_bytes / math.log(2), "val_tokens": count,
            "val_bytes": int(n_bytes)}


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                    top_k: int | None, seed: int) -> str | None:
    """A short text sample; None when the model has no generate() (yet)."""
    if max_new_tokens <= 0:
        return None
    prompt_ids = tokenizer.encode(prompt)
    if prompt_ids.size == 0:
        first = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        prompt_ids = np.array([first], dtype=np.int64)
    prompt_ids = prompt_ids[-(model.config.max_seq_len - 1):]
    room = model.config.max_seq_len - prompt_ids.size
    was_training = model.training
    model.eval()
    try:
        new = model.generate(prompt_ids, min(max_new_tokens, room), temperature=temperature,
                             top_k=top_k, seed=seed)
    except (ImportError, AttributeError, NotImplementedError):
        return None
    finally:
        model.training = was_training
    return tokenizer.decode(np.concatenate([prompt_ids, np.asarray(new, dtype=np.int64)]))
