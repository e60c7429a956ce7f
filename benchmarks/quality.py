"""Does SPICE train a better model than a random 10%? ``spice-ray bench`` on the real corpus.

Data: the records of ``../shared/data`` outside the pico-llama proxy slice (its README: never pool or
evaluate on ``int(sha256("proxy:" + id)[:8], 16) % 100 < 40``), written as JSONL under the bench
root. Proxy and target: ``../shared/models/pico-llama`` (4M parameters, pretrained on the proxy
slice). The bench (``spice_ray.bench``) holds out validation and test splits by uid hash, sketches
the pool once, and for every arm × seed selects 10%, fine-tunes LoRA for one epoch and evaluates
per source.

    python benchmarks/quality.py --root runs/quality                  # the arms of benchmarks/quality.yaml
    python benchmarks/quality.py --root runs/quality --set bench.seeds=[0]   # quicker
    python benchmarks/quality.py --root runs/quality --config benchmarks/quality_sweep.yaml  # the remedies, on validation
    python benchmarks/quality.py --root runs/noisy --setting noisy --config benchmarks/quality_settings.yaml

``--setting redundant|noisy|targeted`` builds that pool from the same records first
(``benchmarks/settings.py``: the held-out rows unchanged) and reports, per arm, the share of its picks
that are corrupted records or near-duplicate rewrites; ``targeted`` sets ``select.target`` to the
setting's target examples and scores the target source's held-out rows only.

Nothing is downloaded; the data never enters the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPICE_SHARED", REPO.parent / "shared"))


def in_proxy_slice(rid: str) -> bool:
    return int(hashlib.sha256(("proxy:" + rid).encode()).hexdigest()[:8], 16) % 100 < 40


def prepare_corpus(data: Path, out: Path) -> Path:
    """The records outside the proxy slice, one JSONL file per source file (written once)."""
    done = out / ".done"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    kept = 0
    for f in sorted(data.glob("*.jsonl")):
        with f.open() as src, (out / f.name).open("w") as dst:
            for line in src:
                row = json.loads(line)
                if not in_proxy_slice(row["id"]):
                    dst.write(line if line.endswith("\n") else line + "\n")
                    kept += 1
    done.write_text(f"{kept}\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/quality", help="bench run root")
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "quality.yaml"), help="bench config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--setting", choices=["standard", "redundant", "noisy", "targeted"], help="build this pool (benchmarks/settings.py)")
    args = ap.parse_args()
    if not any(SHARED.joinpath("data").glob("*.jsonl")):
        print(f"skipped: the real corpus is not at {SHARED / 'data'} (set SPICE_SHARED)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from spice_ray.bench import load_bench, markdown, run_bench

    root = Path(args.root).resolve()
    pico = SHARED / "models" / "pico-llama"
    overrides = [f"run.root={root}", f"model.proxy={pico}", f"model.target={pico}", *args.overrides]
    cfg, _ = load_bench(args.config, overrides)
    if args.setting:
        import settings

        c = cfg.corpus
        rule = settings.SplitRule(c.split_seed, c.holdout_validation, c.holdout_test, c.pool_fraction)
        rows = settings.read_rows(SHARED / "data", lambda r: not in_proxy_slice(r["id"]))
        corpus = settings.write(settings.build(args.setting, rows, rule), root / "setting")
        overrides += ["corpus.pool_fraction=1.0"]  # the written corpus is the pool and the held-out rows
        if args.setting == "targeted":  # aim at the target examples; score on the target source's held-out rows
            overrides += [f"select.target={root / 'setting' / 'target.txt'}", f"bench.sources=[{settings.TARGET_SOURCE}]"]
    else:
        corpus = prepare_corpus(SHARED / "data", root / "corpus")
    cfg, bench = load_bench(args.config, [*overrides, f"corpus.paths=[{corpus}]"])
    t0 = time.time()
    summary = run_bench(cfg, bench)
    print(markdown(summary, bench))
    if args.setting in ("noisy", "redundant"):
        print(picked_shares(root, bench))
    if args.setting == "noisy":
        print(separability(root))
    print(f"bench: {time.time() - t0:.0f} s; results under {root / 'bench'}")
    return 0


def _auc(score, positive) -> float:
    """P(score of a positive > score of a negative), ties half (Mann–Whitney)."""
    import numpy as np
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)) if n_pos and n_neg else float(np.nan)


def separability(root: Path) -> str:
    """Can the proxy tell a corrupted record from a clean one at all? AUC of its loss, its gradient's
    norm and its gradient's disagreement with the pool's mean gradient (−cos), corrupted vs clean;
    0.5 is chance. A selection built on these signals cannot keep out what they do not separate."""
    import numpy as np
    import pyarrow.parquet as pq

    bad = set(json.loads((root / "setting" / "setting.json").read_text())["corrupted"])
    t = pq.read_table(root / "sketch" / "sketches")
    y = np.array([u in bad for u in t.column("uid").to_pylist()])
    G = np.stack(t.column("sketch").to_numpy(zero_copy_only=False)).astype(np.float64)
    G *= (t.column("n_loss_tokens").to_numpy() / t.column("n_loss_tokens").to_numpy().mean())[:, None]  # scale: tokens
    mean = G.mean(axis=0)
    cos = G @ mean / np.maximum(np.linalg.norm(G, axis=1) * np.linalg.norm(mean), 1e-300)
    rows = [("proxy loss", t.column("loss").to_numpy()), ("gradient norm (token-scaled)", np.linalg.norm(G, axis=1)),
            ("−cos(g, pool mean)", -cos)]
    lines = [f"| signal | AUC corrupted vs clean ({int(y.sum())} vs {int((~y).sum())}) |", "|---|---|"]
    lines += [f"| {name} | {_auc(x, y):.3f} |" for name, x in rows]
    return "\n".join(lines)


def picked_shares(root: Path, bench) -> str:
    """Per arm and budget: the share of its picks that are corrupted records (noisy) or rewrites
    (redundant), mean over seeds, beside that share in the pool."""
    import pyarrow.parquet as pq

    manifest = json.loads((root / "setting" / "setting.json").read_text())
    marked = set(manifest.get("corrupted") or manifest.get("duplicate_of") or {})
    what = "corrupted" if manifest["setting"] == "noisy" else "rewrites"
    lines = [f"| arm | budget | picks that are {what} (pool: {len(marked) / manifest['pool_rows']:.1%}) |", "|---|---|---|"]
    for arm in bench.arms:
        for fraction in [arm.fraction] if arm.fraction else bench.fractions:
            shares = []
            for seed in bench.seeds:
                path = root / "bench" / "cells" / arm.name / f"f{fraction:g}" / f"s{seed}" / "select" / "selection.parquet"
                if path.exists():
                    uids = pq.read_table(path, columns=["uid"]).column("uid").to_pylist()
                    shares.append(sum(u in marked for u in uids) / max(1, len(uids)))
            if shares:
                lines.append(f"| {arm.name} | {fraction:g} | {sum(shares) / len(shares):.1%} |")
    table = "\n".join(lines)
    (root / "bench" / f"{what}_picked.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
