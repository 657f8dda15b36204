"""A chat with a pretrained model: the conversation through the checkpoint's chat template.

    history = chat(model, tokenizer, read_message=lambda: input("> "), write=print_now,
                   system="You are terse.", max_new_tokens=256)

Each turn the whole conversation (system message, then the user's and the model's messages
alternately) is rendered by the tokenizer's chat template with the assistant's header at the end
(``add_generation_prompt``), and the model continues it, token by token, until one of the
tokenizer's ``stop_ids`` (the end of its turn: ``<|im_end|>``, ``<|eot_id|>``, eos...), or
``max_new_tokens``, or the context is full.  The answer is streamed to ``write`` as text as it
grows (a character whose UTF-8 bytes span several tokens is written once all of them are there);
the stop token itself is not written.  The key/value cache is kept between answers, so a turn runs
only the tokens after those it holds, as one batch (decoding.stream's ``cache``: the end of the
last answer, the new message and the assistant's header; once old exchanges are dropped, all that
follows the system message).  ``on_answer``, when given, receives each answer's figures: prompt
tokens, prefill and decoding time, new tokens, and why it stopped ("stop_id", or
"max_new_tokens": the answer was cut).

The history is kept within the context: when the rendered conversation plus ``max_new_tokens`` would
not fit in ``max_seq_len``, the oldest exchanges (a user message and the answer to it) are dropped,
the system message never.  A message that does not fit even alone is refused (InputError) and the
chat goes on without it.
"""
from __future__ import annotations

import time
from typing import Callable

from .errors import InputError

REPLACEMENT_CHARACTER = "\ufffd"   # what decoding shows for the first bytes of an unfinished character


def chat_prompt(model, tokenizer, messages: list[dict], max_new_tokens: int):
    """(prompt ids, the messages they hold): ``messages`` rendered with the assistant's header at
    the end, the oldest exchanges dropped until ``max_new_tokens`` more fit in the context.

    Raises:
        InputError: the system message and the last user message alone leave no room.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    limit = model.config.max_seq_len - max_new_tokens
    while True:
        ids = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True)
        if ids.size <= limit:
            return ids, system + turns
        if len(turns) <= 1:
            raise InputError(f"the message is too long: {ids.size} tokens of prompt leave no room for an answer of "
                             f"{max_new_tokens} tokens in the model's context of {model.config.max_seq_len}")
        turns = turns[2:]   # the oldest user message and the answer to it


def answer(model, tokenizer, prompt_ids, write: Callable[[str], object], max_new_tokens: int, stats=None,
           cache=None, **sampling) -> str:
    """Generate the model's answer to ``prompt_ids``, streaming its text to ``write``; returns the
    text (without the stop token).  ``stats``, when a dict, receives the figures of the answer:
    ``prompt_tokens``, ``prefill_s`` (until the first token), ``new_tokens``, ``decode_steps`` and
    ``decode_s`` (the tokens after the first), ``stop`` ("stop_id" or "max_new_tokens": cut).
    ``cache``: a dict kept between a chat's answers, holding the key/value cache (decoding.stream)."""
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(prompt_ids), prefill_s=0.0, new_tokens=0, decode_steps=0, decode_s=0.0,
                 stop="max_new_tokens", slides=0)
    stops = set(tokenizer.stop_ids)
    ids, shown = [], ""
    start = time.perf_counter()
    for token in model.stream(prompt_ids, max_new_tokens, stop_ids=tokenizer.stop_ids, cache=cache, **sampling):
        now = time.perf_counter()
        if stats["new_tokens"] == 0:
            stats["prefill_s"] = now - start          # the prompt's pass and the first token
        else:
            stats["decode_steps"] += 1
            stats["decode_s"] += now - start
        stats["new_tokens"] += 1
        if token in stops:
            stats["stop"] = "stop_id"
            stats["stop_token"] = tokenizer.id_to_token(token)
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith(REPLACEMENT_CHARACTER):
            write(text[len(shown):])
            shown = text
        start = time.perf_counter()                   # the time spent writing is not decoding time
    text = tokenizer.decode(ids)
    write(text[len(shown):])
    return text


def chat(model, tokenizer, read_message: Callable[[], str | None], write: Callable[[str], object],
         system: str | None = None, max_new_tokens: int = 256, refusal_ends: bool = False,
         on_answer: Callable[[dict], object] | None = None, **sampling) -> list[dict]:
    """Talk until ``read_message`` returns None (end of input: Ctrl-D); returns the conversation.

    ``write`` receives the answers' text as it is generated, then a newline after each answer;
    ``sampling`` is passed to ``model.stream`` (temperature, top_k, top_p, seed); ``on_answer``
    receives each answer's figures (see ``answer``) after the newline.  A message the
    template refuses, or too long, is answered ``[why]`` and the chat goes on; with
    ``refusal_ends`` (one message given up front) the InputError is raised instead.
    """
    messages = [{"role": "system", "content": system}] if system else []
    cache = {}     # the key/value cache between answers: a turn runs only its new tokens
    while (message := read_message()) is not None:
        try:
            prompt, kept = chat_prompt(model, tokenizer, messages + [{"role": "user", "content": message}],
                                       max_new_tokens)
        except InputError as e:
            if refusal_ends:
                raise
            write(f"[{e}]\n")
            continue
        stats: dict = {}
        reply = answer(model, tokenizer, prompt, write, max_new_tokens, stats=stats, cache=cache, **sampling)
        write("\n")
        if on_answer is not None:
            on_answer(stats)
        messages = kept + [{"role": "assistant", "content": reply}]
    return messages
