"""Every user mistake the hostile-input review found ends in one line naming the file or key, exit 2
(3 for a held root), never a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spice_ray.cli import app

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg", strict=True))


def _cases(tmp):
    (tmp / "folder.yaml").mkdir()
    (tmp / "latin1.yaml").write_bytes("corpus:\n  paths: [caf\xe9]\n".encode("latin-1"))
    (tmp / "bomb.yaml").write_text(BOMB)
    (tmp / "afile").write_text("x")
    (tmp / "data.csv").write_text("a,b\n1,2\n")
    local = ["--executor", "local", "--root", str(tmp / "run")]
    return {
        "missing corpus": (["run", *local, "--set", f"corpus.paths=[{tmp / 'nope.jsonl'}]"], "nope.jsonl"),
        "glob without match": (["run", *local, "--set", f"corpus.paths=['{tmp}/*.jsonl']"], "*.jsonl"),
        "csv corpus": (["run", *local, "--set", f"corpus.paths=[{tmp / 'data.csv'}]"], "data.csv"),
        "config is a folder": (["run", "--config", str(tmp / "folder.yaml")], "is a directory"),
        "config not UTF-8": (["run", "--config", str(tmp / "latin1.yaml")], "not UTF-8"),
        "alias bomb": (["config", "--config", str(tmp / "bomb.yaml")], "aliases"),
        "root is a file": (["run", "--executor", "local", "--root", str(tmp / "afile")], "afile"),
        "select before sketch": (["select", *local], "has not finished"),
        "infinite lam": (["config", "--set", "select.lam=.inf"], "select.lam"),
        "unknown key": (["config", "--set", "select.lamda=1"], "select.lamda"),
    }


@pytest.mark.parametrize("case", [
    "missing corpus", "glob without match", "csv corpus", "config is a folder", "config not UTF-8", "alias bomb",
    "root is a file", "select before sketch", "infinite lam", "unknown key"])
def test_one_line_error_and_exit_2(tmp_path, case):
    args, needle = _cases(tmp_path)[case]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], result.output
    assert "Traceback" not in result.output, result.output
    assert not any(line.startswith("error:") for line in lines[:-1])  # one error line, the last
