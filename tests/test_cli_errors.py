"""The command line on bad input: a one-line `npllama: error: ...` naming the problem, a non-zero exit
code, and never a Python traceback. Each case runs a real `npllama` process (several at once)."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ)
TINY = ["--dim", "16", "--n-layers", "1", "--n-heads", "2", "--vocab-size", "300", "--context", "16",
        "--batch-size", "2", "--steps", "2", "--eval-interval", "0", "--sample-tokens", "0", "--threads", "1",
        "--no-progress"]


def npllama(args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "npllama.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 20)          # NUL bytes: an image, an archive...
    (d / "latin1.txt").write_bytes("café crème, déjà vu\n".encode("latin-1") * 50)
    (d / "tiny.txt").write_text("to be or not\n")                    # fewer tokens than one window
    from npllama.data import load_text
    (d / "corpus.txt").write_text(load_text()[:20000])
    (d / "bad.toml").write_text("lr = [1, 2\n")
    (d / "unknown.toml").write_text("learning_rate = 0.1\n")
    (d / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (d / "bigint.json").write_text('{"steps": ' + "9" * 5000 + "}")
    return d


# (arguments, a piece of the expected error message)
CASES = {
    "unknown option": (["train", "--bogus-option"], "unrecognized arguments: --bogus-option (see 'npllama train --help')"),
    "unknown top-level option": (["--bogus-option"], "unrecognized arguments: --bogus-option (see 'npllama --help')"),
    "time budget not positive": (["train", "--time-budget", "0"], "--time-budget must be a number > 0, got 0.0"),
    "heads do not divide dim": (["train", "--n-heads", "5"], "--n-heads 5 must divide dim 128 (from --preset small)"),
    "unknown command": (["bogus-command"], "invalid choice"),
    "missing corpus": (["train", "--data", "missing.txt", *TINY], "missing.txt"),
    "empty corpus": (["train", "--data", "empty.txt", *TINY], "empty"),
    "binary corpus": (["train", "--data", "binary.txt", *TINY], "binary"),
    "not UTF-8": (["train", "--data", "latin1.txt", *TINY], "UTF-8"),
    "corpus < one window": (["train", "--data", "tiny.txt", *TINY, "--vocab-size", "257"],
                            "smaller than one context window"),
    "vocab beyond the text": (["train", "--data", "corpus.txt", *TINY, "--vocab-size", "100000"], "vocab"),
    "negative lr": (["train", "--data", "corpus.txt", *TINY, "--lr", "-1"], "lr"),
    "lr not a number": (["train", "--lr", "fast"], "invalid float value"),
    "threads not a number": (["train", "--threads", "many"], "--threads"),
    "threads zero": (["train", "--threads", "0"], "--threads must be between 1 and"),
    "threads beyond the cores": (["generate", "nowhere", "--threads=100000"], "--threads must be between 1 and"),
    "threads without a value": (["train", "--threads"], "--threads expects an integer"),
    "resume nothing": (["train", "--resume", "nowhere"], "nowhere"),
    "resume a non-run": (["train", "--resume", "."], "training_state.json"),
    "config missing": (["train", "--config", "missing.toml"], "missing.toml"),
    "config bad TOML": (["train", "--config", "bad.toml"], "bad.toml"),
    "config unknown key": (["train", "--config", "unknown.toml"], "learning_rate"),
    "config nested deep": (["train", "--config", "deep.json"], "deep.json"),
    "config huge integer": (["train", "--config", "bigint.json"], "bigint.json"),
    "generate from nothing": (["generate", "nowhere"], "nowhere"),
}


@pytest.fixture(scope="module")
def results(files):
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(npllama, args, files) for name, (args, _) in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_cli_error_is_one_clear_line(results, name):
    proc = results[name]
    expected = CASES[name][1]
    assert proc.returncode != 0, f"exit code 0 for {name}; stderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("npllama"), errors[0]
    assert expected in errors[0], f"{expected!r} not in {errors[0]!r}"
    assert not [line for line in proc.stderr.splitlines() if line.startswith((" ", "\t"))], \
        f"indented lines (a source excerpt?) in stderr: {proc.stderr}"
