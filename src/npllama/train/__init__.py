"""Training: `npllama train`.

    npllama train                                   # a small Llama on the bundled Shakespeare, ~5 min
    npllama train --data my.txt --preset medium --steps 2000
    npllama train --resume runs/shakespeare-20250101-120000
    npllama train --resume runs/shakespeare-20250101-120000 --steps 1000   # extend it
    npllama train --data my_code/ --dry-run         # size, tokens, steps and passes, before training
    npllama train --init-from runs/shakespeare-... --data my.txt   # fine-tune, same tokenizer

    loop.py         train(): the step, in the style of nanoGPT's train.py, in a loop
    session.py      around the step: metrics, progress, evaluations, samples, checkpoints, Ctrl-C, results
    run.py          a run: everything a step depends on (Run), the files of its directory
    setup.py        a run set up: fresh (run directory, tokenizer, tokens, model) or from its checkpoint
    checkpoint.py   a run saved as one unit and restored exactly
    run_dir.py      the run directory: claimed, locked, and what a run that never saved removes
    corpus_cache.py the machine-wide cache of tokenizers and tokenized corpora
    evaluation.py   held-out loss in bits per byte, a text sample
    metrics.py      metrics.jsonl, the run's log
    planner.py      how many steps fit in a time budget
    best.py         the best weights by held-out loss (RUN/best/), the overfitting warning, early stopping
    extend.py       --resume RUN --steps N / --time-budget S: more steps, a new tail of the schedule
    dry_run.py      --dry-run: what a run would be on this machine, without training
    progress.py     what a run shows: the progress bar (or plain lines), samples made safe for a terminal
    config.py       TrainConfig (every option, checked), model presets, options from a file
    cli.py          the command line
    distributed.py  data parallelism on MPI: the ranks, the all-reduce during the backward, faults
    ranks.py        one run on every rank: rank 0 sets it up and sends it to the others

On several processes (``mpiexec -n 4 npllama train ...``) every rank trains its share of each
batch with the numbers of one process; see distributed.py and docs/13-data-parallel.md.

Length of a run.  ``--steps N`` fixes it (use it for reproducible runs).  Without it,
``--time-budget S`` (default 300 s) plans the number of steps so that the whole command -- setup
(tokenizer training and tokenization included), training, evaluations, checkpoints and the final
evaluation -- takes about S seconds of wall time.  A first plan comes from the step-0 evaluation
(a step taken as three forward passes; a few throw-away steps when there is no evaluation); as the
machine is shared and its speed drifts, the plan is then redone every 10 steps from the recent step
times (``BudgetPlanner``), and the learning-rate schedule follows the latest plan (warmup does not
depend on it; the decay is stretched or shrunk).  The planned total is saved with each checkpoint,
and a resumed run keeps it and no longer re-plans, so it continues exactly the schedule it was on.

Run directory (``--out-dir``, default ``runs/<data>-<time>``):

    config.json, model.safetensors, tokenizer.json   the model in Hugging Face format
    optimizer.safetensors                           AdamW moments m.<name>, v.<name>
    training_state.json                             step, planned steps, the training config,
                                                    optimizer scalars, data-sampler and dropout RNG
                                                    states, data/tokenizer fingerprints, the live
                                                    thread counts, and the SHA-256 of both
                                                    safetensors files
    metrics.jsonl                                   one JSON line per step, evaluation and sample
    tokens/                                         the tokenized corpus (cache)
    best/                                           the weights of the lowest held-out loss (best.json:
                                                    its step and loss), what `npllama generate` uses

A run directory is made only once the configuration has been checked, and a fresh run that ends
before its first checkpoint (an error, Ctrl-C) removes it again, so a run directory holds a
checkpoint to --resume; only a SIGKILL before that leaves one without, which the same command reuses.

Exact resume.  The state holds everything a step depends on: weights, AdamW moments and step
count, the data sampler's generator, the dropout generator and the planned schedule.  So
``--resume`` continues with the same losses, bit for bit (same dtype and thread count), as a run
that never stopped.
"""
from ..files import file_sha256
from .checkpoint import save_checkpoint
from .cli import config_from_args
from .config import PRESETS, TrainConfig, llama_hidden_dim, model_config, read_config_file
from .evaluation import evaluate, generate_sample
from .loop import forward_backward, train
from .metrics import read_metrics
from .planner import BudgetPlanner, plan_steps
from .run import METRICS_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, Run, TrainingDiverged
from .session import TrainResult
from .setup import load_run, new_run

__all__ = ["METRICS_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "STATE_FILE", "PRESETS", "BudgetPlanner", "Run",
           "TrainConfig", "TrainResult", "TrainingDiverged", "config_from_args", "evaluate", "file_sha256",
           "forward_backward", "generate_sample", "llama_hidden_dim", "load_run", "model_config", "new_run",
           "plan_steps", "read_config_file", "read_metrics", "save_checkpoint", "train"]
