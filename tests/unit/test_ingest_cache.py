"""Incremental ingest: files whose content, name and settings did not change come from the ingest
cache, and the output is byte for byte that of an ingest without a cache."""

from __future__ import annotations

import copy
import gzip
import importlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.config import Config, CorpusConfig
from spice_ray.corpus import ingest
from spice_ray.corpus.ingest_cache import PARTS, IngestCache
from spice_ray.stages import stage

ing = importlib.import_module("spice_ray.corpus.ingest")  # the module (the package exports the function)

FINGERPRINT = "test-tokenizer"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from spice_ray.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Batches of a few rows, so files span several token batches and row groups."""
    monkeypatch.setattr(ing, "TOKENIZE_BATCH", 3)
    monkeypatch.setattr(ing, "WRITE_BATCH", 4)


def row(i: int, **extra) -> dict:
    return {"instruction": f"question {i}", "output": f"answer {i}", **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def corpus(root: Path) -> Path:
    """Three files with duplicates within and across files, conflicting ids and bad rows."""
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "a.jsonl", [row(1, id="x1"), row(2), "{broken", row(3, id=7), row(1, id="x1"), "",
                                   row(4, instruction="word " * 400), row(5)])
    write_jsonl(root / "b.jsonl", [row(2), row(6, id="x1"), row(7), {"prompt": "p"}, row(8, id="7"), row(9)])
    pq.write_table(pa.Table.from_pylist([row(11, id="x9"), row(10), row(5)]), root / "c.parquet")
    return root


def outputs(result) -> tuple[bytes, bytes]:
    return Path(result.records_path).read_bytes(), Path(result.quarantine_path).read_bytes()


def counts(result) -> dict:
    """The result without timings, cache counts and per-file reuse flags."""
    d = result.to_dict()
    for k in ("seconds", "files_read", "files_reused", "records_path", "quarantine_path"):
        d.pop(k)
    d["files"] = [{k: v for k, v in f.items() if k != "reused"} for f in d["files"]]
    return d


def assert_same_as_scratch(tok, cfg, root: Path, tmp: Path, cache: IngestCache, name: str):
    """Ingest with the cache, then from scratch without it: the same bytes and counts."""
    cached = ingest(cfg, tok, tmp / f"{name}-cached", inputs=[str(root)], cache=cache)
    scratch = ingest(cfg, tok, tmp / f"{name}-scratch", inputs=[str(root)])
    assert outputs(cached) == outputs(scratch)
    assert counts(cached) == counts(scratch)
    assert (scratch.files_read, scratch.files_reused) == (len(scratch.files), 0)
    return cached


def test_cold_run_with_a_cache_writes_what_a_run_without_one_writes(tok, tmp_path):
    root = corpus(tmp_path / "corpus")
    cache = IngestCache(str(tmp_path / "cache"), FINGERPRINT)
    result = assert_same_as_scratch(tok, CorpusConfig(max_tokens=256), root, tmp_path, cache, "cold")
    assert (result.files_read, result.files_reused) == (3, 0)
    # every kind of decision is in the fixture: cross-file duplicates and conflicting ids included
    assert set(result.reasons) == {"duplicate", "duplicate_id", "invalid_json", "missing_field", "too_long"}
    assert len(list((tmp_path / "cache" / PARTS).glob("*.parquet"))) == 3


def test_unchanged_corpus_reads_no_file(tok, tmp_path, monkeypatch):
    root = corpus(tmp_path / "corpus")
    cache_dir = str(tmp_path / "cache")
    cfg = CorpusConfig(max_tokens=256)
    first = ingest(cfg, tok, tmp_path / "first", inputs=[str(root)], cache=IngestCache(cache_dir, FINGERPRINT))
    opened = []
    monkeypatch.setattr(ing, "_read_items", lambda path, info: opened.append(path) or iter(()))
    again = ingest(cfg, tok, tmp_path / "again", inputs=[str(root)], cache=IngestCache(cache_dir, FINGERPRINT))
    assert opened == []
    assert (again.files_read, again.files_reused) == (0, 3)
    assert all(f["reused"] for f in again.files)
    assert outputs(again) == outputs(first) and counts(again) == counts(first)


def test_a_corpus_grown_by_one_file_reads_that_file(tok, tmp_path, monkeypatch):
    root = corpus(tmp_path / "corpus")
    cache = IngestCache(str(tmp_path / "cache"), FINGERPRINT)
    cfg = CorpusConfig(max_tokens=256)
    ingest(cfg, tok, tmp_path / "first", inputs=[str(root)], cache=cache)
    # the new file sorts between the others and repeats rows and ids of files before and after it
    write_jsonl(root / "b2.jsonl", [row(12), row(5), row(13, id=7), row(10), row(14)])
    read = ing._read_items
    opened: list[str] = []
    monkeypatch.setattr(ing, "_read_items", lambda path, info: opened.append(path.name) or read(path, info))
    result = assert_same_as_scratch(tok, cfg, root, tmp_path, IngestCache(str(tmp_path / "cache"), FINGERPRINT), "grown")
    assert opened[0] == "b2.jsonl" and opened[1:] == ["a.jsonl", "b.jsonl", "b2.jsonl", "c.parquet"]  # then scratch
    assert (result.files_read, result.files_reused) == (1, 3)
    assert [f["reused"] for f in result.files] == [True, True, False, True]
    # c.parquet's row 10 is now a duplicate of b2.jsonl's, though c.parquet came from the cache
    quarantine = pq.read_table(result.quarantine_path).to_pylist()
    assert any(q["file"].endswith("c.parquet") and q["detail"].startswith(f"duplicate of {root}/b2.jsonl:4")
               for q in quarantine)


def test_a_changed_file_is_read_again(tok, tmp_path):
    root = corpus(tmp_path / "corpus")
    cache = IngestCache(str(tmp_path / "cache"), FINGERPRINT)
    cfg = CorpusConfig(max_tokens=256)
    ingest(cfg, tok, tmp_path / "first", inputs=[str(root)], cache=cache)
    # a.jsonl loses the rows that b.jsonl duplicated, and takes one of c.parquet's
    write_jsonl(root / "a.jsonl", [row(1, id="x1"), row(10), row(15, id="x9")])
    result = assert_same_as_scratch(tok, cfg, root, tmp_path, IngestCache(str(tmp_path / "cache"), FINGERPRINT), "changed")
    assert (result.files_read, result.files_reused) == (1, 2)
    assert result.reasons["duplicate_id"] >= 2  # b.jsonl's x1 and c.parquet's x9


def test_a_removed_file_changes_the_dedup_of_the_files_after_it(tok, tmp_path):
    root = corpus(tmp_path / "corpus")
    cache = IngestCache(str(tmp_path / "cache"), FINGERPRINT)
    cfg = CorpusConfig(max_tokens=256)
    ingest(cfg, tok, tmp_path / "first", inputs=[str(root)], cache=cache)
    (root / "a.jsonl").unlink()
    result = assert_same_as_scratch(tok, cfg, root, tmp_path, IngestCache(str(tmp_path / "cache"), FINGERPRINT), "removed")
    assert (result.files_read, result.files_reused) == (0, 2)
    assert "duplicate_id" not in result.reasons  # b.jsonl's x1 and 7 are first now


def test_a_setting_that_decides_rows_reads_every_file_again(tok, tmp_path):
    root = corpus(tmp_path / "corpus")
    cache_dir = str(tmp_path / "cache")
    ingest(CorpusConfig(max_tokens=256), tok, tmp_path / "first", inputs=[str(root)], cache=IngestCache(cache_dir, FINGERPRINT))
    for name, cfg, fingerprint in [
        ("max_tokens", CorpusConfig(max_tokens=64), FINGERPRINT),
        ("too_long", CorpusConfig(max_tokens=256, too_long="truncate"), FINGERPRINT),
        ("format", CorpusConfig(max_tokens=256, format="alpaca"), FINGERPRINT),
        ("tokenizer", CorpusConfig(max_tokens=256), "another-tokenizer"),
    ]:
        result = assert_same_as_scratch(tok, cfg, root, tmp_path, IngestCache(cache_dir, fingerprint), name)
        assert (result.files_read, result.files_reused) == (3, 0), name
    plain = copy.deepcopy(tok)
    plain.chat_template = None  # the same tokenizer files rendering with another template
    result = assert_same_as_scratch(plain, CorpusConfig(max_tokens=256), root, tmp_path, IngestCache(cache_dir, FINGERPRINT),
                                    "template")
    assert (result.files_read, result.files_reused) == (3, 0)
    # a setting that does not decide rows (the holdout split) reuses every file
    cfg = CorpusConfig(max_tokens=256, holdout_test=0.2)
    result = ingest(cfg, tok, tmp_path / "holdout", inputs=[str(root)], cache=IngestCache(cache_dir, FINGERPRINT))
    assert (result.files_read, result.files_reused) == (0, 3)


def test_a_renamed_file_is_read_again(tok, tmp_path):
    """The name gives the format and the default source: same bytes under another name are read."""
    root = corpus(tmp_path / "corpus")
    cache_dir = str(tmp_path / "cache")
    cfg = CorpusConfig(max_tokens=256)
    ingest(cfg, tok, tmp_path / "first", inputs=[str(root)], cache=IngestCache(cache_dir, FINGERPRINT))
    (root / "b.jsonl").rename(root / "b_renamed.jsonl")
    result = assert_same_as_scratch(tok, cfg, root, tmp_path, IngestCache(cache_dir, FINGERPRINT), "renamed")
    assert (result.files_read, result.files_reused) == (1, 2)
    assert "b_renamed" in result.sources


def test_a_damaged_part_is_rebuilt(tok, tmp_path, caplog):
    root = corpus(tmp_path / "corpus")
    cache_dir = tmp_path / "cache"
    cfg = CorpusConfig(max_tokens=256)
    ingest(cfg, tok, tmp_path / "first", inputs=[str(root)], cache=IngestCache(str(cache_dir), FINGERPRINT))
    parts = sorted((cache_dir / PARTS).glob("*.parquet"))
    parts[0].write_bytes(parts[0].read_bytes()[:-10])  # truncated
    data = bytearray(parts[1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit flipped
    parts[1].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="spice_ray.corpus.ingest_cache"):
        result = assert_same_as_scratch(tok, cfg, root, tmp_path, IngestCache(str(cache_dir), FINGERPRINT), "damaged")
    assert (result.files_read, result.files_reused) == (2, 1)
    assert sum("is damaged (digest mismatch)" in r.getMessage() for r in caplog.records) == 2
    assert len(list((cache_dir / PARTS).glob("*.parquet"))) == 3  # the damaged ones replaced
    again = ingest(cfg, tok, tmp_path / "again", inputs=[str(root)], cache=IngestCache(str(cache_dir), FINGERPRINT))
    assert (again.files_read, again.files_reused) == (0, 3)


def test_an_unreadable_file_is_not_cached(tok, tmp_path):
    root = corpus(tmp_path / "corpus")
    good = gzip.compress(b"".join(json.dumps(row(i)).encode() + b"\n" for i in range(20, 30)))
    (root / "d.jsonl.gz").write_bytes(good[: len(good) // 2])  # an interrupted upload
    cache_dir = str(tmp_path / "cache")
    cfg = CorpusConfig(max_tokens=256)
    first = assert_same_as_scratch(tok, cfg, root, tmp_path, IngestCache(cache_dir, FINGERPRINT), "first")
    assert first.reasons["unreadable_file"] == 1
    again = assert_same_as_scratch(tok, cfg, root, tmp_path, IngestCache(cache_dir, FINGERPRINT), "again")
    assert (again.files_read, again.files_reused) == (1, 3)


def test_a_file_that_changes_while_it_is_read_is_not_cached(tok, tmp_path, monkeypatch):
    root = corpus(tmp_path / "corpus")
    read = ing._read_items

    def rewritten(path, info):  # after it was hashed for its key, before it is read
        if path.name == "b.jsonl":
            write_jsonl(path, [row(40), row(41)])
        return read(path, info)

    monkeypatch.setattr(ing, "_read_items", rewritten)
    result = ingest(CorpusConfig(max_tokens=256), tok, tmp_path / "out", inputs=[str(root)],
                    cache=IngestCache(str(tmp_path / "cache"), FINGERPRINT))
    assert {Path(f["path"]).name: f["rows"] for f in result.files}["b.jsonl"] == 2
    assert len(list((tmp_path / "cache" / PARTS).glob("*.parquet"))) == 2  # a.jsonl and c.parquet only


def test_the_cache_needs_a_tokenizer_fingerprint(tmp_path):
    with pytest.raises(ValueError, match="needs the tokenizer's fingerprint"):
        IngestCache(str(tmp_path), "")


def test_the_stage_line_counts_files_reused_and_read():
    describe = stage("ingest").describe
    r = {"n_in": 10, "n_kept": 8, "n_quarantined": 2, "reasons": {"duplicate": 2}, "files_read": 1, "files_reused": 3}
    assert describe(Config(), r) == "10 rows in, 8 kept, 2 quarantined {'duplicate': 2} (3 files reused, 1 read)"
    old = {k: v for k, v in r.items() if not k.startswith("files_")}
    assert describe(Config(), old) == "10 rows in, 8 kept, 2 quarantined {'duplicate': 2}"
