"""Ingest of all of ../shared/data with the built-in tokenizer: every line accounted for."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spice_ray.config import CorpusConfig
from spice_ray.corpus import ingest
from spice_ray.testing import shared_data_or_skip

logger = logging.getLogger(__name__)


@pytest.mark.real_data
def test_ingest_all_shared_data(tiny_model_dir, tmp_path):
    from spice_ray.models import load_tokenizer

    data = shared_data_or_skip()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    line_counts = {}
    for path in sorted(data.rglob("*.jsonl")):
        with path.open("rb") as fh:
            line_counts[str(path)] = sum(1 for line in fh if line.strip())

    start = time.perf_counter()
    result = ingest(CorpusConfig(paths=[str(data)], max_tokens=4096), tokenizer, tmp_path)
    seconds = time.perf_counter() - start
    print(f"\ningested {result.n_in} rows from {len(result.files)} files in {seconds:.1f}s: "
          f"{result.n_kept} kept, {result.n_quarantined} quarantined {result.reasons}")

    assert result.n_in == sum(line_counts.values())
    assert result.n_in == result.n_kept + result.n_quarantined
    assert {f["path"]: f["rows"] for f in result.files} == line_counts
    for f in result.files:
        assert f["rows"] == f["kept"] + f["quarantined"]
        assert len(f["sha256"]) == 64

    records = pq.read_table(result.records_path, columns=["uid", "source", "file"]).to_pylist()
    quarantine = pq.read_table(result.quarantine_path, columns=["source", "file", "reason"]).to_pylist()
    assert len(records) == result.n_kept and len(quarantine) == result.n_quarantined
    assert len({r["uid"] for r in records}) == len(records)
    assert dict(Counter(r["source"] for r in records)) == result.sources
    # per file, the per-source counts of kept + quarantined add up to the file's rows
    for path, n_lines in line_counts.items():
        per_source = Counter(r["source"] for r in records if r["file"] == path)
        per_source.update(q["source"] for q in quarantine if q["file"] == path)
        assert sum(per_source.values()) == n_lines
        # every record of the shared data names its own file stem as source
        assert set(per_source) == {Path(path).stem}
    assert set(result.reasons) <= {"duplicate", "too_long"}  # the real data is clean otherwise
