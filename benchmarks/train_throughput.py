#!/usr/bin/env python
"""Training throughput: npllama vs PyTorch (eager, torch.compile, Hugging Face), same model, same data.

    python benchmarks/train_throughput.py --config 15M-v4k --threads 2 --steps 10 --warmup 2 \
        [--frameworks npllama,torch,torch-compile,hf] [--json [PATH]]

One training step = forward + mean cross-entropy + backward + AdamW update, on a (batch, context)
block of random tokens (seeded; the same blocks for every framework):
    npllama:  loss, grads = model.loss_and_grad(x, y, copy=False); opt.step(flat_grads=model.flat_grads)
              (npllama.optim.AdamW over model.flat_params; --npllama-adamw dict steps over `grads`)
    torch:    opt.zero_grad(); loss = CE(model(x), y); loss.backward(); opt.step()

Every framework runs in its own child process with NPLLAMA_THREADS, OMP/OPENBLAS/MKL_NUM_THREADS and
torch.set_num_threads set to --threads before anything heavy is imported, so its peak RSS is its
own. All start from the same weights (written once to a temporary safetensors file). Before timing,
a check worker asserts that npllama, the hand-written PyTorch model and HF's LlamaForCausalLM give
the same loss on one batch (relative difference <= --check-rtol) and compares npllama's gradients
with PyTorch autograd's.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from benchmarks import common  # noqa: E402  (imports nothing heavy)

FRAMEWORKS = ("npllama", "torch", "torch-compile", "hf", "npllama-after-torch", "npllama-numpy-blas")
SCRIPT = Path(__file__).resolve()


def parse_args(argv=None):
    p = common.bench_parser(__doc__, config="15M-v4k", threads=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (JIT/compile; reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every framework this many times, interleaved, and keep each one's fastest round")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    p.add_argument("--seq-len", type=int, default=None, help="override the config's sequence length")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--torch-adamw", choices=("foreach", "for-loop", "fused"), default="foreach",
                   help="torch.optim.AdamW implementation (default foreach)")
    p.add_argument("--npllama-adamw", choices=("flat", "dict"), default="flat",
                   help="npllama AdamW over model.flat_params (default) or over the dict of arrays")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the npllama-vs-PyTorch loss check")
    p.add_argument("--check-rtol", type=float, default=1e-4)
    args = common.parse_bench_args(p, argv, FRAMEWORKS)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.rounds < 1:
        p.error("--steps, --threads and --rounds must be >= 1, --warmup >= 0")
    return args


# ======================================================================================================
# workers (run in child processes)
# ======================================================================================================

def worker_peak(lib: str, workdir: Path):
    if lib == "torch":
        run, _ = common.load_run(workdir)
        common.set_torch_threads(run["threads"])
    return common.matmul_peak_gflops(lib)


def worker_check(workdir: Path):
    """Losses of torch reference, HF and npllama on one batch; npllama gradients vs autograd."""
    import numpy as np
    import torch
    from benchmarks import torch_reference as tr
    run, shape = common.load_run(workdir)
    common.set_torch_threads(run["threads"])
    weights = common.load_weights(workdir / "weights.safetensors")
    x, y = common.random_batches(shape.vocab_size, run["batch_size"], run["seq_len"], 1, seed=run["seed"] + 1)[0]
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-12)

    ref = tr.TorchLlama(shape)
    tr.load_params(ref, weights)
    ref_loss = tr.cross_entropy(ref(tx), ty)
    ref_loss.backward()
    out = {"torch_loss": ref_loss.item()}
    hf = tr.build_hf_model(shape)
    tr.load_params(hf, weights)
    with torch.no_grad():
        out["hf_loss"] = tr.cross_entropy(tr.hf_logits(hf, tx), ty).item()
    out["hf_rel_diff"] = rel(out["hf_loss"], out["torch_loss"])
    del hf

    try:
        npllama = common.import_npllama()
    except RuntimeError as e:
        out["npllama_error"] = str(e)
        return out
    try:
        # 1) npllama's own initial weights, copied into the PyTorch model through model.params
        model = common.npllama_model(npllama, shape)
        loss_own, _ = model.loss_and_grad(x, y, copy=False)
        ref_own = tr.load_params(tr.TorchLlama(shape), model.params)
        with torch.no_grad():
            torch_own = tr.cross_entropy(ref_own(tx), ty).item()
        out["npllama_init_loss"] = float(loss_own)
        out["npllama_init_rel_diff"] = rel(float(loss_own), torch_own)
        # 2) the benchmark's weights copied into npllama; losses and gradients vs autograd
        model = common.npllama_model(npllama, shape, weights)
        loss, grads = model.loss_and_grad(x, y)
        out["npllama_loss"] = float(loss)
        out["npllama_rel_diff"] = rel(float(loss), out["torch_loss"])
        worst, worst_name = 0.0, None
        for name, p in ref.named_parameters():
            g_ref = p.grad.numpy()
            err = float(np.linalg.norm(np.asarray(grads[name]) - g_ref) / max(np.linalg.norm(g_ref), 1e-30))
            if err > worst:
                worst, worst_name = err, name
        out["npllama_grad_rel_err"] = worst
        out["npllama_grad_worst_param"] = worst_name
    except Exception as e:
        out["npllama_error"] = f"{type(e).__name__}: {e}"
    return out


def worker_train(framework: str, workdir: Path):
    run, shape = common.load_run(workdir)
    lib, import_s, rss_after_import = common.import_framework(framework, run["threads"])
    import numpy as np

    weights = common.load_weights(workdir / "weights.safetensors")
    n_batches = run["warmup"] + run["steps"]
    batches = common.random_batches(shape.vocab_size, run["batch_size"], run["seq_len"], n_batches,
                                    seed=run["seed"] + 1)
    o = run["optim"]
    losses = []
    t_build = time.perf_counter()
    if framework.startswith("npllama"):
        npllama = lib
        model = common.npllama_model(npllama, shape, weights)
        del weights
        model.train()
        try:
            from npllama.optim import AdamW
        except ImportError as e:
            raise RuntimeError(f"npllama.optim.AdamW cannot be imported ({e})") from e
        hyper = dict(lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"], weight_decay=o["weight_decay"])
        flat = run["npllama_adamw"] == "flat"
        # flat: m, v and the update run over model.flat_params in a few long kernel calls (what
        # npllama's training loop uses); dict: one update per named array.
        opt = AdamW(model.params, **hyper, flat_params=model.flat_params) if flat else AdamW(model.params, **hyper)

        def step(i):
            x, y = batches[i]
            loss, grads = model.loss_and_grad(x, y, copy=False)
            if flat:
                opt.step(flat_grads=model.flat_grads)
            else:
                opt.step(grads)
            losses.append(float(loss))
        from npllama.engine.blas import BLAS
        extra = {"numpy": np.__version__, "npllama_file": getattr(npllama, "__file__", None),
                 "adamw": run["npllama_adamw"], "blas": BLAS}
    else:
        import torch
        tr = lib
        module, fn = tr.build(framework, shape, weights)
        del weights
        module.train()
        impl = run["torch_adamw"]
        # decay only matrices, as npllama's AdamW does by default (RMSNorm gains stay undecayed)
        groups = [{"params": [p for p in module.parameters() if p.ndim >= 2]},
                  {"params": [p for p in module.parameters() if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                                weight_decay=o["weight_decay"], foreach=(impl == "foreach"),
                                fused=(impl == "fused") or None)
        tbatches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]

        def step(i):
            x, y = tbatches[i]
            opt.zero_grad(set_to_none=True)
            loss = tr.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        extra = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "adamw": impl}
        if framework == "hf":
            import transformers
            extra["transformers"] = transformers.__version__
    build_s = time.perf_counter() - t_build
    times = common.time_calls(step, run["warmup"], run["steps"])
    return {"framework": framework, "import_s": import_s, "build_s": build_s, "rss_after_import_mb": rss_after_import,
            "losses": losses, **times.to_json(), **extra}


def worker_entry(args):
    workdir = Path(args.workdir)
    kind = args.worker
    if kind.startswith("peak-"):
        return worker_peak(kind[len("peak-"):], workdir)
    if kind == "check":
        return worker_check(workdir)
    return worker_train(kind, workdir)


# ======================================================================================================
# parent
# ======================================================================================================

def check_passed(check: dict, rtol: float) -> tuple[bool, list[str]]:
    msgs, ok = [], True
    if "error" in check:
        return False, [f"check worker failed: {check['error']}"]
    msgs.append(f"loss torch={check['torch_loss']:.6f} hf={check['hf_loss']:.6f} (rel diff {check['hf_rel_diff']:.1e})")
    if check["hf_rel_diff"] > rtol:
        ok = False
        msgs.append("  FAIL: hand-written PyTorch model and HF LlamaForCausalLM disagree")
    if "npllama_error" in check:
        msgs.append(f"npllama not checked: {check['npllama_error']}")
    else:
        msgs.append(f"loss npllama={check['npllama_loss']:.6f} (rel diff to torch {check['npllama_rel_diff']:.1e}); "
                    f"npllama's own init copied via model.params: rel diff {check['npllama_init_rel_diff']:.1e}; "
                    f"grads max rel err {check['npllama_grad_rel_err']:.1e} ({check['npllama_grad_worst_param']})")
        if check["npllama_rel_diff"] > rtol or check["npllama_init_rel_diff"] > rtol:
            ok = False
            msgs.append(f"  FAIL: npllama and PyTorch losses differ by more than rtol={rtol}")
        if check["npllama_grad_rel_err"] > 1e-3:
            ok = False
            msgs.append("  FAIL: npllama gradients differ from PyTorch autograd by more than 1e-3 (relative norm)")
    return ok, msgs


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        common.worker_main(worker_entry, args)
        return 0

    say = common.printer(args)
    bc = common.get_config(args.config)
    shape = bc.shape
    batch_size = args.batch_size or bc.batch_size
    seq_len = args.seq_len or bc.seq_len
    if seq_len > shape.max_seq_len:
        raise SystemExit(f"--seq-len {seq_len} exceeds the model context {shape.max_seq_len}")
    tokens_per_step = batch_size * seq_len
    flops_tok = common.train_flops_per_token(shape, seq_len)

    common.say_header(say, bc, f"batch {batch_size} x {seq_len} = {tokens_per_step} tokens/step; "
                      f"{args.threads} thread(s); model FLOPs/token (6N + 12·L·H·hd·T, PaLM) = {flops_tok / 1e6:.1f} M",
                      args.threads)

    with tempfile.TemporaryDirectory(prefix="npllama-bench-") as tmp:
        workdir = Path(tmp)
        run = {"shape": shape.to_json(), "batch_size": batch_size, "seq_len": seq_len, "threads": args.threads,
               "warmup": args.warmup, "steps": args.steps, "seed": args.seed, "torch_adamw": args.torch_adamw,
               "npllama_adamw": args.npllama_adamw,
               "optim": {"lr": args.lr, "beta1": args.beta1, "beta2": args.beta2, "eps": args.eps,
                         "weight_decay": args.weight_decay}}
        (workdir / "run.json").write_text(json.dumps(run))
        common.save_weights(workdir / "weights.safetensors", common.make_weights(shape, seed=args.seed))

        def worker(kind):
            if args.wait_idle > 0:
                common.wait_for_idle(args.wait_idle)
            return common.run_worker(SCRIPT, ["--worker", kind, "--workdir", str(workdir)], args.threads)

        def measure_peaks(peaks=None):
            """sgemm rates; with ``peaks`` given, keep the better of old and new (a quieter moment)."""
            peaks = dict(peaks or {})
            for lib in ("numpy", "torch"):
                p = worker(f"peak-{lib}")
                if "gflops" in p and p["gflops"] > peaks.get(lib, {}).get("gflops", 0.0):
                    peaks[lib] = p
                peaks.setdefault(lib, p)
            return peaks

        peaks = measure_peaks()
        say("float32 2048² matmul peak: " + ", ".join(
            f"{lib} {p['gflops']:.1f} GFLOP/s" if "gflops" in p else f"{lib} failed ({p.get('error')})"
            for lib, p in peaks.items()))

        check, check_ok = None, True
        if not args.no_check:
            check = worker("check")
            check_ok, msgs = check_passed(check, args.check_rtol)
            for m in msgs:
                say("check: " + m)

        # Several rounds (each framework once per round, interleaved) and the round with the lowest
        # median kept: on a shared machine, a burst of other work spoils a round, rarely all of them.
        results, rounds = {}, {fw: [] for fw in args.frameworks}
        for rnd in range(args.rounds):
            for fw in args.frameworks:
                say(f"running {fw} ..." + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""))
                r = worker(fw)
                rounds[fw].append(r)
                if "error" in r:
                    say(f"  {fw} failed: {r['error']}")
                elif rnd == 0 and "blas" in r:
                    say(f"  {fw}'s matmuls: {r['blas']}")
                elif args.rounds > 1:
                    say(f"  median {r['median_s'] * 1e3:.1f} ms/step, others {r.get('others_cpus') or 0:.2f} CPUs")
        peaks = measure_peaks(peaks)     # again at the end: the best of the two is the machine's peak
        peak = peaks["numpy"].get("gflops")
        say("float32 2048² matmul peak (best of start and end): " + ", ".join(
            f"{lib} {p['gflops']:.1f} GFLOP/s" for lib, p in peaks.items() if "gflops" in p))
        for fw, rs in rounds.items():
            ok = [r for r in rs if "median_s" in r]
            results[fw] = dict(min(ok, key=lambda r: r["median_s"])) if ok else rs[-1]
            if args.rounds > 1:
                results[fw]["round_medians_s"] = [r.get("median_s") for r in rs]

    rows = []
    base = results.get("npllama", {})
    base_tps = tokens_per_step / base["median_s"] if "median_s" in base else None
    for fw, r in results.items():
        row = {"framework": fw}
        if "median_s" in r:
            tps = tokens_per_step / r["median_s"]
            gflops = tps * flops_tok / 1e9
            row.update(tokens_per_s=tps, best_tokens_per_s=tokens_per_step / r["min_s"], ms_per_step=r["median_s"] * 1e3, gflops=gflops,
                       peak_frac=(gflops / peak if peak else None), peak_rss_mb=r.get("peak_rss_mb"),
                       warmup_s=r.get("warmup_total_s"), cpu_s_per_step=r.get("median_cpu_s"),
                       others=r.get("others_cpus"),
                       first_loss=r["losses"][0], last_loss=r["losses"][-1],
                       npllama_ratio=(base_tps / tps if base_tps else None))
        else:
            row["error"] = r.get("error", "no result")
        rows.append(row)
        r.update({k: v for k, v in row.items() if k != "framework"})

    say("")
    say(common.format_table(rows, [
        ("framework", "framework", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("best_tokens_per_s", "best", ",.0f"),
        ("ms_per_step", "ms/step", ".1f"),
        ("gflops", "GFLOP/s", ".2f"), ("peak_frac", "of peak", ".1%"), ("peak_rss_mb", "peak RSS MB", ".0f"),
        ("warmup_s", "warm-up s", ".1f"), ("cpu_s_per_step", "cpu s/step", ".2f"), ("others", "others", ".2f"),
        ("first_loss", "loss first", ".3f"), ("last_loss", "loss last", ".3f"),
        ("npllama_ratio", "npllama ÷ this", ".2f")]))
    for row in rows:
        if "error" in row:
            say(f"{row['framework']}: {row['error']}")
    say("(tokens/s = batch·T / median step time; best = batch·T / fastest step; GFLOP/s = model FLOPs (PaLM formula) per second; "
        "'of peak' = that / numpy 2048² sgemm GFLOP/s; cpu s/step = process CPU time, all threads; "
        "others = CPUs used by other processes while timing (should be ~0); "
        "'npllama ÷ this' > 1 means npllama is faster)")

    if args.json is not None:
        common.write_json(args.json, {
            "benchmark": "train_throughput", "config": bc.name, "shape": shape.to_json(),
            "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": tokens_per_step,
            "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.rounds,
            "flops_per_token": flops_tok, "flops_formula": "6*N_matmul + 12*L*H*hd*T (PaLM; attention not halved)",
            "n_params": shape.num_parameters(), "n_matmul_params": common.matmul_weight_count(shape),
            "machine": common.machine_info(args.threads), "matmul_peak": peaks, "check": check,
            "check_ok": check_ok, "results": results})
    if not check_ok:
        say("CHECK FAILED: the frameworks do not compute the same thing; timings above are not comparable")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
