"""benchmarks/settings.py: the redundant, noisy and targeted pools are deterministic and never touch held-out rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_settings", REPO / "benchmarks" / "settings.py")
settings = importlib.util.module_from_spec(_spec)
sys.modules["bench_settings"] = settings  # dataclasses look their module up
_spec.loader.exec_module(settings)

RULE = settings.SplitRule(seed=0, validation=0.1, test=0.1, pool_fraction=0.5)


def _rows(n: int = 600) -> list[dict]:
    sources = ["alpha", "beta", "gamma"]
    return [{"id": f"r{i}", "source": sources[i % 3], "instruction": f"Question number {i}?", "input": "",
             "output": "answer " * (1 + i % 17) + str(i)} for i in range(n)]


def _by_uid(rows: list[dict]) -> dict[str, dict]:
    return {settings.uid_of(r): r for r in rows}


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown setting"):
        settings.build("tiny", _rows(), RULE)


@pytest.mark.parametrize("setting", ["standard", "redundant", "noisy", "targeted"])
def test_held_out_rows_are_the_standard_ones_and_nothing_changed_lands_in_them(setting):
    rows = _rows()
    built = settings.build(setting, rows, RULE)
    held = {u for u, r in _by_uid(rows).items() if RULE.held_out(u)}
    out = _by_uid(built.rows)
    assert held and held <= set(out), "every held-out row is written, unchanged"
    assert not {u for u in out if RULE.held_out(u)} - held, "no new or changed row falls into validation/test"
    assert not {u for u in out if RULE.of(u) == "unused" and u in _by_uid(rows)}, "unused rows are left out"
    # Deterministic: the same input gives the same bytes.
    again = settings.build(setting, rows, RULE)
    assert json.dumps(again.rows, sort_keys=True) == json.dumps(built.rows, sort_keys=True)
    assert again.manifest == built.manifest


def test_redundant_adds_templated_rewrites_of_pool_rows():
    rows = _rows()
    built = settings.build("redundant", rows, RULE)
    dup = built.manifest["duplicate_of"]
    pool = {u for u in _by_uid(rows) if RULE.of(u) == "pool"}
    assert len(dup) > 0.3 * len(pool), "about a quarter of the pool gets two rewrites"
    out = _by_uid(built.rows)
    for new, orig in dup.items():
        assert orig in pool
        rewrite, source = out[new], _by_uid(rows)[orig]
        assert rewrite["output"] == source["output"] and source["instruction"] in rewrite["instruction"]
        assert rewrite["instruction"] != source["instruction"] and rewrite["id"].startswith(source["id"] + "~rw")
    assert len({r["id"] for r in built.rows}) == len(built.rows), "ids stay unique"


def test_noisy_swaps_responses_within_a_source_at_similar_length():
    rows = _rows()
    built = settings.build("noisy", rows, RULE)
    corrupted = built.manifest["corrupted"]
    pool = [u for u in _by_uid(rows) if RULE.of(u) == "pool"]
    assert 0.1 * len(pool) < len(corrupted) < 0.25 * len(pool)
    out, original = _by_uid(built.rows), _by_uid(rows)
    assert len(built.rows) == len(rows) - sum(RULE.of(u) == "unused" for u in original), "rows replaced, none added"
    for new, orig in corrupted.items():
        wrong, right = out[new], original[orig]
        assert wrong["id"] == right["id"] and wrong["instruction"] == right["instruction"]
        assert wrong["output"] != right["output"]
        donor = next(r for r in rows if r["output"] == wrong["output"])
        assert donor["source"] == right["source"], "the wrong answer comes from the same source"
        assert abs(len(wrong["output"].split()) - len(right["output"].split())) <= 2, "and has about the same length"


def test_targeted_keeps_only_the_target_examples_of_the_target_source(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "TARGET_SOURCE", "beta")
    monkeypatch.setattr(settings, "TARGET_EXAMPLES", 20)
    rows = _rows()
    built = settings.build("targeted", rows, RULE)
    pool = {u: r for u, r in _by_uid(rows).items() if RULE.of(u) == "pool"}
    out = {u: r for u, r in _by_uid(built.rows).items() if RULE.of(u) == "pool"}
    target = built.manifest["target"]
    assert len(target) == 20 and target == sorted(target)
    assert {u for u, r in out.items() if r["source"] == "beta"} == set(target), "of the target source, only its examples stay"
    assert {u for u, r in out.items() if r["source"] != "beta"} == {u for u, r in pool.items() if r["source"] != "beta"}
    assert built.manifest["target_source_dropped"] == sum(r["source"] == "beta" for r in pool.values()) - 20
    assert any(r["source"] == "beta" and RULE.held_out(u) for u, r in _by_uid(built.rows).items()), "its held-out rows stay"
    settings.write(built, tmp_path)
    assert (tmp_path / "target.txt").read_text().split() == target
