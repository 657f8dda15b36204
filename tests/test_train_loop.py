"""The training step and loop: gradient accumulation equal to one big batch, divergence stopping
the run, the final evaluation."""
import json
import math

import numpy as np
import pytest

import npllama
from npllama.data import TokenDataset, load_text
from npllama.train import STATE_FILE, TrainConfig, TrainingDiverged, evaluate, forward_backward, read_metrics, train

from train_helpers import corpus, file_bytes, step_losses, tiny  # noqa: F401  (corpus: a fixture)


def test_accumulated_gradient_equals_one_big_batch():
    cfg = npllama.LlamaConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=48, max_seq_len=8)
    model = npllama.Llama(cfg, seed=3, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (6, 8))
    y = rng.integers(0, 50, (6, 8))
    big_loss, big_grads = model.loss_and_grad(x, y)
    big = big_grads["lm_head.weight"].copy(), model.flat_grads.copy()

    buffer = np.empty_like(model.flat_params)
    loss, grads = forward_backward(model, [(x[0:2], y[0:2]), (x[2:4], y[2:4]), (x[4:6], y[4:6])], buffer)
    assert grads is buffer
    assert loss == pytest.approx(big_loss, rel=1e-13)
    np.testing.assert_allclose(grads, big[1], rtol=1e-10, atol=1e-15)
    # one micro-batch: the model's own gradient buffer, no copy
    loss1, grads1 = forward_backward(model, [(x, y)], buffer)
    assert grads1 is model.flat_grads and loss1 == big_loss


def test_training_with_accumulation_matches_big_batches(corpus, tmp_path):
    # 2 micro-batches of 4 windows = 1 batch of 8: the sampler draws the same windows in the same
    # order, so every step's loss agrees (float64: to rounding).
    common = dict(dtype="float64", steps=5, eval_interval=0, final_eval_tokens=50, sample_tokens=0)
    train(tiny(corpus, tmp_path / "big", batch_size=8, **common), progress=False, verbose=False)
    train(tiny(corpus, tmp_path / "acc", batch_size=4, grad_accum=2, **common), progress=False, verbose=False)
    big, acc = step_losses(tmp_path / "big"), step_losses(tmp_path / "acc")
    assert len(big) == len(acc) == 5
    np.testing.assert_allclose(acc, big, rtol=1e-12)
    assert big[-1] < big[0] - 0.1   # it learns


def test_nan_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    d = tmp_path / "run"
    snapshot = {}

    def poison(step, loss, run):
        if step == 5:   # after the step-4 checkpoint
            snapshot.update(file_bytes(d))
            run.model.params["model.norm.weight"][0] = np.nan

    with pytest.raises(TrainingDiverged, match=r"diverged at step 6: the loss is nan.*checkpoint \(step 4\)"):
        train(tiny(corpus, d, checkpoint_interval=4), progress=False, verbose=False, on_step=poison)
    assert file_bytes(d) == snapshot
    assert json.loads((d / STATE_FILE).read_text())["step"] == 4
    # and the run can go on from that checkpoint
    assert train(resume=d, progress=False, verbose=False).step == 8


def test_nan_before_any_checkpoint_says_so(corpus, tmp_path):
    def poison(step, loss, run):
        run.model.params["model.embed_tokens.weight"][:] = np.inf

    with pytest.raises(TrainingDiverged, match="step 2.*no checkpoint had been saved yet"):
        train(tiny(corpus, tmp_path / "run"), progress=False, verbose=False, on_step=poison)


def test_final_eval_is_bits_per_byte_of_all_held_out_text(corpus, tmp_path):
    d = tmp_path / "run"
    result = train(tiny(corpus, d, steps=3, final_eval_tokens=None, eval_interval=2), progress=False,
                   verbose=False)
    ev = result.final_eval
    model = npllama.Llama.from_pretrained(d)
    data = TokenDataset.from_text(load_text(corpus[0]), model.tokenizer, val_fraction=TrainConfig().val_fraction)
    assert ev["val_tokens"] == len(data.val_tokens)
    assert ev["val_bytes"] == data.val_bytes == len(load_text(corpus[0])[-data.val_bytes:].encode())
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] * ev["val_tokens"] / ev["val_bytes"] / math.log(2),
                                          rel=1e-12)
    again = evaluate(model, data.val_tokens, data.eval_context_token, data.val_bytes, 4, 16)
    assert again["val_loss"] == pytest.approx(ev["val_loss"], rel=1e-6)
    # the held-out loss is the sum over every held-out token: a plain loop over windows agrees
    evals = [r for r in read_metrics(d) if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3] and evals[-1]["final"]
    assert evals[0]["val_loss"] == pytest.approx(math.log(300), abs=0.1)   # untrained: ~uniform
    assert "train_loss" in evals[1]
