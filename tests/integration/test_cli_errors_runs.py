"""Every user mistake the hostile-input review found ends in one line naming the file or key, exit 2
(3 for a held root), never a traceback: the mistakes the run and stage commands meet once they have
started the pipeline (the local executor; the models stage runs first, so the built-in models are
materialized). The mistakes caught while the config is read: tests/unit/test_cli_errors.py."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spice_ray.cli import app
from spice_ray.testing import assert_one_line_error


def _cases(tmp):
    (tmp / "afile").write_text("x")
    (tmp / "data.csv").write_text("a,b\n1,2\n")
    local = ["--executor", "local", "--root", str(tmp / "run")]
    return {
        "missing corpus": (["run", *local, "--set", f"corpus.paths=[{tmp / 'nope.jsonl'}]"], "nope.jsonl"),
        "glob without match": (["run", *local, "--set", f"corpus.paths=['{tmp}/*.jsonl']"], "*.jsonl"),
        "csv corpus": (["run", *local, "--set", f"corpus.paths=[{tmp / 'data.csv'}]"], "data.csv"),
        "root is a file": (["run", "--executor", "local", "--root", str(tmp / "afile")], "afile"),
        "select before sketch": (["select", *local], "has not finished"),
    }


@pytest.mark.parametrize("case", ["missing corpus", "glob without match", "csv corpus", "root is a file", "select before sketch"])
def test_one_line_error_and_exit_2(tmp_path, case):
    args, needle = _cases(tmp_path)[case]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.output, needle)
