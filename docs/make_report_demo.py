"""Build a small run root with real records and synthetic sketches, then write its report.

    python docs/make_report_demo.py /tmp/report-demo        # -> /tmp/report-demo/report/index.html

Ingest is real (``spice_ray.corpus.ingest`` with the built-in tokenizer) over the first rows of each
file in ``../shared/data`` (or the generated demo corpus when that is absent), plus a file of broken
rows so the quarantine has content. The sketches are random, not gradients: one direction per
source plus noise, scaled by n_tokens^(-1/4), with one source pointing against another so the
conflict term has something to do. Selection is the real ``select_to_dir`` (SPICE, 10%). Train and
eval are not run (the report shows them as such). This is what produced docs/report.png.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spice_ray.config import CorpusConfig, SelectConfig
from spice_ray.corpus.demo import write_demo_corpus
from spice_ray.corpus.ingest import ingest
from spice_ray.models.builtin import _tokenizer_texts, train_tokenizer
from spice_ray.report import write_report
from spice_ray.select.stage import select_to_dir

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROWS_PER_FILE = 250
DIM = 64

BROKEN = [
    '{"instruction": "Name three primary colors.", "output": "Red, yellow and blue."}',
    '{"instruction": "Name three primary colors.", "output": "Red, yellow and blue."}',  # duplicate
    '{"instruction": "Translate to French: cat", "output": ',  # truncated JSON
    '["not", "an", "object"]',
    '{"instruction": "", "output": "an answer to nothing"}',
    '{"prompt": "Summarize the text.", "response": "   "}',
]


def _manifest(root: Path, stage: str, result: dict) -> None:
    d = root / stage
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "key": f"demo-{stage}", "result": result}, indent=2))
    (d / "_SUCCESS").write_text(f"demo-{stage}\n")


def build(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    files = sorted(SHARED_DATA.glob("*.jsonl"))
    if files:
        for f in files:
            with f.open() as src, (corpus / f.name).open("w") as dst:
                for i, line in enumerate(src):
                    if i >= ROWS_PER_FILE:
                        break
                    dst.write(line)
    else:
        write_demo_corpus(corpus, n=600, seed=0)
    (corpus / "broken.jsonl").write_text("\n".join(BROKEN) + "\n")
    (root / "config.yaml").write_text("select:\n  method: spice\n  fraction: 0.1\n  alpha: 1.0\n  lam: 0.1\n  seed: 0\n")

    tokenizer = train_tokenizer(_tokenizer_texts())
    res = ingest(CorpusConfig(paths=[str(corpus)], max_tokens=1536), tokenizer, root / "ingest")
    _manifest(root, "ingest", {
        "records": str(root / "ingest" / "records.parquet"), "quarantine": str(root / "ingest" / "quarantine.parquet"),
        "n_in": res.n_in, "n_kept": res.n_kept, "n_quarantined": res.n_quarantined,
        "reasons": res.reasons, "sources": res.sources,
    })

    records = pq.read_table(root / "ingest" / "records.parquet", columns=["uid", "source", "n_tokens"])
    sources = records.column("source").to_pylist()
    names = sorted(set(sources))
    rng = np.random.default_rng(0)
    centers = {s: rng.normal(size=DIM) for s in names}
    if len(names) >= 2:
        centers[names[-1]] = -0.8 * centers[names[0]] + 0.2 * centers[names[-1]]
    n_tok = records.column("n_tokens").to_numpy().astype(np.float64)
    scale = 3.0 / np.maximum(n_tok, 8.0) ** 0.25
    G = np.stack([0.7 * centers[s] + rng.normal(size=DIM) for s in sources]) * scale[:, None]
    G = G.astype(np.float32)
    sk = root / "sketch" / "sketches"
    sk.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "uid": records.column("uid"),
        "sketch": pa.FixedSizeListArray.from_arrays(pa.array(G.ravel(), pa.float32()), DIM),
        "loss": pa.array(rng.uniform(0.8, 3.5, size=len(sources))),
        "grad_norm": pa.array(np.linalg.norm(G, axis=1).astype(np.float64)),
        "n_tokens": records.column("n_tokens"),
    }), sk / "part-00000.parquet")
    _manifest(root, "sketch", {"sketches": str(sk), "n_records": len(sources), "n_sketches": len(sources), "num_workers": 1})

    summary = select_to_dir(str(sk), str(root / "select"), SelectConfig(method="spice", fraction=0.1, alpha=1.0, lam=0.1))
    _manifest(root, "select", {"selection": str(root / "select" / "selection.parquet"), **summary})
    return write_report(root)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="spice-report-demo-"))
    print(build(out))
