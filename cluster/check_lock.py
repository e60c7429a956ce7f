#!/usr/bin/env python3
"""Check that the running Python environment is exactly a lock file.

    python cluster/check_lock.py [--require-cuda] [LOCK]

LOCK is cluster/requirements.lock (the image: `name==version` lines) by default, or
requirements.lock (the virtualenv: uv's format, with `--hash` continuation lines). Every pinned
package must be installed at that version (a local label such as +cu128 or +cpu is ignored, as pip
does). --require-cuda also requires torch to be a CUDA build. The image build runs it
(cluster/Dockerfile) after installing the lock, so an image that drifts from the lock does not build.
Exit 0 when it matches, 1 with one line per mismatch otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from pathlib import Path


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip().removesuffix("\\").strip()
        if not line or line.startswith("--hash="):
            continue
        name, sep, version = line.partition("==")
        if not sep or not version or any(c in version for c in "<>=!~*,; "):
            raise ValueError(f"{path}: not an exact pin: {raw!r}")
        pins[name] = version
    return pins


def mismatches(pins: dict[str, str]) -> list[str]:
    out = []
    for name, version in pins.items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            out.append(f"{name}: locked {version}, not installed")
            continue
        if installed.split("+", 1)[0] != version.split("+", 1)[0]:
            out.append(f"{name}: locked {version}, installed {installed}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", nargs="?", type=Path, default=Path(__file__).with_name("requirements.lock"))
    parser.add_argument("--require-cuda", action="store_true", help="torch must be a CUDA build")
    args = parser.parse_args(argv)
    bad = mismatches(read_lock(args.lock))
    if args.require_cuda:
        import torch

        if not torch.version.cuda:
            bad.append(f"torch {torch.__version__} is not a CUDA build")
    for line in bad:
        print(f"check_lock: {line}", file=sys.stderr)
    if not bad:
        print(f"check_lock: environment matches {args.lock}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
