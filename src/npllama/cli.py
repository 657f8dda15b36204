"""The `npllama` command: train, generate, gradcheck, plot, export, reference, compare, warmup.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> exit code``; this file only wires them up, applies ``--threads N`` (npllama's thread
count: engine/threads.py), answers --help without importing NumPy or Numba, and turns npllama's errors into one-line messages with a
non-zero exit code instead of tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

from . import __version__
from .engine.threads import thread_limit
from .errors import NpllamaError, one_line

SUBCOMMANDS = {
    "train": ("npllama.train.cli", "train a model (with no arguments: a small Llama on the bundled Shakespeare)"),
    "generate": ("npllama.generate.cli", "sample text from, or chat with (--chat), a run directory, a Hugging Face "
                 "Llama directory or a .gguf file"),
    "gradcheck": ("npllama.gradcheck",
                  "check every layer's backward and the whole model's (fast and reference) against finite "
                  "differences (float64)"),
    "inspect": ("npllama.inspection", "draw a model's attention patterns (every head, T x T) for a prompt --text"),
    "plot": ("npllama.plot", "draw the loss curves of one run, or several together, to a PNG (against steps, "
             "tokens or wall time; --csv for a table)"),
    "export": ("npllama.export", "write a model and its tokenizer as a GGUF (llama.cpp), a llama2.c checkpoint or a "
               "Hugging Face directory; --merge folds a LoRA run's adapters in first"),
    "reference": ("npllama.golden", "write a golden file: every named activation and gradient of the float64 "
                  "reference model on a batch, for checking another implementation"),
    "compare": ("npllama.divergence", "compare your implementation's tensors with a golden file and name the first "
                "that diverges (exit code 1)"),
    "warmup": ("npllama.warmup", "compile the kernels a training run calls into Numba's cache now, on several "
               "processes (a first npllama train does it by itself on two)"),
}


def _threads_from_argv(argv) -> int | None:
    """The value of --threads (the last one, as argparse would take), checked; None if not given."""
    value = None
    for i, a in enumerate(argv):
        if a == "--threads":
            value = argv[i + 1] if i + 1 < len(argv) else ""
        elif a.startswith("--threads="):
            value = a.split("=", 1)[1]
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--threads expects an integer, got {value[:50]!r}") from None
    cores = os.cpu_count() or 1
    if not 1 <= n <= cores:
        raise ValueError(f"--threads must be between 1 and {cores} (the cores of this machine), got {n}")
    return n


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (the train command's usage alone is twenty lines), pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser():
    parser = _Parser(prog="npllama", description="A Llama in NumPy with hand-written backward passes.")
    parser.add_argument("--version", action="version", version=f"npllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices   # name -> its parser, whose usage errors name it
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            p.set_defaults(_missing=module_name)
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        threads = _threads_from_argv(argv)
    except ValueError as e:
        print(f"npllama: error: {e}", file=sys.stderr)
        return 2
    with thread_limit(threads) if threads is not None else contextlib.nullcontext():
        return _run(argv)


def _run(argv) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # answered by the subcommand's parser, so that the hint is `npllama train --help`
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"npllama: error: '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    warnings.showwarning = _show_warning_on_one_line
    try:
        return int(args._run(args) or 0)
    except NpllamaError as e:
        print(f"npllama: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, ... outside npllama's own checks: still one line
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"npllama: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except UnicodeError as e:   # stdin (or a file read as text) that is not UTF-8
        print(f"npllama: error: input is not valid UTF-8 ({one_line(e, 200)})", file=sys.stderr)
        return 1
    except MemoryError as e:
        print(f"npllama: error: out of memory ({e or 'allocation failed'}); try a smaller model or batch",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("npllama: interrupted", file=sys.stderr)
        return 130


def _show_warning_on_one_line(message, category, filename, lineno, file=None, line=None):
    """Warnings as ``npllama: warning: ...`` rather than Python's two lines with a source excerpt."""
    print(f"npllama: warning: {message}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
