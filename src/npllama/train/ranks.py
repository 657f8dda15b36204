"""One run on every rank of a data-parallel job (npllama/train/distributed.py).

Rank 0 sets the run up as one process would (``new_run``: tokenizer, token cache, model; or
``load_run``), while the other ranks wait.  Then it sends them what a step depends on: the
configuration, the counters, the sampler's state and, as raw arrays, the weights and the AdamW
moments.  The others memory-map the token cache rank 0 wrote in the run directory; when any rank
cannot see it (no shared file system), rank 0 sends the tokens too.  Each rank has its own
dropout generator (rank 0's is the one a single process would use); a checkpoint keeps all of
them, so that a resume on as many ranks continues bit for bit.  On another number of ranks the
data order is still the same (the sampler is global); ranks without a saved dropout stream start
a fresh one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import LlamaConfig
from ..data import BatchSampler, TokenDataset, generator_from_state, open_cached_tokens, token_cache_meta
from ..errors import CheckpointError
from ..model import Llama
from ..tokenizer import Tokenizer
from .progress import say
from .run import STATE_FILE, TOKENS_DIR, Run, make_optimizer
from .setup import load_run, new_run
from .config import DTYPES, TrainConfig
from .distributed import World


def setup_run(world: World, config: TrainConfig | None, resume, verbose: bool) -> Run:
    """The run on this rank: set up (or restored) by rank 0, the same on every rank."""
    if world.size == 1:
        return load_run(resume, verbose) if resume is not None else new_run(config, verbose)
    world.check_same_everywhere({"config": None if config is None else config.to_dict(),
                                 "resume": None if resume is None else str(resume)})
    run = (load_run(resume, verbose) if resume is not None else new_run(config, verbose)) if world.root else None
    header = world.from_root(_header(run) if world.root else None, "waiting for rank 0 to set the run up")
    if not world.root:
        run = _follower_run(header, world)
    world.check_batch(run.config.batch_size, run.config.grad_accum)
    _share_tokens(run, header, world)
    _share_arrays(run, world)
    _seed_dropout(run, header, world, verbose)
    run.world = world
    return run


def _header(run: Run) -> dict:
    """What the other ranks need to build the same Run, as JSON."""
    cache = run.run_dir / TOKENS_DIR
    saved_ranks = None
    if run.step > 0:   # a resumed run: the dropout streams its ranks saved (load_run checked the file)
        saved_ranks = _checked_ranks(json.loads((run.run_dir / STATE_FILE).read_text(encoding="utf-8")).get("ranks"))
    lora = run.model.lora
    return {"config": run.config.to_dict(), "run_dir": str(run.run_dir), "model": run.model.config.to_dict(),
            "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
                                               "dropout": lora.dropout},
            "tokenizer": run.tokenizer.to_str(), "text_sha256": run.text_sha256,
            "data": {"train_bytes": run.data.train_bytes, "val_bytes": run.data.val_bytes,
                     "train": token_cache_meta(cache, "train"), "val": token_cache_meta(cache, "val")},
            "step": run.step, "total_steps": run.total_steps, "warmup_steps": run.warmup_steps,
            "tokens_seen": run.tokens_seen, "train_seconds": run.train_seconds, "plan": run.plan,
            "last_checkpoint_step": run.last_checkpoint_step, "optimizer_t": run.optimizer.t,
            "sampler": run.sampler.state_dict(), "saved_ranks": saved_ranks}


def _checked_ranks(saved):
    """training_state.json's "ranks" (absent for a run saved by one process), checked."""
    if saved is None:
        return None
    if not (isinstance(saved, dict) and isinstance(saved.get("size"), int) and isinstance(saved.get("dropout_rngs"), list)
            and len(saved["dropout_rngs"]) == saved["size"]):
        raise CheckpointError(f"{STATE_FILE}: 'ranks' must hold the size and one dropout_rng state per rank")
    return saved


def _follower_run(header: dict, world: World) -> Run:
    cfg = TrainConfig.from_dict(header["config"], source="rank 0's configuration")
    tokenizer = Tokenizer.from_str(header["tokenizer"])
    model = Llama(LlamaConfig.from_dict(header["model"]), dtype=DTYPES[cfg.dtype])   # weights: from rank 0
    if header["lora"] is not None:
        lora = header["lora"]
        model.add_lora(lora["rank"], lora["alpha"], lora["targets"], lora["dropout"], seed=cfg.seed)
    model.tokenizer = tokenizer
    model.train()
    placeholder = np.zeros(cfg.seq_len + 1, dtype=np.uint16)   # the tokens come in _share_tokens
    data = TokenDataset(train_tokens=placeholder, val_tokens=placeholder, train_bytes=header["data"]["train_bytes"],
                        val_bytes=header["data"]["val_bytes"], vocab_size=tokenizer.vocab_size)
    optimizer = make_optimizer(model, cfg)
    optimizer.t = header["optimizer_t"]
    return Run(config=cfg, run_dir=Path(header["run_dir"]), model=model, tokenizer=tokenizer, data=data,
               text_sha256=header["text_sha256"], optimizer=optimizer, sampler=None, step=header["step"],
               total_steps=header["total_steps"], warmup_steps=header["warmup_steps"],
               tokens_seen=header["tokens_seen"], train_seconds=header["train_seconds"], plan=header["plan"] or {},
               last_checkpoint_step=header["last_checkpoint_step"])


def _share_tokens(run: Run, header: dict, world: World) -> None:
    """The other ranks memory-map rank 0's token cache when every one of them sees it, else rank 0
    sends the tokens."""
    tokens = {}
    if world.root:
        tokens = {"train": run.data.train_tokens, "val": run.data.val_tokens}
    else:
        for name in ("train", "val"):
            meta = header["data"][name]
            cached = None if meta is None else open_cached_tokens(run.run_dir / TOKENS_DIR, name, meta)
            if cached is not None:
                tokens[name] = cached
    seen_everywhere = world.sum_int(len(tokens), "looking for the token cache") == 2 * world.size
    if not seen_everywhere:
        for name in ("train", "val"):
            meta = header["data"][name]
            buffer = np.array(tokens[name]) if world.root else np.empty(meta["n_tokens"], dtype=meta["dtype"])
            tokens[name] = world.bcast_(buffer, "receiving the tokens from rank 0")
    cfg = run.config
    if not world.root:
        run.data = TokenDataset(train_tokens=tokens["train"], val_tokens=tokens["val"],
                                train_bytes=run.data.train_bytes, val_bytes=run.data.val_bytes,
                                vocab_size=run.data.vocab_size)
        run.sampler = BatchSampler(run.data.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 2)
        run.sampler.load_state_dict(header["sampler"])


def _share_arrays(run: Run, world: World) -> None:
    """Rank 0's weights (with LoRA: the base and the adapters) and AdamW moments into every rank's."""
    world.bcast_(run.model.flat_params, "receiving the weights from rank 0")
    if run.model.lora is not None:
        world.bcast_(run.model.flat_trainable, "receiving the adapters from rank 0")
    for name in run.optimizer.m:
        world.bcast_(run.optimizer.m[name], "receiving the optimizer state from rank 0")
        world.bcast_(run.optimizer.v[name], "receiving the optimizer state from rank 0")


def _seed_dropout(run: Run, header: dict, world: World, verbose: bool) -> None:
    """Rank 0 keeps the dropout stream of one process; rank r > 0 takes the one it saved when the
    run was saved on at least r+1 ranks, else a fresh stream of its own."""
    saved = header["saved_ranks"]
    states = saved["dropout_rngs"] if saved else [None]
    if world.rank > 0:
        if world.rank < len(states):
            run.model.dropout_rng = generator_from_state(states[world.rank], f"rank {world.rank}'s dropout_rng")
        else:
            run.model.dropout_rng = np.random.default_rng([run.config.seed + 1, world.rank, run.step])
    if saved and saved["size"] != world.size and run.config.dropout > 0:
        say(f"note: the run was saved on {saved['size']} ranks and continues on {world.size}: the same data order, "
            "but other dropout masks than an unbroken run", verbose and world.root)
