"""`npllama generate`: load a run directory, a Hugging Face directory or a GGUF file, encode the
prompt, print the continuation as it is decoded, and a one-line report (prefill and decoding speed)
on stderr.  With ``--chat``: a conversation through the checkpoint's chat template
(npllama.chat), one message per line of stdin until its end (Ctrl-D), or the one ``--prompt``."""
from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

import numpy as np

from ..chat import chat
from ..config import LlamaConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..model import Llama
from .decoding import NonFiniteLogits, generate, slide_window, stream
from .healing import TokenHealing
from .sampling import chat_sampling, check_sampling, check_stop_ids, describe_sampling


def add_arguments(parser):
    parser.add_argument("path", metavar="MODEL",
                        help="a run directory of `npllama train`, a Hugging Face Llama directory "
                             "(config.json, model.safetensors, tokenizer.json) or a .gguf file")
    parser.add_argument("--prompt", default="",
                        help='text to continue ("-" reads it from stdin, dropping one trailing newline); '
                             "default: start from the BOS / end-of-text token.  With --chat: the one "
                             "message to answer")
    parser.add_argument("--chat", action="store_true",
                        help="talk to the model through its chat template: one message per line of stdin, "
                             "the answers streamed, the history kept within the context; Ctrl-D (end of "
                             "input) to leave")
    parser.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                        help="default 256; past the model's context (max_seq_len tokens, prompt included) "
                             "generation goes on over a sliding window: when the context is full, its last "
                             "half is run again as a fresh context and decoding continues (see --no-slide)")
    parser.add_argument("--slide", action=argparse.BooleanOptionalAction, default=True,
                        help="at the context limit, go on over a sliding window (default); --no-slide stops there")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="0 = greedy (then --top-k/--top-p are ignored); default 0.8, with --chat the "
                             "model's own settings (its generation_config.json or GGUF metadata), else 0")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="keep the K most likely tokens (default: all; with --chat the model's setting)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="keep the most likely tokens up to cumulative probability P (1 = off); default "
                             "0.95, with --chat the model's setting")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="sampling seed (default: a random one, printed at the end)")
    parser.add_argument("--last", action="store_true",
                        help="with a run directory that kept its best weights by held-out loss (RUN/best/, "
                             "used by default): the last weights instead")
    parser.add_argument("--token-healing", action=argparse.BooleanOptionalAction, default=None,
                        help="back up over the prompt's last token and let the model spell it again as it "
                             "learned it (default: on when the prompt ends in whitespace, e.g. an indent, "
                             "which training text never ends a token with)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="the dtype the weights are loaded into and computed in (default float32; a "
                             "quantized GGUF's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K matrices stay in their blocks unless --dequantize)")
    parser.add_argument("--dequantize", action="store_true",
                        help="a GGUF file's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K matrices dequantized to --dtype when loading (default: "
                             "kept in their blocks, which the model multiplies by directly: 4-7x fewer bytes to read "
                             "per token)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads npllama runs on, its own and BLAS's (default: NPLLAMA_THREADS, else all cores)")


class IncrementalText:
    """The text of a growing list of token ids, handed out piece by piece as it becomes final.

    Each push decodes the whole list again (a token can be half of a UTF-8 character, and
    decoders such as SentencePiece's treat the first token specially), preceded by a few context
    ids (the end of the prompt) whose own text is cut off, so a leading space is kept.  Text
    ending in U+FFFD (an incomplete UTF-8 sequence) is held back until later tokens complete it
    or the generation ends."""

    def __init__(self, tokenizer, context_ids=()):
        self.tokenizer = tokenizer
        self.context = [int(t) for t in context_ids]
        self.base = tokenizer.decode(self.context) if self.context else ""
        self.ids: list[int] = []
        self.emitted = ""

    def _text(self) -> str:
        text = self.tokenizer.decode(self.context + self.ids)
        if text.startswith(self.base):
            return text[len(self.base):]
        return self.tokenizer.decode(self.ids)

    def _release(self, text: str) -> str:
        if not text.startswith(self.emitted):
            return ""  # the decoder rewrote text already shown: nothing sensible to add
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._release(self._text().rstrip("\ufffd"))

    def flush(self) -> str:
        return self._release(self._text()) if self.ids else ""


def _read_prompt(arg: str) -> str:
    if arg != "-":
        return arg
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


def run(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    path = _best_or_last(path, args.last)
    check_sampling(args.max_new_tokens, 0.0 if args.temperature is None else args.temperature, args.top_k,
                   args.top_p, args.seed, flags=True)
    if args.system is not None and not args.chat:
        raise InputError("--system is a chat's system message: give --chat too")
    text = _read_prompt(args.prompt)
    model = Llama.from_pretrained(path, dtype=np.float64 if args.dtype == "float64" else np.float32,
                                  quantized=not args.dequantize)
    model.eval()
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer; `npllama generate` needs one to encode the prompt and decode "
                              "the output (a run directory of `npllama train` has one; for a Hugging Face model, "
                              "put its tokenizer.json beside config.json)")
    if args.chat:
        return _chat(model, path, text, args)
    if args.temperature is None:
        args.temperature = 0.8
    if args.top_p is None:
        args.top_p = 0.95
    seed = args.seed
    if seed is None and args.temperature > 0:
        seed = secrets.randbelow(2 ** 31)
    ids = [int(t) for t in tokenizer.encode(text)]
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids     # what the model saw before each training text
    if not ids:  # nothing to continue: start from the BOS or the end-of-text token
        ids = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    if ids[0] is None:
        raise InputError("the prompt is empty and the tokenizer has no BOS or end-of-text token to start "
                         "from: give a --prompt")
    healing = _token_healing(tokenizer, ids, text, args.token_healing)
    if healing is not None:
        ids = ids[:-healing.n_removed]
    warm_up(model.dtype, quantized_types(model))
    stats: dict = {}
    tokens = stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=seed, stats=stats, slide=args.slide, healing=healing)
    stops = check_stop_ids(model, None)
    out = sys.stdout
    pieces = IncrementalText(tokenizer, context_ids=ids[-4:])
    if healing is not None:
        pieces.emitted = healing.removed_text    # (printed with the prompt; the new tokens spell it again)
    try:
        out.write(text)
        out.flush()
        for token in tokens:
            if token in stops:
                stats["stop_token"] = tokenizer.id_to_token(token)
                break     # the stop token itself is not printed
            piece = pieces.push(token)
            if piece:
                out.write(piece)
                out.flush()
        out.write(pieces.flush() + ("\n" if out.isatty() else ""))
        out.flush()
        stats["newline_first"] = not out.isatty() and not (text + pieces.emitted).endswith("\n") \
            and _shown_together(out, sys.stderr)
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, and keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        return 0
    except NonFiniteLogits as e:
        raise NonFiniteLogits(f"{path}: {e}") from None
    _report(stats, seed if args.temperature > 0 else None, model.config.max_seq_len)
    return 0


def _best_or_last(path: Path, last: bool) -> Path:
    """A run directory's best weights (RUN/best/, see npllama/train/best.py) unless ``last``; a note
    on stderr says which weights answer."""
    from ..train.best import read_best   # (here: `npllama generate` imports the train package only for this)
    best = read_best(path) if path.is_dir() else None
    if best is None:
        return path
    if last:
        print(f"npllama: the last weights of {path} (its best by held-out loss, step {best['step']:,}, are in "
              f"{path / 'best'})", file=sys.stderr)
        return path
    print(f"npllama: {path / 'best'}: the weights of step {best['step']:,}, the run's lowest held-out loss "
          f"({best['val_bpb']:.4f} bits/byte); --last for the last weights", file=sys.stderr)
    return path / "best"


def _shown_together(out, err) -> bool:
    """Whether the report on ``err`` would be glued to the text on ``out``: both go to one file or
    pipe (``2>&1``), or the report to a terminal that may show the text too (``| tee``)."""
    try:
        return err.isatty() or os.path.sameopenfile(out.fileno(), err.fileno())
    except (AttributeError, OSError, ValueError):   # (streams without a file: captured in a test)
        return False


def _token_healing(tokenizer, ids, text: str, option: bool | None) -> TokenHealing | None:
    """``--token-healing``: the prompt's healing, or None; by default only a prompt ending in
    whitespace is healed.  A note on stderr says what was done (a warning when it was turned off)."""
    ends_in_space = text[-1:].isspace()
    if option is False or (option is None and not ends_in_space):
        if ends_in_space:
            print("npllama: warning: the prompt ends in whitespace, which training text rarely ends a token with; "
                  "expect odd spacing (--token-healing lets the model spell it)", file=sys.stderr)
        return None
    healing = TokenHealing.of(tokenizer, ids[1:] if ids[:1] == [tokenizer.bos_id] else ids,
                              whitespace_only=option is None)
    if healing is not None:
        print(f"npllama: token healing: the prompt's last {healing.n_removed} token"
              f"{'s' if healing.n_removed > 1 else ''} ({healing.removed_text!r}) spelled again by the model "
              "(--no-token-healing keeps them)", file=sys.stderr)
    return healing


def _chat(model, path, prompt: str, args) -> int:
    """``--chat``: answer the one ``--prompt``, or each line of stdin until its end.  The sampling
    settings are the model's own where it brings them (``chat_sampling``), each overridden by the
    option given; the first line on stderr says which are used, and after each answer a report
    line as plain generation's (and that the answer was cut, when --max-new-tokens cut it)."""
    if model.tokenizer.chat_template is None:
        raise ConfigError(f"{path}: the checkpoint has no chat template, which --chat needs (use --prompt "
                          "without --chat to continue a text)")
    settings, source = chat_sampling(path)
    given = {key: getattr(args, key) for key in settings if getattr(args, key) is not None}
    settings.update(given)
    seed = args.seed
    if seed is None and settings["temperature"] > 0:
        seed = secrets.randbelow(2 ** 31)
    flags = ", ".join("--" + key.replace("_", "-") for key in given)
    how = (f"{flags} as given" if len(given) == len(settings) else
           f"{flags + ' as given, the rest ' if given else ''}from {source}")
    seeded = f"; seed {seed}" if settings["temperature"] > 0 else ""
    print(f"npllama: sampling: {describe_sampling(**settings)} ({how}{seeded}); answers up to "
          f"{args.max_new_tokens} tokens (--max-new-tokens)", file=sys.stderr)
    if args.prompt:
        messages = iter([prompt])
        read_message = lambda: next(messages, None)  # noqa: E731
    else:
        read_message = _read_line
    out = sys.stdout

    def write(text):
        out.write(text)
        out.flush()

    def on_answer(stats):
        _report(stats, None, model.config.max_seq_len)
        if stats["stop"] == "max_new_tokens":
            print(f"npllama: the answer was cut at {args.max_new_tokens} tokens: give a larger --max-new-tokens "
                  "for longer answers", file=sys.stderr)

    warm_up(model.dtype, quantized_types(model))
    try:
        chat(model, model.tokenizer, read_message, write, system=args.system, max_new_tokens=args.max_new_tokens,
             refusal_ends=bool(args.prompt), on_answer=on_answer, seed=seed, **settings)
    except NonFiniteLogits as e:   # (the chat template's errors name its file: Tokenizer.apply_chat_template)
        raise NonFiniteLogits(f"{path}: {e}") from None
    return 0


def _read_line() -> str | None:
    """The next non-blank line of stdin without its newline (after a "> " prompt on a terminal);
    None at the end of input (Ctrl-D)."""
    while True:
        if sys.stdin.isatty():
            try:
                line = input("> ")
            except EOFError:
                print()
                return None
        else:
            line = sys.stdin.readline()
            if not line:
                return None
            line = line.rstrip("\n")
        if line.strip():
            return line


def quantized_types(model) -> list[str]:
    """The block formats of the model's quantized weights (layers/quantized_linear.py)."""
    return sorted({w.qtype for w in model.params.values() if getattr(w, "quantized", False)})


def warm_up(dtype, qtypes=()) -> None:
    """Run every kernel of a generation (and of a chat's next turn) once on a tiny model of the same
    dtype (and quantized formats), so that Numba's one-off start (loading its compiled-code cache,
    ~1 s) is not counted as prefill time."""
    tiny = Llama(LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8,
                             max_seq_len=4), dtype=dtype)
    generate(tiny, [1, 2], 2)
    generate(tiny, [1], 1, temperature=1.0, top_k=4, top_p=0.9, seed=0)
    kept = {}
    generate(tiny, [1], 1, cache=kept)
    generate(tiny, [1, 2, 3], 1, cache=kept)       # a chat's next turn: its two new tokens as one batch
    # The kernels take the format as an argument (one compiled kernel for all): a format the gguf
    # package cannot quantize to (the K-quants) is warmed up by Q8_0's run.
    if qtypes:   # (quantized_linear imports the gguf package: only for a quantized model)
        from ..layers.quantized_linear import QUANTIZERS
    for qtype in sorted({q if q in QUANTIZERS else "Q8_0" for q in qtypes}):
        tiny = Llama(LlamaConfig(vocab_size=8, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32,
                                 max_seq_len=4), dtype=dtype).quantize(qtype)
        generate(tiny, [1, 2], 2)


def _report(stats: dict, seed, context: int) -> None:
    def rate(n, s):
        return f"{n / s:,.1f} tok/s" if s > 0 and n > 0 else "-"

    def count(n, what):
        return f"{n:,} {what}{'' if n == 1 else 's'}"

    reason = {"stop_id": f"{stats.get('stop_token')} (a stop token)", "max_new_tokens": "--max-new-tokens",
              "context": "context limit"}[stats["stop"]]
    line = (f"npllama: prompt {count(stats['prompt_tokens'], 'token')}, prefill {stats['prefill_s']:.3f} s "
            f"({rate(stats['prompt_tokens'], stats['prefill_s'])}); {count(stats['new_tokens'], 'new token')}, "
            f"decode {rate(stats['decode_steps'], stats['decode_s'])}; stopped at {reason}")
    if stats["slides"]:
        line += (f"; the {context}-token context was full {count(stats['slides'], 'time')}, each time "
                 f"generation went on over its last {slide_window(context)} tokens")
    if seed is not None:
        line += f"; seed {seed}"
    print(("\n" if stats.get("newline_first") else "") + line, file=sys.stderr)
