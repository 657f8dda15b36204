"""The README's commands do what a newcomer expects of them."""
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_test_command():
    m = re.search(r'pip install -e "\.\[test\]" && (python -m pytest[^\n`]*)', README)
    assert m, "the README no longer gives the test command"
    return m.group(1).split()


def test_readme_test_command_prints_pytest_summary_line():
    """`-q` twice (the command's own plus an addopts one) hides pytest's 'N passed' line."""
    cmd = readme_test_command()
    assert cmd[:3] == ["python", "-m", "pytest"], cmd
    # the README's flags, with the project's own pytest configuration, on one quick test
    target = "tests/test_optim.py::test_default_decay_set_is_the_matrices"
    proc = subprocess.run([sys.executable, *cmd[1:], target], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^1 passed", proc.stdout.strip().splitlines()[-1]), proc.stdout


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block of the README, in order in one namespace, as a reader pastes them (in
    an empty directory: they may write files)."""
    blocks = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(ROOT / "README.md"), "exec"), namespace)
    # the API example: logits of every position, and an untrained model's loss near ln(vocab)
    cfg, tokens = namespace["cfg"], namespace["tokens"]
    assert namespace["logits"].shape == (*tokens.shape, cfg.vocab_size)
    assert abs(float(namespace["loss"]) - math.log(cfg.vocab_size)) < 0.5
    assert set(namespace["grads"]) == set(namespace["model"].params)


def test_npllama_version():
    import npllama
    proc = subprocess.run([sys.executable, "-m", "npllama.cli", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"npllama {npllama.__version__}\n", proc


def test_what_the_readme_and_examples_write_is_not_left_untracked():
    """The README's downloads (pip download -d DIR, unzip -d DIR), the runs and the examples'
    default outputs are ignored by git, so a clone stays clean after following the README."""
    import shutil
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        import pytest
        pytest.skip("not a git checkout")
    written = set(re.findall(r"(?:pip download|unzip)\b[^\n]*?-d (\S+?)/?(?:\s|$)", README)) | {"runs/x", "runs/finetuned"}
    assert {"wheels", "models"} <= written, written
    for path in sorted(written):
        done = subprocess.run(["git", "check-ignore", "-q", f"{path}/some-file"], cwd=ROOT)
        assert done.returncode == 0, f"{path}/ is not ignored by .gitignore"
