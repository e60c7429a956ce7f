"""Ingest against hostile files: every record that parses on its own is kept or quarantined by
itself, whatever else is in its file (binary blocks, bad bytes, odd layouts, symlinks, huge rows)."""

from __future__ import annotations

import gzip
import importlib
import json
import random
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.config import CorpusConfig
from spice_ray.corpus import IngestError, RowError, ingest, normalize_row

ing = importlib.import_module("spice_ray.corpus.ingest")  # the module (the package exports the function)
reader_base = importlib.import_module("spice_ray.corpus.readers.base")  # MAX_ROW_BYTES is read there
reader_files = importlib.import_module("spice_ray.corpus.readers.files")  # READ_CHUNK is read there

INVISIBLE = ["\u200b", "\u200c\u200d", "\u2060", "\ufeff", "\u00ad", " \u200b\t\u3000\u00a0", "\ufe0f", "\u2028"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from spice_ray.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = None  # the plain template: fast
    return tokenizer


def row(i: int, **extra) -> dict:
    return {"instruction": f"question {i}", "output": f"answer {i}", **extra}


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def run(tok, out: Path, *inputs, max_tokens: int = 100_000):
    """ingest ``inputs``; returns (result, {(file name, line): reason}, {(file name, line)} kept)."""
    result = ingest(CorpusConfig(max_tokens=max_tokens), tok, out, inputs=[str(i) for i in inputs])
    quarantine = pq.read_table(result.quarantine_path).to_pylist()
    records = pq.read_table(result.records_path).to_pylist()
    assert result.n_in == result.n_kept + result.n_quarantined
    assert len(quarantine) == result.n_quarantined and len(records) == result.n_kept
    counts = Counter((Path(q["file"]).name, q["line"]) for q in quarantine)
    assert all(n == 1 for n in counts.values()), counts  # one quarantine row per bad record
    bad = {(Path(q["file"]).name, q["line"]): q["reason"] for q in quarantine}
    kept = {(Path(r["file"]).name, r["line"]) for r in records}
    return result, bad, kept


def rows_of(result) -> list[dict]:
    return pq.read_table(result.records_path).to_pylist()


def quarantine_of(result) -> list[dict]:
    return pq.read_table(result.quarantine_path).to_pylist()


# ----------------------------------------------------------------------- 1: good rows beside bad bytes


def test_nul_block_in_jsonl_quarantines_only_its_line(tok, tmp_path):
    lines = [line(row(i)) for i in range(40)]
    lines.insert(1, b'{"instruction": "q' + b"\x00" * 600 + b'", "output": "a"}')  # binary-looking head
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    _, bad, kept = run(tok, tmp_path / "out", tmp_path / "c.jsonl")
    assert bad == {("c.jsonl", 2): "binary_line"}
    assert len(kept) == 40


def test_binary_file_is_one_file_row(tok, tmp_path):
    blob = bytes(random.Random(0).randrange(256) for _ in range(20_000)) + b"\x00" * 500
    (tmp_path / "blob.jsonl").write_bytes(blob)
    (tmp_path / "blob.json").write_bytes(blob)
    result, bad, _ = run(tok, tmp_path / "out", tmp_path / "blob.jsonl", tmp_path / "blob.json")
    assert bad == {("blob.jsonl", 0): "binary_file", ("blob.json", 0): "binary_file"}
    assert all(q["raw_bytes"] == len(blob) for q in quarantine_of(result))
    assert all(f["sha256"] for f in result.files)
    # a binary-looking start but mostly text: no row parses, yet each line is its own row
    (tmp_path / "text.jsonl").write_bytes(b"\x00" * 200 + b"\n" + b"".join(b"not json %d\n" % i for i in range(300)))
    result, bad, _ = run(tok, tmp_path / "out2", tmp_path / "text.jsonl")
    assert bad == {("text.jsonl", 1): "binary_line", **{("text.jsonl", i): "invalid_json" for i in range(2, 302)}}


def test_json_array_bad_elements_are_quarantined_alone(tok, tmp_path):
    elements = [line(row(i)) for i in range(50)]
    elements[3] = b'{"instruction": "caf\xe9", "output": "latin-1"}'
    elements[10] = b'{"instruction": "q\x00", "output": "a"}'
    elements[20] = b'{"instruction": "q", "output": tru}'
    elements[30] = b'{"instruction": "q", "output": "a", "n": ' + b"7" * 5000 + b"}"
    elements[40] = b'{"instruction": "q", "output": "a", "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    (tmp_path / "a.json").write_bytes(b"[" + b", ".join(elements) + b"]")
    # pretty-printed, one element with an unterminated string: it ends at its line end
    pretty = [json.dumps(row(100 + i), indent=2).encode() for i in range(5)]
    pretty[2] = pretty[2].replace(b'"answer 102"', b'"answer 102')
    (tmp_path / "p.json").write_bytes(b"[\n" + b",\n".join(pretty) + b"\n]\n")
    _, bad, kept = run(tok, tmp_path / "out", tmp_path / "a.json", tmp_path / "p.json")
    assert bad == {
        ("a.json", 4): "invalid_utf8", ("a.json", 11): "binary_line", ("a.json", 21): "invalid_json",
        ("a.json", 31): "invalid_json", ("a.json", 41): "invalid_json", ("p.json", 3): "invalid_json",
    }
    assert len(kept) == 45 + 4


JSON_LAYOUTS = {
    "records": [row(0), row(1), row(2)],
    "wrapper": {"version": 1, "note": "x", "data": [row(0), row(1), row(2)]},
    "table": {"schema": {"fields": []}, "data": [row(0), row(1), row(2)]},
    "columns": {
        "instruction": {"0": "question 0", "1": "question 1", "2": "question 2"},
        "output": {"0": "answer 0", "1": "answer 1", "2": "answer 2"},
    },
    "split": {"columns": ["instruction", "output"], "index": [0, 1, 2],
              "data": [["question 0", "answer 0"], ["question 1", "answer 1"], ["question 2", "answer 2"]]},
    "index": {"a": row(0), "b": row(1), "c": row(2)},
}


@pytest.mark.parametrize("layout", sorted(JSON_LAYOUTS))
def test_json_layouts(layout, tok, tmp_path):
    path = tmp_path / f"{layout}.json"
    path.write_text(json.dumps(JSON_LAYOUTS[layout], indent=1 if layout == "columns" else None))
    result, bad, _ = run(tok, tmp_path / "out", path)
    assert bad == {}
    assert [(r["line"], r["messages"][0]["content"]) for r in rows_of(result)] == [
        (1, "question 0"), (2, "question 1"), (3, "question 2")
    ]


def test_pandas_to_json_layouts(tok, tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame([row(i) for i in range(4)])
    for orient in (None, "records", "split", "index", "table"):
        path = tmp_path / f"{orient}.json"
        path.write_text(frame.to_json(orient=orient) if orient else frame.to_json())
        result, bad, kept = run(tok, tmp_path / f"out-{orient}", path)
        assert bad == {} and kept == {(path.name, i) for i in (1, 2, 3, 4)}, orient
        assert [r["messages"][1]["content"] for r in rows_of(result)] == [f"answer {i}" for i in range(4)]


def test_json_column_layout_bad_cell_quarantines_its_row(tok, tmp_path):
    text = '{"instruction": {"0": "q0", "1": "q\\u0000", "2": "q2"}, "output": {"0": "a0", "1": "a1", "2": 5}}'
    (tmp_path / "cols.json").write_text(text)
    _, bad, kept = run(tok, tmp_path / "out", tmp_path / "cols.json")
    assert bad == {("cols.json", 2): "nul_byte", ("cols.json", 3): "wrong_type"}
    assert kept == {("cols.json", 1)}


def test_cr_endings_and_pretty_jsonl(tok, tmp_path):
    (tmp_path / "cr.jsonl").write_bytes(b"\r".join(line(row(i)) for i in range(5)) + b"\r\r")
    (tmp_path / "mixed.jsonl").write_bytes(line(row(5)) + b"\r\n" + line(row(6)) + b"\r" + line(row(7)) + b"\n")
    (tmp_path / "pretty.jsonl").write_text(json.dumps([row(10 + i) for i in range(3)], indent=2))
    (tmp_path / "obj.jsonl").write_text(json.dumps({"data": [row(20), row(21)]}, indent=2))
    result, bad, kept = run(tok, tmp_path / "out", tmp_path)
    assert bad == {}
    assert sorted(kept) == sorted(
        [("cr.jsonl", i) for i in range(1, 6)] + [("mixed.jsonl", i) for i in (1, 2, 3)]
        + [("pretty.jsonl", i) for i in (1, 2, 3)] + [("obj.jsonl", 1), ("obj.jsonl", 2)]
    )
    assert {Path(f["path"]).name: f["blank_lines"] for f in result.files}["cr.jsonl"] == 1


def test_symlinks(tok, tmp_path):
    root, outside = tmp_path / "corpus", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "a.jsonl").write_bytes(line(row(1)) + b"\n")
    (root / "real" / "b.jsonl").write_bytes(line(row(2)) + b"\n")
    (outside / "secret.jsonl").write_text("SECRET LINE\n")
    (outside / "more.jsonl").write_bytes(line(row(3)) + b"\n")
    (root / "alias").symlink_to(root / "real")  # inside: read once, at its real place
    (root / "link.jsonl").symlink_to(root / "a.jsonl")  # inside, a second name of a.jsonl: read once
    (root / "real" / "loop").symlink_to(root)  # a loop
    (root / "leak.jsonl").symlink_to(outside / "secret.jsonl")
    (root / "passwd.jsonl").symlink_to("/etc/passwd")
    (root / "outdir").symlink_to(outside)
    (root / "broken.jsonl").symlink_to(root / "gone.jsonl")
    result, bad, kept = run(tok, tmp_path / "out", root)
    assert kept == {("a.jsonl", 1), ("b.jsonl", 1)}
    assert bad == {
        ("leak.jsonl", 0): "symlink_outside_root", ("passwd.jsonl", 0): "symlink_outside_root",
        ("outdir", 0): "symlink_outside_root", ("broken.jsonl", 0): "unreadable_file",
    }
    for q in quarantine_of(result):
        assert q["raw"] == "" and "SECRET" not in q["detail"] and "root:" not in q["raw"]
    # naming the outside folder too makes it a root: its link is followed
    result, bad, kept = run(tok, tmp_path / "out2", root, outside)
    assert ("more.jsonl", 1) in kept and ("outdir", 0) not in bad
    assert bad[("leak.jsonl", 1)] == "invalid_json"  # read once, under the name met first


def test_compressed_and_ndjson(tok, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "a.jsonl.gz", "wb") as fh:
        fh.write(line(row(1)) + b"\n" + line(row(2)) + b"\n")
    with gzip.open(data / "b.json.gz", "wb") as fh:
        fh.write(json.dumps([row(3), row(4)]).encode())
    (data / "c.ndjson").write_bytes(line(row(5)) + b"\n")
    (data / "d.jsonl.zst").write_bytes(b"(\xb5/\xfd not really")
    result, bad, kept = run(tok, tmp_path / "out", data)
    assert len(kept) == 5
    assert {r["source"] for r in rows_of(result)} == {"a", "b", "c"}
    sha = {Path(f["path"]).name: f["sha256"] for f in result.files}
    assert sha["a.jsonl.gz"] == __import__("hashlib").sha256((data / "a.jsonl.gz").read_bytes()).hexdigest()
    if importlib.util.find_spec("zstandard") is None:
        assert bad == {("d.jsonl.zst", 0): "unsupported_compression"}
        with pytest.raises(IngestError, match="zstandard"):
            run(tok, tmp_path / "out2", data / "d.jsonl.zst")
    else:
        assert bad == {("d.jsonl.zst", 0): "unreadable_file"}
    # a truncated gzip: the rows before the cut stay, then one unreadable_file row
    whole = gzip.compress(b"".join(line(row(10 + i)) + b"\n" for i in range(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    result, bad, kept = run(tok, tmp_path / "out3", tmp_path / "cut.jsonl.gz")
    assert bad == {("cut.jsonl.gz", 0): "unreadable_file"} and len(kept) > 0


def test_globs_and_named_input_errors(tok, tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "one.jsonl").write_bytes(line(row(1)) + b"\n")
    (tmp_path / "d" / "sub" / "two.jsonl").write_bytes(line(row(2)) + b"\n")
    (tmp_path / "d" / "notes.csv").write_text("a,b\n")
    assert [p.name for p in ing.collect_files([f"{tmp_path}/d/*.jsonl"])] == ["one.jsonl"]
    assert [p.name for p in ing.collect_files([f"{tmp_path}/d/**/*.jsonl"])] == ["one.jsonl", "two.jsonl"]
    assert [p.name for p in ing.collect_files([f"{tmp_path}/d/s*"])] == ["two.jsonl"]
    cases = {
        f"{tmp_path}/d/*.parquet": "no files match",
        f"{tmp_path}/nope.jsonl": "not found",
        f"{tmp_path}/d/notes.csv": "unsupported file type",
    }
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "gone")
    cases[f"{tmp_path}/dangling.jsonl"] = "broken symlink"
    (tmp_path / "bad\nname.jsonl").touch()
    (tmp_path / "bad\nname.jsonl").unlink()
    cases[f"{tmp_path}/bad\nname.jsonl"] = "not found"
    for item, message in cases.items():
        with pytest.raises(IngestError, match=message) as err:
            run(tok, tmp_path / "out", item)
        assert "\n" not in str(err.value)
        assert Path(item).name.replace("\n", "\\n") in str(err.value)


@pytest.mark.parametrize("text", INVISIBLE)
def test_invisible_text_is_empty(text):
    with pytest.raises(RowError) as err:
        normalize_row({"instruction": "q", "output": text})
    assert err.value.reason == "empty_response"
    with pytest.raises(RowError) as err:
        normalize_row({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "a"}]})
    assert err.value.reason == "empty_instruction"
    assert normalize_row({"instruction": "q", "input": text, "output": "a", "system": text}) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    ]


# -------------------------------------------------------------------------- 2: one row cannot stop the job


def test_parser_exceptions_quarantine_the_row(tok, tmp_path):
    lines = [
        line(row(1)),
        b'{"instruction": "q", "output": "a", "n": ' + b"1" * 5000 + b"}",
        b'{"instruction": "q", "output": "a", "id": ' + b"9" * 4400 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"instruction": "q", "output": 1e999999}',
        line(row(2)),
    ]
    (tmp_path / "x.jsonl").write_bytes(b"\n".join(lines))
    result, bad, kept = run(tok, tmp_path / "out", tmp_path / "x.jsonl")
    assert bad == {("x.jsonl", 2): "invalid_json", ("x.jsonl", 3): "invalid_json", ("x.jsonl", 4): "invalid_json",
                   ("x.jsonl", 5): "wrong_type"}
    assert kept == {("x.jsonl", 1), ("x.jsonl", 6)}
    details = {q["line"]: q["detail"] for q in quarantine_of(result)}
    assert "4300 digits" in details[2] and "recursion" in details[4]


def test_oversized_row_is_rejected_unparsed_and_streamed(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(reader_base, "MAX_ROW_BYTES", 4096)
    big = b'{"instruction": "q", "output": "' + b"x" * 50_000 + b'"}'
    (tmp_path / "big.jsonl").write_bytes(line(row(1)) + b"\n" + big + b"\n" + line(row(2)) + b"\n")
    (tmp_path / "big.json").write_bytes(b"[" + line(row(3)) + b"," + big + b"," + line(row(4)) + b"]")
    result, bad, kept = run(tok, tmp_path / "out", tmp_path / "big.jsonl", tmp_path / "big.json")
    assert bad == {("big.jsonl", 2): "too_long", ("big.json", 2): "too_long"}
    assert len(kept) == 4
    for q in quarantine_of(result):
        assert q["raw_bytes"] == len(big) and len(q["raw"]) == ing.RAW_LIMIT and "MAX_ROW_BYTES" in q["detail"]
    # a 16 MB line is never held whole: reading it peaks far below its size
    monkeypatch.setattr(reader_files, "READ_CHUNK", 1 << 18)
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as fh:
        fh.write(line(row(5)) + b"\n" + b'{"output": "' + b"y" * (16 << 20) + b'"}\n' + line(row(6)) + b"\n")
    info = ing._FileInfo(path=str(path), bytes=path.stat().st_size)
    tracemalloc.start()
    try:
        items = list(ing._read_items(path, info))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [i.reason for i in items] == [None, "too_long", None] and items[1].raw_bytes == (16 << 20) + 14
    assert peak < 4 << 20, peak


def test_file_removed_or_failing_during_ingest(tok, tmp_path, monkeypatch):
    for k, name in enumerate("abc"):
        (tmp_path / f"{name}.jsonl").write_bytes(b"".join(line(row(1000 * k + i)) + b"\n" for i in range(300)))
    real_collect = ing.collect_files

    def collect_then_remove(inputs):
        files = real_collect(inputs)
        (tmp_path / "b.jsonl").unlink()
        return files

    monkeypatch.setattr(ing, "collect_files", collect_then_remove)
    result, bad, kept = run(tok, tmp_path / "out", tmp_path)
    assert bad == {("b.jsonl", 0): "unreadable_file"} and len(kept) == 600
    monkeypatch.undo()

    # reading fails half-way (an I/O error): the rows read before it stay
    monkeypatch.setattr(reader_files, "READ_CHUNK", 4096)
    real_readinto, calls = ing._Hashing.readinto, Counter()

    def failing(self, buffer):
        if Path(self.raw.name).name == "c.jsonl":
            calls["c"] += 1
            if calls["c"] > 3:
                raise OSError(5, "Input/output error")
        return real_readinto(self, buffer)

    monkeypatch.setattr(ing._Hashing, "readinto", failing)
    result, bad, kept = run(tok, tmp_path / "out2", tmp_path / "c.jsonl")
    assert bad == {("c.jsonl", 0): "unreadable_file"}
    assert 0 < len(kept) < 300 and "after" in quarantine_of(result)[0]["detail"]


# ---------------------------------------------------------------------------------------------- 3: fuzz

LIMIT = 16384  # MAX_ROW_BYTES in the fuzz test (the big-integer and deep rows fit under it)
TEXT = "abc xyz \" \\ { } [ ] , : é 日本 🙂 \n \t"


def fuzz_text(rng: random.Random, i: int) -> str:
    return "".join(rng.choice(TEXT) for _ in range(rng.randrange(0, 40))) + f" #{i}"


def good_row(rng: random.Random, i: int) -> dict:
    q, a = fuzz_text(rng, i), fuzz_text(rng, i)
    kind = rng.randrange(3)
    if kind == 0:
        return {"instruction": q, "input": "", "output": a}
    if kind == 1:
        return {"prompt": q, "response": a}
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def bad_json(rng: random.Random, i: int, base: bytes, lines: bool) -> tuple[bytes, str]:
    """A corrupted row (one JSON text, no line break) and the reason it must be quarantined for;
    ``lines``: for a JSON-lines file (where a row may also be cut short)."""
    kinds = ["nul", "utf8", "bigint", "deep", "type", "invisible", "huge", "list", "token"]
    kind = rng.choice(kinds + ["cut"] * lines)
    if kind == "cut":  # a truncated line, maybe inside a UTF-8 character
        data = base[: rng.randrange(2, len(base) - 1)]
        data = data if not data.rstrip().endswith(b"}") else b'{"instruction": '
        return data, "invalid_json" if data.decode("utf-8", errors="ignore").encode() == data else "invalid_utf8"
    if kind == "nul":
        cut = rng.randrange(1, len(base))
        return base[:cut] + b"\x00" * rng.randrange(1, 700) + base[cut:], "binary_line"
    if kind == "utf8":
        cut = base.index(b'"', 2) + 1
        return base[:cut] + b"\xff\xfe" + base[cut:], "invalid_utf8"
    if kind == "bigint":
        return b'{"instruction": "q", "output": "a", "n": ' + b"8" * 4500 + b"}", "invalid_json"
    if kind == "deep":
        return b'{"prompt": "q", "response": "a", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", "invalid_json"
    if kind == "type":
        return line({"instruction": i, "output": "a"}), "wrong_type"
    if kind == "invisible":
        return line({"prompt": f"q{i}", "response": rng.choice(INVISIBLE)}), "empty_response"
    if kind == "huge":
        return line({"instruction": "q", "output": "z" * (LIMIT + rng.randrange(1, 3 * LIMIT))}), "too_long"
    if kind == "list":
        return line([1, "two", i]), "not_object"
    return b'{"instruction": "q", "output": tru}', "invalid_json"


def fuzz_jsonl(rng: random.Random, rows: list[tuple[bytes, str | None]]) -> tuple[bytes, dict[int, str | None]]:
    """A JSON-lines file with random line endings, blank lines and maybe a BOM."""
    eol = rng.choice([b"\n", b"\r\n", b"\r"])
    out, expect, n = [b"\xef\xbb\xbf"] if rng.random() < 0.2 else [], {}, 0
    for data, reason in rows:
        if rng.random() < 0.1:
            out.append(b"  " + eol)
            n += 1
        n += 1
        out.append(data + eol)
        expect[n] = reason
    return b"".join(out), expect


def fuzz_json(rng: random.Random, rows: list[tuple[bytes, str | None]], objs: list, keep: int) -> tuple[bytes, dict[int, str | None]]:
    """A JSON array, compact or pretty-printed (where a good element other than ``keep`` may get an
    unterminated string)."""
    pretty = rng.random() < 0.5
    parts, expect = [], {}
    for n, ((data, reason), obj) in enumerate(zip(rows, objs), 1):
        if pretty and reason is None and n != keep + 1 and rng.random() < 0.15:
            data = json.dumps({"instruction": "q", "output": f"a{n}"}, indent=1).encode().replace(b'"}', b"}")
            data, reason = data.replace(f'"a{n}"'.encode(), f'"a{n}'.encode()), "invalid_json"
        elif pretty and reason is None:
            data = json.dumps(obj, indent=1, ensure_ascii=rng.random() < 0.5).encode()
        parts.append(data)
        expect[n] = reason
    sep = b",\n" if pretty else rng.choice([b",", b", "])
    return b"[" + (b"\n" if pretty else b"") + sep.join(parts) + b"]", expect


def fuzz_parquet(rng: random.Random, path: Path, first: int) -> dict[int, str | None]:
    instruction, output, expect = [], [], {}
    for n in range(1, rng.randrange(3, 12)):
        kind = rng.choice(["good", "good", "good", "empty", "invisible", "missing", "nul", "huge"])
        q, a = f"pq question {first + n}", f"pq answer {first + n}"
        reason = {"good": None, "empty": "empty_response", "invisible": "empty_response", "missing": "missing_field",
                  "nul": "nul_byte", "huge": "too_long"}[kind]
        a = {"empty": " ", "invisible": rng.choice(INVISIBLE), "nul": "a\x00b", "huge": "w" * 2 * LIMIT}.get(kind, a)
        instruction.append(q)
        output.append(None if kind == "missing" else a)
        expect[n] = reason
    pq.write_table(pa.table({"instruction": instruction, "output": output}), path)
    return expect


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_hostile_files(seed, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(reader_base, "MAX_ROW_BYTES", LIMIT)
    rng = random.Random(seed)
    root = tmp_path / "corpus"
    root.mkdir()
    expected: dict[tuple[str, int], str | None] = {}
    counter = 0
    for f in range(24):
        kind = rng.choice(["jsonl", "jsonl", "json", "parquet", "jsonl.gz"])
        name = f"f{f:02d}.{kind}"
        if kind == "parquet":
            expect = fuzz_parquet(rng, root / name, counter)
            counter += len(expect)
        else:
            rows, objs = [], []
            n_rows = rng.randrange(2, 14)
            good_at = rng.randrange(n_rows)  # every file has a good row (else it may be binary as a whole)
            for r in range(n_rows):
                counter += 1
                obj = good_row(rng, counter)
                data = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()
                objs.append(obj)
                rows.append((data, None) if r == good_at or rng.random() < 0.5 else bad_json(rng, counter, data, kind != "json"))
            content, expect = fuzz_json(rng, rows, objs, good_at) if kind == "json" else fuzz_jsonl(rng, rows)
            (root / name).write_bytes(gzip.compress(content) if kind.endswith(".gz") else content)
        expected.update({(name, n): reason for n, reason in expect.items()})

    result, bad, kept = run(tok, tmp_path / "out", root)
    want_bad = {k: r for k, r in expected.items() if r is not None}
    want_kept = {k for k, r in expected.items() if r is None}
    assert bad == want_bad, ({k: v for k, v in bad.items() if want_bad.get(k) != v}, {k: v for k, v in want_bad.items() if bad.get(k) != v})
    assert kept == want_kept, (sorted(kept - want_kept), sorted(want_kept - kept))
    assert result.n_in == len(expected)
    for f in result.files:
        assert f["rows"] == f["kept"] + f["quarantined"] == sum(1 for k in expected if k[0] == Path(f["path"]).name)


def test_too_long_rows_kept_truncated_when_asked(tmp_path):
    """corpus.too_long=truncate keeps an over-long row (cut to max_tokens later) when a response
    token survives the cut, and still quarantines one whose response would be cut off entirely."""
    from spice_ray.config import CorpusConfig
    from spice_ray.corpus.ingest import ingest
    from spice_ray.models import load_tokenizer, materialize_builtin

    tok = load_tokenizer(str(materialize_builtin("builtin:tiny-llama", tmp_path / "tiny")))
    rows = [
        {"instruction": "Say hi.", "output": "hi " * 400},  # long response: truncated, kept
        {"instruction": "word " * 400, "output": "ok"},  # long prompt: the response is cut off
        {"instruction": "Say yes.", "output": "yes"},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = ingest(CorpusConfig(paths=[str(path)], max_tokens=64, too_long="truncate"), tok, tmp_path / "t")
    assert (kept.n_kept, kept.n_quarantined, kept.n_truncated) == (2, 1, 1) and kept.reasons == {"too_long": 1}
    n_tokens = pq.read_table(kept.records_path).column("n_tokens").to_pylist()
    assert max(n_tokens) == 64
    strict = ingest(CorpusConfig(paths=[str(path)], max_tokens=64), tok, tmp_path / "q")
    assert (strict.n_kept, strict.reasons) == (1, {"too_long": 2})


def _quarantine_of(result) -> list[dict]:
    return pq.read_table(result.quarantine_path).to_pylist()


@pytest.mark.parametrize("extra_first", [False, True])
def test_dict_of_rows_with_a_metadata_entry(extra_first, tok, tmp_path):
    """{"0": row, ..., "29": row, "version": "1"}: the 30 rows are kept, the extra entry is one
    not_object row that names its key (it used to take the 30 rows along as one missing_field row)."""
    rows = {str(i): row(i) for i in range(30)}
    document = {"version": "1", **rows} if extra_first else {**rows, "version": "1"}
    (tmp_path / "d.json").write_text(json.dumps(document, indent=1))
    result, bad, kept = run(tok, tmp_path / "out", tmp_path / "d.json")
    version_line = 1 if extra_first else 31
    assert bad == {("d.json", version_line): "not_object"}
    assert kept == {("d.json", i) for i in range(1, 32) if i != version_line}
    assert sorted(r["messages"][1]["content"] for r in rows_of(result)) == sorted(f"answer {i}" for i in range(30))
    [q] = _quarantine_of(result)
    assert "'version'" in q["detail"] and q["raw"] == '"1"'


def test_dict_of_rows_with_several_extra_entries(tok, tmp_path):
    """Extra entries of any JSON type beside a dict of rows (the rows the majority): each one
    quarantined by itself."""
    document = {"a": row(0), "b": row(1), "n": 3, "c": row(2), "tags": ["x"], "d": row(3), "note": None}
    (tmp_path / "d.json").write_text(json.dumps(document))
    _, bad, kept = run(tok, tmp_path / "out", tmp_path / "d.json")
    assert bad == {("d.json", 3): "not_object", ("d.json", 5): "not_object", ("d.json", 7): "not_object"}
    assert kept == {("d.json", 1), ("d.json", 2), ("d.json", 4), ("d.json", 6)}


def test_zero_byte_parquet_is_quarantined_with_a_warning(tok, tmp_path, caplog):
    """A 0-byte .parquet (or .jsonl.gz) is a failed upload: one unreadable_file row and a warning,
    never silently accepted as an empty file; an empty .jsonl stays an empty file (no rows)."""
    (tmp_path / "upload.parquet").write_bytes(b"")
    (tmp_path / "upload.jsonl.gz").write_bytes(b"")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "good.jsonl").write_bytes(line(row(1)) + b"\n")
    with caplog.at_level("WARNING", logger="spice_ray.corpus.ingest"):
        result, bad, kept = run(tok, tmp_path / "out", tmp_path)
    assert bad == {("upload.parquet", 0): "unreadable_file", ("upload.jsonl.gz", 0): "unreadable_file"}
    assert kept == {("good.jsonl", 1)}
    details = {Path(q["file"]).name: q["detail"] for q in _quarantine_of(result)}
    assert "0 bytes" in details["upload.parquet"] and "Parquet" in details["upload.parquet"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("upload.parquet" in m and "0 bytes" in m for m in warned), warned
    files = {Path(f["path"]).name: f for f in result.files}
    assert files["upload.parquet"]["quarantined"] == 1 and files["empty.jsonl"]["rows"] == 0
    assert files["upload.parquet"]["sha256"]  # the sha256 of an empty file, still recorded


def _long_row(tok, n_words: int) -> tuple[dict, int]:
    from spice_ray.corpus import count_tokens, normalize_row

    value = {"instruction": "Summarise.", "output": " ".join(f"w{i % 997}" for i in range(n_words))}
    return value, count_tokens(tok, normalize_row(value))


def test_max_tokens_is_capped_to_the_model_context(tok, tmp_path, caplog):
    """corpus.max_tokens=100000 with a model of 2,048 positions (max_position_embeddings in its
    config.json): the limit is 2,048, said in one warning line; an 11,000-token row is too_long."""
    value, n_tokens = _long_row(tok, 4000)
    assert n_tokens > 10_000  # the 11,000-token row of the issue
    (tmp_path / "c.jsonl").write_bytes(line(value) + b"\n" + line(row(1)) + b"\n")
    with caplog.at_level("WARNING"):
        result, bad, kept = run(tok, tmp_path / "out", tmp_path / "c.jsonl", max_tokens=100_000)
    assert bad == {("c.jsonl", 1): "too_long"} and kept == {("c.jsonl", 2)}
    assert result.max_tokens == 2048
    [q] = _quarantine_of(result)
    assert f"{n_tokens} tokens > 2048" in q["detail"] and "100000" in q["detail"]
    capped = [r.getMessage() for r in caplog.records if "capped" in r.getMessage()]
    assert len(capped) == 1 and "\n" not in capped[0]
    assert "100000" in capped[0] and "2048" in capped[0] and "max_position_embeddings" in capped[0]


def test_max_tokens_capped_rows_truncated_when_asked(tok, tmp_path):
    """corpus.too_long=truncate with the capped limit: the long row is kept, cut to the context."""
    value, n_tokens = _long_row(tok, 4000)
    (tmp_path / "c.jsonl").write_bytes(line(value) + b"\n")
    cfg = CorpusConfig(max_tokens=100_000, too_long="truncate")
    result = ingest(cfg, tok, tmp_path / "out", inputs=[str(tmp_path / "c.jsonl")])
    assert (result.n_kept, result.n_truncated, result.max_tokens) == (1, 1, 2048)
    assert rows_of(result)[0]["n_tokens"] == 2048 < n_tokens


def test_max_tokens_under_the_model_context_is_left_alone(tok, tmp_path, caplog):
    (tmp_path / "c.jsonl").write_bytes(line(row(1)) + b"\n")
    with caplog.at_level("WARNING"):
        result, bad, _ = run(tok, tmp_path / "out", tmp_path / "c.jsonl", max_tokens=1024)
    assert result.max_tokens == 1024 and bad == {}
    assert not [r for r in caplog.records if "capped" in r.getMessage()]


def test_stages_after_ingest_encode_within_the_capped_limit():
    """Sketch, train and eval see corpus.max_tokens as ingest applied it (capped to the context)."""
    from spice_ray.config import Config
    from spice_ray.stages import StageContext, within_context

    cfg = Config.model_validate({"corpus": {"max_tokens": 100_000, "too_long": "truncate"}})

    def ctx(upstream):
        return StageContext(cfg=cfg, executor=None, dirs=None, upstream=upstream, root_uri="")

    assert within_context(ctx({"ingest": {"max_tokens": 2048}})).corpus.max_tokens == 2048
    assert cfg.corpus.max_tokens == 100_000, "the run's config is not changed"
    assert within_context(ctx({"ingest": {"records": "r"}})) is cfg  # an ingest written before the cap
    assert within_context(ctx({"ingest": {"max_tokens": 100_000}})) is cfg
