#!/usr/bin/env bash
# `make lock-drift`: what a fresh resolution today would change in requirements.lock, without
# touching it. Upgrading is then a decision: `scripts/lock.sh --upgrade-package NAME` (or
# `--upgrade`), run the tests, commit both locks.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
if [[ -d /opt/wheels ]]; then TORCH_CPU=(--find-links /opt/wheels); else TORCH_CPU=(--extra-index-url https://download.pytorch.org/whl/cpu); fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$UV" pip compile --quiet pyproject.toml --extra dev --constraint constraints.txt \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 "${TORCH_CPU[@]}" \
  --upgrade --no-header --no-annotate --output-file "$tmp/newest.txt"
python3 - requirements.lock "$tmp/newest.txt" <<'PY'
import re
import sys

def pins(path):
    return dict(m.groups() for m in re.finditer(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", open(path).read(), re.M))

locked, newest = pins(sys.argv[1]), pins(sys.argv[2])
rows = [(n, locked.get(n, "-"), newest.get(n, "-")) for n in sorted(locked.keys() | newest.keys()) if locked.get(n) != newest.get(n)]
if not rows:
    print("requirements.lock is what a fresh resolution gives today: nothing to upgrade")
    sys.exit(0)
width = max(len(n) for n, _, _ in rows)
print(f"{'package':<{width}}  {'locked':<14}  newest today")
for name, old, new in rows:
    print(f"{name:<{width}}  {old:<14}  {new}")
print(f"\n{len(rows)} package(s) differ. To take them: scripts/lock.sh --upgrade-package NAME (or --upgrade), then make test.")
PY
