"""Chat templates: a checkpoint's Jinja template that turns a conversation into the prompt text.

    text = render_chat(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                       bos_token="<s>", eos_token="</s>")

Rendered as transformers renders it (``utils/chat_template_utils.py``), so that the same template
gives the same text: a sandboxed Jinja environment (a template comes with a downloaded checkpoint
and is untrusted code) with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
``raise_exception(message)``, ``strftime_now(format)`` and a ``tojson`` filter that does not escape
HTML.  The variables are ``messages``, ``add_generation_prompt`` (end with the header of the
assistant's turn, so the model answers) and the special tokens' text (``bos_token``, ``eos_token``).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import CheckpointError, InputError, one_line


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template. Raises CheckpointError if it is not valid Jinja."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"the chat template is not valid Jinja (line {e.lineno}: {one_line(e.message)})") from None


def render_chat(source: str, messages, add_generation_prompt: bool = False, **variables) -> str:
    """The text of ``messages`` (a list of {"role": ..., "content": ...}) through the template ``source``.

    Raises:
        InputError: messages not a list of dicts with string roles, or refused by the template itself
            (its ``raise_exception``, e.g. roles that do not alternate).
    """
    if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise InputError("messages must be a list of {'role': str, 'content': ...} dicts")
    template = compile_template(source)
    try:
        # tools/documents None as transformers passes them: `tools is not none` differs for undefined
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None,
                               documents=None, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"the chat template refused the conversation: {one_line(e)}") from None
