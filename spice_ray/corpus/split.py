"""Held-out splits of the ingested records, by a hash of each record's uid.

A record's split is a pure function of its uid and ``corpus.split_seed``: with
``u = int(sha256(f"split:{seed}:{uid}")[:16], 16) / 2**64``,

    u < test                                  → test
    test ≤ u < test + validation              → validation
    otherwise, a second draw v (salt "pool") < pool_fraction → pool (what is sketched, selected, trained on)
    otherwise                                 → unused (counted, not dropped silently)

So the splits are stable: a record never changes split when the corpus grows or is reordered, the
held-out sets never overlap the pool, and every source is held out in proportion to its share (the
eval reports each source apart). ``pool_fraction`` < 1 draws a stable random subset of the rest.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

SPLITS = ("pool", "validation", "test", "unused")


def unit_hash(uid: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{uid}".encode()).hexdigest()[:16], 16) / 2**64


def split_of(uid: str, *, seed: int, validation: float, test: float, pool_fraction: float) -> str:
    u = unit_hash(uid, f"split:{seed}")
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "pool" if unit_hash(uid, f"pool:{seed}") < pool_fraction else "unused"


@dataclass
class Split:
    tables: dict[str, pa.Table]
    counts: dict[str, int]
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> source -> rows


def split_records(records: pa.Table, *, seed: int, validation: float, test: float, pool_fraction: float) -> Split:
    """``records`` cut into pool / validation / test / unused (row order kept within each)."""
    labels = [split_of(u, seed=seed, validation=validation, test=test, pool_fraction=pool_fraction)
              for u in records.column("uid").to_pylist()]
    sources = records.column("source").to_pylist() if "source" in records.column_names else [""] * len(labels)
    tables, counts, by_source = {}, {}, {}
    for name in SPLITS:
        mask = pa.array([label == name for label in labels], pa.bool_())
        tables[name] = records.filter(mask)
        counts[name] = tables[name].num_rows
        by_source[name] = dict(sorted(Counter(s for s, label in zip(sources, labels, strict=True) if label == name).items()))
    return Split(tables=tables, counts=counts, sources=by_source)
