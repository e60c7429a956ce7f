"""Bench settings built from the real corpus, where diversity and conflict should matter (issue 19).

Every setting starts from the same records as ``benchmarks/quality.py`` (``../shared/data`` outside
the pico-llama proxy slice) and the same split rule (``corpus.split_seed``, ``holdout_validation``,
``holdout_test``, ``pool_fraction`` of the bench config): the validation and test rows are exactly
the standard setting's, untouched, and only pool records are changed or added. The written corpus
holds the pool and the held-out rows only, so the bench runs it with ``corpus.pool_fraction: 1``
(the pool is then everything not held out). A changed record has another uid (the uid hashes the
content) and so could fall into a held-out split: such a change is not made (counted in the
manifest), so no corrupted or duplicated text ever reaches validation or test.

- ``standard``: the pool as it is.
- ``redundant``: a quarter of the pool records get two templated rewrites each (the instruction
  wrapped in boilerplate, the response unchanged), so a third of the grown pool is near-duplicates
  in clusters of three. Real instruction corpora look like this: P3/T0 and FLAN issue one task under
  many prompt templates, Self-Instruct and Alpaca re-generate paraphrases of their seeds, and
  scraped sets repeat popular prompts with wrapper text that exact dedup (ours hashes the content)
  does not catch. The response, and so most of the gradient, is shared within a cluster: a
  selection that ranks rows one by one picks whole clusters, a diverse one picks one per cluster.
- ``noisy``: a fifth of the pool records get a wrong response: within one source, the chosen
  records are ordered by response length and consecutive ones swap responses, so a wrong answer is
  as long as the right one would be (length cannot tell them apart) and in the same style (source).
- ``targeted`` (LESS's setting): one source is the target task. Its pool records leave the pool but
  for 100 of them, the target examples (``target.txt``, their uids; ``select.target`` takes them out
  of every method's candidates); the model is evaluated on that source's held-out rows
  (``bench.sources``). The source is gsm8k: grade-school maths with worked answers, a task the rest
  of the pool holds only scattered pieces of (flan_cot's chains of thought, alpaca's arithmetic), so
  which of them a selection finds is what it is measured on.

Deterministic: every choice is a hash of the record's uid and a salt, never a random generator.

    python benchmarks/settings.py noisy --out runs/settings/noisy   # writes corpus/ and setting.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spice_ray.corpus.formats import RowError, canonical_uid, normalize_row  # noqa: E402
from spice_ray.corpus.split import split_of, unit_hash  # noqa: E402

SETTINGS = ("standard", "redundant", "noisy", "targeted")
REDUNDANT_SHARE = 0.25
REDUNDANT_COPIES = 2
NOISY_SHARE = 0.2
TARGET_SOURCE = "gsm8k"
TARGET_EXAMPLES = 100
# Boilerplate a prompt collection wraps a task in; {t} is the original instruction.
TEMPLATES = (
    "Please answer the following.\n\n{t}",
    "{t}\n\nGive your answer below.",
    "Task: {t}",
    "Here is a request from a user.\n{t}\nRespond to it.",
    "{t}\nAnswer carefully.",
    "Instruction:\n{t}",
    "Read the following and reply.\n\n{t}",
    "{t}\n\nYour response:",
)


@dataclass(frozen=True)
class SplitRule:
    """The corpus section's split settings (what ingest will apply)."""

    seed: int = 0
    validation: float = 0.03
    test: float = 0.05
    pool_fraction: float = 0.27

    def of(self, uid: str) -> str:
        return split_of(uid, seed=self.seed, validation=self.validation, test=self.test, pool_fraction=self.pool_fraction)

    def held_out(self, uid: str) -> bool:
        return self.of(uid) in ("validation", "test")


@dataclass
class Built:
    rows: list[dict[str, Any]]
    manifest: dict[str, Any] = field(default_factory=dict)


def uid_of(row: dict[str, Any]) -> str | None:
    """The uid ingest gives this row (None where ingest will quarantine it)."""
    try:
        return canonical_uid(normalize_row(row))
    except RowError:
        return None


def build(setting: str, rows: Iterable[dict[str, Any]], rule: SplitRule) -> Built:
    """The setting's corpus: the pool (changed as the setting says) and the held-out rows."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; one of {', '.join(SETTINGS)}")
    pool, held, counts = [], [], Counter()
    for row in rows:
        uid = uid_of(row)
        split = rule.of(uid) if uid else "unparsable"
        counts[split] += 1
        if split == "pool":
            pool.append((uid, row))
        elif split in ("validation", "test"):
            held.append(row)
    built = {"standard": lambda: Built([r for _, r in pool]), "redundant": lambda: _redundant(pool, rule),
             "noisy": lambda: _noisy(pool, rule), "targeted": lambda: _targeted(pool)}[setting]()
    built.rows = built.rows + held
    built.manifest |= {"setting": setting, "rule": rule.__dict__, "input_splits": dict(sorted(counts.items())),
                       "pool_rows": len(built.rows) - len(held), "held_out_rows": len(held)}
    return built


def _redundant(pool: list[tuple[str, dict[str, Any]]], rule: SplitRule) -> Built:
    out, duplicates, skipped = [], {}, 0
    for uid, row in pool:
        out.append(row)
        if unit_hash(uid, "redundant") >= REDUNDANT_SHARE:
            continue
        start = int(unit_hash(uid, "template") * len(TEMPLATES))
        made = 0
        for j in range(len(TEMPLATES)):
            if made == REDUNDANT_COPIES:
                break
            t = (start + j) % len(TEMPLATES)
            copy_row = copy.deepcopy(row)
            copy_row["id"] = f"{row['id']}~rw{t}"
            copy_row["instruction"] = TEMPLATES[t].format(t=row["instruction"])
            new_uid = uid_of(copy_row)
            if new_uid is None or rule.held_out(new_uid):
                skipped += 1
                continue
            duplicates[new_uid] = uid
            out.append(copy_row)
            made += 1
    return Built(out, {"duplicate_of": duplicates, "rewrites": len(duplicates), "rewrites_held_out_skipped": skipped})


def _noisy(pool: list[tuple[str, dict[str, Any]]], rule: SplitRule) -> Built:
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, (uid, row) in enumerate(pool):
        if unit_hash(uid, "noisy") < NOISY_SHARE:
            by_source[str(row.get("source", ""))].append(i)
    rows = [row for _, row in pool]
    corrupted, skipped = {}, 0
    for source in sorted(by_source):
        chosen = sorted(by_source[source], key=lambda i: (len(rows[i]["output"]), pool[i][0]))
        for a, b in zip(chosen[0::2], chosen[1::2]):
            ra, rb = copy.deepcopy(rows[a]), copy.deepcopy(rows[b])
            ra["output"], rb["output"] = rows[b]["output"], rows[a]["output"]
            ua, ub = uid_of(ra), uid_of(rb)
            if ua is None or ub is None or rule.held_out(ua) or rule.held_out(ub) or rows[a]["output"] == rows[b]["output"]:
                skipped += 1
                continue
            rows[a], rows[b] = ra, rb
            corrupted[ua], corrupted[ub] = pool[a][0], pool[b][0]
    return Built(rows, {"corrupted": corrupted, "corrupted_rows": len(corrupted), "pairs_held_out_skipped": skipped})


def _targeted(pool: list[tuple[str, dict[str, Any]]]) -> Built:
    """The pool without the target source, but for its ``TARGET_EXAMPLES`` examples (lowest hash)."""
    own = sorted((unit_hash(uid, "target"), uid) for uid, row in pool if row.get("source") == TARGET_SOURCE)
    target = sorted(uid for _, uid in own[:TARGET_EXAMPLES])
    keep = set(target)
    rows = [row for uid, row in pool if row.get("source") != TARGET_SOURCE or uid in keep]
    return Built(rows, {"target_source": TARGET_SOURCE, "target": target, "target_source_dropped": len(own) - len(target)})


def read_rows(data: Path, keep: Any = lambda row: True) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(data.glob("*.jsonl")):
        with f.open() as src:
            rows.extend(row for row in map(json.loads, src) if keep(row))
    return rows


def write(built: Built, out: Path) -> Path:
    """``out/corpus/<source>.jsonl``, ``out/setting.json`` (and ``out/target.txt``, the targeted
    setting's target uids); written once (a ``.done`` marker)."""
    corpus = out / "corpus"
    if (out / ".done").exists():
        return corpus
    corpus.mkdir(parents=True, exist_ok=True)
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in built.rows:
        by_source[str(row.get("source", "unknown"))].append(row)
    for source, rows in sorted(by_source.items()):
        (corpus / f"{source}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (out / "setting.json").write_text(json.dumps(built.manifest, indent=1, sort_keys=True))
    if built.manifest.get("target"):
        (out / "target.txt").write_text("".join(uid + "\n" for uid in built.manifest["target"]))
    (out / ".done").write_text("ok\n")
    return corpus


def main() -> int:
    from quality import SHARED, in_proxy_slice

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("setting", choices=SETTINGS)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    built = build(args.setting, read_rows(SHARED / "data", lambda r: not in_proxy_slice(r["id"])), SplitRule())
    write(built, args.out)
    print(json.dumps({k: v for k, v in built.manifest.items() if not isinstance(v, dict) or len(v) < 20}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
