"""What SPICE's terms change (issue 19): on a bench root's sketches, how many of the default's picks
change when the conflict term is dropped (λ = 0) and when log det is replaced by the norm ranking
(gradnorm, token-scaled) or by length alone (longest), beside the paper's diagnostics of the
default's run (ρ(conflict, Δ) over candidates; the step where the gain halves). Selection only, no
training: seconds per budget.

    python benchmarks/terms.py --root runs/budgets --fractions 0.02 0.05 0.1 0.2 0.4
    python benchmarks/terms.py --root runs/targeted --fractions 0.05 0.1 --target runs/targeted/setting/target.txt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spice_ray.config import SelectConfig  # noqa: E402
from spice_ray.select.stage import select_to_dir  # noqa: E402

VARIANTS = {"λ = 0 (logdet)": {"lam": 0.0}, "norm ranking (gradnorm-tokens)": {"method": "gradnorm"},
            "length (longest)": {"method": "longest"}}


def picks(sketches: str, out: Path, fields: dict) -> tuple[list[str], dict]:
    summary = select_to_dir(sketches, str(out), SelectConfig(**fields))
    return pq.read_table(out / "selection.parquet", columns=["uid"]).column("uid").to_pylist(), summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path, help="a bench root (its sketch/sketches are read)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1])
    ap.add_argument("--target", help="select.target (the targeted setting's target.txt)")
    args = ap.parse_args()
    sketches = str(args.root / "sketch" / "sketches")
    base = {"target": args.target} if args.target else {}
    lines = ["| budget | k | " + " | ".join(f"picks changed: {v}" for v in VARIANTS) + " | ρ(conflict, Δ) | gain halves at step |",
             "|---|---|" + "---|" * len(VARIANTS) + "---|---|"]
    with tempfile.TemporaryDirectory(prefix="spice-terms-") as tmp:
        for f in args.fractions:
            default, summary = picks(sketches, Path(tmp) / f"d{f}", base | {"fraction": f})
            changed = []
            for name, fields in VARIANTS.items():
                other, _ = picks(sketches, Path(tmp) / f"{name[:8]}{f}", base | {"fraction": f} | fields)
                changed.append(len(default) - len(set(default) & set(other)))
            diag = summary.get("diagnostics", {})
            cells = [f"{c} ({c / len(default):.0%})" for c in changed]
            lines.append(f"| {f:g} | {len(default)} | " + " | ".join(cells)
                         + f" | {diag.get('rho_conflict_gain', float('nan')):+.2f} | {diag.get('gain_halving_step')} |")
    table = "\n".join(lines)
    print(table)
    (args.root / "terms.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
