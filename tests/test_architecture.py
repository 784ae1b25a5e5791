"""The package's imports flow one way: no cycles, libraries below commands, kernels at the bottom.

Every `import` and `from ... import` in condensa/ is read with `ast`, at module level and inside
functions alike (a lazy import is still a dependency), and resolved to the module it names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "condensa"
# What a kernel may import besides other kernels (the tile geometry that the reference ops share
# with the kernels is condensa.kernels.tiling, a kernel package itself): the errors alone.
KERNEL_BASE = ("condensa.errors",)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The condensa modules that `name` imports (a `from package import module` counts as the module)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _is_command(name: str) -> bool:
    """A module run as a program: `__main__`, `*_cli`, or one with a `__main__` guard."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "__main__" or leaf.endswith("_cli"):
        return True
    return 'if __name__ == "__main__":' in _modules()[name].read_text()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return components


def test_the_import_graph_is_read(graph):
    """A guard for the tests below: the parser finds the edges it must (so an empty graph cannot pass)."""
    assert "condensa.attention.reference" in graph["condensa.attention"]
    assert "condensa.kernels.toptheta_prefill" in graph["condensa.attention.pallas_backend"]  # a lazy import
    assert "condensa.eval.text" in graph["condensa.eval.ppl_cli"]


def test_no_import_cycles(graph):
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds one


def test_no_module_imports_a_command(graph):
    """Commands sit on top: a library never imports one, nor does another command (the dispatchers
    `condensa.eval` and `condensa.eval.bench` find theirs by name, from tables in their packages)."""
    offending = sorted((name, target) for name, targets in graph.items() for target in targets if _is_command(target))
    assert offending == []


def test_kernels_import_only_kernels_and_errors(graph):
    offending = sorted((name, target) for name, targets in graph.items() if name.startswith("condensa.kernels")
                       for target in targets
                       if not target.startswith("condensa.kernels") and not target.startswith(KERNEL_BASE))
    assert offending == []


def _lazy_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source line) of every import of a condensa module inside a function of `path`."""
    lines = path.read_text().splitlines()
    found = []
    for func in ast.walk(ast.parse(path.read_text())):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." if node.level else node.module or ""]
            else:
                continue
            if any(name == "condensa" or name.startswith(("condensa.", ".")) for name in names):
                found.append((node.lineno, lines[node.lineno - 1]))
    return sorted(set(found))


def test_every_lazy_import_says_why():
    """An import of a condensa module inside a function is kept only for a reason (an optional heavy
    dependency, an order to respect, a test that patches the name), written on its line."""
    lazy = {f"{path.relative_to(PACKAGE.parent)}:{line}": text.strip()
            for path in sorted(PACKAGE.rglob("*.py")) for line, text in _lazy_imports(path)}
    assert "condensa/attention/pallas_backend.py" in " ".join(lazy)  # the finder finds them
    assert {where: text for where, text in lazy.items() if "#" not in text} == {}
