"""What a person (or a script) reads (issue 22): tables never cut (rich on a terminal, tab-separated
when piped, --json), stage lines without logger names, Ray's noise kept off the terminal. (The
bench's inner pipeline call leaving the root's status.json and latest.json to the user's last run
runs the pipeline: tests/integration/test_terminal_output_runs.py.)"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from spice_ray.bench import BenchSection, full_data_note, markdown, table_rows, verdict
from spice_ray.cli import app
from spice_ray.logs import ConsoleFilter, ConsoleFormatter, drop_native_lines, route_framework_logs
from spice_ray.tables import print_table, tsv

LONG_RUN = "20261207T101112.123456Z-0123456789abcdef"


def _console(width: int, terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, force_terminal=terminal, color_system=None), out


# ------------------------------------------------------------------------------------------ tables


def test_piped_table_is_tab_separated_with_whole_values():
    console, out = _console(20, terminal=False)  # narrow and not a terminal: a pipe
    print_table(console, ["run", "state"], [[LONG_RUN, "succeeded"], ["b\tc", "x\ny"]], title="runs of a root")
    lines = out.getvalue().splitlines()
    assert lines == ["# runs of a root", "run\tstate", f"{LONG_RUN}\tsucceeded", "b c\tx y"]


RUN_COLUMNS = ["run", "state", "records", "sketched", "selected", "method", "log det", "eval loss", "redone"]
RUN_ROW = [LONG_RUN, "succeeded (bench)", "123456", "123456", "12345", "spice", "-1234.567", "1.3944",
           "models,ingest,sketch,select,train,eval"]


@pytest.mark.parametrize("width", [64, 80, 100, 120])
def test_terminal_table_folds_instead_of_cutting(width):
    console, out = _console(width, terminal=True)
    print_table(console, RUN_COLUMNS, [RUN_ROW, RUN_ROW])
    text = out.getvalue()
    assert "┏" in text and "…" not in text and "..." not in text
    assert max(len(line) for line in text.splitlines()) <= width  # never wider than the terminal (rich would crop)
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    assert first_column == LONG_RUN * 2  # every character of the long value, folded


def test_terminal_too_narrow_for_a_table_prints_each_row_as_lines():
    console, out = _console(40, terminal=True)
    print_table(console, RUN_COLUMNS, [RUN_ROW])
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 40
    joined = "".join(text.split())
    assert all("".join(v.split()) in joined for v in RUN_ROW)


def test_terminal_table_keeps_every_character_of_a_long_cell():
    console, out = _console(24, terminal=True)
    print_table(console, ["run"], [[LONG_RUN]])
    cells = "".join(ch for line in out.getvalue().splitlines() for ch in line if ch not in "│┃┏┓┗┛┡┩└┘─━╇ ")
    assert LONG_RUN in cells and "…" not in out.getvalue()


def test_column_widths_share_the_room_and_keep_narrow_columns_whole():
    from spice_ray.tables import column_widths

    assert column_widths(["a", "b"], [["1", "2"]], 80) is None  # fits: rich's own widths
    widths = column_widths(RUN_COLUMNS, [RUN_ROW], 100)
    assert widths is not None and sum(widths) <= 100 - (3 * len(RUN_COLUMNS) + 1)
    assert widths[RUN_COLUMNS.index("method")] == len("method")  # a narrow column keeps its width
    assert widths[0] == widths[-1]  # the two wide ones share the rest


def test_tsv_header_then_rows():
    assert tsv(["a", "b"], [["1", "2"]]) == "a\tb\n1\t2\n"


# ------------------------------------------------------------------------------------ spice-ray runs


def _history(root: Path, name: str, state: str = "succeeded", inner: bool = False) -> None:
    entry = root / "history" / name
    entry.mkdir(parents=True)
    stages = {
        "ingest": {"skipped": False, "result": {"n_kept": 30, "n_quarantined": 1}},
        "sketch": {"skipped": False, "result": {"n_computed": 30}},
        "select": {"skipped": False, "result": {"k_selected": 3, "method": "spice", "logdet": -12.3456}},
        "eval": {"skipped": False, "result": {"sets": {"test": {"tuned": {"loss": 1.39441}}}}},
    }
    (entry / "run.json").write_text(json.dumps({"state": state, "inner": inner, "stages": stages}))


def test_runs_piped_prints_whole_values_as_tsv(tmp_path):
    _history(tmp_path, LONG_RUN)
    _history(tmp_path, LONG_RUN.replace("1011", "1112"), inner=True)
    result = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["run", "state", "records", "sketched", "selected", "method", "log det", "eval loss", "redone"]
    first = lines[1].split("\t")
    assert first == [LONG_RUN, "succeeded", "30", "30", "3", "spice", "-12.346", "1.3944", "ingest,sketch,select,eval"]
    assert lines[2].split("\t")[1] == "succeeded (bench)"
    assert "…" not in result.stdout


def test_runs_json_parses_with_raw_values(tmp_path):
    _history(tmp_path, LONG_RUN)
    result = CliRunner().invoke(app, ["runs", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["run"] == LONG_RUN and row["logdet"] == -12.3456 and row["eval_loss"] == 1.39441
    assert row["redone"] == ["ingest", "sketch", "select", "eval"] and row["inner"] is False


def test_runs_json_of_an_empty_root_is_an_empty_list(tmp_path):
    result = CliRunner().invoke(app, ["runs", str(tmp_path), "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout) == []


# ------------------------------------------------------------------------------------ the comparison


def _summary(diffs: list[float]) -> tuple[dict, BenchSection]:
    from spice_ray.bench import summarize

    seeds = list(range(len(diffs)))
    bench = BenchSection.model_validate({"arms": [{"name": "spice"}, {"name": "random"},
                                                  {"name": "full", "fraction": 1.0, "seeds": [0]}],
                                         "seeds": seeds, "splits": ["test"]})

    def cell(arm, fraction, seed, loss):
        return {"arm": arm, "fraction": fraction, "seed": seed, "source_mix": {"x": 1}, "train": {"tokens": 10, "steps": 5, "seconds": 2.0 + seed},
                "eval": {"test": {"overall": {"loss": loss, "tokens": 10}, "sources": {"x": {"loss": loss, "tokens": 10}}}}}

    cells = [cell("random", 0.1, s, 1.40 + 0.001 * s) for s in seeds]
    cells += [cell("spice", 0.1, s, 1.40 + 0.001 * s + d) for s, d in zip(seeds, diffs, strict=True)]
    cells.append(cell("full", 1.0, 0, 1.30))
    base = {"eval": {"test": {"overall": {"loss": 1.5}, "sources": {"x": {"loss": 1.5}}}}}
    return summarize(cells, base, bench), bench


def test_verdict_says_which_arm_is_better_by_how_much_and_whether_the_interval_excludes_zero():
    summary, bench = _summary([-0.010, -0.011, -0.012])
    text = verdict(summary, bench, "spice", "test")
    assert text.startswith("spice (10%) trains a better model than random (10%)")
    assert "0.0110" in text and "lower for spice" in text and "over 3 seeds" in text and "excludes zero" in text

    summary, bench = _summary([-0.010, 0.012, 0.001])
    text = verdict(summary, bench, "spice", "test")
    assert text.startswith("random (10%) trains a better model than spice (10%)") and "includes zero" in text

    assert verdict(summary, bench, "random", "test") is None  # the baseline is not paired with itself


def test_full_arm_with_one_seed_and_the_gap_note():
    summary, bench = _summary([-0.010, -0.011, -0.012])
    columns, rows = table_rows(summary, bench, "test")
    cells = {r[0]: r for r in rows}
    assert cells["full"][2] == "1.3000 (1 seed)" and "±" in cells["spice"][2]
    assert columns[2] == "loss (mean ± sd, 3 seeds)"
    assert columns[-1] == "train s" and cells["spice"][-1] == "3" and cells["full"][-1] == "2"  # mean wall seconds over seeds
    note = full_data_note(summary, bench, "test")
    assert note.startswith("All the data (1 seed): held-out test loss 1.3000") and "spice closes" in note
    assert markdown(summary, bench).splitlines()[2] == "| " + " | ".join(columns) + " |"
    assert "sketching the pool took 363 s" in markdown(summary | {"sketch_seconds": 363.0}, bench)


@pytest.mark.parametrize("terminal", [True, False])
def test_the_comparison_is_a_table_then_the_verdict(monkeypatch, terminal):
    from spice_ray import cli

    console, out = _console(100, terminal=terminal)
    monkeypatch.setattr(cli, "console", console)
    summary, bench = _summary([-0.010, -0.011, -0.012])
    cli._print_comparison(summary, bench, arm="spice")
    text = out.getvalue()
    assert "|---|" not in text and "…" not in text and "excludes zero" in text and "All the data (1 seed)" in text
    if terminal:
        assert "┏" in text and max(len(line) for line in text.splitlines()) <= 100
    else:
        lines = text.splitlines()
        assert lines[0] == "# test (base model: 1.5000)" and lines[1].startswith("arm\tbudget\t")
        assert [line.split("\t")[0] for line in lines[2:5]] == ["spice", "random", "full"]


def test_demo_comparison_uses_three_seeds_and_full_data_once(monkeypatch):
    import spice_ray.bench as bench_mod
    from spice_ray.config import load_config

    seen = {}
    monkeypatch.setattr(bench_mod, "run_bench", lambda cfg, bench, executor=None: seen.setdefault("bench", bench))
    cfg = load_config(None, ["train.seed=5"])
    _, bench = bench_mod.demo_comparison(cfg, executor=object())  # type: ignore[arg-type]
    assert bench.seeds == [5, 6, 7] and bench.splits == ["test"]
    arms = {a.name: a for a in bench.arms}
    assert arms[cfg.select.method].seeds is None and arms["random"].seeds is None and arms["full"].seeds == [5]
    assert len(bench_mod._cells(bench)) == 7  # 3 + 3 + 1 cells


# ------------------------------------------------------------------------------------------- logging


def _record(name: str, level: int, msg: str = "sketch: started") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_stage_lines_carry_no_level_or_logger_name():
    line = ConsoleFormatter().format(_record("spice_ray.pipeline", logging.INFO))
    assert line.split(" ", 1)[1] == "sketch: started" and "INFO" not in line and "spice_ray" not in line
    warning = ConsoleFormatter().format(_record("spice_ray.pipeline", logging.WARNING, "sketch: recomputing"))
    assert warning.split(" ", 1)[1] == "warning: sketch: recomputing"


@pytest.mark.parametrize(("name", "level", "shown"), [
    ("spice_ray.pipeline", logging.INFO, True),
    ("spice_ray.cli", logging.INFO, True),
    ("spice_ray.sketch.stage", logging.INFO, False),  # per-batch progress: the bar shows it
    ("spice_ray.pipeline", logging.DEBUG, False),
    ("spice_ray.lease", logging.WARNING, True),
    ("ray._private.authentication.authentication_token_setup", logging.WARNING, False),
    ("ray.data._internal.progress", logging.WARNING, False),  # "Progress bars disabled"
    ("ray", logging.INFO, False),
    ("py.warnings", logging.WARNING, False),
    ("transformers", logging.ERROR, True),  # anyone's error is shown
])
def test_console_filter(name, level, shown):
    assert ConsoleFilter().filter(_record(name, level)) is shown


def test_a_record_ray_data_hides_stays_hidden():
    record = _record("ray.data._internal.execution", logging.ERROR)
    record.hide = True
    assert ConsoleFilter().filter(record) is False


def test_framework_loggers_lose_their_terminal_handlers_and_propagate():
    name = "spice-test-framework"
    framework = logging.getLogger(name)
    stream, file_handler = logging.StreamHandler(io.StringIO()), logging.FileHandler(os.devnull)
    framework.addHandler(stream)
    framework.addHandler(file_handler)
    framework.propagate = False
    try:
        route_framework_logs((name,))
        assert framework.propagate and stream not in framework.handlers and file_handler in framework.handlers
        assert framework.level == logging.INFO
    finally:
        framework.removeHandler(file_handler)
        file_handler.close()


def test_native_false_alarm_is_dropped_and_the_rest_passes(tmp_path):
    """fd 2 is a file here; a native line (os.write on fd 2, as Ray's C++ logger does) that matches
    is dropped, every other line and a partial last line pass, and fd 2 is restored."""
    target = tmp_path / "stderr.txt"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT)
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        with drop_native_lines(("max_restarts > 0",)):
            os.write(2, b"[2026-12-07 10:11:12,123 E 1 1] core_worker.cc:2465: Actor ... has constructor arguments in the "
                        b"object store and max_restarts > 0. If ...\n")
            os.write(2, b"a real error\n")
            os.write(2, b"partial")
        os.write(2, b"\nafter\n")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    assert target.read_text() == "a real error\npartial\nafter\n"


def test_init_ray_disables_token_auth_only_for_a_new_local_cluster(monkeypatch):
    from spice_ray import ray_executor

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_executor._starts_local_cluster("local")
    assert not ray_executor._starts_local_cluster("10.0.0.1:6379")
    assert not ray_executor._starts_local_cluster("ray://head:10001")


@pytest.mark.parametrize(("preset", "expected"), [(None, "disabled"), ("token", "token")])
def test_init_ray_quiet_local_start(monkeypatch, preset, expected):
    """A Ray this process starts gets RAY_AUTH_MODE=disabled unless the user set it; Ray's loggers are
    routed through the root logger; workers' output stays off the terminal. ray.init is not called."""
    ray = pytest.importorskip("ray")
    from spice_ray import ray_executor

    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    if preset:
        monkeypatch.setenv("RAY_AUTH_MODE", preset)
    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw, auth=os.environ.get("RAY_AUTH_MODE")))
    monkeypatch.setattr(ray_executor, "_starts_local_cluster", lambda address: True)
    from spice_ray.logs import FRAMEWORK_LOGGERS

    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in FRAMEWORK_LOGGERS}
    try:
        ray_executor.init_ray(None, verbose=False)
        assert seen["auth"] == expected and seen["log_to_driver"] is False
        ray_logger = logging.getLogger("ray")
        assert ray_logger.propagate and not any(type(h).__name__ == "PlainRayHandler" for h in ray_logger.handlers)
    finally:
        for name, (handlers, propagate, level) in saved.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
            logging.getLogger(name).setLevel(level)


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("file descriptors", allow_module_level=True)


def test_raylet_notices_go_to_the_log_not_stdout(capsys):
    """Ray's error-listener thread prints the raylet's worker-pool warning to stdout; after
    route_raylet_notices it is a `ray` WARNING record (driver.log), and other output still prints."""
    from ray._private import worker as ray_worker

    from spice_ray.logs import route_raylet_notices

    original = ray_worker.print_to_stdstream
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("ray").addHandler(handler)
    try:
        route_raylet_notices()
        route_raylet_notices()  # idempotent: wrapped once
        ray_worker.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started"], "pid": "raylet",
                                       "is_err": False}, ignore_prefix=False)
        assert "worker processes" not in capsys.readouterr().out
        assert [(r.levelname, r.getMessage()) for r in records] == [("WARNING", "(raylet) WARNING: 8 PYTHON worker processes have been started")]
        ray_worker.print_to_stdstream({"lines": ["hello from a task"], "pid": 1234, "ip": "127.0.0.1", "is_err": False,
                                       "task_name": "t", "actor_name": None, "job": "01"}, ignore_prefix=True)
        assert "hello from a task" in capsys.readouterr().out
    finally:
        ray_worker.print_to_stdstream = original
        logging.getLogger("ray").removeHandler(handler)
