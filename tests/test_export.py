"""Export: GGUF and llama2.c files written by npllama, read back by npllama (always) and run by the
formats' own runtimes (when present):

* llama.cpp, through ``llama-cpp-python`` (``pip install llama-cpp-python``, which compiles llama.cpp;
  the tests skip without it): same tokenization, same last-position logits to 1e-4 relative
  (float32), same greedy tokens as ``model.generate``;
* llama2.c's ``export.py`` (``NPLLAMA_LLAMA2C_REPO``: a checkout of karpathy/llama2.c, and torch): the
  files it writes, read by npllama, give its ``model.py``'s logits;
* llama2.c's ``run.c``: build it yourself (``gcc -O3 -o run run.c -lm`` from
  https://github.com/karpathy/llama2.c) and give its path in ``NPLLAMA_LLAMA2C_RUN``; the test skips
  without it.  run.c's printed greedy text must be what npllama's greedy continuation of the ids
  run.c builds prints through run.c's own rules (``run_c_encode``/``run_c_text`` below follow run.c's
  ``encode``/``decode``/``safe_printf``).

The model is tiny and trained for a few dozen steps on a short text, so that greedy decoding
follows the text and the logits have clear margins (random weights repeat one token).
"""
import math
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from npllama import CheckpointError, ConfigError, Llama, LlamaConfig, Tokenizer
from npllama.cli import main as cli_main
from npllama.formats.gguf import load_weights, open_gguf
from npllama.formats.gguf_writer import write_gguf
from npllama.formats.llama2c import (BOS_ID, FIRST_BYTE_ID, NEVER_MERGED, is_llama2c, llama2c_vocabulary,
                                     open_llama2c, read_llama2c, write_llama2c, write_tokenizer_bin)
from npllama.formats.llama2c import load_weights as load_llama2c_weights
from npllama.formats.rope_rows import deinterleave_rope_rows, interleave_rope_rows
from npllama.optim import AdamW

TEXT = ("The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun. "
        "A quick brown fox runs into the woods, and the dog follows the fox.\n") * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MIXED = "The lazy fox, jumps!\n\n  over  the dög 🌍 <|im_end|>\tend 1234 it's"
CFG = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128)


def train_tiny(cfg=CFG, steps=40, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # BPE training stops short of 320 tokens on this text
        tok = Tokenizer.train(TEXT, vocab_size=cfg.vocab_size, special_tokens=SPECIALS)
    tok.chat_template = TEMPLATE
    ids = tok.encode(TEXT)
    model = Llama(cfg, seed=seed)
    model.tokenizer = tok
    opt = AdamW(model.params, lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    T = 48
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - T - 1, size=4)
        x = np.stack([ids[s:s + T] for s in starts])
        y = np.stack([ids[s + 1:s + T + 1] for s in starts])
        model.loss_and_grad(x, y)
        opt.step(model.grads)
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return train_tiny()


def random_params(cfg, seed=0):
    model = Llama(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p[...] = rng.normal(0, 0.5, p.shape)
    return model.params


def test_rope_row_orders_are_inverse_and_pair_the_halves():
    w = np.arange(2 * 8 * 3).reshape(16, 3)           # two heads of 8 rows
    inter = interleave_rope_rows(w, 8)
    np.testing.assert_array_equal(inter[:, 0] // 3, [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15])
    np.testing.assert_array_equal(deinterleave_rope_rows(inter, 8), w)


# ---- GGUF ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_f32_round_trip_gives_the_same_weights_config_and_tokenizer(trained, tmp_path, tied):
    cfg = LlamaConfig(**{**CFG.to_dict(), "tie_embeddings": tied})
    params = random_params(cfg) if tied else trained.params
    tok = trained.tokenizer
    write_gguf(tmp_path / "m.gguf", cfg, params, tok)
    ckpt = open_gguf(tmp_path / "m.gguf")
    back = ckpt.config
    assert back.norm_eps == float(np.float32(cfg.norm_eps))   # GGUF stores float32
    assert LlamaConfig(**{**back.to_dict(), "norm_eps": cfg.norm_eps, "eos_token_id": None}) == cfg
    assert back.eos_token_id == tok.eos_id == 0 and back.bos_token_id is None
    model = Llama(back)
    load_weights(ckpt, model.params)
    assert set(model.params) == set(params)
    for name, p in params.items():
        np.testing.assert_array_equal(model.params[name], p, err_msg=name)

    got = Tokenizer.from_gguf(ckpt)
    np.testing.assert_array_equal(got.encode(MIXED), tok.encode(MIXED))
    np.testing.assert_array_equal(got.encode(TEXT), tok.encode(TEXT))
    assert got.decode(got.encode(MIXED)) == MIXED
    assert (got.eos_id, got.bos_id, got.add_bos, got.chat_template) == (tok.eos_id, None, False, TEMPLATE)
    assert got.stop_ids == tok.stop_ids == (0, tok.token_to_id("<|im_end|>"))
    chat = [{"role": "user", "content": "the fox"}]
    np.testing.assert_array_equal(got.apply_chat_template(chat, add_generation_prompt=True),
                                  tok.apply_chat_template(chat, add_generation_prompt=True))
    # rows past the tokenizer's last id are llama.cpp's UNUSED padding tokens
    assert ckpt.value("tokenizer.ggml.tokens")[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, 320)]


def test_gguf_f16_holds_half_precision_matrices_and_float32_gains(trained, tmp_path):
    write_gguf(tmp_path / "m.gguf", CFG, trained.params, trained.tokenizer, dtype="f16")
    ckpt = open_gguf(tmp_path / "m.gguf")
    model = Llama(ckpt.config)
    load_weights(ckpt, model.params)
    for name, p in trained.params.items():
        want = p.astype(np.float16).astype(np.float32) if p.ndim == 2 else p
        np.testing.assert_array_equal(model.params[name], want, err_msg=name)
    assert ckpt.tensors["model.norm.weight"].tensor_type.name == "F32"
    assert ckpt.tensors["lm_head.weight"].tensor_type.name == "F16"


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1"])
def test_gguf_quantized_export_holds_the_gguf_quantizers_blocks(trained, tmp_path, dtype):
    """Matrices of whole 32-weight rows quantized by the gguf package (read back as they are, kept in
    their blocks), the others float16, the gains float32."""
    from npllama.layers.quantized_linear import QuantizedMatrix
    write_gguf(tmp_path / "m.gguf", CFG, trained.params, trained.tokenizer, dtype=dtype)
    model = Llama.from_pretrained(tmp_path / "m.gguf", quantized=True)
    quantized = 0
    for name, p in trained.params.items():
        got = model.params[name]
        if p.ndim == 2 and p.shape[1] % 32 == 0 and isinstance(got, QuantizedMatrix):
            np.testing.assert_array_equal(got.blocks, QuantizedMatrix.from_float(p, dtype.upper()).blocks, err_msg=name)
            quantized += 1
        elif p.ndim == 2:
            np.testing.assert_array_equal(got, p.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            np.testing.assert_array_equal(got, p, err_msg=name)
    assert quantized > 0


def test_gguf_export_refuses_what_it_cannot_express(trained, tmp_path):
    tok = trained.tokenizer
    with pytest.raises(ConfigError, match="dtype"):
        write_gguf(tmp_path / "m.gguf", CFG, trained.params, tok, dtype="q5_0")
    scaled = LlamaConfig(**{**CFG.to_dict(), "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    with pytest.raises(ConfigError, match="RoPE scaling"):
        write_gguf(tmp_path / "m.gguf", scaled, trained.params, tok)
    small = LlamaConfig(**{**CFG.to_dict(), "vocab_size": 100})
    with pytest.raises(ConfigError, match="only 100 embedding rows"):
        write_gguf(tmp_path / "m.gguf", small, random_params(small), tok)
    sp = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"\u2581a": 0, "a": 1, "\u2581": 2}, merges=[("\u2581", "a")]))
    sp.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    with pytest.raises(ConfigError, match="only byte-level BPE"):
        write_gguf(tmp_path / "m.gguf", CFG, trained.params, Tokenizer(sp))
    split = Tokenizer.from_str(tok.to_str())
    split.hf_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(), tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(ConfigError, match="not one llama.cpp knows"):
        write_gguf(tmp_path / "m.gguf", CFG, trained.params, split)
    assert not list(tmp_path.iterdir())   # nothing written, not even a temporary file


def test_smollm2_tokenizer_and_template_survive_gguf_export(tmp_path):
    from real_model import smollm2_gguf
    tok = Tokenizer.from_pretrained(smollm2_gguf())
    cfg = LlamaConfig(vocab_size=49152, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=16, tie_embeddings=True)
    write_gguf(tmp_path / "m.gguf", cfg, random_params(cfg), tok)
    ckpt = open_gguf(tmp_path / "m.gguf")
    assert ckpt.value("tokenizer.ggml.pre") == "gpt-2"
    got = Tokenizer.from_gguf(ckpt)
    text = MIXED + "\n" + TEXT + "def f(x):\n    return x ** 2  # señor ünïcödé 日本語 \u00a0\u2003 <|im_start|>"
    np.testing.assert_array_equal(got.encode(text), tok.encode(text))
    assert (got.bos_id, got.eos_id, got.stop_ids, got.chat_template) == (tok.bos_id, tok.eos_id, tok.stop_ids,
                                                                        tok.chat_template)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    np.testing.assert_array_equal(got.apply_chat_template(chat, add_generation_prompt=True),
                                  tok.apply_chat_template(chat, add_generation_prompt=True))


# ---- llama2.c checkpoints -----------------------------------------------------------------------
def llama2c_file_bytes(cfg, version):
    """Size of a llama2.c checkpoint by export.py's layout: header, weights, v0's RoPE tables."""
    L, d, h, V, hd = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.head_dim
    kv = cfg.n_kv_heads * hd
    floats = V * d + L * (2 * d + d * d + 2 * kv * d + d * d + 3 * d * h) + d + (0 if cfg.tie_embeddings else V * d)
    return (28 + 4 * (floats + cfg.max_seq_len * hd)) if version == 0 else 256 + 4 * floats


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [False, True])
def test_llama2c_round_trip_gives_the_same_weights_and_config(tmp_path, version, tied):
    cfg = LlamaConfig(**{**CFG.to_dict(), "tie_embeddings": tied})
    params = random_params(cfg)
    path = write_llama2c(tmp_path / "m.bin", cfg, params, version=version)
    raw = path.read_bytes()
    assert len(raw) == llama2c_file_bytes(cfg, version)
    header = struct.unpack_from("<7i", raw, 0 if version == 0 else 8)
    V = cfg.vocab_size if tied or version == 1 else -cfg.vocab_size
    assert header == (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, V, cfg.max_seq_len)
    if version == 1:
        assert raw[:8] == b"24ka" + struct.pack("<i", 1) and raw[36] == int(tied) and not any(raw[37:256])
    # the embedding right after the header in v0, after the RMSNorm gains in v1
    first = 28 if version == 0 else 256 + 4 * (2 * cfg.n_layers + 1) * cfg.dim
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4", cfg.dim, first), params["model.embed_tokens.weight"][0])

    back, tensors = read_llama2c(path)
    assert back == LlamaConfig(**{**cfg.to_dict(), "bos_token_id": 1, "eos_token_id": 2})
    assert set(tensors) == set(params)
    for name, p in params.items():
        np.testing.assert_array_equal(tensors[name], p, err_msg=name)
        assert tensors[name].dtype == np.float32
    assert read_llama2c(path, np.float64)[1]["model.norm.weight"].dtype == np.float64
    assert is_llama2c(path) and not is_llama2c(tmp_path)
    ckpt = open_llama2c(path)   # the loader's way: into a model's own arrays
    model = Llama(ckpt.config, dtype=np.float64)
    load_llama2c_weights(ckpt, model.params)
    for name, p in params.items():
        np.testing.assert_array_equal(model.params[name], p, err_msg=name)
    with pytest.raises(CheckpointError, match="another config"):
        load_llama2c_weights(ckpt, Llama(LlamaConfig(**{**cfg.to_dict(), "tie_embeddings": not tied})).params)


LLAMA2C_REPO = os.environ.get("NPLLAMA_LLAMA2C_REPO")


@pytest.mark.skipif(not LLAMA2C_REPO, reason="set NPLLAMA_LLAMA2C_REPO to a checkout of "
                    "https://github.com/karpathy/llama2.c (its model.py and export.py; needs torch) to read files "
                    "its export.py writes")
@pytest.mark.parametrize("tied", [True, False])
def test_files_written_by_llama2c_export_py_give_its_models_logits(tmp_path, monkeypatch, tied):
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(LLAMA2C_REPO)
    from export import legacy_export, version1_export   # llama2.c's export.py
    from model import ModelArgs, Transformer             # llama2.c's model.py
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96, max_seq_len=64)
    theirs = Transformer(args)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        if not tied:
            theirs.output.weight = torch.nn.Parameter(torch.randn_like(theirs.tok_embeddings.weight) * 0.3)
    tokens = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        want = theirs.eval()(tokens)[0, -1].double().numpy()
    for version, export in ((0, legacy_export), (1, version1_export)):
        export(theirs, tmp_path / f"v{version}.bin")
        args.vocab_size = 300   # legacy_export negates it in place for an untied head
        cfg, tensors = read_llama2c(tmp_path / f"v{version}.bin", np.float64)
        assert cfg.tie_embeddings == tied
        ours = Llama(cfg, dtype=np.float64)
        for name, w in tensors.items():
            ours.params[name][...] = w
        got = ours.eval().forward(tokens.numpy())[0, -1]
        # theirs runs in float32 (measured 4e-7)
        assert np.abs(got - want).max() / np.abs(want).max() < 2e-6, version


def test_llama2c_rows_follow_the_token_order(tmp_path):
    params = random_params(CFG)
    order = np.random.default_rng(0).permutation(CFG.vocab_size)
    _, tensors = read_llama2c(write_llama2c(tmp_path / "m.bin", CFG, params, token_order=order))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        np.testing.assert_array_equal(tensors[name], params[name][order])


def test_llama2c_export_refuses_models_run_c_computes_differently(tmp_path):
    for change, message in [({"rope_theta": 5e5}, "theta"), ({"norm_eps": 1e-6}, "eps"),
                            ({"head_dim": 32}, "head_dim"), ({}, "version")]:
        cfg = LlamaConfig(**{**CFG.to_dict(), **change})
        with pytest.raises(ConfigError, match=message):
            write_llama2c(tmp_path / "m.bin", cfg, random_params(cfg), version=2 if not change else 0)
    assert not list(tmp_path.iterdir())


def test_bad_llama2c_files_are_checkpoint_errors_naming_the_file(tmp_path):
    good = write_llama2c(tmp_path / "good.bin", CFG, random_params(CFG)).read_bytes()
    cases = {
        "truncated.bin": (good[:-4], "truncated"),
        "trailing.bin": (good + b"\0" * 4, "trailing data"),
        "short.bin": (good[:10], "too short"),
        "q80.bin": (struct.pack("<Ii", 0x616B3432, 2) + bytes(300), "version 2"),
        "v9.bin": (struct.pack("<Ii", 0x616B3432, 9) + bytes(300), "version 9"),
        "heads.bin": (struct.pack("<7i", 64, 128, 2, 5, 5, 320, 128) + good[28:], "divisible by n_heads"),
        "zero.bin": (bytes(28) + good[28:], "positive integer"),
        "text.bin": (b"hello world, this is not a checkpoint at all" * 3, "not a llama2.c"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message) as e:
            read_llama2c(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value), name
    with pytest.raises(CheckpointError, match="cannot read"):
        read_llama2c(tmp_path / "missing.bin")


def test_llama2c_sizes_are_checked_before_anything_is_allocated(tmp_path):
    """A 92-byte file claiming 10^6 (or 2^31 - 1) layers: refused from its header alone, in bounded
    memory (was: the per-layer section list built first, 51 s and 3.3 GB)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    for n_layers in (10**6, 2**31 - 1):
        path = tmp_path / f"{n_layers}.bin"
        path.write_bytes(struct.pack("<7i", 64, 128, n_layers, 4, 2, 320, 128) + bytes(64))
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + (256 << 20), hard))
        try:
            with pytest.raises(CheckpointError, match=f"n_layers {n_layers}.* implies .*truncated") as e:
                read_llama2c(path)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        assert str(path) in str(e.value)


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_llama2c_nan_or_infinite_weights_are_refused(tmp_path, bad):
    params = random_params(CFG)
    params["model.layers.0.self_attn.v_proj.weight"][1, 2] = bad
    path = write_llama2c(tmp_path / "m.bin", CFG, params)
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.self_attn.v_proj.weight': contains NaN or "
                                              "infinite values") as e:
        Llama.from_pretrained(path)
    assert str(path) in str(e.value)


# ---- llama2.c tokenizer -------------------------------------------------------------------------
def test_llama2c_vocabulary_puts_end_of_text_at_bos_and_bytes_at_3(trained):
    tok = trained.tokenizer
    v = llama2c_vocabulary(tok, CFG.vocab_size)
    assert sorted(v.order) == list(range(CFG.vocab_size))
    assert v.order[BOS_ID] == tok.eos_id and v.pieces[BOS_ID] == b"<|endoftext|>"
    assert [v.pieces[FIRST_BYTE_ID + b] for b in range(256)] == [bytes([b]) for b in range(256)]
    for j, i in enumerate(v.order):
        if i < tok.vocab_size:
            assert v.pieces[j] == tok.decode([i]).encode("utf-8") or len(v.pieces[j]) == 1   # (lone bytes: not UTF-8)
        else:
            assert v.pieces[j] == f"[PAD{i}]".encode()
    merges = tok.hf_tokenizer.to_str()
    first_merge = "".join(__import__("json").loads(merges)["model"]["merges"][0])
    j = v.order.index(tok.token_to_id(first_merge))
    assert v.scores[j] == 0.0 and v.scores[FIRST_BYTE_ID] == v.scores[BOS_ID] == NEVER_MERGED
    ranked = sorted((s, p) for s, p in zip(v.scores, v.pieces) if s != NEVER_MERGED)
    assert len(ranked) == tok.vocab_size - 256 - len(SPECIALS)


def test_tokenizer_bin_is_llama2c_layout(tmp_path):
    write_tokenizer_bin(tmp_path / "t.bin", [b"a", b"\xe2\x96\x81bc", b""], [0.0, -1.5, NEVER_MERGED])
    raw = (tmp_path / "t.bin").read_bytes()
    assert raw == (struct.pack("<i", 5) + struct.pack("<fi", 0.0, 1) + b"a" + struct.pack("<fi", -1.5, 5)
                   + b"\xe2\x96\x81bc" + struct.pack("<fi", NEVER_MERGED, 0))


# ---- the command ---------------------------------------------------------------------------------
def test_export_command(trained, tmp_path, capsys):
    run = tmp_path / "run"
    trained.save_pretrained(run)
    assert cli_main(["export", str(run), "--to", "gguf"]) == 0
    out = tmp_path / "run.gguf"
    model = Llama(open_gguf(out).config)
    load_weights(open_gguf(out), model.params)
    np.testing.assert_array_equal(model.flat_params, trained.flat_params)
    assert "wrote" in capsys.readouterr().out

    assert cli_main(["export", str(run), "--to", "gguf"]) == 1
    assert "run.gguf exists; pass --force" in capsys.readouterr().err
    out.write_bytes(b"old")
    assert cli_main(["export", str(run), "--to", "gguf", "--dtype", "f16", "--out", str(out), "--force"]) == 0
    assert open_gguf(out).tensors["lm_head.weight"].tensor_type.name == "F16"

    assert cli_main(["export", str(run), "--to", "llama2c", "--version", "1"]) == 0
    cfg, tensors = read_llama2c(tmp_path / "run-llama2c" / "model.bin")
    order = llama2c_vocabulary(trained.tokenizer, CFG.vocab_size).order
    np.testing.assert_array_equal(tensors["lm_head.weight"], trained.params["lm_head.weight"][order])
    assert (tmp_path / "run-llama2c" / "tokenizer.bin").is_file()
    capsys.readouterr()

    for args, message in [(["--to", "llama2c", "--dtype", "f16"], "float32 weights only"),
                          (["--to", "gguf", "--version", "1"], "GGUF has none"),
                          (["--to", "llama2c"], "model.bin exists; pass --force")]:
        assert cli_main(["export", str(run), *args]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert cli_main(["export", str(tmp_path / "nowhere"), "--to", "gguf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("npllama: error:") and "nowhere" in err and err.count("\n") == 1
    (run / "tokenizer.json").unlink()
    assert cli_main(["export", str(run), "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 1
    assert "no tokenizer" in capsys.readouterr().err


# ---- llama.cpp ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, rtol", [("f32", 1e-6), ("f16", 1e-3)])
def test_llama_cpp_runs_the_gguf_to_the_same_logits_and_greedy_tokens(trained, tmp_path, dtype, rtol):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(pip install llama-cpp-python compiles llama.cpp)")
    path = write_gguf(tmp_path / "m.gguf", CFG, trained.params, trained.tokenizer, dtype=dtype)
    # float32 KV cache (llama.cpp's default is float16); llama.cpp multiplies float16 weights by
    # activations rounded to float16, hence the looser tolerance there.  Measured: 1.6e-7 and 7.5e-5.
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=CFG.max_seq_len, n_threads=1, n_batch=CFG.max_seq_len,
                          logits_all=True, type_k=f32, type_v=f32, verbose=False)
    tok = trained.tokenizer
    assert llm.tokenize(MIXED.encode(), add_bos=False, special=True) == tok.encode(MIXED).tolist()
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == tok.encode(TEXT).tolist()
    assert llm.metadata["tokenizer.chat_template"] == TEMPLATE
    ours = Llama(CFG)   # the model as the file holds it
    for name, p in trained.params.items():
        ours.params[name][...] = p.astype(np.float16) if dtype == "f16" and p.ndim == 2 else p
    ours.eval()

    prompt = tok.encode("The lazy dog sleeps in").tolist()
    llm.eval(prompt)
    theirs_logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    ours_logits = ours.forward(np.array([prompt]))[0, -1].astype(np.float64)
    rel = np.abs(theirs_logits - ours_logits).max() / np.abs(ours_logits).max()
    print(f"llama.cpp vs npllama, {dtype}: last-position logits max |diff| / max |logit| = {rel:.2e}")
    assert rel < rtol
    n_new = 40
    theirs = []
    for _ in range(n_new):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert ours.generate(np.array(prompt), n_new, temperature=0.0, stop_ids=[]).tolist() == theirs
    assert len(set(theirs)) > 5   # not one token repeated: the comparison means something


@pytest.mark.slow
def test_llama_cpp_runs_smollm2_exported_by_npllama(tmp_path):
    """The real model, dequantized by npllama, written back as a float32 GGUF: llama.cpp answers
    the chat question with npllama's tokens (measured: logits 2.3e-6 relative)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(pip install llama-cpp-python compiles llama.cpp)")
    from real_model import smollm2_gguf
    ckpt = open_gguf(smollm2_gguf())
    model = Llama(ckpt.config)
    load_weights(ckpt, model.params)
    model.eval()
    tok = Tokenizer.from_gguf(ckpt)
    path = write_gguf(tmp_path / "smollm2-f32.gguf", ckpt.config, model.params, tok)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True).tolist()
    assert llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs_logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    ours_logits = model.forward(np.array([ids]))[0, -1].astype(np.float64)
    assert np.abs(theirs_logits - ours_logits).max() / np.abs(ours_logits).max() < 1e-5
    theirs = []
    for _ in range(8):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert model.generate(np.array(ids), 8, temperature=0.0, stop_ids=[]).tolist() == theirs
    assert tok.decode(theirs) == "The capital of France is Paris.<|im_end|>"


# ---- llama2.c's run.c ---------------------------------------------------------------------------
def run_c_encode(pieces, scores, text: str) -> list[int]:
    """run.c's ``encode(tokenizer, text, bos=1, eos=0)``: BOS, the dummy-prefix " ", each UTF-8
    character's token (or its bytes + 3), then merges of the best-scoring adjacent pair."""
    c_str = [p.split(b"\0")[0] for p in pieces]            # C strings end at the first NUL
    lookup = {}
    for i, p in enumerate(c_str):
        lookup.setdefault(p, i)
    ids = [BOS_ID] + ([lookup[b" "]] if text else [])
    for ch in text:
        b = ch.encode("utf-8")
        ids += [lookup[b]] if b in lookup else [x + FIRST_BYTE_ID for x in b]
    scores = np.asarray(scores, dtype=np.float32)
    while True:
        best, best_id, best_at = np.float32(-1e10), -1, -1
        for k in range(len(ids) - 1):
            j = lookup.get(c_str[ids[k]] + c_str[ids[k + 1]], -1)
            if j != -1 and scores[j] > best:
                best, best_id, best_at = scores[j], j, k
        if best_at == -1:
            return ids
        ids[best_at:best_at + 2] = [best_id]


def run_c_text(pieces, ids) -> bytes:
    """What run.c prints for the tokens after the first (``decode`` + ``safe_printf``)."""
    out = b""
    for prev, token in zip(ids, ids[1:]):
        piece = pieces[token].split(b"\0")[0]
        if prev == BOS_ID and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 1 and not (0x20 <= piece[0] <= 0x7E or piece[0] in b"\t\n\v\f\r"):
            continue
        out += piece
    return out


RUN_C = os.environ.get("NPLLAMA_LLAMA2C_RUN")


@pytest.mark.skipif(not RUN_C, reason="set NPLLAMA_LLAMA2C_RUN to a llama2.c run binary (gcc -O3 -o run run.c -lm "
                    "from https://github.com/karpathy/llama2.c) to check exports against run.c")
def test_run_c_generates_npllamas_greedy_tokens(trained, tmp_path):
    tok = trained.tokenizer
    vocab = llama2c_vocabulary(tok, CFG.vocab_size)
    write_llama2c(tmp_path / "model.bin", CFG, trained.params, version=0, token_order=vocab.order)
    write_tokenizer_bin(tmp_path / "tokenizer.bin", vocab.pieces, vocab.scores)
    n_new = 60
    for prompt in ["The quick brown", "A lazy dog runs", "zebra Ünïcode 42 fox"]:
        ids = run_c_encode(vocab.pieces, vocab.scores, prompt)     # llama2.c's ids
        ours = trained.generate(np.array([vocab.order[i] for i in ids]), n_new, temperature=0.0, stop_ids=[])
        new = [vocab.order.index(int(i)) for i in ours]
        if BOS_ID in new:                                          # run.c stops when it samples BOS
            new = new[:new.index(BOS_ID)]
        done = subprocess.run([RUN_C, str(tmp_path / "model.bin"), "-z", str(tmp_path / "tokenizer.bin"), "-t", "0",
                               "-n", str(len(ids) - 1 + n_new), "-i", prompt], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == run_c_text(vocab.pieces, ids + new) + b"\n", prompt
        assert len(set(new)) > 5, prompt


def test_a_llama2c_export_generates_with_its_tokenizer_bin(trained, tmp_path):
    """`npllama generate RUN-llama2c/model.bin` reads the tokenizer.bin beside it: the same ids (in
    llama2.c's order) for a text, the same text back, and the same greedy continuation as the run."""
    run = tmp_path / "run"
    trained.save_pretrained(run)
    assert cli_main(["export", str(run), "--to", "llama2c"]) == 0
    exported = Llama.from_pretrained(tmp_path / "run-llama2c" / "model.bin")
    order = llama2c_vocabulary(trained.tokenizer, CFG.vocab_size).order
    text = "ROMEO: hello, fair world!\nJULIET: and you."
    ids = trained.tokenizer.encode(text)
    assert [order[i] for i in exported.tokenizer.encode(text)] == ids.tolist()
    assert exported.tokenizer.decode(exported.tokenizer.encode(text)) == text
    assert exported.tokenizer.eos_id is not None and order[exported.tokenizer.eos_id] == trained.tokenizer.eos_id
    new = exported.generate(exported.tokenizer.encode(text), 12)
    assert [order[i] for i in new] == trained.generate(ids, 12).tolist()

    (tmp_path / "run-llama2c" / "tokenizer.bin").write_bytes(b"\x05\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(CheckpointError, match="tokenizer.bin: not a llama2.c tokenizer.bin"):
        Llama.from_pretrained(tmp_path / "run-llama2c" / "model.bin")


def test_export_help_names_every_format_and_merge(capsys):
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    description = " ".join(capsys.readouterr().out.split("positional arguments")[0].split())
    assert all(word in description for word in ("GGUF", "llama2.c", "Hugging Face", "--merge")), description
