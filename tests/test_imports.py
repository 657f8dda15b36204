"""The package's import structure: no cycles between npllama's modules, no import of npllama inside a
function unless a comment there says why, `import npllama` / `npllama.cli` start neither NumPy nor
Numba, and the engine's wall: layers/ (the maths) imports from engine/ (the machinery), never the
other way, and nothing low-level."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "npllama"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
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
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- private names stay in their module ---------------------------------------------------------------
# A name that starts with one underscore (a module's _function, an object's _attribute, a _module) is
# its module's business.  Outside it, code uses public names: the test lists every reach into another
# npllama module's private names.  Found statically, so by name: an attribute ``x._name`` counts when
# some npllama module defines ``_name`` and this one does not (self._name, cls._name and super()._name
# are the module's own, as is any name it defines itself); ``from m import _name`` and importing a
# _module from outside its package count always.  Third-party private names (numpy's memmap._mmap,
# Numba's internals) are not npllama's to tidy and are not listed.


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_names(tree) -> set[str]:
    """Every name a module defines: functions, classes, assigned names, attributes it assigns on
    self/cls, keyword arguments of its calls (argparse's set_defaults(_run=...))."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
              and node.value.id in ("self", "cls")):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def private_reaches() -> list[str]:
    trees = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
    own = {name: defined_names(tree) for name, tree in trees.items()}
    npllama_private = {n for names in own.values() for n in names if is_private(n)}
    found = []
    for name, tree in trees.items():
        where = lambda node: f"{name}:{node.lineno}"  # noqa: E731
        package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                base = node.value
                mine = (isinstance(base, ast.Name) and base.id in ("self", "cls")) or (
                    isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super")
                if not mine and node.attr in npllama_private and node.attr not in own[name]:
                    found.append(f"{where(node)}: {ast.unparse(node)}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
                attr = node.args[1]
                if (isinstance(attr, ast.Constant) and isinstance(attr.value, str) and is_private(attr.value)
                        and attr.value in npllama_private and attr.value not in own[name]):
                    found.append(f"{where(node)}: {ast.unparse(node)}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for module in imported_modules(name, node):
                    parent, _, last = module.rpartition(".")
                    if is_private(last) and parent != package:
                        found.append(f"{where(node)}: imports {module}")
                if isinstance(node, ast.ImportFrom) and imported_modules(name, node):
                    for alias in node.names:
                        if is_private(alias.name):
                            found.append(f"{where(node)}: imports {alias.name}")
    return sorted(found)


def test_no_module_reaches_another_modules_private_names():
    found = private_reaches()
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_the_private_names_check_finds_a_reach(tmp_path, monkeypatch):
    """The check above is not empty by accident: a module that reads another's _name is listed."""
    reaching = PACKAGE / "generate" / "decoding.py"
    source = reaching.read_text()
    assert "model.layers)" in source
    monkeypatch.setitem(MODULES, "npllama.generate.decoding", tmp_path / "decoding.py")
    (tmp_path / "decoding.py").write_text(source.replace("model.layers)", "model._workspaces)"))
    assert any(f.startswith("npllama.generate.decoding:") and "model._workspaces" in f for f in private_reaches())


# ---- the engine's wall ----------------------------------------------------------------------------
LOW_LEVEL = {"llvmlite", "ctypes", "threading", "_thread", "concurrent", "numba", "threadpoolctl"}


def all_imports(name: str) -> set[str]:
    """Every module ``name`` imports anywhere in its file (functions too), npllama's and others'."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(imported_modules(name, node) if node.level or (node.module or "").startswith("npllama")
                         else [node.module])
    return found


def test_layers_import_the_engine_and_nothing_low_level():
    layers = [name for name in MODULES if name.startswith("npllama.layers")]
    assert len(layers) >= 10
    for name in layers:
        low = {m for m in all_imports(name) if m.split(".")[0] in LOW_LEVEL}
        assert not low, f"{name} imports {sorted(low)}: that belongs behind the engine's wall (npllama/engine/)"
    assert any(m.startswith("npllama.engine") for name in layers for m in all_imports(name))


def test_the_engine_imports_no_layer_and_no_model():
    engine = [name for name in MODULES if name.startswith("npllama.engine")]
    for name in engine:
        outside = {m for m in all_imports(name) if m.startswith("npllama") and not m.startswith("npllama.engine")
                   and m not in ("npllama.caches", "npllama.errors")}   # (where its caches go; its errors)
        assert not outside, f"{name} imports {sorted(outside)}: the engine must not depend on the maths"


def test_the_engine_module_map_names_every_module():
    """npllama/engine/__init__.py's docstring and docs/engine.md each name every engine module."""
    import npllama.engine
    modules = sorted(p.name for p in (PACKAGE / "engine").glob("*.py") if p.name != "__init__.py")
    assert {"threads.py", "pool.py", "batch.py", "matmul.py", "blas.py", "jit.py", "fastmath.py", "simd.py"} <= set(modules)
    page = (ROOT / "docs" / "engine.md").read_text()
    for module in modules:
        assert module in npllama.engine.__doc__, f"engine/__init__.py's module map lacks {module}"
        assert f"engine/{module}" in page, f"docs/engine.md lacks engine/{module}"
