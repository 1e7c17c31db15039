"""The repository's layout, so the house does not regrow: the top level holds the scripts a
user runs and the five shared modules; helpers live in folders and never import a script;
imports stand in layers (no cycles, at most MAX_IMPORT_DEPTH deep) and sit at module top
unless a comment says why; no function runs past MAX_FUNCTION_LINES."""

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"extract", "pre_process", "align_faces", "train", "lfw_eval", "megaface", "ijb_eval",
           "export_onnx", "demo", "identify"}
SHARED = {"models", "arcface_loss", "data_gen", "config", "utils"}
MAX_TOP_LEVEL = 15
MAX_FUNCTION_LINES = 80
MAX_IMPORT_DEPTH = 7  # a module that imports nothing of ours has depth 1
NOT_CODE = {"tests", "bench", "data", "runs", "megaface"}  # folders outside the import graph


def _modules() -> dict[str, Path]:
    """Every project module by dotted name: top-level files and the helper folders' files."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for init in ROOT.glob("*/__init__.py"):
        package = init.parent.name
        if package in NOT_CODE or package.startswith("."):
            continue
        found[package] = init
        found.update({f"{package}.{p.stem}": p for p in init.parent.glob("*.py")
                      if p.stem != "__init__"})
    return found


MODULES = _modules()


@functools.cache
def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"))


def _imports(name: str) -> list[tuple[ast.stmt, str]]:
    """(statement, project module imported) for every import of a project module in ``name``,
    wherever it sits; ``from package import module`` counts as importing the module."""
    out = []
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            subs = [f"{node.module}.{a.name}" for a in node.names
                    if f"{node.module}.{a.name}" in MODULES]
            out += [(node, m) for m in subs] or [(node, node.module)]
    return [(node, m) for node, m in out if m != name]


def test_top_level_holds_the_scripts_and_the_shared_modules():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top <= SCRIPTS | SHARED, f"not scripts or shared modules: {top - SCRIPTS - SHARED}"
    assert len(top) <= MAX_TOP_LEVEL
    for package in {m.split(".")[0] for m in MODULES if "." in m}:
        doc = ast.get_docstring(_tree(package))
        assert doc and len(doc.splitlines()) <= 12, f"{package}/__init__.py needs a short docstring"


def test_no_helper_imports_a_script():
    bad = [f"{name} imports {target}" for name in MODULES if "." in name
           for _, target in _imports(name) if target in SCRIPTS]
    assert not bad, bad


def test_imports_stand_in_layers():
    graph = {name: {target for _, target in _imports(name)} for name in MODULES}
    depth: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> int:
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        if name not in depth:
            depth[name] = 1 + max((visit(t, path + (name,)) for t in graph[name]), default=0)
        return depth[name]

    for name in MODULES:
        visit(name, ())
    deepest = max(depth, key=depth.get)
    assert depth[deepest] <= MAX_IMPORT_DEPTH, f"{deepest} stands {depth[deepest]} levels deep"


def _source_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not any(
        part.startswith(".") or part in {"tests", "data", "runs"}
        for part in p.relative_to(ROOT).parts)]


def test_imports_at_module_top_unless_a_comment_says_why():
    hidden = []
    for path in _source_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    said = "#" in lines[inner.lineno - 1] or \
                        lines[inner.lineno - 2].strip().startswith("#")
                    if not said:
                        hidden.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert not hidden, f"imports inside functions without a comment saying why: {hidden}"


def test_no_function_runs_past_the_limit():
    long = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {length}")
    assert not long, long


@pytest.mark.parametrize("script", sorted(s for s in SCRIPTS if (ROOT / f"{s}.py").exists()))
def test_every_script_answers_help(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
