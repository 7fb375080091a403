"""The house of docs/DESIGN.md: imports go one way (no cycles, no layer importing one above it), no private
name crosses a module, and every file a docstring cites exists. Read from the source, so nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memlm"
#: the dependency order of docs/DESIGN.md: a module may import its own rank or lower ones
RANKS = {
    "memlm.kernels": 0, "memlm.index": 0, "memlm.config": 0, "memlm.version": 0,
    "memlm.positions": 1, "memlm.memory": 1,
    "memlm.runtime": 2,
    "memlm.train": 3, "memlm.store": 3, "memlm.eval": 3, "memlm.summarize": 3, "memlm.tiny": 3,
    "memlm.models": 3,
    "memlm.serve": 4, "memlm.cli": 4,
    "memlm": 5,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("memlm", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        found[name] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, lazy ones inside functions too."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((target, [alias.name for alias in node.names]))
    return found


def rank(module: str) -> int:
    while module not in RANKS:
        module = module.rsplit(".", 1)[0]
    return RANKS[module]


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {name: set() for name in known}
    for name, path in known.items():
        for target, names in imports(name, path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in known and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def test_no_module_imports_a_layer_above_it():
    upward = [(name, target) for name, targets in internal_graph().items() for target in targets
              if rank(target) > rank(name)]
    assert upward == []


def test_index_and_kernels_never_import_the_runtime():
    for name, targets in internal_graph().items():
        if name.startswith(("memlm.index", "memlm.kernels")):
            assert all(t.startswith(("memlm.index", "memlm.kernels")) for t in targets), (name, targets)
            assert not any(t.startswith("memlm.index") for t in targets if name.startswith("memlm.kernels"))


def test_imports_have_no_cycles():
    graph = internal_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in graph[node]:
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*trail, node, target])}")
            if target not in state:
                visit(target, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_no_private_name_crosses_a_module():
    crossing = []
    for name, path in modules().items():
        for target, names in imports(name, path):
            if target and target.startswith("memlm"):
                crossing += [(name, target, n) for n in names if n.startswith("_") and n != "__version__"]
    assert crossing == []


def test_every_file_a_docstring_cites_exists():
    files = {path.name for path in ROOT.rglob("*") if ".venv" not in path.parts and ".git" not in path.parts}
    missing = []
    for name, path in modules().items():
        for cited in re.findall(r"[\w/]*\b([\w-]+\.(?:md|py|yaml|json))\b", path.read_text()):
            if cited not in files and not cited.endswith(".json"):
                missing.append((name, cited))
    assert missing == []


def test_the_repository_declares_its_license_and_types():
    assert "Apache License" in (ROOT / "LICENSE").read_text() and (ROOT / "memlm" / "py.typed").is_file()
