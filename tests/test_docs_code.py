"""What the docs show as code is the code: every line of a ```py excerpt, and every code span in a
table's "code" or "kernel" column, is found literally (comments and spacing aside; "..." stands for
arguments left out) in npllama/ or examples/; and every "check it yourself" block says what it
verified (it prints), so that a reader who runs one sees more than silence."""
import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + sorted((DOCS / "kernels").glob("*.md"))
# the learning path's pages (check-your-implementation.md, for engineers, runs as a tutorial of its own)
LEARNING = [p for p in PAGES if p.name != "check-your-implementation.md"]


def normalise(line):
    """A line without its comment and with single spaces ('' for a comment or blank line)."""
    line = line.strip()
    if line.startswith("#"):
        return ""
    return re.sub(r"\s+", " ", re.sub(r"\s+#.*$", "", line)).strip()


def code_text():
    lines = set()
    for path in list((ROOT / "src" / "npllama").rglob("*.py")) + list((ROOT / "examples").glob("*.py")):
        lines.update(normalise(line) for line in path.read_text().splitlines())
    return "\n".join(sorted(lines - {""}))


def excerpts(page):
    """(line number, what the page shows as code) of its ```py blocks and of its tables' code columns."""
    text = page.read_text()
    for m in re.finditer(r"^```py\n(.*?)^```", text, flags=re.S | re.M):
        first = text[:m.start()].count("\n") + 2
        for i, line in enumerate(m.group(1).splitlines()):
            if normalise(line) and not normalise(line).startswith("..."):
                yield first + i, normalise(line)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        header = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        column = next((header.index(name) for name in ("code", "kernel") if name in header), None)
        if column is None:
            continue
        j = i + 2
        while j < len(lines) and lines[j].startswith("|"):
            cells = [c.strip() for c in lines[j].strip().strip("|").split(" | ")]
            for span in re.findall(r"`([^`]+)`", cells[column] if column < len(cells) else ""):
                yield j + 1, normalise(span)
            j += 1


@pytest.fixture(scope="module")
def code():
    return code_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_excerpt_is_literally_in_the_code(page, code):
    missing = []
    for n, shown in excerpts(page):
        pattern = ".*".join(re.escape(part.strip()) for part in shown.split("..."))
        if not re.search(pattern, code):
            missing.append(f"{page.name}:{n}: {shown}")
    assert not missing, "shown as code but not in npllama/ or examples/:\n" + "\n".join(missing)


@pytest.mark.parametrize("page", [p for p in LEARNING if "```python" in p.read_text()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_check_block_says_what_it_verified(page):
    """Run the page's blocks in order in one namespace; each must print something (and the last line
    of each block is that print, or a loop or call that prints)."""
    namespace = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(page), "exec"), namespace)
        assert out.getvalue().strip(), f"{page.name}: check block {i + 1} prints nothing"
