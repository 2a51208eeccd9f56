"""The library's dependency rule, read from the source: shared core <- infra <- stages <- pipeline
<- CLI, with development tools apart and the Airflow plugin on top.

Every ``import`` of the library counts, at the top of a file or inside a function: an upward
import hidden in a function is still an upward dependency. A cycle between modules fails too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import REPO

LIBRARY = REPO / "include" / "fine_tuning"
PLUGIN = REPO / "plugins"

# Lowest first. A module may import its own layer and the layers before it, never one after.
# The stages come in pipeline order: a stage may use an earlier one (train counts tokens with
# collect's counter, deploy reads evaluate's A/B records), never a later one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("fine_tuning", "fine_tuning.config", "fine_tuning.manifests", "fine_tuning.routing", "fine_tuning.clock", "fine_tuning.retirement",
              "fine_tuning.step_graph")),
    ("infra", ("fine_tuning.infra",)),
    ("collect", ("fine_tuning.collect",)),
    ("train", ("fine_tuning.train",)),
    ("track", ("fine_tuning.track",)),
    ("evaluate", ("fine_tuning.evaluate",)),
    ("deploy", ("fine_tuning.deploy",)),
    ("pipeline", ("fine_tuning.pipeline",)),
    ("cli", ("fine_tuning.cli", "fine_tuning.__main__")),
    ("dev", ("fine_tuning.dev",)),
]
# The CLI's development commands (``seed``, ``settings``) import dev tools when asked for: dev/
# is not in the Airflow image, so these two stay inside their functions.
ALLOWED_UPWARD = {
    ("fine_tuning.cli", "fine_tuning.dev.airflow_settings"),
    ("fine_tuning.cli", "fine_tuning.dev.seed"),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def imports(path: Path, module: str) -> Iterator[tuple[str, int, bool]]:
    """``(imported module, line, at top level)`` for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    for node in tree.body:  # ``if TYPE_CHECKING:`` imports are the file's own, for types only
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            top.update(id(child) for child in node.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                package = module.split(".")
                base = ".".join(package[: len(package) - node.level + (path.name == "__init__.py")])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target, node.lineno, id(node) in top
            for alias in node.names:  # ``from fine_tuning.infra import db`` imports a module
                yield f"{target}.{alias.name}", node.lineno, id(node) in top


def library_modules() -> dict[str, Path]:
    return {module_name(p, LIBRARY.parent): p for p in LIBRARY.rglob("*.py")}


def library_edges() -> dict[str, set[str]]:
    modules = library_modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in imports(path, name):
            if target in modules and target != name:
                edges[name].add(target)
    return edges


def test_no_module_imports_a_later_layer() -> None:
    modules = library_modules()
    upward = []
    for name, path in sorted(modules.items()):
        for target, line, _ in imports(path, name):
            if target not in modules or (name, target) in ALLOWED_UPWARD:
                continue
            if layer_of(target) > layer_of(name):
                upward.append(
                    f"{path.relative_to(REPO)}:{line}: {name} ({LAYERS[layer_of(name)][0]}) imports "
                    f"{target} ({LAYERS[layer_of(target)][0]})"
                )
    assert upward == []


def test_no_import_cycle() -> None:
    edges = library_edges()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    # A package's __init__ re-exporting its modules is not a cycle of the code.
    real = [c for c in cycles if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert real == []


def test_library_imports_itself_at_the_top() -> None:
    """Inside the library, the library is imported at the top of the file: no import hides in a
    function to dodge a cycle. (Heavy third-party modules stay lazy; see the DAG-parse test.)"""
    modules = library_modules()
    lazy = []
    for name, path in sorted(modules.items()):
        for target, line, top in imports(path, name):
            module = target if target in modules else target.rpartition(".")[0]
            if module in modules and not top and (name, module) not in ALLOWED_UPWARD:
                lazy.append(f"{path.relative_to(REPO)}:{line}: {module}")
    assert sorted(set(lazy)) == []


@pytest.mark.parametrize("forbidden", ["fine_tuning_airflow", "openai_emulator"])
def test_the_library_knows_neither_the_plugin_nor_the_emulator(forbidden: str) -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for name, path in library_modules().items()
        if not name.startswith("fine_tuning.dev")
        for target, line, _ in imports(path, name)
        if target.split(".")[0] == forbidden
    ]
    assert found == []


def test_the_plugin_and_dags_use_no_development_tool() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}: {target}"
        for root in (PLUGIN, REPO / "dags")
        for path in root.rglob("*.py")
        for target, line, _ in imports(path, module_name(path, root))
        if target.startswith("fine_tuning.dev") or target.split(".")[0] == "openai_emulator"
    ]
    assert found == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule is not vacuous: an infra module importing a stage is reported."""
    package = tmp_path / "fine_tuning" / "infra"
    package.mkdir(parents=True)
    (package / "bad.py").write_text("def f():\n    from fine_tuning.evaluate import ab\n")
    name = module_name(package / "bad.py", tmp_path)
    targets = [(t, top) for t, _, top in imports(package / "bad.py", name)]
    assert ("fine_tuning.evaluate.ab", False) in targets
    assert layer_of("fine_tuning.evaluate.ab") > layer_of(name)
