"""docs/check-your-implementation.md's code runs as a reader would paste it: its ```python blocks in
one namespace, its ```sh `npllama` lines, its ```toml map written to the file its first line names,
in order, in an empty directory: once without the blocks whose first line is "# needs torch", once
with them (skipped without torch and transformers); the claims the page makes about their output
are checked after."""
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from npllama.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "check-your-implementation.md"
HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def blocks():
    return re.findall(r"^```(python|sh|toml)\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("with_torch", [False, True], ids=["numpy", "pytorch"])
def test_the_page_runs(tmp_path, monkeypatch, with_torch):
    if with_torch and not HAVE_TORCH:
        pytest.skip("the PyTorch parts need torch and transformers")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs"}
    ran = []
    for kind, code in blocks():
        if code.startswith("# needs torch") and not with_torch:
            continue
        if kind == "python":
            exec(compile(code, str(PAGE), "exec"), namespace)
        elif kind == "toml":
            name = code.splitlines()[0].lstrip("# ").strip()
            (tmp_path / name).write_text(code)
        else:
            for line in code.splitlines():
                if line.startswith("npllama "):
                    command, _, comment = line.partition("#")
                    expected = int(re.search(r"exit code (\d)", comment).group(1)) if "exit code" in comment else 0
                    assert main(shlex.split(command)[1:]) == expected, line
        ran.append(kind)
    assert ran.count("python") >= 4 and "sh" in ran and "toml" in ran
    assert (tmp_path / "golden.model" / "config.json").exists()
    assert main(["compare", "golden.safetensors", "fused.npz", "--map", "map.toml"]) == 0
    # without the map the fused names are unknown and q/k/v's gradients missing: listed, not fatal
    assert main(["compare", "golden.safetensors", "fused.npz"]) == 0
    if with_torch:
        import npllama
        # the page's example output: plain float64 transformers parts at the first RMSNorm
        assert npllama.compare("golden.safetensors", "mine.safetensors").first_divergence == \
            "model.layers.0.input_layernorm"
