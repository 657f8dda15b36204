"""The README's commands do what a newcomer expects of them."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_readme_is_short_and_learn_comes_first():
    """A newcomer's README: at most ~10 KB; Learn right after the quick start; every docs page linked."""
    assert len(README.encode()) <= 10_300, len(README.encode())
    sections = re.findall(r"^## (.+)$", README, flags=re.M)
    assert sections[:2] == ["Quick start", "Learn"], sections
    for page in sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs").glob("*.ipynb")):
        if page.name != "README.md":
            assert f"(docs/{page.name})" in README, f"the README does not link docs/{page.name}"
    # one date in the quick start and one in the speed section: the rest is in benchmarks/README.md
    assert len(set(re.findall(r"20\d\d-\d\d-\d\d", README))) == 1, re.findall(r"20\d\d-\d\d-\d\d", README)


def test_readme_layout_names_every_module():
    layout = README[README.index("## Layout"):]
    rows = " ".join(re.findall(r"^\| `([^|]*)\|", layout, flags=re.M))
    named = set(re.findall(r"`([\w./]+)`", rows)) | set(re.findall(r"([\w./]+)`", rows))
    package = ROOT / "src" / "npllama"
    missing = []
    for path in sorted(package.iterdir()):
        if path.name.startswith("__") or path.name == "data" or path.suffix not in (".py", ""):
            continue
        shown = f"{path.name}/" if path.is_dir() else path.name
        if not any(n == shown or n.endswith("/" + path.name) or n == path.name for n in named):
            missing.append(shown)
    assert missing == [], f"the README's Layout table does not name {missing}"


def test_readme_export_names_are_the_ones_written():
    from npllama.export import default_output
    run = Path("runs/x")
    assert "$RUN.gguf" in README and "$RUN-f16.gguf" in README and "$RUN-llama2c/{model,tokenizer}.bin" in README
    assert default_output(run, "gguf", "f32") == Path("runs/x.gguf")
    assert default_output(run, "gguf", "f16") == Path("runs/x-f16.gguf")
    assert default_output(run, "llama2c", "f32") == Path("runs/x-llama2c")


PARENT_SNIPPET = """
import numpy as np, npllama
cfg = npllama.LlamaConfig(vocab_size=50, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=32)
print(type(npllama.Llama(cfg)).__name__)
"""


def test_import_npllama_from_the_clones_parent_directory(tmp_path):
    """`git clone ... npllama && pip install -e npllama`, then Python from the folder holding the
    clone: `import npllama` must find the installed package, not the clone's directory."""
    import importlib.util
    import os
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import npllama.config"], cwd=tmp_path, env=env,
                           capture_output=True, timeout=120)
    if probe.returncode != 0 or importlib.util.find_spec("npllama") is None:
        pytest.skip("npllama is not installed (pip install -e .): nothing to shadow")
    clone = tmp_path / "npllama"
    clone.symlink_to(ROOT, target_is_directory=True)     # the clone, named as git names it
    proc = subprocess.run([sys.executable, "-c", PARENT_SNIPPET], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "Llama", proc.stderr
