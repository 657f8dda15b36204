"""Chat templates: a checkpoint's Jinja template that turns a conversation into the prompt text.

    text = render_chat(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                       bos_token="<s>", eos_token="</s>")

Rendered as transformers renders it (``utils/chat_template_utils.py``), so that the same template
gives the same text: a sandboxed Jinja environment (a template comes with a downloaded checkpoint
and is untrusted code) with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
``raise_exception(message)``, ``strftime_now(format)`` and a ``tojson`` filter that does not escape
HTML.  The variables are ``messages``, ``add_generation_prompt`` (end with the header of the
assistant's turn, so the model answers) and the special tokens' text (``bos_token``, ``eos_token``).

A template is also bounded in what it may cost: a render's output (``MAX_RENDER_CHARS``; a ``*`` or
``**`` whose result would be larger is refused before it is computed) and its time
(``RENDER_SECONDS``: the render runs in a thread of its own, stopped by an exception raised into it),
and any exception inside it (a division by zero, ``range(10**9)``, a macro recursing forever)
becomes one ChatTemplateError.
"""
from __future__ import annotations

import ctypes
import functools
import json
import threading
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import CheckpointError, InputError, one_line


class ChatTemplateError(CheckpointError):
    """A chat template that is not valid Jinja, fails, or passes its bounds (a fault of the file
    that brought it, which the command line names)."""


MAX_RENDER_CHARS = 1 << 22   # a rendered conversation: far more text than any model's context holds
RENDER_SECONDS = 1.5         # real templates render in milliseconds


class TemplateRefusal(InputError):
    """A conversation the chat template refuses (its ``raise_exception``: roles that do not
    alternate, a system message where none may be, ...)."""


class _RenderTimeout(Exception):
    """Raised into a render's thread when it runs out of time."""


class _OverLimit(jinja2.exceptions.SecurityError):
    """A render's output, or a ``*`` or ``**`` in it, past its bound."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with ``*`` and ``**`` checked before they run: ``'ab ' * 7*10**7`` would build
    210 MB in one step, ``10 ** 10 ** 8`` compute for minutes."""
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                    raise _OverLimit(f"'*' would make a sequence of {len(seq) * n:,} items, "
                                                          f"more than the {MAX_RENDER_CHARS:,} a render may")
        elif isinstance(left, int) and isinstance(right, int) and right > 0 \
                and right * max(abs(left).bit_length() - 1, 0) > 1 << 16:
            raise _OverLimit(f"'**' would make an integer of about "
                                                  f"{right * (abs(left).bit_length() - 1):,} bits")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template. Raises ChatTemplateError if it is not valid Jinja."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}: {one_line(e.message)})") from None


def render_chat(source: str, messages, add_generation_prompt: bool = False, **variables) -> str:
    """The text of ``messages`` (a list of {"role": ..., "content": ...}) through the template ``source``.

    Raises:
        InputError: messages not a list of dicts with string roles, or (TemplateRefusal) refused by
            the template itself (its ``raise_exception``, e.g. roles that do not alternate).
        ChatTemplateError: a template that is not valid Jinja, fails, or passes its bounds.
    """
    if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise InputError("messages must be a list of {'role': str, 'content': ...} dicts")
    template = compile_template(source)
    # tools/documents None as transformers passes them: `tools is not none` differs for undefined
    variables = dict(messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None,
                     documents=None, **variables)
    outcome = {}

    def render():
        try:
            outcome["text"] = _bounded_render(template, variables)
        except BaseException as e:   # (_RenderTimeout included)
            outcome["error"] = e

    worker = threading.Thread(target=render, name="chat-template", daemon=True)
    worker.start()
    worker.join(RENDER_SECONDS)
    if worker.is_alive():   # stop it at its next bytecode; a daemon thread, should it not stop
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_RenderTimeout))
        worker.join(0.5)
        raise ChatTemplateError(f"the chat template took more than {RENDER_SECONDS} s to render; stopped")
    error = outcome.get("error")
    if error is None:
        return outcome["text"]
    if isinstance(error, _OverLimit):
        raise ChatTemplateError(f"the chat template exceeds the sandbox's limits: {one_line(error)}") from None
    if isinstance(error, jinja2.exceptions.TemplateError):
        raise TemplateRefusal(f"the chat template refused the conversation: {one_line(error)}") from None
    if isinstance(error, (Exception, RecursionError)):
        raise ChatTemplateError(f"the chat template failed ({type(error).__name__}: {one_line(error, 200)})") from None
    raise error


def _bounded_render(template, variables) -> str:
    pieces, size = [], 0
    for piece in template.generate(**variables):
        size += len(piece)
        if size > MAX_RENDER_CHARS:
            raise _OverLimit(f"its output passed {MAX_RENDER_CHARS:,} characters")
        pieces.append(piece)
    return "".join(pieces)
