"""`npllama train --init-from MODEL --lora-rank R`: adapters train on a frozen base, the run directory
is a PEFT adapter directory, progress/evaluation/samples work, a run resumes exactly after an
interrupt, the NaN guard holds, and a changed base is refused on resume."""
import json
import os
import re
import signal

import numpy as np
import pytest

import npllama
from npllama.adapters import merge_adapters
from npllama import cli
from npllama.data import load_text
from npllama.errors import CheckpointError, ConfigError
from npllama.gradcheck import relative_error
from npllama.train import OPTIMIZER_FILE, STATE_FILE, TrainConfig, TrainingDiverged, new_run, read_metrics, train

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", OPTIMIZER_FILE, STATE_FILE)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A corpus and a tiny trained run to fine-tune (an npllama run directory is also a Hugging Face one)."""
    d = tmp_path_factory.mktemp("lora")
    corpus = d / "text.txt"
    corpus.write_text(load_text(None)[:20000], encoding="utf-8")
    src = d / "base"
    train(TrainConfig(data=str(corpus), preset="tiny", dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=300,
                      seq_len=16, batch_size=4, steps=3, warmup_steps=1, eval_interval=0, sample_tokens=0,
                      final_eval_tokens=200, out_dir=str(src)), progress=False, verbose=False)
    return corpus, src


def lora_config(base, out_dir, **overrides):
    corpus, src = base
    values = dict(data=str(corpus), init_from=str(src), lora_rank=2, lora_alpha=4.0, seq_len=16, batch_size=4,
                  steps=6, warmup_steps=1, lr=1e-2, eval_interval=3, eval_tokens=200, final_eval_tokens=400,
                  sample_tokens=4, checkpoint_interval=0, out_dir=str(out_dir))
    values.update(overrides)
    return TrainConfig(**values)


def step_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_lora_run_trains_the_adapters_only(base, tmp_path):
    _, src = base
    before = (src / "model.safetensors").read_bytes()
    d = tmp_path / "run"
    result = train(lora_config(base, d, lora_targets="q_proj,v_proj,down_proj", grad_accum=2), progress=False,
                   verbose=False)
    assert result.step == 6 and np.isfinite(result.final_eval["val_loss"])
    for name in ADAPTER_FILES:
        assert (d / name).is_file(), name
    assert not (d / "model.safetensors").exists()
    assert (src / "model.safetensors").read_bytes() == before
    config = json.loads((d / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"], config["base_model_name_or_path"]) == \
        (2, 4.0, ["q_proj", "v_proj", "down_proj"], str(src))
    model = npllama.Llama.from_pretrained(d)
    assert model.lora.targets == ("q_proj", "v_proj", "down_proj")
    assert all(p.any() for k, p in model.lora_params.items() if ".lora_B." in k)   # B moved off 0
    assert model.tokenizer.fingerprint == npllama.Llama.from_pretrained(src).tokenizer.fingerprint
    base_model = npllama.Llama.from_pretrained(src)
    for name, p in model.params.items():
        np.testing.assert_array_equal(p, base_model.params[name])
    evals = [r for r in read_metrics(d) if "val_loss" in r]
    assert evals and all(np.isfinite(r["val_loss"]) for r in evals)


def test_lora_resume_after_interrupt_is_exact(base, tmp_path):
    ref = tmp_path / "ref"
    train(lora_config(base, ref, lora_dropout=0.2, checkpoint_interval=2), progress=False, verbose=False)
    d = tmp_path / "run"

    def stop_at_4(step, loss, run):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    first = train(lora_config(base, d, lora_dropout=0.2, checkpoint_interval=2), progress=False, verbose=False,
                  on_step=stop_at_4)
    assert first.interrupted and first.step == 4
    train(resume=d, progress=False, verbose=False)
    assert step_losses(d) == step_losses(ref)                           # bit for bit
    for name in ("adapter_model.safetensors", OPTIMIZER_FILE):
        assert (d / name).read_bytes() == (ref / name).read_bytes(), name

    # a crash (no save) at step 5: the step-4 checkpoint is what is left, and the run goes on from it
    class Crash(Exception):
        pass

    def crash_at_5(step, loss, run):
        if step == 5:
            raise Crash

    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(lora_config(base, crashed, lora_dropout=0.2, checkpoint_interval=2), progress=False, verbose=False,
              on_step=crash_at_5)
    assert json.loads((crashed / STATE_FILE).read_text())["step"] == 4
    train(resume=crashed, progress=False, verbose=False)
    assert step_losses(crashed) == step_losses(ref)


def test_lora_nan_guard_and_changed_base(base, tmp_path):
    corpus, src = base

    def poison(step, loss, run):
        run.model.flat_lora[:] = np.nan

    with pytest.raises(TrainingDiverged, match="step 2"):
        train(lora_config(base, tmp_path / "nan"), progress=False, verbose=False, on_step=poison)

    copy = tmp_path / "base_copy"
    npllama.Llama.from_pretrained(src).save_pretrained(copy)
    d = tmp_path / "run"
    train(lora_config(base, d, init_from=str(copy), steps=2, eval_interval=0), progress=False, verbose=False)
    (d / STATE_FILE).write_text((d / STATE_FILE).read_text().replace('"total_steps": 2', '"total_steps": 4'))
    model = npllama.Llama.from_pretrained(copy)
    model.params["model.norm.weight"][0] += 1.0
    model.save_pretrained(copy)
    with pytest.raises(CheckpointError, match="base model of this LoRA run changed"):
        train(resume=d, progress=False, verbose=False)


def test_lora_options_are_checked(base, tmp_path):
    with pytest.raises(ConfigError, match="--lora-rank needs --init-from"):
        TrainConfig(lora_rank=4)
    with pytest.raises(ConfigError, match="--lora-targets"):
        lora_config(base, tmp_path, lora_targets="q_proj,qkv")
    with pytest.raises(ConfigError, match="--lora-dropout"):
        lora_config(base, tmp_path, lora_dropout=1.0)
    run = new_run(lora_config(base, tmp_path / "r"), verbose=False)
    assert run.optimizer.flat_params is run.model.flat_lora


def test_cli_lora_train(base, tmp_path, capsys):
    corpus, src = base
    d = tmp_path / "run"
    argv = ["train", "--init-from", str(src), "--lora-rank", "2", "--lora-alpha", "8", "--lora-dropout", "0.1",
            "--lora-targets", "q_proj,k_proj,v_proj,o_proj", "--data", str(corpus), "--context", "16",
            "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--eval-interval", "2", "--eval-tokens",
            "100", "--final-eval-tokens", "200", "--sample-tokens", "5", "--out-dir", str(d), "--threads", "1",
            "--no-progress"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "LoRA: rank 2" in err and "bits/byte" in err and "done: 3 steps" in err
    peak = float(re.search(r"peak memory ([0-9.]+) GB", err).group(1))   # VmHWM: NumPy + Numba alone are > 0.05 GB
    assert 0.05 < peak < 64
    assert json.loads((d / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    # `npllama generate RUN` on the LoRA run: the base with the adapter, greedy = the merged model's tokens
    assert cli.main(["generate", str(d), "--prompt", "ROMEO", "--max-new-tokens", "6", "--temperature", "0",
                     "--threads", "1"]) == 0
    out = capsys.readouterr().out
    model = npllama.Llama.from_pretrained(d)
    merged = merge_adapters(model)
    ids = model.tokenizer.encode("ROMEO")
    expected = model.tokenizer.decode(merged.generate(np.array(ids), 6))
    assert expected and expected in out


def test_export_merge_writes_the_merged_model(base, tmp_path, capsys):
    d = tmp_path / "run"
    train(lora_config(base, d, steps=3, eval_interval=0, sample_tokens=0), progress=False, verbose=False)
    assert cli.main(["export", str(d), "--to", "gguf"]) == 1
    assert "pass --merge" in capsys.readouterr().err
    assert cli.main(["export", str(base[1]), "--merge"]) == 1               # a model without an adapter
    assert "no LoRA adapter" in capsys.readouterr().err
    assert cli.main(["export", str(d), "--merge"]) == 0
    out = tmp_path / "run-hf"
    merged = npllama.Llama.from_pretrained(out)
    assert merged.lora is None and (out / "tokenizer.json").is_file()
    lora = npllama.Llama.from_pretrained(d)
    np.testing.assert_array_equal(merged.flat_params, merge_adapters(lora).flat_params)
    tokens = np.arange(12).reshape(2, 6)
    assert relative_error(merged.forward(tokens), lora.forward(tokens)) <= 1e-5   # float32
    assert cli.main(["export", str(d), "--merge"]) == 1                      # no overwrite without --force
    assert cli.main(["export", str(d), "--merge", "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0


def test_fine_tune_from_a_gguf_file_keeps_its_tokenizer(base, tmp_path):
    """--init-from a .gguf (no tokenizer.json beside it: the tokenizer is in its metadata), LoRA and full:
    the GGUF's own tokenizer with its chat template, the adapter's base is the .gguf, resume checks its hash."""
    from npllama.formats.gguf_writer import write_gguf
    corpus, src = base
    model = npllama.Llama.from_pretrained(src)
    model.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    gguf = write_gguf(tmp_path / "base.gguf", model.config, model.params, model.tokenizer)
    from_gguf = npllama.Llama.from_pretrained(gguf)

    d = tmp_path / "lora"
    result = train(lora_config(base, d, init_from=str(gguf), steps=4, checkpoint_interval=2), progress=False,
                   verbose=False)
    assert result.step == 4 and result.final_eval["val_bpb"] > 0
    assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf)
    lora = npllama.Llama.from_pretrained(d)
    assert lora.tokenizer.fingerprint == from_gguf.tokenizer.fingerprint
    assert lora.tokenizer.chat_template == model.tokenizer.chat_template    # tokenizer_config.json in the run
    np.testing.assert_array_equal(lora.flat_params, from_gguf.flat_params)
    assert any(p.any() for k, p in lora.lora_params.items() if ".lora_B." in k)

    # a resumed run checks the .gguf it trains against
    (d / STATE_FILE).write_text((d / STATE_FILE).read_text().replace('"total_steps": 4', '"total_steps": 6'))
    train(resume=d, progress=False, verbose=False)
    assert json.loads((d / STATE_FILE).read_text())["step"] == 6
    (d / STATE_FILE).write_text((d / STATE_FILE).read_text().replace('"total_steps": 6', '"total_steps": 8'))
    model.params["model.norm.weight"][0] += 1.0
    write_gguf(gguf, model.config, model.params, model.tokenizer)
    with pytest.raises(CheckpointError, match="base model of this LoRA run changed"):
        train(resume=d, progress=False, verbose=False)

    full = tmp_path / "full"
    result = train(lora_config(base, full, init_from=str(gguf), lora_rank=None, steps=2), progress=False,
                   verbose=False)
    assert result.step == 2 and (full / "model.safetensors").is_file()
    tuned = npllama.Llama.from_pretrained(full)
    assert tuned.tokenizer.fingerprint == from_gguf.tokenizer.fingerprint
    assert tuned.tokenizer.chat_template == model.tokenizer.chat_template
    assert not np.array_equal(tuned.flat_params, npllama.Llama.from_pretrained(gguf).flat_params)


def test_a_gguf_without_a_tokenizer_cannot_be_fine_tuned(base, tmp_path):
    from test_gguf import CFG, random_model, write_gguf as write_bare_gguf   # llama.cpp's writer, no tokenizer
    bare = tmp_path / "bare.gguf"
    write_bare_gguf(bare, random_model(CFG).params, CFG)
    d = tmp_path / "run"
    with pytest.raises(ConfigError, match="bare.gguf: the checkpoint has no tokenizer.*fine-tuning needs the "
                                          "checkpoint's own tokenizer"):
        new_run(lora_config(base, d, init_from=str(bare)), verbose=False)
    assert not d.exists()


def test_fine_tuning_learning_rate_and_warmup_defaults(base, tmp_path):
    corpus, src = base
    assert (TrainConfig().lr, TrainConfig().warmup_steps) == (3e-3, 50)
    assert (TrainConfig(init_from=str(src)).lr, TrainConfig(init_from=str(src)).warmup_steps) == (1e-4, 10)
    assert TrainConfig(init_from=str(src), lora_rank=8).lr == 1e-3
    assert (TrainConfig(init_from=str(src), lr=2e-2, warmup_steps=0).lr,
            TrainConfig(init_from=str(src), lr=2e-2, warmup_steps=0).warmup_steps) == (2e-2, 0)
    saved = TrainConfig(init_from=str(src), lora_rank=8).to_dict()
    assert (saved["lr"], saved["warmup_steps"]) == (1e-3, 10)     # a resumed run keeps what it trained with


def test_qlora_from_a_quantized_gguf_keeps_the_base_in_its_blocks(base, tmp_path):
    """--init-from a Q8_0 .gguf with --lora-rank: the base stays quantized (QLoRA) and the run trains,
    evaluates, samples (through a merged copy on the dequantized base) and resumes against the same
    quantized base; --dequantize-base loads it as float32, and a step from the same adapters gives the
    same loss within float32 rounding."""
    from npllama.formats.gguf_writer import write_gguf
    from npllama.layers.quantized_linear import QuantizedMatrix
    model = npllama.Llama.from_pretrained(base[1])
    gguf = write_gguf(tmp_path / "base-q8.gguf", model.config, model.params, model.tokenizer, dtype="q8_0")
    d = tmp_path / "qlora"
    result = train(lora_config(base, d, init_from=str(gguf), steps=4, checkpoint_interval=2), progress=False,
                   verbose=False)
    assert result.step == 4 and result.final_eval["val_bpb"] > 0
    qlora = npllama.Llama.from_pretrained(d, quantized=True)
    assert qlora.quantized and isinstance(qlora.params["model.layers.0.mlp.up_proj.weight"], QuantizedMatrix)
    assert any(p.any() for k, p in qlora.lora_params.items() if ".lora_B." in k)
    float_base = npllama.Llama.from_pretrained(d)
    assert not float_base.quantized
    tokens = np.arange(32).reshape(2, 16) % model.config.vocab_size
    loss_q, _ = qlora.loss_and_grad(tokens, tokens)
    loss_f, _ = float_base.loss_and_grad(tokens, tokens)
    assert abs(loss_q - loss_f) <= 1e-5 * abs(loss_f)
    (d / STATE_FILE).write_text((d / STATE_FILE).read_text().replace('"total_steps": 4', '"total_steps": 5'))
    train(resume=d, progress=False, verbose=False)
    assert json.loads((d / STATE_FILE).read_text())["step"] == 5
