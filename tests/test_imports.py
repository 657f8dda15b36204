"""The package's import structure: no cycles between npllama's modules, no import of npllama inside a
function unless a comment there says why, and `import npllama` / `npllama.cli` start neither NumPy
nor Numba (the command line sets their thread counts first)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "npllama"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, node) -> list[str]:
    """The npllama modules an Import/ImportFrom node loads (``from . import x`` counts x when it is a
    module, else the package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "npllama"]
    if node.level:
        package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    elif node.module and node.module.split(".")[0] == "npllama":
        base = node.module
    else:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def top_level_imports(name: str) -> set[str]:
    """Modules imported when ``name`` is imported: its imports outside functions and classes."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(imported_modules(name, node))
            elif isinstance(node, (ast.If, ast.Try)):      # e.g. a guarded optional import
                for block in (node.body, node.orelse, getattr(node, "finalbody", []),
                              *[h.body for h in getattr(node, "handlers", [])]):
                    visit(block)

    visit(tree.body)
    return {m for m in found if m in MODULES and m != name}


def test_every_module_imports():
    for name in MODULES:
        __import__(name)


def test_no_import_cycles():
    graph = {name: top_level_imports(name) for name in MODULES}
    state = {}   # name -> "visiting" | "done"

    def walk(name, path):
        state[name] = "visiting"
        for dep in sorted(graph[name]):
            if state.get(dep) == "visiting":
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    # the graph is not empty by accident: the model reads its files through formats.hf
    assert "npllama.formats.hf" in graph["npllama.model"] and "npllama.files" in graph["npllama.formats.hf"]


def test_function_level_imports_of_npllama_say_why():
    unexplained = set()
    for name, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        for func in ast.walk(ast.parse(source)):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and imported_modules(name, node):
                    here = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
                    if "#" not in here:
                        unexplained.add(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "imports inside functions without a comment saying why:\n" + "\n".join(sorted(unexplained))


def test_files_imports_nothing_of_npllama_but_errors():
    assert top_level_imports("npllama.files") == {"npllama.errors"}


def test_import_npllama_and_its_cli_start_neither_numpy_nor_numba():
    code = ("import sys, npllama, npllama.cli\n"
            "assert 'numpy' not in sys.modules and 'numba' not in sys.modules, sorted(sys.modules)\n"
            "npllama.Llama  # the lazy names still work\n"
            "assert 'numpy' in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
