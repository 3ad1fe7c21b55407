"""The one-way streets of the house (DESIGN.md §3, docs/architecture.md), read from the imports.

Every ``import`` statement counts, those inside functions too. Run alone with
``python -m pytest tests/test_layers.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# service/ from the top down: a room may import the rooms below it, never one above it.
# Rooms on one line are side by side and may not import each other (engine and store).
SERVICE_FLOORS = [
    {"cli"},
    {"app"},
    {"api"},
    {"deps"},
    {"handlers"},
    {"jobs"},  # the jobs' backends and state machine, below the handlers that run them
    {"protocol", "settings"},
    {"engine", "store", "auth"},
    {"core", "metrics", "logging", "errors"},
]


def _modules(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` (dotted) and the dotted modules it imports."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        out[dotted] = names
    return out


def _room(dotted: str) -> str | None:
    """``service.engine.decode`` -> ``engine``; ``service.app`` -> ``app``."""
    parts = dotted.split(".")
    return parts[1] if parts[0] == "service" and len(parts) > 1 else None


def test_service_rooms_import_only_downward() -> None:
    floor = {room: i for i, rooms in enumerate(SERVICE_FLOORS) for room in rooms}
    wrong = []
    for module, imports in _modules("service").items():
        here = _room(module)
        for target in {_room(name) for name in imports} - {None, here}:
            assert here in floor and target in floor, f"{module}: place {here} / {target}"
            if floor[target] <= floor[here]:
                wrong.append(f"{module} -> service.{target}")
    assert wrong == []


def test_no_import_circle_in_service() -> None:
    modules = _modules("service")
    graph = {m: {n for n in imports if n in modules and n != m} for m, imports in modules.items()}
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path, module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_packages_keep_the_dependency_rule() -> None:
    """``trainer -> prompts <- service``, ``trainer -> client``, and nowhere else."""
    never = {"prompts": ("service", "trainer", "client"), "service": ("trainer", "client")}
    wrong = [
        f"{module} -> {name}"
        for package, banned in never.items()
        for module, imports in _modules(package).items()
        for name in imports
        if name.split(".")[0] in banned
    ]
    assert wrong == []
