"""The selection report (issue #8) and compare_runs, on small synthetic run roots (no Ray)."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.report import compare_runs, load_run, write_report
from spice_ray.report.analysis import _average_ranks, logdet_curves, spearman
from spice_ray.report.render import fmt, pct
from spice_ray.select import read_sketches, select
from spice_ray.testing import REPORT_SCRIPT_PROMPT as SCRIPT_PROMPT
from spice_ray.testing import REPORT_SOURCES as SOURCES
from spice_ray.testing import make_report_run as make_run
from spice_ray.testing import report_messages as _messages


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, Path]:
    root = make_run(tmp_path_factory.mktemp("runs") / "full")
    return root, write_report(root)


def _html(index: Path) -> str:
    return index.read_text()


def test_files_written(full_run) -> None:
    root, index = full_run
    assert index == root / "report" / "index.html"
    out = root / "report"
    for name in ("summary.md", "source_mix.png", "token_lengths.png", "gain_decay.png", "conflict.png",
                 "logdet_vs_k.png", "train_loss.png"):
        assert (out / name).is_file(), name
    assert (out / "gain_decay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_is_self_contained(full_run) -> None:
    html = _html(full_run[1])
    assert "<title>SPICE report: full</title>" in html
    assert 'src="http' not in html and "src='http" not in html
    assert "<link" not in html and "<script" not in html  # no external CSS/JS, no JS at all
    assert not re.search(r"""(href|src)=["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    imgs = re.findall(r"<img [^>]*>", html)
    assert len(imgs) == 6
    for tag in imgs:
        src = re.search(r'src="([^"]+)"', tag).group(1)
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"


def test_counts_match_manifests(full_run) -> None:
    root, index = full_run
    html, md = _html(index), (root / "report" / "summary.md").read_text()
    ing = json.loads((root / "ingest" / "manifest.json").read_text())["result"]
    for text in (html, md):
        assert f"{ing['n_in']:,} rows in, {ing['n_kept']:,} kept, {ing['n_quarantined']:,} quarantined" in text
        assert "120 sketches of 120 records" in text
        assert "spice: 24 of 120 (20.0%)" in text
        assert "8 steps of 8 planned" in text
    # quarantine reasons with counts and an example row (file name, line, escaped detail)
    assert "<code>duplicate</code></td><td class=\"n\">2</td>" in html
    assert "other.jsonl" in html and "no &#x27;output&#x27; &lt;b&gt;field&lt;/b&gt;" in html
    assert "| duplicate | 2 | 40.0% |" in md


def test_source_mix_numbers(full_run) -> None:
    root, index = full_run
    html, md = _html(index), (root / "report" / "summary.md").read_text()
    records = pq.read_table(root / "ingest" / "records.parquet").to_pandas()
    sel = set(pq.read_table(root / "select" / "selection.parquet").column("uid").to_pylist())
    picked = records[records.uid.isin(sel)]
    assert len(picked) == 24
    for source, count in SOURCES.items():
        n_sel = int((picked.source == source).sum())
        cells = [source, fmt(count), pct(count / 120), fmt(n_sel), pct(n_sel / 24)]
        assert "| " + " | ".join(cells) + " |" in md
        assert "".join(f'<td class="n">{c}</td>' for c in cells[1:]) in html


def test_selection_and_logdet(full_run) -> None:
    root, index = full_run
    html, md = _html(index), (root / "report" / "summary.md").read_text()
    summary = json.loads((root / "select" / "summary.json").read_text())
    assert summary["k_selected"] == 24
    final = fmt(summary["logdet"])
    assert final in html and final in md
    # baselines recomputed on the same sketches
    uids, G = read_sketches(str(root / "sketch" / "sketches"))
    for m in ("spice", "logdet", "random", "gradnorm"):
        ld = select(G, 24, method=m, alpha=1.0, lam=0.1, seed=0).logdet
        assert f"| {m} | 24 | {fmt(ld)} |" in md
        assert f"<code>{m}</code></td><td class=\"n\">24</td><td class=\"n\">{fmt(ld)}</td>" in html
    assert fmt(select(G, 24, method="spice", alpha=1.0, lam=0.1).logdet) == final


def test_top_example_text_escaped(full_run) -> None:
    root, index = full_run
    html, md = _html(index), (root / "report" / "summary.md").read_text()
    sel = pq.read_table(root / "select" / "selection.parquet").to_pandas()
    top = sel.sort_values("score", ascending=False, kind="stable").iloc[0]
    i = int(top.uid[:4])
    source = [s for s, c in SOURCES.items() for _ in range(c)][i]
    prompt = _messages(i, source)[0]["content"]
    import html as htmlmod

    assert htmlmod.escape(prompt) in html
    assert f"answer {2 * i} from {source}" in html
    assert f"rank {int(top['rank'])} · score {fmt(float(top.score))}" in html
    assert prompt.replace("<", "&lt;").replace(">", "&gt;") in md or prompt in md
    assert "<script>" not in html


def test_script_prompt_is_escaped(tmp_path) -> None:
    root = make_run(tmp_path / "esc", stages=("ingest", "sketch", "select"))
    # put markup into the top example's prompt and response
    sel = pq.read_table(root / "select" / "selection.parquet").to_pandas()
    top_uid = sel.sort_values("score", ascending=False, kind="stable").uid.iloc[0]
    records = pq.read_table(root / "ingest" / "records.parquet")
    msgs = records.column("messages").to_pylist()
    j = records.column("uid").to_pylist().index(top_uid)
    msgs[j] = [{"role": "user", "content": SCRIPT_PROMPT}, {"role": "assistant", "content": "<img src=x onerror=alert(1)> | done"}]
    records = records.set_column(records.schema.get_field_index("messages"), "messages",
                                 pa.array(msgs, records.schema.field("messages").type))
    pq.write_table(records, root / "ingest" / "records.parquet")
    html = write_report(root, baselines=()).read_text()
    md = (root / "report" / "summary.md").read_text()
    assert "<script" not in html and "<img src=x" not in html
    assert "What does &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;amp; co print?" not in html  # not double-escaped
    assert "What does &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co print?" in html
    assert "&lt;img src=x onerror=alert(1)&gt; \\| done" in md
    assert "<script" not in md
    assert "baselines not computed" in html


def test_baseline_cost_guard(tmp_path) -> None:
    root = make_run(tmp_path / "guard", stages=("ingest", "sketch", "select"))
    summary = json.loads((root / "select" / "summary.json").read_text())
    md_path = root / "report" / "summary.md"
    html = write_report(root, max_gflop=0.0).read_text()
    md = md_path.read_text()
    # the run's own method falls back to its selection.parquet trace, the others are skipped
    assert f"| spice (selection.parquet) | 24 | {fmt(summary['logdet'])} | 1.000 |" in md
    for m in ("logdet", "random", "gradnorm"):
        assert f"| {m} | 24 | skipped: estimated" in md
    assert "skipped: estimated" in html
    html = write_report(root, baselines=("random",)).read_text()
    assert "<code>random</code>" in html and "<code>logdet</code>" not in html
    too_big = logdet_curves(load_run(root), max_sketch_bytes=1000)
    assert "GiB" in too_big["error"] and "baselines not computed" in too_big["error"]


def test_diagnostics(full_run) -> None:
    root, index = full_run
    html = _html(index)
    sel = pq.read_table(root / "select" / "selection.parquet").to_pandas()
    eps = sel.gain - sel.base
    assert fmt(float(eps.mean())) in html
    assert (eps <= 1e-9).all()
    assert "100.0%" in html  # the bound holds on every step
    rho = spearman(sel.conflict.to_numpy(), sel.gain.to_numpy())
    assert rho is not None and fmt(rho) in html


def test_select_diagnostics_from_summary(full_run) -> None:
    root, index = full_run
    html, md = _html(index), (root / "report" / "summary.md").read_text()
    diag = json.loads((root / "select" / "summary.json").read_text()).get("diagnostics")
    if not isinstance(diag, dict):
        pytest.skip("this select version writes no diagnostics into summary.json")
    for key, value in diag.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            shown = pct(value) if "holds" in key or key.endswith("_frac") else fmt(value)
            assert f"<code>diagnostics.{key}</code></td><td class=\"n\">{shown}</td>" in html, key
            assert f"| diagnostics.{key} | {shown} |" in md, key
    assert "engine" not in {k.split(".")[0] for k in re.findall(r"<code>(diagnostics\.[^<]+|engine\.[^<]+)</code>", html)}
    if diag.get("conflict_gain_spearman") is not None:
        assert f"| Spearman ρ(conflict, Δ) | {fmt(diag['conflict_gain_spearman'])} | summary.json: diagnostics.conflict_gain_spearman |" in md


def test_summary_diagnostics_shown(tmp_path) -> None:
    root = make_run(tmp_path / "diag", stages=("ingest", "sketch", "select"))
    path = root / "select" / "summary.json"
    summary = json.loads(path.read_text())
    summary.update(spearman_conflict_delta=-0.4321, eps_bound_holds_frac=0.875,
                   diagnostics={"curvature": 0.1234})
    path.write_text(json.dumps(summary))
    html = write_report(root, baselines=()).read_text()
    for text in ("spearman_conflict_delta", "-0.4321", "eps_bound_holds_frac", "87.5%", "diagnostics.curvature", "0.1234"):
        assert text in html


def test_spearman_fallback_matches_scipy(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=50), 1)  # ties
    y = x + rng.normal(size=50)
    assert _average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "scipy.stats", None)  # as if scipy were not installed
        ours = spearman(x, y)
        assert spearman(np.ones(5), y[:5]) is None
        assert spearman(np.arange(10.0), -np.arange(10.0)) == pytest.approx(-1.0)
    stats = pytest.importorskip("scipy.stats")
    assert ours == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(ours, abs=1e-12)


def test_train_loss_and_not_run_stages(full_run) -> None:
    root, index = full_run
    html, md = _html(index), (root / "report" / "summary.md").read_text()
    final = fmt(3.0 / 8 ** 0.3)
    assert f"final loss {final}" in html and final in md  # the torn last metrics line is skipped
    assert '<p class="notrun">eval: not run</p>' in html
    assert "eval: not run" in md


def test_missing_stages_render_not_run(tmp_path) -> None:
    root = make_run(tmp_path / "partial", stages=("ingest",))
    index = write_report(root)
    html = index.read_text()
    assert "120 kept" in html
    for stage in ("sketch", "select", "train", "eval"):
        assert f'<p class="notrun">{stage}: not run</p>' in html or (
            f"<td>{stage}</td><td><span class=\"status notrun\">not run</span>" in html
        ), stage
    assert '<span class="status notrun">not run</span></td><td>not run</td>' in html
    assert "select: not run" in (root / "report" / "summary.md").read_text()
    assert set(p.name for p in (root / "report").glob("*.png")) == {"source_mix.png", "token_lengths.png"}

    empty = tmp_path / "empty"
    empty.mkdir()
    html = write_report(empty).read_text()
    assert html.count("not run") >= 8
    assert not list((empty / "report").glob("*.png"))


def test_early_stop_marked(tmp_path) -> None:
    root = make_run(tmp_path / "early", k=100, omega=0.5, stages=("ingest", "sketch", "select"))
    summary = json.loads((root / "select" / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stop" and summary["k_selected"] < 100
    html = write_report(root).read_text()
    assert f"after {summary['k_selected']} picks (of 100 requested)" in html
    assert "threshold ω·Δ_first" in html


def test_compare_runs_overlap(tmp_path) -> None:
    a = make_run(tmp_path / "a", k=24, method="spice", stages=("ingest", "sketch", "select"))
    b = make_run(tmp_path / "b", k=30, method="random", stages=("ingest", "sketch", "select"))
    ua = set(pq.read_table(a / "select" / "selection.parquet").column("uid").to_pylist())
    ub = set(pq.read_table(b / "select" / "selection.parquet").column("uid").to_pylist())
    inter, union = len(ua & ub), len(ua | ub)
    assert 0 < inter < 24
    md = compare_runs(a, b)
    assert f"| 24 | 30 | {inter} | {union} | {24 - inter} | {30 - inter} | {fmt(inter / union)} |" in md
    for run, label in ((a, "A (a)"), (b, "B (b)")):
        s = json.loads((run / "select" / "summary.json").read_text())
        assert f"| {label} | {s['method']} |" in md and fmt(s["logdet"]) in md
    assert "eval: not run in either run" in md
    assert "| arithmetic |" in md
    # the same run against itself: full overlap
    assert "| 24 | 24 | 24 | 24 | 0 | 0 | 1.0000 |" in compare_runs(a, a)


def test_a_remote_root_reports_through_a_mirror_of_what_the_report_reads(tmp_path):
    """``write_report`` on object storage reads a local mirror (mirror_run): the same report, and no
    checkpoint or model is fetched. (The S3 round trip itself: tests/e2e/test_s3_run.py.)"""
    from spice_ray.pipeline import portable
    from spice_ray.report.render import build_report, mirror_run, render_markdown
    from spice_ray.storage import Store

    root = make_run(tmp_path / "run")
    (root / "train" / "model").mkdir()
    (root / "train" / "model" / "model.safetensors").write_bytes(b"weights")
    for path in root.glob("*/manifest.json"):  # as the pipeline writes them: paths inside the root as root:…
        path.write_text(json.dumps(portable(json.loads(path.read_text()), str(root))))
    mirror = tmp_path / "mirror"
    mirror_run(Store(str(root)), mirror, sketches=True)
    assert (mirror / "sketch" / "sketches").is_dir() and (mirror / "train" / "metrics.jsonl").is_file()
    assert not (mirror / "train" / "model").exists()

    def markdown(at: Path, location: str | None = None) -> str:
        text = render_markdown(build_report(at, baselines=("random",), location=location))
        return "\n".join(line for line in text.splitlines() if "generated" not in line.lower())

    assert markdown(mirror, location=str(root)) == markdown(root)  # named by the root it mirrors
    mirror_run(Store(str(root)), tmp_path / "lean", sketches=False)
    assert not (tmp_path / "lean" / "sketch" / "sketches").exists()
