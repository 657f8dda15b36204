"""The learning material cannot rot: the examples run (on tiny sizes) and do what they claim, and
the docs' links, function names, gradcheck commands and "check it yourself" blocks match the code.

Examples run as subprocesses, the way a reader runs them, with one BLAS/Numba thread each: at
these sizes threads only add overhead (and contention when the suite runs beside other work).
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama.gradcheck import LAYER_CHECKS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
DOC_PAGES = sorted(DOCS.glob("*.md")) + sorted((DOCS / "kernels").glob("*.md"))   # pages, then appendices
SINGLE_THREAD = {"NPLLAMA_THREADS": "1"}


def run_example(name, *args, cwd=None):
    env = {**os.environ, **SINGLE_THREAD}   # (conftest's PYTHONPATH: this checkout's npllama)
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    return proc


def held_out(stdout):
    """(before, after) from the examples' last line 'held-out loss A -> B nats/token ...'."""
    m = re.search(r"held-out loss ([\d.]+) -> ([\d.]+) nats/token", stdout)
    assert m, f"no held-out loss line in:\n{stdout}"
    return float(m.group(1)), float(m.group(2))


# ---- examples ----------------------------------------------------------------------------------
def test_train_tiny_learns():
    proc = run_example("train_tiny.py", "--steps", 30, "--dim", 32, "--layers", 2, "--chars", 30000,
                       "--vocab", 300, "--seq-len", 32, "--batch", 8)
    assert proc.returncode == 0, proc.stderr
    before, after = held_out(proc.stdout)
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)  lr", proc.stdout)]
    # an untrained model is near uniform over the 300-token vocabulary: ln 300 = 5.70 nats
    assert abs(before - np.log(300)) < 0.2
    assert after < before - 0.5, (before, after)
    assert losses[-1] < losses[0] - 0.5
    assert re.search(r"^sample: ROMEO:.", proc.stdout, flags=re.M)     # the trained model writes text


def test_train_reference_learns_and_saves_a_loadable_model(tmp_path):
    proc = run_example("train_reference.py", "--steps", 30, "--dim", 32, "--layers", 2, "--chars", 30000,
                       "--vocab", 300, "--seq-len", 32, "--batch", 8, "--sample-tokens", 5, "--out", tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    before, after = held_out(proc.stdout)
    assert abs(before - np.log(300)) < 0.2          # near uniform before training
    assert after < before - 0.5, (before, after)
    assert re.search(r"^sample: ROMEO:.", proc.stdout, flags=re.M)
    # the saved model is the reference's: the fast model loaded from it computes the same held-out loss
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_reference as ex
    finally:
        sys.path.remove(str(EXAMPLES))
    from npllama.data import TokenDataset, load_text
    model = npllama.Llama.from_pretrained(tmp_path / "m", dtype=np.float64)
    data = TokenDataset.from_text(load_text(None)[:30000], model.tokenizer)
    params = {name: np.array(p) for name, p in model.params.items()}
    assert ex.held_out_loss(params, model.config, data, 32) == pytest.approx(after, abs=2e-3)


def test_train_reference_trains_with_a_students_backward(tmp_path):
    answers = tmp_path / "mine.py"
    answers.write_text("from npllama.layers.swiglu import swiglu_backward_reference as swiglu_backward\n")
    proc = run_example("train_reference.py", "--steps", 3, "--dim", 16, "--layers", 1, "--chars", 5000,
                       "--vocab", 270, "--seq-len", 16, "--batch", 2, "--sample-tokens", 2,
                       "--exercise", "swiglu", "--answers", answers)
    assert proc.returncode == 0, proc.stderr
    assert f"with your swiglu backward from {answers}" in proc.stdout


def test_check_my_layer_passes_and_catches_the_bug():
    good = run_example("check_my_layer.py")
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count(" ok") == 4 and "all gradients match" in good.stdout
    bad = run_example("check_my_layer.py", "--bug")
    assert bad.returncode == 1
    assert "FAILED: layernorm.x" in bad.stdout


def test_check_my_layer_functions():
    # in-process too: the wrong backward is off by far more than rounding, the right one is not
    sys.path.insert(0, str(EXAMPLES))
    try:
        import check_my_layer as ex
    finally:
        sys.path.remove(str(EXAMPLES))
    errors = ex.check_layernorm(np.random.default_rng(3))
    assert max(errors.values()) < 1e-7
    assert ex.check_layernorm(np.random.default_rng(3), bug=True)["x"] > 1e-2
    assert ex.check_gelu(np.random.default_rng(3))["x"] < 1e-7


def test_finetune_hf_saves_a_loadable_better_model(tmp_path):
    out = tmp_path / "finetuned"
    proc = run_example("finetune_hf.py", "--steps", 30, "--chars", 20000, "--out", out)
    assert proc.returncode == 0, proc.stderr
    before, after = held_out(proc.stdout)
    assert after < before - 0.3, (before, after)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    original = npllama.Llama.from_pretrained(ROOT / "tests" / "fixtures" / "hf_gqa")
    model = npllama.Llama.from_pretrained(out)
    assert model.config.vocab_size == original.config.vocab_size == 64
    assert model.tokenizer is not None and model.tokenizer.vocab_size <= 64
    text = "To be, or not to be: that is the question."
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text
    # the weights moved, and the saved model has the held-out loss the example reported
    assert not np.allclose(model.flat_params, original.flat_params)
    sys.path.insert(0, str(EXAMPLES))
    try:
        import finetune_hf as ex
    finally:
        sys.path.remove(str(EXAMPLES))
    from npllama.data import TokenDataset, load_text
    data = TokenDataset.from_text(load_text(None)[:20000], model.tokenizer)
    val = list(data.iter_val_batches(batch_size=8, seq_len=32))[:4]
    assert ex.mean_loss(model, val) == pytest.approx(after, abs=1e-3)


# ---- docs --------------------------------------------------------------------------------------
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def github_anchor(heading):
    """GitHub's slug of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\$", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def defined_names(path):
    """Top-level functions, classes and constants of a module, and its classes' methods (also as
    Class.method)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)}
            names |= {m.name for m in node.body if isinstance(m, ast.FunctionDef)}
    return names


def learning_markdown():
    """The docs pages and the README (whose Learn section links them)."""
    return DOC_PAGES + [ROOT / "README.md"]


def test_docs_exist_in_data_flow_order():
    names = [p.name for p in DOC_PAGES]
    for page in ("00-conventions.md", "01-embedding.md", "02-rmsnorm.md", "03-linear.md", "04-rope.md",
                 "05-attention.md", "06-swiglu.md", "07-decoder-block.md", "08-output.md",
                 "09-cross-entropy.md", "10-adamw.md", "11-kv-cache.md", "walkthrough.md", "README.md"):
        assert page in names
    index = (DOCS / "README.md").read_text()
    for page in DOC_PAGES:
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"


@pytest.mark.parametrize("page", learning_markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_resolve_and_name_real_functions(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    checked = 0
    for label, target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"
        name = re.fullmatch(r"`([A-Za-z_][\w.]*)`", label)
        if name and dest.suffix == ".py" and name.group(1) != dest.name:
            assert name.group(1) in defined_names(dest), \
                f"{page.name}: {name.group(1)} is not defined in {dest.relative_to(ROOT)}"
            checked += 1
    if page.name[:2].isdigit() and page.name != "00-conventions.md":
        assert checked >= 2, f"{page.name} links fewer than two implementing functions"


@pytest.mark.parametrize("page", learning_markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_gradcheck_commands_name_real_layers(page):
    for layer in re.findall(r"npllama gradcheck --layer ([a-z_]+)", page.read_text()):
        assert layer in LAYER_CHECKS, f"{page.name}: no gradcheck layer {layer!r}"


def test_every_gradcheck_layer_is_documented():
    text = "".join(p.read_text() for p in DOC_PAGES)
    for layer in LAYER_CHECKS:
        assert f"npllama gradcheck --layer {layer}`" in text, f"no page shows `npllama gradcheck --layer {layer}`"


def inline_math(text):
    """(line number, content) of every inline $...$ outside code blocks and code spans."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for n, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"`[^`]*`", "", line)
        dollars = [m.start() for m in re.finditer(r"(?<!\\)\$", line)]
        assert len(dollars) % 2 == 0, f"line {n}: odd number of $: {line}"
        for a, b in zip(dollars[::2], dollars[1::2]):
            yield n, line, line[a + 1:b]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_math_is_well_formed(page):
    """Lint of what GitHub's math rendering trips on.  Display math is in ```math blocks, which
    Markdown leaves alone.  Inline $...$ is not protected from Markdown: a backslash before
    punctuation (\\, \\; \\{ \\_ ...) is eaten as a Markdown escape, so those are not used inline;
    a space just inside the dollars or an odd number of them breaks the delimiters, and a `|` in
    a table row splits the cell."""
    for n, line, inner in inline_math(page.read_text()):
        where = f"{page.name}:{n}: ${inner}$"
        assert inner and not inner[0].isspace() and not inner[-1].isspace(), f"{where}: space inside"
        assert not re.search(r"\\[!-/:-@\[-`{-~]", inner), f"{where}: backslash before punctuation"
        if line.lstrip().startswith("|"):
            assert "|" not in inner, f"{where}: | inside math in a table row"


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_inline_math_survives_github_markdown(page):
    """Render with cmark-gfm (GitHub's Markdown, before its math step): every inline formula must
    come out verbatim, i.e. no underscore pair turned into emphasis, no escape eaten.  cmarkgfm is
    not a test dependency, so this runs where it is installed (pip install cmarkgfm)."""
    cmarkgfm = pytest.importorskip("cmarkgfm")
    import html
    source = page.read_text()
    out = html.unescape(cmarkgfm.github_flavored_markdown_to_html(source))
    for n, _, inner in inline_math(source):
        assert f"${inner}$" in out, f"{page.name}:{n}: GitHub's Markdown alters ${inner}$"
    for block in re.findall(r"^```math\n(.*?)^```", source, flags=re.S | re.M):
        assert block in out


# check-your-implementation.md's blocks need its shell commands between them: tests/test_docs_check.py runs it
@pytest.mark.parametrize("page", [p for p in DOC_PAGES if "```python" in p.read_text()
                                  and p.name != "check-your-implementation.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_check_it_yourself_blocks_run(page):
    """Each page's ```python blocks run in order in one namespace; their asserts hold the page's
    formulas to npllama's kernels."""
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)
    assert blocks
    namespace = {"__name__": f"docs_{page.stem}"}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)


def test_every_layer_page_has_a_check_block():
    for page in DOC_PAGES:
        if page.name[:2].isdigit() and page.name != "00-conventions.md":
            assert "```python" in page.read_text(), f"{page.name} has no check-it-yourself block"
