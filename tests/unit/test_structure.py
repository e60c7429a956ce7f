"""The package's shape, checked from the source with ``ast`` (nothing is imported, nothing runs).

1. Storage goes through ``spice_ray/storage.py``: no other module renames with ``os.replace``, tests
   for a URI with a ``"://"`` literal or builds a filesystem with ``FileSystem.from_uri`` (which
   skips the S3 timeouts that ``storage.s3_options`` applies). Use ``storage.is_uri`` /
   ``is_remote``, ``uri_filesystem`` / ``resolve_filesystem``, ``replace_atomically``,
   ``publish_once`` and ``replace_dir`` instead.
2. The import graph of ``spice_ray`` has no cycles, counting imports inside functions too (a cycle
   through a function-level import works at run time but is still two modules that need each other).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "spice_ray"

STORAGE_ALLOWED = {"storage.py"}


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _storage_violations(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "from_uri":
            found.append((node.lineno, "from_uri"))
        elif (isinstance(node, ast.Attribute) and node.attr == "replace" and isinstance(node.value, ast.Name)
              and node.value.id == "os"):
            found.append((node.lineno, "os.replace"))
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(a.name == "replace" for a in node.names):
            found.append((node.lineno, "from os import replace"))
        elif isinstance(node, ast.Constant) and node.value == "://":
            found.append((node.lineno, "'://' literal"))
    return found


def test_renames_uri_tests_and_filesystems_only_in_storage():
    bad = []
    for name, path in _modules().items():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in STORAGE_ALLOWED:
            continue
        bad += [f"spice_ray/{rel}:{line}: {what}" for line, what in _storage_violations(ast.parse(path.read_text()))]
    assert not bad, "use the helpers of spice_ray/storage.py instead:\n" + "\n".join(bad)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The spice_ray modules that module ``name`` imports, at module level or inside functions.
    ``from spice_ray.x import y`` is an edge to ``spice_ray.x.y`` when that is a module, else to
    ``spice_ray.x``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import spice_ray.x.y` names a module; trim attributes
                target = target.rpartition(".")[0]
            if target.startswith("spice_ray") and target != name:
                out.add(target)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                    components.append(set(component))
    return [_a_cycle(graph, c) for c in components]


def _a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first)."""
    start = min(component)
    parent: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & component):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle in {component}")


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_cycle_finder_finds_a_cycle_and_none_in_a_tree():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_sees_function_level_and_package_imports():
    graph = import_graph()
    assert "spice_ray.storage" in graph["spice_ray.executor"]  # imported inside a function
    assert "spice_ray.select.greedy" in graph["spice_ray.select"]  # an __init__ re-export


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)
