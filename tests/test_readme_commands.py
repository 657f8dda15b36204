"""The README's commands do what a newcomer expects of them."""
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
