"""The library's layout: imports run one way (each layer imports only the layers below it), no module imports
itself back through others, and no file grows past 500 lines. Read from the source (every ``import`` statement,
those inside functions included), so an import that runs up a layer fails here however it is written."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "delinea"

#: The layers, lowest first: a module may import its own layer and the layers below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("delinea.errors", "delinea.labels"),
    ("delinea.outputs",),
    ("delinea.io",),
    ("delinea.geometry",),
    ("delinea.models",),
    ("delinea.datamodules",),
    ("delinea.evaluation",),
    ("delinea.volumes",),
    ("delinea.tasks",),
    ("delinea.segmenter",),
    ("delinea.callbacks",),
    ("delinea.cli",),  # what the commands share: dataset names, argv, one-line errors
    ("delinea.runs",),
    ("delinea.preprocess",),
    ("delinea.main", "delinea.__main__"),
    ("delinea.demo", "delinea.testing"),  # the demo and test fixtures: nothing in the library imports them
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The delinea modules a module imports, anywhere in it (``from package import submodule`` is the submodule)."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: a relative import; delinea imports by absolute name"
            base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"module {name} is in no layer of tests/test_layout.py: place it")


# The package root only re-exports the Segmenter lazily; it stands above every layer.
LIBRARY = sorted(m for m in MODULES if m != "delinea")


@pytest.mark.parametrize("name", LIBRARY)
def test_imports_run_one_way(name: str) -> None:
    upward = sorted(m for m in imports(name) if m != "delinea" and layer(m) > layer(name))
    assert not upward, f"{name} imports {upward}, above its layer"


def test_the_layers_name_the_rules() -> None:
    # models import nothing above them; datamodules never import tasks; the library never imports demo or testing
    assert layer("delinea.models.dit") < layer("delinea.datamodules.base") < layer("delinea.tasks.base")
    assert layer("delinea.segmenter") < layer("delinea.demo.run") == layer("delinea.testing.phantoms")
    assert all(
        layer(m) < layer("delinea.demo") for m in LIBRARY if not m.startswith(("delinea.demo", "delinea.testing"))
    )


def test_no_import_cycles() -> None:
    graph = {name: imports(name) for name in MODULES}
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif state[nxt] == 0:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if state[name] == 0:
            visit(name, [name])
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_a_module_that_imports_up_is_caught(tmp_path: Path) -> None:
    # the checker itself: a models module importing a task, even inside a function, is reported
    source = "def f():\n    from delinea.tasks.base import SegmentationTask\n    return SegmentationTask\n"
    MODULES["delinea.models._probe"] = tmp_path / "probe.py"
    (tmp_path / "probe.py").write_text(source)
    try:
        assert imports("delinea.models._probe") == {"delinea.tasks.base"}
        assert layer("delinea.tasks.base") > layer("delinea.models._probe")
    finally:
        del MODULES["delinea.models._probe"]


def test_no_file_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"files over 500 lines (split them along their jobs): {long}"


def test_main_uses_no_private_attribute_of_lightning() -> None:
    # The CLI goes through Lightning's public hooks; where none exists the private use lives beside its reason
    # (callbacks.NewestLastCheckpoint: no public way to write last.ckpt; runs.claim_version: none to set a logger's
    # version once built).
    source = (PACKAGE / "main.py").read_text()
    private = [node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)]
    private = [a for a in private if a.startswith("_") and not a.startswith("__")]
    owned = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert not [a for a in private if a not in owned], f"main.py reaches into private attributes: {private}"
