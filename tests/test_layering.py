"""The import direction of moemerge's layers stays one way (DESIGN "Package layout"):
cli -> api -> (engine, pma) -> planner -> config -> (io, methods), with io and methods side by
side, knowing nothing of each other. Every import counts: top-level, inside functions and under
`if TYPE_CHECKING:`. Read from the source with `ast`; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moemerge"

#: Layer of each module: the longest matching dotted prefix wins. A module no row covers fails
#: `test_every_module_has_a_layer`: place it in the table when you add it.
LAYER_OF: dict[str, str] = {
    "moemerge.cli": "cli",
    "moemerge.__main__": "cli",
    "moemerge": "api",  # the package itself: importing it imports moemerge.api
    "moemerge.api": "api",
    "moemerge.demo": "api",
    "moemerge.export": "api",
    "moemerge.verify": "api",
    "moemerge.synthetic": "api",
    "moemerge.engine": "engine",
    "moemerge.pma": "pma",
    "moemerge.planner": "planner",
    "moemerge.config": "config",
    "moemerge.slices_config": "config",  # the `slices:` / `modules:` part of the YAML schema
    "moemerge.io": "io",
    "moemerge.methods": "methods",
    # neutral leaves: importable from anywhere, importing only each other
    "moemerge.errors": "leaf",
    "moemerge.sizes": "leaf",
    "moemerge.names": "leaf",
    "moemerge.settings": "leaf",
    # the planner sizes buffers with the engine's block size; this module imports nothing
    "moemerge.engine.constants": "leaf",
    # torch on first use, and the collector paused while headers are parsed (start-up, issue 15)
    "moemerge._lazy": "leaf",
    "moemerge._gc": "leaf",
    "moemerge._startup": "leaf",  # torch imported with the collector paused: run, pma, pma update
    "moemerge.render": "cli",  # inspect's table and JSON, printed as rich would
    "moemerge.synthetic_headers": "api",  # headers-only DeepSeek-V3 layouts (scripts/bench_plan.py)
}

#: What each layer may import besides itself and the leaves.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "cli": frozenset({"api"}),
    "api": frozenset({"engine", "pma", "planner", "config", "io", "methods"}),
    "pma": frozenset({"engine", "planner", "config", "io", "methods"}),
    "engine": frozenset({"planner", "config", "io", "methods"}),
    "planner": frozenset({"config", "io", "methods"}),
    "config": frozenset({"io", "methods"}),
    "io": frozenset(),
    "methods": frozenset(),
    "leaf": frozenset(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        hit = LAYER_OF.get(".".join(parts[:n]))
        if hit is not None:
            return hit
    return None


def imports(module: str) -> list[tuple[int, str]]:
    """(line, imported moemerge module) of every import in `module`, wherever it stands."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "moemerge"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "moemerge":
                continue
            for a in node.names:  # `from moemerge.io import storage` imports a module
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return found


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if layer(m) is None]
    assert not missing, f"add these modules to LAYER_OF in {Path(__file__).name}: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    mine = layer(module)
    assert mine is not None
    wrong = []
    for line, target in imports(module):
        theirs = layer(target)
        if theirs is None or theirs == mine or theirs == "leaf" or theirs in MAY_IMPORT[mine]:
            continue
        wrong.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {mine} module imports "
                     f"{target} ({theirs}); {mine} may import {', '.join(sorted(MAY_IMPORT[mine])) or 'nothing'}"
                     " (and the leaves)")
    assert not wrong, "\n".join(wrong)


def test_the_layer_table_is_acyclic() -> None:
    """The allowed imports themselves point one way (so no two layers may import each other)."""
    seen: dict[str, int] = {}

    def depth(name: str, path: tuple[str, ...] = ()) -> int:
        assert name not in path, f"cycle in MAY_IMPORT: {' -> '.join(path + (name,))}"
        if name not in seen:
            seen[name] = 1 + max((depth(d, path + (name,)) for d in MAY_IMPORT[name]), default=0)
        return seen[name]

    for name in MAY_IMPORT:
        depth(name)
