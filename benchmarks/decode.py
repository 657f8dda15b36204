#!/usr/bin/env python
"""Batch-1 greedy decoding speed: npllama.generate vs Hugging Face generate (vs llama2.c's run.c).

    python benchmarks/decode.py --config 15M --threads 1 --new-tokens 200 --prompt-len 16 \
        [--frameworks npllama,hf] [--llama2c /tmp/llama2c/run] [--repeats 3] [--json [PATH]]

Every framework gets the same random weights and the same prompt (ids [1, 3, random...]) and
generates --new-tokens tokens greedily with no early stop:
    npllama:  model.generate(prompt_ids, max_new_tokens, temperature=0.0)
    hf:       LlamaForCausalLM.generate(do_sample=False, use_cache=True, min_new_tokens=max_new_tokens)
    llama2c:  run model.bin -z tokenizer.bin -t 0 -n P+N-1 -i <prompt string>  (weights exported here)

tokens/s for npllama and hf = new tokens / wall time of one generate call (prompt prefill
included), median of --repeats calls after --warmup calls (the first npllama call includes
Numba compilation; its time is reported separately). For llama2.c it is run.c's own "achieved
tok/s": positions forwarded per second, one token at a time (prompt tokens included), timed from
the second position on with a millisecond clock. Each framework runs in its own process.

The generated ids are compared with HF's: a mismatch early on means the implementations differ;
a late one can be a float32 near-tie flipping a greedy choice.
"""
from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from benchmarks import common  # noqa: E402  (imports nothing heavy)

FRAMEWORKS = ("npllama", "hf")
SCRIPT = Path(__file__).resolve()


def parse_args(argv=None):
    p = common.bench_parser(__doc__, config="15M", threads=1)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length including the leading BOS")
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generate calls first (JIT; reported)")
    p.add_argument("--llama2c", action="append", default=[], metavar="RUN_BINARY",
                   help="path to a llama2.c `run` binary to time as well (repeatable, e.g. -O3 and -Ofast builds)")
    p.add_argument("--weight-std", type=float, default=0.3,
                   help="std of the random weight matrices (default 0.3). Speed does not depend on it; with "
                        "the usual 0.02 greedy decoding repeats one token and logit margins are tiny, so the "
                        "token comparison across frameworks would prove little")
    p.add_argument("--seed", type=int, default=0)
    args = common.parse_bench_args(p, argv, FRAMEWORKS)
    if args.new_tokens < 1 or args.prompt_len < 2 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("need --new-tokens >= 1, --prompt-len >= 2, --repeats >= 1, --warmup >= 0, --threads >= 1")
    return args


# ======================================================================================================
# workers
# ======================================================================================================

def _new_ids(result, prompt_len: int, n_new: int) -> list[int]:
    """generate()'s continuation, whether it returns the new ids alone or after the prompt."""
    import numpy as np
    out = np.asarray(result).reshape(-1)
    if out.size == prompt_len + n_new:
        out = out[prompt_len:]
    return [int(t) for t in out]


def worker_decode(framework: str, workdir: Path):
    run, shape = common.load_run(workdir)
    prompt, n_new = run["prompt"], run["new_tokens"]
    lib, import_s, rss_after_import = common.import_framework(framework, run["threads"])
    import numpy as np
    weights = common.load_weights(workdir / "weights.safetensors")

    if framework == "npllama":
        npllama = lib
        if not hasattr(npllama.Llama, "generate"):
            raise RuntimeError("npllama.Llama.generate does not exist yet")
        model = common.npllama_model(npllama, shape, weights)
        model.eval()
        prompt_arr = np.array(prompt, dtype=np.int64)

        def generate(_):
            return _new_ids(model.generate(prompt_arr, n_new, temperature=0.0), len(prompt), n_new)
        extra = {"numpy": np.__version__}
    else:
        import torch
        from transformers import GenerationConfig
        tr = lib
        model = tr.build_hf_model(shape)
        tr.load_params(model, weights)
        model.eval()
        prompt_t = torch.tensor([prompt], dtype=torch.int64)
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, use_cache=True,
                                   eos_token_id=None, pad_token_id=0, bos_token_id=1)

        def generate(_):
            with torch.inference_mode():
                out = model.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), generation_config=gen_cfg)
            return _new_ids(out[0].numpy(), len(prompt), n_new)
        import transformers
        extra = {"torch": torch.__version__, "transformers": transformers.__version__,
                 "torch_threads": torch.get_num_threads()}
    del weights
    outputs = []
    times = common.time_calls(lambda i: outputs.append(generate(i)), run["warmup"], run["repeats"])
    ids = outputs[-1]
    if len(ids) != n_new:
        raise RuntimeError(f"{framework} generated {len(ids)} tokens, expected {n_new}")
    return {"framework": framework, "import_s": import_s, "rss_after_import_mb": rss_after_import,
            "new_ids": ids, "distinct_new_ids": len(set(ids)), **times.to_json(), **extra}


# ======================================================================================================
# llama2.c
# ======================================================================================================

# run.c's tokenizer is fixed (BOS 1, the token of " " first, then the prompt's characters), so the
# benchmark gives it a synthetic tokenizer.bin in which every id is one character: a prompt string
# then encodes to exactly the benchmark's ids (no two pieces concatenate into a third, so nothing
# merges) and the printed output maps back to ids one character per token.
BOS_ID = 1
SPACE_ID = 3
_FIRST_CHAR = 0x4E00          # CJK Unified Ideographs; 0x4E00 + 32000 stays below the surrogates


def llama2c_piece(token_id: int) -> str:
    if token_id == BOS_ID:
        return "\n<s>\n"
    if token_id == SPACE_ID:
        return " "
    return chr(_FIRST_CHAR + token_id)


def llama2c_prompt_text(prompt_ids) -> str:
    """The ``-i`` string that run.c encodes to ``prompt_ids``, which must be [BOS, SPACE_ID, ...]."""
    ids = list(prompt_ids)
    if ids[:2] != [BOS_ID, SPACE_ID] or any(i in (BOS_ID, SPACE_ID) for i in ids[2:]):
        raise ValueError("prompt must be [BOS, SPACE_ID, ids not in {BOS, SPACE_ID}...] for llama2.c")
    return "".join(llama2c_piece(i) for i in ids[2:])


def llama2c_parse_output(stdout: str, prompt_ids) -> list[int]:
    """Generated ids from run.c's stdout (which echoes the prompt after BOS, minus the leading space)."""
    text = stdout[:-1] if stdout.endswith("\n") else stdout
    ids = [SPACE_ID if ch == " " else ord(ch) - _FIRST_CHAR for ch in text]
    echoed = len(prompt_ids) - 2
    if ids[:echoed] != list(prompt_ids[2:]):
        raise ValueError("llama2.c's output does not start with the prompt; tokenizer mismatch?")
    return ids[echoed:]


def run_llama2c(binary: str, workdir: Path, run: dict, threads: int) -> dict:
    prompt, n_new = run["prompt"], run["new_tokens"]
    steps = len(prompt) + n_new - 1          # run.c counts positions, BOS included
    # a tiny Python parent reports the binary's own peak RSS (RUSAGE_CHILDREN) on its last stderr line
    rss_wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                   "print('RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                   "sys.exit(r.returncode)")
    cmd = [sys.executable, "-c", rss_wrapper, binary, str(workdir / "model.bin"), "-z", str(workdir / "tokenizer.bin"), "-t", "0", "-n", str(steps),
           "-s", "1", "-i", llama2c_prompt_text(prompt)]
    rates, walls, ids, rss_kb, others = [], [], None, 0, []
    for i in range(run["warmup"] + run["repeats"]):
        ru0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), common.system_busy_seconds(), time.perf_counter()
        proc = subprocess.run(cmd, env=common.child_env(threads), capture_output=True, timeout=600)
        walls.append(time.perf_counter() - t0)
        ru1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), common.system_busy_seconds()
        if i >= run["warmup"] and busy0 is not None:
            own = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
            others.append(max((busy1 - busy0) - own, 0.0) / walls[-1])
        err = proc.stderr.decode("utf-8", "replace")
        if proc.returncode != 0:
            return {"error": f"{binary} exited with {proc.returncode}: {err.strip()[-500:]}"}
        m = re.search(r"achieved tok/s:\s*([0-9.eE+-]+)", err)
        if not m:
            return {"error": f"no 'achieved tok/s' in {binary}'s stderr: {err.strip()[-300:]}"}
        rates.append(float(m.group(1)))
        m = re.search(r"RSS_KB (\d+)", err)
        rss_kb = max(rss_kb, int(m.group(1)) if m else 0)
        ids = llama2c_parse_output(proc.stdout.decode("utf-8"), prompt)
    timed = rates[run["warmup"]:]
    out = {"framework": f"llama2c:{Path(binary).name}", "binary": binary, "achieved_tok_s": timed,
           "tokens_per_s": statistics.median(timed), "process_wall_s": walls, "new_ids": ids,
           "distinct_new_ids": len(set(ids)), "peak_rss_mb": rss_kb / 1024.0 or None,
           "others_cpus": statistics.median(others) if others else None}
    if len(ids) != n_new:
        out["note"] = f"run.c stopped after {len(ids)} of {n_new} tokens (it stops when it samples BOS)"
    return out


# ======================================================================================================
# parent
# ======================================================================================================

def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        common.worker_main(lambda a: worker_decode(a.worker, Path(a.workdir)), args)
        return 0

    import numpy as np
    say = common.printer(args)
    bc = common.get_config(args.config)
    shape = bc.shape
    P, N = args.prompt_len, args.new_tokens
    if P + N > shape.max_seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens = {P + N} exceeds the context {shape.max_seq_len}")
    rng = np.random.default_rng(args.seed + 7)
    pool = np.setdiff1d(np.arange(shape.vocab_size), [0, 2, BOS_ID, SPACE_ID])
    prompt = [BOS_ID, SPACE_ID] + [int(t) for t in rng.choice(pool, size=P - 2)]
    mean_ctx = P + (N - 1) / 2                    # average number of cached positions a new token sees
    flops_tok = common.decode_flops_per_token(shape, mean_ctx)
    weight_bytes = 4 * common.matmul_weight_count(shape)

    common.say_header(say, bc, f"batch 1, prompt {P} tokens, {N} new tokens, greedy; {args.threads} thread(s); "
                      f"FLOPs/token at mean context {mean_ctx:.0f} = {flops_tok / 1e6:.1f} M; "
                      f"matmul weights {weight_bytes / 1e6:.1f} MB", args.threads)

    results = {}
    with tempfile.TemporaryDirectory(prefix="npllama-decode-") as tmp:
        workdir = Path(tmp)
        weights = make_decode_weights(shape, args)
        common.save_weights(workdir / "weights.safetensors", weights)
        run = {"shape": shape.to_json(), "prompt": prompt, "new_tokens": N, "threads": args.threads,
               "warmup": args.warmup, "repeats": args.repeats}
        (workdir / "run.json").write_text(json.dumps(run))
        if args.llama2c:
            from npllama.formats.llama2c import write_llama2c, write_tokenizer_bin
            write_llama2c(workdir / "model.bin", shape.npllama_config(), weights, version=0)
            write_tokenizer_bin(workdir / "tokenizer.bin", [llama2c_piece(i).encode() for i in range(shape.vocab_size)],
                                [0.0] * shape.vocab_size)
        del weights
        for binary in args.llama2c:
            say(f"running llama2.c {binary} ...")
            if not Path(binary).is_file():
                results[f"llama2c:{binary}"] = {"error": f"{binary} does not exist (see benchmarks/README.md)"}
                continue
            if args.wait_idle > 0:
                common.wait_for_idle(args.wait_idle)
            r = run_llama2c(binary, workdir, run, args.threads)
            results[r.get("framework", f"llama2c:{binary}")] = r
        for fw in args.frameworks:
            say(f"running {fw} ...")
            if args.wait_idle > 0:
                common.wait_for_idle(args.wait_idle)
            results[fw] = common.run_worker(SCRIPT, ["--worker", fw, "--workdir", str(workdir)], args.threads)

    # the bandwidth ceiling: measured here, in the parent (a serial loop: one thread, as decoding
    # at --threads 1; a worker would add its 256 MB to a framework's peak RSS)
    memory_read = common.memory_read_gbs()
    read_gbs = memory_read["gbs"]
    ref_ids = results.get("hf", {}).get("new_ids")
    rows = []
    for name, r in results.items():
        row = {"framework": name}
        if "error" in r:
            row["error"] = r["error"]
            rows.append(row)
            continue
        tps = r["tokens_per_s"] if "tokens_per_s" in r else N / r["median_s"]
        best = max(r["achieved_tok_s"]) if "achieved_tok_s" in r else N / r["min_s"]
        r["tokens_per_s"], r["best_tokens_per_s"] = tps, best
        row.update(tokens_per_s=tps, best_tokens_per_s=best, ms_per_token=1e3 / tps, gflops=tps * flops_tok / 1e9,
                   weight_gbs=tps * weight_bytes / 1e9, peak_rss_mb=r.get("peak_rss_mb"),
                   warmup_s=r.get("warmup_total_s"), distinct=r.get("distinct_new_ids"),
                   others=r.get("others_cpus"), of_read=tps * weight_bytes / 1e9 / read_gbs if read_gbs else None)
        ids = r.get("new_ids")
        if ref_ids is not None and ids is not None:
            agree = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
            row["agree"] = f"{agree}/{N}"
            r["agree_with_hf"] = agree
        rows.append(row)
    say("")
    say(common.format_table(rows, [
        ("framework", "framework", ""), ("tokens_per_s", "tokens/s", ",.1f"), ("best_tokens_per_s", "best", ",.1f"),
        ("ms_per_token", "ms/token", ".2f"),
        ("gflops", "GFLOP/s", ".2f"), ("weight_gbs", "weights GB/s", ".2f"), ("of_read", "of read BW", ".0%"), ("peak_rss_mb", "peak RSS MB", ".0f"),
        ("warmup_s", "warm-up s", ".1f"), ("others", "others", ".2f"), ("distinct", "distinct ids", ""),
        ("agree", "same as HF", "")]))
    for row in rows:
        if "error" in row:
            say(f"{row['framework']}: {row['error']}")
    for name, r in results.items():
        if "note" in r:
            say(f"{name}: {r['note']}")
    if read_gbs:
        say(f"memory read, one thread, {memory_read['mb']} MB: {read_gbs:.2f} GB/s "
            f"-> at most {read_gbs * 1e9 / weight_bytes:.0f} tokens/s for {weight_bytes / 1e6:.1f} MB of matmul weights "
            f"per token, whoever decodes ('of read BW' = weights GB/s / this)")
    say("(tokens/s: new tokens / generate() wall time, median (best: fastest call); llama2.c: its own "
        "'achieved tok/s'. "
        "weights GB/s = matmul weight bytes streamed per second (decode is bandwidth-bound). "
        "others = CPUs used by other processes while timing (should be ~0); "
        "same as HF = leading generated tokens equal to HF's)")

    if args.json is not None:
        common.write_json(args.json, {
            "benchmark": "decode", "config": bc.name, "shape": shape.to_json(), "prompt": prompt,
            "new_tokens": N, "warmup": args.warmup, "repeats": args.repeats, "flops_per_token": flops_tok,
            "flops_formula": "2*N_matmul + 4*L*H*hd*t at mean context t = P + (N-1)/2",
            "machine": common.machine_info(args.threads), "memory_read": memory_read, "results": results})
    return 0


def make_decode_weights(shape, args) -> dict:
    """The shared random weights; token 1 (BOS) can never be the greedy pick (llama2.c stops at BOS)."""
    weights = common.make_weights(shape, seed=args.seed, zero_bos_logit=True)
    if args.weight_std != 0.02:
        scale = args.weight_std / 0.02
        for name, w in weights.items():
            if w.ndim == 2:
                w *= scale
    return weights


if __name__ == "__main__":
    sys.exit(main())
