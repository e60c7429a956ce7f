"""Every user mistake the hostile-input review found ends in one line naming the file or key, exit 2
(3 for a held root), never a traceback. Here the mistakes caught while the config is read; those the
run command meets once it has started the pipeline (a missing corpus, a root that is a file, a stage
before its inputs): tests/integration/test_cli_errors_runs.py."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spice_ray.cli import app
from spice_ray.testing import assert_one_line_error

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg", strict=True))


def _cases(tmp):
    (tmp / "folder.yaml").mkdir()
    (tmp / "latin1.yaml").write_bytes("corpus:\n  paths: [caf\xe9]\n".encode("latin-1"))
    (tmp / "bomb.yaml").write_text(BOMB)
    return {
        "config is a folder": (["run", "--config", str(tmp / "folder.yaml")], "is a directory"),
        "config not UTF-8": (["run", "--config", str(tmp / "latin1.yaml")], "not UTF-8"),
        "alias bomb": (["config", "--config", str(tmp / "bomb.yaml")], "aliases"),
        "infinite lam": (["config", "--set", "select.lam=.inf"], "select.lam"),
        "unknown key": (["config", "--set", "select.lamda=1"], "select.lamda"),
    }


@pytest.mark.parametrize("case", ["config is a folder", "config not UTF-8", "alias bomb", "infinite lam", "unknown key"])
def test_one_line_error_and_exit_2(tmp_path, case):
    args, needle = _cases(tmp_path)[case]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.output, needle)
