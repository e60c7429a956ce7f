"""Corpus: formats, uids, tokenization masks, the demo corpus and ingest (with a bad-input fixture)."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spice_ray.config import CorpusConfig
from spice_ray.corpus import (
    IGNORE_INDEX,
    QUARANTINE_SCHEMA,
    RECORDS_SCHEMA,
    EncodeError,
    IngestError,
    RowError,
    canonical_uid,
    count_text_tokens,
    count_tokens,
    detect_format,
    encode,
    encode_batch,
    generate_demo_corpus,
    ingest,
    normalize_row,
    pad_batch,
    write_demo_corpus,
)
from spice_ray.corpus.demo import row_format

U, A, S = "user", "assistant", "system"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def chatml_tok(tiny_model_dir):
    from spice_ray.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.chat_template
    return tok


@pytest.fixture(scope="module")
def plain_tok(chatml_tok):
    tok = copy.deepcopy(chatml_tok)
    tok.chat_template = None
    return tok


# ---------------------------------------------------------------------------------------------- formats


def test_alpaca():
    assert normalize_row({"instruction": "Sort.", "input": "3, 1", "output": "1, 3"}) == [
        msg(U, "Sort.\n\n3, 1"),
        msg(A, "1, 3"),
    ]
    # blank or absent input: the instruction alone
    for row in ({"instruction": "Hi", "input": "  ", "output": "Hello"}, {"instruction": "Hi", "output": "Hello"}):
        assert normalize_row(row) == [msg(U, "Hi"), msg(A, "Hello")]
    assert normalize_row({"instruction": "Hi", "input": None, "output": "Yo", "system": "Be brief."}) == [
        msg(S, "Be brief."),
        msg(U, "Hi"),
        msg(A, "Yo"),
    ]


def test_prompt_response():
    assert normalize_row({"prompt": "2+2?", "response": "4"}) == [msg(U, "2+2?"), msg(A, "4")]


def test_messages_are_authoritative():
    row = {
        "instruction": "first q",
        "input": "",
        "output": "first a",
        "messages": [msg(U, "first q"), msg(A, "first a"), msg(U, "second q"), msg(A, "second a")],
    }
    assert detect_format(row) == "messages"
    assert normalize_row(row) == row["messages"]
    # explicit alpaca format reads the alpaca fields instead
    assert normalize_row(row, "alpaca") == [msg(U, "first q"), msg(A, "first a")]


def test_messages_extra_keys_and_empty_system():
    row = {"messages": [{"role": S, "content": " "}, {"role": U, "content": "q", "name": "x"}, msg(A, "a")]}
    assert normalize_row(row) == [msg(U, "q"), msg(A, "a")]


def test_sharegpt():
    row = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"},
        ]
    }
    assert normalize_row(row) == [msg(S, "sys"), msg(U, "q1"), msg(A, "a1"), msg(U, "q2"), msg(A, "a2")]
    row = {"system": "top", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert normalize_row(row) == [msg(S, "top"), msg(U, "q"), msg(A, "a")]


def test_auto_precedence():
    both = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "prompt": "p"}
    assert detect_format(both) == "sharegpt"
    assert detect_format({"prompt": "p", "response": "r", "instruction": "i", "output": "o"}) == "prompt_response"
    assert detect_format({"messages": None, "instruction": "i", "output": "o"}) == "alpaca"


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"instruction": "q"}, "missing_field"),
        ({"output": "a"}, "missing_field"),
        ({"prompt": "q"}, "missing_field"),
        ({"id": 3, "text": "hello"}, "missing_field"),
        ({"instruction": "   ", "output": "a"}, "empty_instruction"),
        ({"instruction": "", "input": "data", "output": "a"}, "empty_instruction"),
        ({"instruction": "q", "output": " \n\t"}, "empty_response"),
        ({"prompt": "q", "response": ""}, "empty_response"),
        ({"instruction": "q", "output": 42}, "wrong_type"),
        ({"instruction": ["q"], "output": "a"}, "wrong_type"),
        ({"messages": "user: hi"}, "wrong_type"),
        ({"messages": [msg(U, "q"), {"role": A, "content": 7}]}, "wrong_type"),
        ({"messages": [msg(U, "q"), "a"]}, "wrong_type"),
        ({"messages": [msg(U, "q"), {"role": A}]}, "missing_field"),
        ({"messages": []}, "empty_chat"),
        ({"messages": [msg("tool", "q"), msg(A, "a")]}, "unknown_role"),
        ({"conversations": [{"from": "bot", "value": "q"}]}, "unknown_role"),
        ({"messages": [msg(U, "q"), msg(A, "a"), msg(U, "and?")]}, "last_turn_not_assistant"),
        ({"messages": [msg(S, "s"), msg(U, "q")]}, "no_assistant_turn"),
        ({"messages": [msg(U, "q"), msg(U, "q2"), msg(A, "a")]}, "bad_turn_order"),
        ({"messages": [msg(U, "q"), msg(S, "s"), msg(A, "a")]}, "bad_turn_order"),
        ({"messages": [msg(A, "a")]}, "bad_turn_order"),
        ({"messages": [msg(U, "q"), msg(A, "")]}, "empty_response"),
        ({"instruction": "q\x00", "output": "a"}, "nul_byte"),
        ({"messages": [msg(U, "q"), msg(A, "a\x00b")]}, "nul_byte"),
        ({"instruction": "q\ud800", "output": "a"}, "invalid_unicode"),
    ],
)
def test_row_errors(row, reason):
    with pytest.raises(RowError) as err:
        normalize_row(row)
    assert err.value.reason == reason
    assert err.value.detail


def test_not_object():
    with pytest.raises(RowError) as err:
        normalize_row([1, 2])
    assert err.value.reason == "not_object"


def test_uid_is_stable_and_content_only():
    messages = [msg(U, "Capital of France?"), msg(A, "Paris.")]
    expected = hashlib.sha256(
        '[{"content":"Capital of France?","role":"user"},{"content":"Paris.","role":"assistant"}]'.encode()
    ).hexdigest()
    assert canonical_uid(messages) == expected
    alpaca = normalize_row({"instruction": "Capital of France?", "output": "Paris.", "source": "a", "id": 1})
    chat = normalize_row({"messages": [{"content": "Capital of France?", "role": U}, msg(A, "Paris.")], "source": "b"})
    assert canonical_uid(alpaca) == canonical_uid(chat) == expected
    assert canonical_uid([msg(U, "Capital of France?"), msg(A, "Paris")]) != expected
    assert canonical_uid([msg(U, "é ü 日本")]) == hashlib.sha256('[{"content":"é ü 日本","role":"user"}]'.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- demo


def test_demo_corpus(tmp_path):
    rows = generate_demo_corpus(n=300, seed=1)
    assert rows == generate_demo_corpus(n=300, seed=1)
    assert rows != generate_demo_corpus(n=300, seed=2)
    assert len(rows) == 300
    assert {row_format(r) for r in rows} == {"alpaca", "prompt_response", "messages", "sharegpt"}
    sources = Counter(r["source"] for r in rows)
    assert {"arithmetic", "capitals", "sort_list", "noisy", "multi_turn"} <= set(sources)
    normalized = [normalize_row(r) for r in rows]  # every generated row is valid
    assert any(len(m) >= 4 for m in normalized)  # multi-turn chats
    paths = write_demo_corpus(tmp_path, n=300, seed=1)
    assert len(paths) >= 2
    lines = [json.loads(line) for p in paths for line in p.read_text().splitlines()]
    assert sorted(map(json.dumps, lines)) == sorted(map(json.dumps, rows))


# ---------------------------------------------------------------------------------------------- encode


def labelled_runs(e) -> list[list[int]]:
    runs, cur = [], []
    for tok, lab in zip(e.input_ids, e.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


CHAT = [
    msg(S, "You are terse."),
    msg(U, "What is 2 + 2?"),
    msg(A, "2 + 2 = 4."),
    msg(U, "And the capital of Japan?"),
    msg(A, "The capital of Japan is Tokyo. ünïcode 😀"),
]


@pytest.mark.parametrize("which", ["chatml", "plain"])
def test_encode_labels_exactly_assistant_content(which, chatml_tok, plain_tok):
    tok = chatml_tok if which == "chatml" else plain_tok
    e = encode(tok, CHAT)
    assert e.n_tokens == len(e.input_ids) == len(e.labels) == count_tokens(tok, CHAT)
    runs = labelled_runs(e)
    contents = [m["content"] for m in CHAT if m["role"] == A]
    assert len(runs) == len(contents)  # every assistant turn, nothing else
    for run, content in zip(runs, contents):
        assert run[-1] == tok.eos_token_id  # the end-of-turn token is learned too
        assert tok.decode(run[:-1]) == content
        assert tok.decode(run, skip_special_tokens=True) == content
    # the unlabelled tokens hold every user/system text and none of the answers
    prompt = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab == IGNORE_INDEX])
    for m in CHAT:
        assert (m["content"] in prompt) == (m["role"] != A)
    if which == "plain":
        text = tok.decode(e.input_ids)
        assert text.startswith("<|system|>\nYou are terse.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n2 + 2 = 4.")


def test_encode_all_tokens_and_truncation(chatml_tok):
    full = encode(chatml_tok, CHAT)
    every = encode(chatml_tok, CHAT, loss_on="all")
    assert every.labels == every.input_ids == full.input_ids
    cut = encode(chatml_tok, CHAT, max_tokens=20)
    assert cut.truncated and not full.truncated
    assert cut.n_tokens == 20 and cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    assert encode(chatml_tok, CHAT, max_tokens=10_000).input_ids == full.input_ids
    assert encode_batch(chatml_tok, [CHAT, CHAT[1:3]]) == [full, encode(chatml_tok, CHAT[1:3])]
    with pytest.raises(ValueError):
        encode(chatml_tok, CHAT, loss_on="prompt")  # type: ignore[arg-type]


def test_encode_trimming_template(chatml_tok):
    """A Llama-2-style template that trims content and ends turns with ' ' + eos."""
    tok = copy.deepcopy(chatml_tok)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
    )
    chat = [msg(U, "2 + 2?"), msg(A, "  It is 4.  "), msg(U, "3 + 3?"), msg(A, "Six")]
    e = encode(tok, chat)
    runs = labelled_runs(e)
    assert [tok.decode(r, skip_special_tokens=True).strip() for r in runs] == ["It is 4.", "Six"]
    assert all(r[-1] == tok.eos_token_id for r in runs)


def test_count_text_tokens_matches_tokenizer_call(chatml_tok):
    texts = ["<|im_start|>user\nhi<|im_end|>\n", "plain text, ünïcode 😀", "x" * 5000, ""]
    expected = [len(ids) for ids in chatml_tok(texts, add_special_tokens=False)["input_ids"]]
    assert count_text_tokens(chatml_tok, texts) == expected
    assert count_text_tokens(chatml_tok, []) == []


def test_encode_needs_fast_tokenizer(chatml_tok):
    class Slow:
        is_fast = False
        chat_template = None
        eos_token = bos_token = None

    with pytest.raises(EncodeError, match="fast"):
        encode(Slow(), CHAT)


def test_pad_batch(chatml_tok):
    a, b = encode(chatml_tok, CHAT), encode(chatml_tok, CHAT[1:3])
    out = pad_batch([a, b], chatml_tok.pad_token_id)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, a.n_tokens)
    assert out["input_ids"].dtype == torch.long
    assert out["attention_mask"][1].sum() == b.n_tokens
    assert out["input_ids"][1, b.n_tokens :].eq(chatml_tok.pad_token_id).all()
    assert out["labels"][1, b.n_tokens :].eq(IGNORE_INDEX).all()
    assert out["labels"][1, : b.n_tokens].tolist() == b.labels
    with pytest.raises(ValueError):
        pad_batch([], 0)


# ---------------------------------------------------------------------------------------------- ingest

GOOD_ALPACA = {"instruction": "Reverse 'abc'.", "input": "", "output": "cba", "source": "strings"}


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A directory of good and bad inputs; returns (dir, {(file, line): reason}, {(file, line): source})."""
    root = tmp_path_factory.mktemp("corpus")
    sub = root / "more"
    sub.mkdir()
    bad: dict[tuple[str, int], str] = {}
    good: dict[tuple[str, int], str] = {}
    huge_output = "lorem ipsum " * 100_000  # 1.2 MB in one line

    lines: list[tuple[bytes, str | None, str | None]] = [  # (line, reason or None, source when good)
        (_line(GOOD_ALPACA), None, "strings"),
        (_line({"instruction": "Sort.", "input": "3, 1", "output": "1, 3"}), None, "mixed"),
        (_line({"prompt": "2+2?", "response": "4", "source": "math"}), None, "math"),
        (_line({"messages": [msg(S, "s"), msg(U, "hi"), msg(A, "hello")], "source": "chat"}), None, "chat"),
        (_line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}), None, "mixed"),
        (_line({"messages": [msg(U, "q1"), msg(A, "a1"), msg(U, "q2"), msg(A, "a2")], "source": ""}), None, "mixed"),
        (b'{"instruction": "broken", "output": \n', "invalid_json", None),
        (b'{"instruction": "caf\xe9", "output": "latin-1"}\n', "invalid_utf8", None),
        (_line({"instruction": "q", "output": "   "}), "empty_response", None),
        (_line({"instruction": "q"}), "missing_field", None),
        (_line({"prompt": "q", "response": 5}), "wrong_type", None),
        (_line({"instruction": "q", "output": huge_output}), "too_long", None),
        (_line({"instruction": "nul \u0000 here", "output": "a"}), "nul_byte", None),
        (_line({"messages": [msg("robot", "q"), msg(A, "a")]}), "unknown_role", None),
        (_line({"messages": [msg(U, "q1"), msg(A, "a1"), msg(U, "q2")]}), "last_turn_not_assistant", None),
        (_line({"messages": [msg(U, "Reverse 'abc'."), msg(A, "cba")], "source": "dup"}), "duplicate", None),
        (_line([1, 2, 3]), "not_object", None),
        (b"\n", "blank", None),
        (_line({"messages": [msg(U, "q")]}), "no_assistant_turn", None),
        # explicit record ids: the first kept row claims its id
        (_line({"id": "rec-1", "instruction": "What is 2+3?", "output": "5", "source": "ids"}), None, "ids"),
        (_line({"id": "rec-1", "instruction": "What is 2+4?", "output": "6", "source": "ids"}), "duplicate_id", None),
        (_line({"id": "rec-1", "instruction": "What is 2+3?", "output": "5", "source": "ids"}), "duplicate", None),
        (_line({"id": 7, "prompt": "int id", "response": "ok", "source": "ids"}), None, "ids"),
        (b'{"instruction": "q", "output": "a", "source": "bad \\ud800 source"}\n', "invalid_unicode", None),
    ]
    with (root / "mixed.jsonl").open("wb") as fh:
        for i, (data, reason, source) in enumerate(lines, 1):
            fh.write(data)
            if reason == "blank":
                continue
            if reason:
                bad[("mixed.jsonl", i)] = reason
            else:
                good[("mixed.jsonl", i)] = source
    json_rows = [
        {"prompt": "json prompt", "response": "json answer", "source": "js"},
        "not an object",
        {"instruction": "json q", "output": "json a", "source": "js"},
        GOOD_ALPACA,  # duplicate of mixed.jsonl:1
    ]
    (sub / "rows.json").write_text(json.dumps(json_rows))
    good[("more/rows.json", 1)] = "js"
    bad[("more/rows.json", 2)] = "not_object"
    good[("more/rows.json", 3)] = "js"
    bad[("more/rows.json", 4)] = "duplicate"
    table = pa.table(
        {
            "instruction": ["pq q1", None, "pq q3"],
            "input": ["", None, ""],
            "output": ["pq a1", None, "   "],
            "messages": [None, [msg(U, "pq chat"), msg(A, "pq reply")], None],
            "source": ["pq", "pq", None],
        }
    )
    pq.write_table(table, sub / "rows.parquet")
    good[("more/rows.parquet", 1)] = "pq"
    good[("more/rows.parquet", 2)] = "pq"
    bad[("more/rows.parquet", 3)] = "empty_response"
    ids = [
        {"id": "7", "prompt": "string seven", "response": "clashes with the int id 7", "source": "ids"},
        {"id": "rec-2", "prompt": "lone surrogate \ud800", "response": "x", "source": "ids"},
        {"id": "rec-2", "prompt": "fine", "response": "kept: the row above never claimed rec-2", "source": "ids"},
    ]
    (sub / "ids.json").write_text(json.dumps(ids))  # ensure_ascii: the surrogate stays a \ud800 escape
    bad[("more/ids.json", 1)] = "duplicate_id"
    bad[("more/ids.json", 2)] = "invalid_unicode"
    good[("more/ids.json", 3)] = "ids"
    (root / "binary.jsonl").write_bytes(b"\x00" * 2000 + bytes(range(256)) * 8)
    bad[("binary.jsonl", 0)] = "binary_file"
    (root / "empty.jsonl").write_bytes(b"")
    (root / "notes.txt").write_text("not a corpus file")
    (root / ".hidden.jsonl").write_text("garbage")
    return root, bad, good


def _rel(root: Path, file: str) -> str:
    return Path(file).relative_to(root).as_posix()


def test_ingest_bad_corpus(bad_corpus, chatml_tok, tmp_path, caplog):
    root, bad, good = bad_corpus
    cfg = CorpusConfig(paths=[str(root)], max_tokens=256)
    with caplog.at_level("WARNING"):
        result = ingest(cfg, chatml_tok, tmp_path / "out")
    assert "notes.txt" in caplog.text

    assert result.n_in == len(bad) + len(good)
    assert result.n_in == result.n_kept + result.n_quarantined
    assert result.n_kept == len(good) and result.n_quarantined == len(bad)
    assert result.reasons == dict(Counter(bad.values()))

    records = pq.read_table(result.records_path)
    quarantine = pq.read_table(result.quarantine_path)
    assert records.schema.equals(RECORDS_SCHEMA)
    assert quarantine.schema.equals(QUARANTINE_SCHEMA)

    got_bad = {(_rel(root, r["file"]), r["line"]): r["reason"] for r in quarantine.to_pylist()}
    assert got_bad == bad
    rec_rows = records.to_pylist()
    assert {(_rel(root, r["file"]), r["line"]): r["source"] for r in rec_rows} == good
    assert [(_rel(root, r["file"]), r["line"]) for r in rec_rows] == sorted(
        good, key=lambda k: (["binary.jsonl", "empty.jsonl", "mixed.jsonl", "more/ids.json", "more/rows.json", "more/rows.parquet"].index(k[0]), k[1])
    )
    assert result.sources == dict(sorted(Counter(good.values()).items()))

    for r in rec_rows:
        assert r["uid"] == canonical_uid(r["messages"])
        assert r["n_tokens"] == count_tokens(chatml_tok, r["messages"]) <= 256
    assert len({r["uid"] for r in rec_rows}) == len(rec_rows)

    by_key = {(_rel(root, r["file"]), r["line"]): r for r in quarantine.to_pylist()}
    huge = by_key[("mixed.jsonl", 12)]
    assert len(huge["raw"]) == 4096 and huge["raw_bytes"] > 1_000_000
    assert "tokens > max_tokens 256" in huge["detail"]
    assert by_key[("mixed.jsonl", 16)]["detail"].startswith(f"duplicate of {root / 'mixed.jsonl'}:1 ")
    assert by_key[("more/rows.json", 4)]["detail"].startswith(f"duplicate of {root / 'mixed.jsonl'}:1 ")
    assert by_key[("mixed.jsonl", 8)]["raw"].startswith('{"instruction": "caf\\xe9"')
    assert by_key[("mixed.jsonl", 1 + 6)]["raw"].startswith('{"instruction": "broken"')
    assert by_key[("more/rows.json", 2)]["raw"] == '"not an object"'
    assert by_key[("binary.jsonl", 0)]["raw_bytes"] == 2000 + 256 * 8
    # record ids: carried into the records; a later row with a kept row's id and other content is
    # quarantined naming that row; an exact duplicate stays a plain duplicate
    ids = {(_rel(root, r["file"]), r["line"]): r["id"] for r in rec_rows if r["id"] is not None}
    assert ids == {("mixed.jsonl", 20): "rec-1", ("mixed.jsonl", 23): "7", ("more/ids.json", 3): "rec-2"}
    assert by_key[("mixed.jsonl", 21)]["detail"].startswith(f"id 'rec-1' already used by {root / 'mixed.jsonl'}:20 ")
    assert by_key[("mixed.jsonl", 22)]["detail"].startswith(f"duplicate of {root / 'mixed.jsonl'}:20 ")
    assert by_key[("more/ids.json", 1)]["detail"].startswith(f"id '7' already used by {root / 'mixed.jsonl'}:23 ")
    assert by_key[("mixed.jsonl", 24)]["source"] == "bad \\ud800 source"  # escaped, so it could be written
    assert "\\ud800" in by_key[("more/ids.json", 2)]["raw"]

    files = {_rel(root, f["path"]): f for f in result.files}
    assert set(files) == {"binary.jsonl", "empty.jsonl", "mixed.jsonl", "more/ids.json", "more/rows.json", "more/rows.parquet"}
    assert files["empty.jsonl"]["rows"] == 0
    assert files["mixed.jsonl"]["blank_lines"] == 1
    assert files["mixed.jsonl"]["sha256"] == hashlib.sha256((root / "mixed.jsonl").read_bytes()).hexdigest()
    assert files["more/rows.parquet"]["sha256"] == hashlib.sha256((root / "more/rows.parquet").read_bytes()).hexdigest()
    for name, f in files.items():
        assert f["rows"] == f["kept"] + f["quarantined"]
        assert f["rows"] == sum(1 for k in list(bad) + list(good) if k[0] == name)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["quarantine.parquet", "records.parquet"]

    # deterministic: a rerun writes the same records
    again = ingest(cfg, chatml_tok, tmp_path / "out2")
    assert pq.read_table(again.records_path).equals(records)
    assert again.reasons == result.reasons


def test_bad_corpus_covers_every_kind_of_bad_input(bad_corpus):
    """The fixture mixes good rows with every kind of bad input the ingest must survive."""
    root, bad, good = bad_corpus
    kinds = {
        "invalid_json", "invalid_utf8", "empty_response", "missing_field", "wrong_type", "too_long", "nul_byte",
        "unknown_role", "last_turn_not_assistant", "duplicate", "duplicate_id", "binary_file", "not_object",
        "no_assistant_turn", "invalid_unicode",
    }
    assert kinds <= set(bad.values())
    assert (root / "empty.jsonl").stat().st_size == 0  # an empty file
    assert max((root / "mixed.jsonl").read_bytes().split(b"\n"), key=len).__len__() > 1_000_000  # a huge row
    assert len(good) >= 10


def test_ingest_explicit_files_and_errors(bad_corpus, plain_tok, tmp_path):
    root, _, _ = bad_corpus
    cfg = CorpusConfig(max_tokens=64)
    result = ingest(cfg, plain_tok, tmp_path / "a", inputs=[str(root / "more" / "rows.json")])
    assert (result.n_in, result.n_kept, result.reasons) == (4, 3, {"not_object": 1})
    with pytest.raises(IngestError, match="unsupported"):
        ingest(cfg, plain_tok, tmp_path / "b", inputs=[str(root / "notes.txt")])
    with pytest.raises(IngestError, match="not found"):
        ingest(cfg, plain_tok, tmp_path / "c", inputs=[str(root / "missing.jsonl")])
    # a .json file holding JSON lines, and a dict of rows
    (tmp_path / "lines.json").write_text(_line(GOOD_ALPACA).decode() + _line({"prompt": "p", "response": "r"}).decode())
    (tmp_path / "dict.json").write_text(json.dumps({"a": {"prompt": "x", "response": "y"}, "b": {"prompt": "z"}}))
    result = ingest(cfg, plain_tok, tmp_path / "d", inputs=[str(tmp_path / "lines.json"), str(tmp_path / "dict.json")])
    assert (result.n_in, result.n_kept, result.reasons) == (4, 3, {"missing_field": 1})


def test_ingest_demo_when_no_inputs(chatml_tok, tmp_path):
    cfg = CorpusConfig(demo_size=120, demo_seed=3)
    result = ingest(cfg, chatml_tok, tmp_path)
    assert result.n_in == 120 == result.n_kept + result.n_quarantined
    assert set(result.reasons) <= {"duplicate"}
    assert "noisy" in result.sources or result.n_kept < 120
    assert all(Path(f["path"]).parent == tmp_path / "demo_corpus" for f in result.files)


def test_model_context_from_config_or_tokenizer(tmp_path, caplog):
    """The model's context: max_position_embeddings (or n_positions, …, or a text_config's) of the
    config.json beside the tokenizer, else the tokenizer's model_max_length unless it is Hugging
    Face's "unknown" sentinel; max_tokens is capped to it with one warning line."""
    from types import SimpleNamespace

    from spice_ray.corpus.tokenize import ModelContext, effective_max_tokens, model_context

    def tok(config: dict | None, model_max_length: int = int(1e30)) -> SimpleNamespace:
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        return SimpleNamespace(name_or_path=str(folder), model_max_length=model_max_length)

    assert model_context(tok({"max_position_embeddings": 2048})).positions == 2048
    assert model_context(tok({"n_positions": 1024, "n_ctx": 512})).positions == 1024
    assert model_context(tok({"text_config": {"max_position_embeddings": 4096}})).positions == 4096
    assert model_context(tok({"max_position_embeddings": 2048}, 512)).positions == 2048  # the model's own
    assert model_context(tok(None, 512)) == ModelContext(512, "the tokenizer's model_max_length")
    assert model_context(tok({"hidden_size": 8})) is None and model_context(tok(None)) is None
    assert "max_position_embeddings in" in model_context(tok({"max_position_embeddings": 8})).source

    with caplog.at_level("WARNING"):
        assert effective_max_tokens(1024, ModelContext(2048, "x")) == 1024
        assert effective_max_tokens(1024, None) == 1024
        assert not caplog.records
        assert effective_max_tokens(100_000, ModelContext(2048, "max_position_embeddings in m/config.json")) == 2048
    [warning] = caplog.records
    assert "corpus.max_tokens=100000" in warning.getMessage() and "capped to 2048" in warning.getMessage()
