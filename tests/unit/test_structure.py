"""The package's shape and the unit tests' bounds, checked from the source with ``ast`` (nothing is
imported, nothing runs).

1. Storage goes through ``spice_ray/storage.py``: no other module renames with ``os.replace``, tests
   for a URI with a ``"://"`` literal or builds a filesystem with ``FileSystem.from_uri`` (which
   skips the S3 timeouts that ``storage.s3_options`` applies). Use ``storage.is_uri`` /
   ``is_remote``, ``uri_filesystem`` / ``resolve_filesystem``, ``replace_atomically``,
   ``publish_once`` and ``replace_dir`` instead.
2. The import graph of ``spice_ray`` has no cycles, counting imports inside functions too (a cycle
   through a function-level import works at run time but is still two modules that need each other).
3. Ray is imported only by its shells (``RAY_MODULES``: the executor, the shard actors, the Ray Train
   session, the fault drills, job submission, the log routing, the test helpers), and the math and
   data rooms (``corpus/``, ``select/`` but its stage and Ray shells, ``sketch/`` but its stage,
   ``config``, ``storage``) reach none of them through any chain of imports.
4. ``tests/unit`` starts no subprocess, browser or pipeline: no test there imports ``subprocess`` or
   ``multiprocessing``, uses ``sys.executable`` or ``os.system``, calls ``run_pipeline``,
   ``run_bench``, a ``run_*_stage``, ``run_loop`` or ``LocalExecutor``, invokes a CLI command that
   runs stages (``run``, ``select``, ``bench``, ...) with a literal argument list, or takes the Ray
   or executor fixtures. Such tests go to ``tests/integration``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "spice_ray"
UNIT_TESTS = Path(__file__).resolve().parent

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


RAY_MODULES = {"spice_ray.ray_executor", "spice_ray.select.ray_shards", "spice_ray.train.session", "spice_ray.train.faults",
               "spice_ray.submit", "spice_ray.logs", "spice_ray.testing"}
STAGE_SHELLS = {"spice_ray.select.ray_shards", "spice_ray.select.stage", "spice_ray.sketch.stage"}


def _imports_ray(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        lines += [node.lineno for name in names if name == "ray" or name.startswith("ray.")]
    return lines


def test_ray_is_imported_only_by_its_shells():
    bad = [f"spice_ray/{path.relative_to(PACKAGE).as_posix()}:{line}: imports ray"
           for name, path in _modules().items() if name not in RAY_MODULES for line in _imports_ray(path)]
    assert not bad, "Ray belongs in the modules of RAY_MODULES:\n" + "\n".join(bad)


def test_the_math_and_data_rooms_reach_no_ray_module():
    graph = import_graph()
    rooms = ("spice_ray.corpus", "spice_ray.select", "spice_ray.sketch", "spice_ray.config", "spice_ray.storage")
    bad = []
    for name in sorted(graph):
        if not name.startswith(rooms) or name in STAGE_SHELLS:
            continue
        seen, todo = set(), [name]
        while todo:
            for child in graph[todo.pop()] - seen:
                seen.add(child)
                todo.append(child)
        bad += [f"{name} reaches {ray}" for ray in sorted(seen & RAY_MODULES)]
    assert not bad, "\n".join(bad)

UNIT_FORBIDDEN_MODULES = {"subprocess", "multiprocessing", "playwright", "pyppeteer", "selenium"}
UNIT_FORBIDDEN_ATTRIBUTES = {("sys", "executable"), ("os", "system"), ("os", "fork"), ("os", "posix_spawn"), ("ray", "init")}
UNIT_FORBIDDEN_CALLS = re.compile(r"^(run_pipeline|run_bench|run_stage|run_loop|run_\w+_stage|LocalExecutor)$")
UNIT_FORBIDDEN_FIXTURES = {"ray_session", "ray_executor", "local_executor"}
STAGE_COMMANDS = {"run", "ingest", "sketch", "select", "train", "eval", "demo", "bench", "pretrain", "submit"}


def _unit_test_violations(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in UNIT_FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNIT_FORBIDDEN_MODULES:
            found.append((node.lineno, f"from {node.module} import"))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (node.value.id, node.attr) in UNIT_FORBIDDEN_ATTRIBUTES:
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if UNIT_FORBIDDEN_CALLS.match(name):
                found.append((node.lineno, f"{name}(...)"))
            elif name == "invoke":  # CliRunner().invoke(app, ["run", ...]): a command that runs stages
                found += [(node.lineno, f"invoke {a.elts[0].value}") for a in node.args if isinstance(a, ast.List) and a.elts
                          and isinstance(a.elts[0], ast.Constant) and a.elts[0].value in STAGE_COMMANDS]
        elif isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            found += [(node.lineno, f"fixture {a.arg}") for a in node.args.args if a.arg in UNIT_FORBIDDEN_FIXTURES]
    return found


def test_the_unit_checker_sees_subprocesses_pipelines_and_ray_fixtures():
    source = (
        "import subprocess, sys\nfrom spice_ray.pipeline import run_pipeline\n"
        "def test_a(ray_session):\n    subprocess.run([sys.executable])\n    run_pipeline(cfg)\n"
        "def test_b(tmp_path):\n    x.run_sketch_stage(cfg)\n    LocalExecutor().train()\n"
        "    CliRunner().invoke(app, ['select', '--root', root])\n    CliRunner().invoke(app, ['config'])\n"
    )
    assert sorted(_unit_test_violations(ast.parse(source))) == [
        (1, "import subprocess"), (3, "fixture ray_session"), (4, "sys.executable"), (5, "run_pipeline(...)"),
        (7, "run_sketch_stage(...)"), (8, "LocalExecutor(...)"), (9, "invoke select")]


def test_unit_tests_start_no_subprocess_browser_or_pipeline():
    bad = []
    for path in sorted(UNIT_TESTS.glob("*.py")):
        bad += [f"tests/unit/{path.name}:{line}: {what}" for line, what in sorted(_unit_test_violations(ast.parse(path.read_text())))]
    assert not bad, "tests/unit runs in this process only; move these tests to tests/integration:\n" + "\n".join(bad)
