"""Hostile inputs that once crashed, hung or passed silently (issue 28): each ends in one clear
error naming what is wrong."""
import io

import numpy as np
import pytest

from npllama import CheckpointError, Llama, LlamaConfig
from npllama import cli

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=32)


def saved_model(path, chat_template=None, **weights):
    """A small model with a trained tokenizer (and ``chat_template``) saved as a Hugging Face
    directory at ``path``; ``weights``: parameter name -> a value to fill it with."""
    import warnings
    from npllama import Tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (a short text: fewer merges than asked for)
        tokenizer = Tokenizer.train("the cat sat on the mat; the dog sat on the log. " * 20, vocab_size=300)
    tokenizer.chat_template = chat_template
    model = Llama(LlamaConfig(**{**CFG.to_dict(), "vocab_size": 300}), seed=0)
    for name, value in weights.items():
        model.params[name][...] = value
    model.tokenizer = tokenizer
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("temperature, top_p", [(0.0, None), (0.8, None), (0.8, 0.9)])
def test_nan_logits_stop_generation_with_one_clear_error(temperature, top_p):
    """(was: an IndexError in sampling.top_p_ids, or, greedy, nothing printed and exit 0)"""
    model = Llama(CFG, seed=0)
    model.params["lm_head.weight"][5, 0] = np.nan
    with pytest.raises(CheckpointError, match=r"^the model's logits are NaN or infinite after 3 tokens: its weights"):
        model.generate(np.array([1, 2, 3]), 4, temperature=temperature, top_p=top_p, seed=0)


def test_overflowing_logits_from_a_saved_model_end_the_cli_in_one_line(tmp_path, capsys):
    saved_model(tmp_path / "m", "{{ messages[-1]['content'] }}", **{"lm_head.weight": 3e38})   # finite weights, infinite logits
    assert cli.main(["generate", str(tmp_path / "m"), "--prompt", "the cat", "--max-new-tokens", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"npllama: error: {tmp_path / 'm'}: the model's logits are NaN "
                                                    "or infinite after ")
    assert cli.main(["generate", str(tmp_path / "m"), "--chat", "--prompt", "the cat", "--max-new-tokens", "3"]) == 1
    err = capsys.readouterr().err   # (after the chat's line on its sampling)
    assert err.count("npllama: error:") == 1
    assert err.splitlines()[-1].startswith(f"npllama: error: {tmp_path / 'm'}: the model's logits are NaN")


# ---- chat templates: bounded in output, time and what they may raise ---------------------------------
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, match", [
    ("{{ 'ab ' * 7*10**7 }}", "'\\*' would make a sequence of 210,000,000 items"),      # was: SIGABRT in tokenizers
    ("{{ [1] * 10**9 }}", "'\\*' would make a sequence"),
    ("{{ 10 ** (10 ** 8) }}", "'\\*\\*' would make an integer"),
    ("{% for i in range(90000) %}{{ 'abcdefghij' * 50 }}{% endfor %}", "its output passed"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than"),  # was: a hang
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ range(10**9) | list }}", "OverflowError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
])
def test_a_hostile_chat_template_ends_in_one_error_within_seconds(template, match):
    import time
    from npllama.chat_template import render_chat
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=match) as e:
        render_chat(template, USER)
    assert time.monotonic() - t0 < 3 and "\n" not in str(e.value)
    assert str(e.value).startswith("the chat template ")


def test_chat_with_one_prompt_the_template_refuses_exits_with_an_error(tmp_path, capsys, monkeypatch):
    """`--chat --prompt` (one message, no conversation to go on with): was exit 0, the error in brackets on stdout."""
    saved_model(tmp_path / "m", "{{ raise_exception('no cats here') if 'cat' in messages[-1]['content'] }}"
                                "{{ messages[-1]['content'] }}")
    assert cli.main(["generate", str(tmp_path / "m"), "--chat", "--prompt", "the cat", "--max-new-tokens", "2"]) == 1
    out, err = capsys.readouterr()   # (err: after the chat's line on its sampling)
    assert out == "" and err.count("npllama: error:") == 1
    assert err.endswith(f"\nnpllama: error: {tmp_path / 'm' / 'tokenizer_config.json'}: the chat template refused "
                        "the conversation: no cats here\n")   # (was: the file not named)
    assert cli.main(["generate", str(tmp_path / "m"), "--chat", "--prompt", "the dog " * 20, "--max-new-tokens", "2"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("npllama: error: the message is too long:")
    # a template at fault (here: a hang) is named by its file
    saved_model(tmp_path / "hangs", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert cli.main(["generate", str(tmp_path / "hangs"), "--chat", "--prompt", "hi", "--max-new-tokens", "2"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"npllama: error: {tmp_path / 'hangs' / 'tokenizer_config.json'}: "
                                                        "the chat template took more than 1.5 s to render; stopped")
    # in a conversation on stdin the refusal is answered, naming the file too, and the chat goes on
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\nthe dog\n"))
    assert cli.main(["generate", str(tmp_path / "m"), "--chat", "--max-new-tokens", "2", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"[{tmp_path / 'm' / 'tokenizer_config.json'}: the chat template refused the conversation: "
                          "no cats here]\n") and out.count("\n") == 2
    # a template in chat_template.jinja is named so; one of a GGUF by the .gguf
    (tmp_path / "m" / "chat_template.jinja").write_text("{{ raise_exception('no jinja cats') }}")
    assert cli.main(["generate", str(tmp_path / "m"), "--chat", "--prompt", "the cat", "--max-new-tokens", "2"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"npllama: error: {tmp_path / 'm' / 'chat_template.jinja'}: "
                                                        "the chat template refused the conversation: no jinja cats")


# ---- corpora ---------------------------------------------------------------------------------------
def test_a_gzip_bomb_as_data_is_refused_in_bounded_memory_naming_the_file(tmp_path, capsys):
    """(was: 3 MB -> 3 GB decompressed, the file not named)"""
    import gzip
    import resource
    from npllama.data import GUNZIP_FLOOR, load_text
    bomb = tmp_path / "bomb.txt.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        line = b"all work and no play makes jack a dull boy\n" * 1000
        for _ in range(3 * GUNZIP_FLOOR // len(line)):   # 192 MB of text in ~0.5 MB
            f.write(line)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), hard))
    try:
        with pytest.raises(Exception, match=rf"^{bomb}: decompresses to more than 67,108,864 bytes, 20 times its size"):
            load_text(bomb)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert cli.main(["train", "--data", str(bomb), "--out-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"npllama: error: {bomb}: decompresses to more than")
    assert not (tmp_path / "run").exists()
    # an ordinary gzip corpus still reads
    small = tmp_path / "small.txt.gz"
    small.write_bytes(gzip.compress(b"to be or not to be\n" * 1000))
    assert load_text(small) == "to be or not to be\n" * 1000


def test_a_corpus_file_with_megabytes_nowhere_to_cut_is_refused_naming_it(tmp_path, capsys):
    """(was: a DataError from the tokenizer, naming no file, after the run directory was claimed)"""
    from npllama import DataError
    from npllama.data import load_corpus
    from npllama.tokenizer import MAX_UNCUT_CHARS
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("the cat sat on the mat\n" * 1000)
    (folder / "sub" / "b.txt").write_text("line one\nline two\n" + "=" * (MAX_UNCUT_CHARS + 1) + "\nend\n")
    message = (f"{folder / 'sub' / 'b.txt'}: {MAX_UNCUT_CHARS + 1:,} characters from line 3 (character 18) on without "
               "a place to cut them into words")
    with pytest.raises(DataError) as e:
        load_corpus(folder)
    assert str(e.value).startswith(message)
    assert cli.main(["train", "--data", str(folder), "--out-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"npllama: error: {message}")
    assert not (tmp_path / "run").exists()
    # just under the limit: read
    (folder / "sub" / "b.txt").write_text("=" * MAX_UNCUT_CHARS + " x")
    assert len(load_corpus(folder).documents) == 2


# ---- tracebacks that became one line ----------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model") / "m", "{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.mark.parametrize("raw, warns", [
    ('{"eos_token": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"eos_token": "x", "add_bos_token": ' + "9" * 5000 + "}", "digits"),
    ('{"chat_template": [{"name": ["default"], "template": "x"}, {"name": "default", "template": "ok"}]}', None),
])
def test_a_hostile_tokenizer_config_is_read_or_warned_about_never_a_traceback(small_model_dir, tmp_path, raw, warns):
    import shutil
    import warnings
    from npllama import Tokenizer
    d = tmp_path / "m"
    shutil.copytree(small_model_dir, d)
    (d / "tokenizer_config.json").write_text(raw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer = Tokenizer.from_file(d / "tokenizer.json")
    messages = [str(w.message) for w in caught]
    if warns:
        assert len(messages) == 1 and str(d / "tokenizer_config.json") in messages[0] and warns in messages[0]
    else:
        assert messages == [] and tokenizer.chat_template == "ok"


def test_a_tokenizer_json_over_the_json_limit_is_refused_unread(tmp_path):
    from npllama import Tokenizer
    from npllama.files import MAX_JSON_BYTES
    big = tmp_path / "tokenizer.json"
    with open(big, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)   # (sparse: nothing of it is read)
    with pytest.raises(CheckpointError, match=rf"^{big}: not a valid tokenizer.json \(268,435,457 bytes, more than"):
        Tokenizer.from_file(big)


HOSTILE_SPLIT = {"type": "Split", "pattern": {"Regex": "(a+)+b"}, "behavior": "Isolated", "invert": False}


def test_a_pre_tokenizer_regex_that_gives_up_is_an_input_error(capfd):
    """(was: tokenizers' PanicException, a BaseException, as a traceback; then Rust's report of the
    panic on stderr before the error line)"""
    import os
    import tokenizers
    from tokenizers import Regex, models, pre_tokenizers
    from npllama import InputError, Tokenizer
    from npllama.tokenizer import _holding_stderr
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("(a+)+b"), "isolated")
    capfd.readouterr()
    with pytest.raises(InputError, match=r"^the tokenizer cannot encode this text \(its regex gave up\): Onig"):
        Tokenizer(hf).encode("a" * 30)
    with pytest.raises(InputError, match=r"^the tokenizer cannot encode this text"):
        Tokenizer(hf).encode_long("a" * 30 + " b" * 40_000, chunk_chars=1000)
    assert capfd.readouterr().err == ""
    # what else is written to stderr meanwhile is kept, before a panic and without one
    def write_then_encode(text):
        os.write(2, b"kept\n")
        return hf.pre_tokenizer.pre_tokenize_str(text)

    assert _holding_stderr(write_then_encode, "aab") == [("aab", (0, 3))]
    with pytest.raises(BaseException, match="retry-limit"):
        _holding_stderr(write_then_encode, "a" * 30)
    assert capfd.readouterr().err == "kept\nkept\n"


@pytest.mark.parametrize("backtrace", ["0", "1"])
def test_a_tokenizer_file_whose_regex_gives_up_ends_in_one_line_naming_it(small_model_dir, tmp_path, backtrace):
    """`npllama generate` on a tokenizer.json whose pre-tokenizer regex is (a+)+b, a prompt of 30 a's
    (was: Rust's panic report, and its backtrace with RUST_BACKTRACE=1, before an error not naming the file)"""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    d = tmp_path / "m"
    shutil.copytree(small_model_dir, d)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = HOSTILE_SPLIT
    (d / "tokenizer.json").write_text(json.dumps(spec))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "npllama.cli", "generate", str(d), "--prompt", "a" * 30,
                           "--max-new-tokens", "2"], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root / "src"), "RUST_BACKTRACE": backtrace})
    assert done.returncode == 1 and done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"npllama: error: {d / 'tokenizer.json'}: the tokenizer cannot encode this text (its regex gave up): "), lines


def test_a_prompt_that_is_not_utf8_ends_in_one_error_line(small_model_dir):
    """`--prompt $'\\xff'`, and the same on stdin to --chat (was: TypeError: TextInputSequence must be str)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "LC_ALL": "C.UTF-8", "RUST_BACKTRACE": "0"}

    def generate(*args, stdin=b""):
        return subprocess.run([sys.executable.encode(), b"-m", b"npllama.cli", b"generate", str(small_model_dir).encode(),
                               b"--max-new-tokens", b"2", b"--seed", b"0", *args], input=stdin, capture_output=True,
                              env=env, timeout=120)

    for args, stdin in (([b"--prompt", b"the \xff cat"], b""), ([b"--prompt", b"-"], b"the \xff cat\n")):
        done = generate(*args, stdin=stdin)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.decode("utf-8", "replace").splitlines()
        assert len(lines) == 1 and lines[0].startswith("npllama: error: ") and "UTF-8" in lines[0], lines
    # a chat on stdin answers the bad line with why, and goes on to the next
    done = generate(b"--chat", stdin=b"the \xff cat\nthe cat\n")
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith(b"[the text is not valid UTF-8 (undecodable byte 0xff at character 4)]\n")


# ---- what a SIGKILL during a write leaves ------------------------------------------------------------
KILLED_WRITER = """
import sys, time
from npllama.files import atomic_write_bytes
def chunks():
    yield b"x" * (1 << 20)
    print("writing", flush=True)
    time.sleep(120)
    yield b"never"
atomic_write_bytes(sys.argv[1], chunks())
"""


def test_temp_files_of_a_killed_write_are_removed_by_the_next_write_to_the_same_file(tmp_path):
    """(was: `.NAME.<random>.tmp` of hundreds of MB left by a SIGKILL during export, removed by nothing)"""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path
    from npllama.files import atomic_write_bytes
    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "model.bin"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert writer.stdout.readline() == b"writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.bin.") and left[0].endswith(".tmp")
    # not npllama's naming, a live writer's (this process's), another file's: all kept
    host = socket.gethostname()
    kept = [".model.bin.abc123.tmp", f".model.bin.{host}-{os.getpid()}.x.tmp", f".other.bin.{host}-1.x.tmp"]
    for name in kept:
        (tmp_path / name).write_bytes(b"keep")
    atomic_write_bytes(target, [b"new"])
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["model.bin"])
