"""What the training tests share: a small corpus, a tiny run's config, a run's losses and files."""
import os
import signal

import pytest

from npllama.data import load_text
from npllama.train import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, TrainConfig, read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two small UTF-8 texts cut from the bundled Shakespeare (about 20 kB each)."""
    text = load_text(None)
    d = tmp_path_factory.mktemp("corpus")
    first, second = d / "first.txt", d / "second.txt"
    first.write_text(text[:20000], encoding="utf-8")
    second.write_text(text[100000:120000], encoding="utf-8")
    return first, second



@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """One small UTF-8 text cut from the bundled Shakespeare (its first 20 kB), for tests that need one."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(load_text(None)[:20000], encoding="utf-8")
    return path

def tiny(corpus, out_dir, **overrides) -> TrainConfig:
    values = dict(data=str(corpus[0]), preset="tiny", dim=32, n_layers=2, n_heads=2, vocab_size=300,
                  seq_len=16, batch_size=4, steps=8, warmup_steps=2, lr=3e-3, eval_interval=4,
                  eval_tokens=200, final_eval_tokens=400, sample_tokens=4, checkpoint_interval=0,
                  out_dir=str(out_dir))
    values.update(overrides)
    return TrainConfig(**values)


def step_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def file_bytes(run_dir):
    return {name: (run_dir / name).read_bytes() for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)}


def interrupt_at(step_to_stop, signum=signal.SIGINT):
    def on_step(step, loss, run):
        if step == step_to_stop:
            os.kill(os.getpid(), signum)
    return on_step
