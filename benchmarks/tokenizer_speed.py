"""Time BPE training and tokenization of the bundled corpus.

    python benchmarks/tokenizer_speed.py [--vocab 4096 8192]

Prints, per vocabulary size: training seconds, whole-text ``encode`` and chunked ``encode_long``
seconds (with a check that both give the same ids), tokens per byte, and the time to build the
token cache of a TokenDataset and to open it again from the cache.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from npllama.data import TokenDataset, load_text
from npllama.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 8192])
    args = parser.parse_args()

    t0 = time.perf_counter()
    text = load_text()
    n_bytes = len(text.encode("utf-8"))
    print(f"load_text: {len(text):,} chars in {time.perf_counter() - t0:.2f} s")
    for vocab in args.vocab:
        t0 = time.perf_counter()
        tok = Tokenizer.train(text, vocab)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids_long = tok.encode_long(text)
        t_long = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids_whole = tok.encode(text)
        t_whole = time.perf_counter() - t0
        same = np.array_equal(ids_long, ids_whole)
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            TokenDataset.from_text(text, tok, cache_dir=cache)
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            TokenDataset.from_text(text, tok, cache_dir=cache)
            t_reopen = time.perf_counter() - t0
        print(f"vocab {tok.vocab_size}: train {t_train:.2f} s | encode_long {t_long:.2f} s, "
              f"encode {t_whole:.2f} s, identical={same} | {len(ids_long):,} tokens, "
              f"{n_bytes / len(ids_long):.2f} bytes/token | dataset cache build {t_build:.2f} s, "
              f"reopen {t_reopen:.2f} s")


if __name__ == "__main__":
    main()
