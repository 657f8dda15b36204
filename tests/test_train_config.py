"""Training options: presets and overrides, bad values refused, a config file then the command
line, a resume that refuses new settings, what `npllama train --help` says."""
import json

import pytest

import npllama
from npllama import cli
from npllama.errors import ConfigError
from npllama.train import OPTIMIZER_FILE, STATE_FILE, TrainConfig, config_from_args, llama_hidden_dim, model_config

from train_helpers import corpus  # noqa: F401  (a fixture)


def test_model_config_from_preset_and_overrides():
    c = model_config(TrainConfig(preset="medium"), vocab_size=1000)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim) == (256, 6, 8, 8, 704)
    c = model_config(TrainConfig(preset="medium", dim=96, n_heads=4, n_kv_heads=2, seq_len=64), 1000)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.max_seq_len) == (96, 6, 4, 2, 256, 64)
    assert llama_hidden_dim(64) == 192 and llama_hidden_dim(128) == 352


@pytest.mark.parametrize("bad, match", [
    (dict(lr=0.0), "^--lr must be a number > 0, got 0.0$"), (dict(batch_size=0), "--batch-size"),
    (dict(preset="huge"), "--preset"), (dict(dropout=1.0), r"--dropout must be a number in \[0, 1\)"),
    (dict(dtype="float16"), "--dtype"), (dict(min_lr=1.0, lr=0.1), "--min-lr"), (dict(steps=2.5), "--steps"),
    (dict(schedule="exp"), "--schedule"), (dict(val_fraction=0.0), "--val-fraction"),
    (dict(time_budget=-1), "^--time-budget must be a number > 0, got -1$"),
    # the model's shape, before any tokenizer is trained
    (dict(n_heads=5), r"^--n-heads 5 must divide dim 128 \(from --preset small\)"),
    (dict(dim=100, n_heads=8), "^--n-heads 8 must divide --dim 100:"),
    (dict(dim=48, n_heads=16), "channels per head must be even"),
    (dict(n_kv_heads=3), r"^--n-kv-heads 3 must divide n_heads 4 \(from --preset small\)"),
    (dict(vocab_size=200), "--vocab-size must be at least 257"),
])
def test_bad_config_values_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_config_file_then_command_line(tmp_path):
    parser = cli.build_parser()
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 0.01\nbatch-size = 3\npreset = "tiny"\nsample_prompt = "ROMEO:"\n')
    args = parser.parse_args(["train", "--config", str(toml), "--lr", "0.02", "--context", "64"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.batch_size, cfg.preset, cfg.seq_len, cfg.sample_prompt) == (0.02, 3, "tiny", 64, "ROMEO:")
    assert cfg.weight_decay == TrainConfig().weight_decay

    js = tmp_path / "c.json"
    js.write_text(json.dumps({"grad_accum": 4, "tie_embeddings": True}))
    cfg = config_from_args(parser.parse_args(["train", "--config", str(js), "--no-tie-embeddings"]))
    assert cfg.grad_accum == 4 and cfg.tie_embeddings is False

    js.write_text(json.dumps({"learning_rate": 1.0}))
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        config_from_args(parser.parse_args(["train", "--config", str(js)]))
    js.write_text(json.dumps({"threads": 2}))
    with pytest.raises(ConfigError, match="--threads"):
        config_from_args(parser.parse_args(["train", "--config", str(js)]))
    toml.write_text("lr = [")
    with pytest.raises(ConfigError, match="cannot parse"):
        config_from_args(parser.parse_args(["train", "--config", str(toml)]))


def test_cli_train_then_resume_refuses_new_settings(corpus, tmp_path, capsys):
    d = tmp_path / "run"
    argv = ["train", "--data", str(corpus[0]), "--preset", "tiny", "--dim", "32", "--vocab-size", "300",
            "--context", "16", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--eval-interval", "2",
            "--eval-tokens", "100", "--final-eval-tokens", "200", "--sample-tokens", "5", "--out-dir", str(d),
            "--threads", "1", "--no-progress"]
    assert cli.main(argv) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", OPTIMIZER_FILE, STATE_FILE, "metrics.jsonl"):
        assert (d / name).is_file(), name
    err = capsys.readouterr().err
    assert "final eval on all held-out text" not in err and "bits/byte" in err and "done: 3 steps" in err
    model = npllama.Llama.from_pretrained(d)
    assert model.config.dim == 32 and model.tokenizer.vocab_size == 300
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n"
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text

    assert cli.main(["train", "--resume", str(d), "--lr", "0.1"]) == 1
    assert "remove --lr" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(d), "--threads", "1", "--no-progress"]) == 0


def test_train_help_says_what_the_presets_and_init_from_take(capsys):
    from npllama import cli
    from npllama.train.config import PRESETS
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ".gguf" in out.split("--init-from MODEL")[-1].split("--lora-rank N", 1)[0]   # (its help, not usage)
    for name, p in PRESETS.items():
        assert f"{name} dim {p['dim']}, {p['n_layers']} layers, {p['n_heads']} heads" in out
