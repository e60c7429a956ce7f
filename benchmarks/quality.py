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
    args = ap.parse_args()
    if not any(SHARED.joinpath("data").glob("*.jsonl")):
        print(f"skipped: the real corpus is not at {SHARED / 'data'} (set SPICE_SHARED)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from spice_ray.bench import load_bench, markdown, run_bench

    root = Path(args.root).resolve()
    corpus = prepare_corpus(SHARED / "data", root / "corpus")
    pico = SHARED / "models" / "pico-llama"
    overrides = [f"run.root={root}", f"corpus.paths=[{corpus}]", f"model.proxy={pico}", f"model.target={pico}", *args.overrides]
    cfg, bench = load_bench(args.config, overrides)
    t0 = time.time()
    summary = run_bench(cfg, bench)
    print(markdown(summary, bench))
    print(f"bench: {time.time() - t0:.0f} s; results under {root / 'bench'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
