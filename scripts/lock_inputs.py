#!/usr/bin/env python3
"""Print the digest of what requirements.lock is resolved from.

The inputs are pyproject.toml's runtime and dev dependency lists, its build requirements and
constraints.txt. scripts/lock.sh writes the digest into the lock's first line; a test compares it
with the digest of today's files, so a changed dependency list without a new lock fails at once.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def lock_inputs_digest(repo: Path = REPO) -> str:
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    inputs = {
        "dependencies": pyproject["project"]["dependencies"],
        "dev": pyproject["project"]["optional-dependencies"]["dev"],
        "build": pyproject["build-system"]["requires"],
        "constraints": [ln.strip() for ln in (repo / "constraints.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")],
    }
    return "sha256:" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    print(lock_inputs_digest())
