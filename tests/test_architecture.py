"""The package's layers, checked from its imports (docs/ARCHITECTURE.md).

Every ``import`` and ``from … import`` in ``ihld/`` counts, including those
inside functions and under ``TYPE_CHECKING``: a lazy import is still a
dependency. A module may import its own subpackage and any subpackage of a
lower rank; nothing else. The module graph must have no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import ihld

PACKAGE = Path(ihld.__file__).parent

# rank of each subpackage: a module imports only lower ranks (or its own subpackage)
RANKS = {
    "common": 0,
    "backends": 1,
    "sim": 1,
    "core": 2,
    "plugins": 3,
    "observe": 3,
    "service": 4,
    "client": 5,
    "bench": 6,
    "cli": 7,
}
TOP = {"ihld", "ihld.__main__"}  # the public API (lazy names) and ``python -m ihld``
MAX_LINES = 450  # "modules of a few hundred lines"
# A module allowed past the limit for now, with its length: it may shrink, never grow.
OVER_LIMIT: dict[str, int] = {}


def module_name(path: Path) -> str:
    parts = ["ihld", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """The ihld modules ``path`` imports, with line numbers; names via ``ihld``'s API resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ihld":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base.split(".")[0] != "ihld":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    yield full, node.lineno  # a submodule
                elif base == "ihld" and alias.name in ihld._API:
                    yield ihld._API[alias.name], node.lineno  # a public name: its home
                elif base != "ihld":
                    yield base, node.lineno


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    edges: dict[str, set[str]] = {}
    for name, path in found.items():
        edges[name] = {target for target, _ in imported(name, path, known) if target != name}
    return edges


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else None


def test_every_subpackage_has_a_rank() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(RANKS)
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == {"__init__.py", "__main__.py"}, "top-level modules belong in a subpackage"


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    for source, targets in graph().items():
        here = layer(source)
        if here is None:
            continue
        for target in targets:
            there = layer(target)
            if target in TOP or there is None or there == here:
                continue
            if RANKS[there] >= RANKS[here]:
                wrong.append(f"{source} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target in TOP or target not in edges:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_plugin_api_names_resolve() -> None:
    for name in ihld.__all__:
        assert getattr(ihld, name) is not None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_module_size(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    limit = OVER_LIMIT.get(module_name(path), MAX_LINES)
    assert lines <= limit, f"{module_name(path)}: {lines} lines (limit {limit})"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The walker finds imports inside functions, relative imports and API names."""
    source = tmp_path / "probe.py"
    source.write_text(
        "def late():\n"
        "    from ihld.cli import main\n"
        "    from ihld import Scheduler\n"
        "    import ihld.observe.logs\n"
    )
    found = {t for t, _ in imported("ihld.core.probe", source, set(modules()))}
    assert found == {"ihld.cli.main", "ihld.core.scheduler", "ihld.observe.logs"}
