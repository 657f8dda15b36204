"""What a training run shows on stderr besides its one-off lines: the progress (a bar on a terminal,
plain periodic lines otherwise) and samples made safe and short for a terminal.

The bar fits 80 columns and keeps the speed and the time left.  A time-budgeted run measures its
progress in seconds of the budget after set-up, not in steps: the planner re-plans the number of steps as the
machine's speed drifts, and a bar over a step total would jump, even backwards.
"""
from __future__ import annotations

import shutil
import sys
import time
import unicodedata

from tqdm import tqdm

WIDTH = 80          # columns of the bar (fewer on a narrower terminal)
PLAIN_EVERY = 0.1   # without a terminal, a line at every 10 % of the run
REDRAW = 0.1        # on a terminal, the bar redrawn at most this often (seconds)


def printable(text: str) -> str:
    """``text`` with every control character other than newline and tab escaped as Python writes it
    (a carriage return becomes the two characters ``\\r``, 0x0e becomes ``\\x0e``), so that text a
    model made up cannot move the cursor, overwrite a line or switch the terminal's character set."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text)


def sample_lines(text: str, max_lines: int, width: int = WIDTH - 4) -> list[str]:
    """The first ``max_lines`` non-empty lines of a sample, escaped (``printable``), each cut to
    ``width`` characters."""
    lines = [line for line in printable(text).split("\n") if line.strip()][:max_lines]
    return [line if len(line) <= width else line[:width - 3] + "..." for line in lines]


def progress_text(step: int, total_steps: int | None, loss: float, tokens_per_second: float | None,
                  seconds_left: float | None) -> str:
    """``step 820/2,000 loss 2.3412 17,747 tok/s 02:51 left``; without a step total (a time-budgeted
    run, whose total is re-planned as it goes) ``step 820 loss ...``; without a rate yet (a session's
    first step, which may load kernels: its time says nothing of the next ones) ``... timing``."""
    steps = f"{step:,}" if total_steps is None else f"{step:,}/{total_steps:,}"
    if tokens_per_second is None:
        return f"step {steps} loss {loss:.4f} timing..."
    return f"step {steps} loss {loss:.4f} {tokens_per_second:,.0f} tok/s {hms(seconds_left)} left"


def hms(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from an hour on."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """The progress of a run on ``stream`` (stderr): ``update(fraction, text)`` after every step.

    On a terminal, a bar rewritten in place, e.g.

         42% |████████▍           | step 820 loss 2.3412 17,747 tok/s 02:51 left

    Otherwise (a pipe, a log file) no carriage returns: the same text as a plain line each time the
    run passes another 10 %.  ``fraction`` never goes back (the bar keeps the largest seen).
    """

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.fraction = 0.0
        self.bar = None
        if enabled and self.stream.isatty():
            # (a terminal that reports no size, e.g. a bare pty, gets the full width, not a 0-column bar)
            width = min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns or WIDTH)
            self.bar = tqdm(total=1.0, file=self.stream, ncols=width, bar_format="{percentage:3.0f}% |{bar}| {desc}")
            self.shown_at = 0.0

    def update(self, fraction: float, text: str) -> None:
        if not self.enabled:
            return
        fraction = min(max(fraction, self.fraction), 1.0)
        if self.bar is not None:
            # Redrawn here, at most every REDRAW seconds: tqdm's own pacing adapts to the rate of
            # its first updates, and after a long start-up (setup, step-0 evaluation) in a short
            # budget it drew nothing more until the end.
            self.bar.n = fraction
            self.bar.set_description_str(text, refresh=False)
            now = time.monotonic()
            if now - self.shown_at >= REDRAW or fraction >= 1.0:
                self.bar.refresh()
                self.shown_at = now
        elif int(fraction / PLAIN_EVERY + 1e-9) > int(self.fraction / PLAIN_EVERY + 1e-9):
            tqdm.write(f"{100 * fraction:3.0f}% {text}", file=self.stream)
        self.fraction = fraction

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


TOKENIZING_EVERY = 10.0   # seconds between the lines on a corpus being tokenized


def tokenizing_progress(verbose: bool):
    """A ``progress(characters_done, characters)`` for tokenizing a corpus (Tokenizer.encode_long)
    that says how far it is every ``TOKENIZING_EVERY`` seconds (a 100 MB corpus takes a minute or
    more); None when not ``verbose``."""
    if not verbose:
        return None
    start = last = time.monotonic()

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= TOKENIZING_EVERY and done < total:
            last = now
            say(f"tokenizing: {100 * done / total:.0f}% of {total:,} characters, {now - start:.0f}s", True)

    return progress


def say(msg: str, verbose: bool) -> None:
    """A line on stderr that does not break the progress bar."""
    if verbose:
        tqdm.write(msg, file=sys.stderr)
