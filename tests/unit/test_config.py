"""Config: defaults, YAML, --set overrides, one clear message per bad key, README in sync."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from spice_ray.cli import app
from spice_ray.config import (
    ConfigError,
    config_reference_markdown,
    dump_config,
    load_config,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("select:\n  lam: 0.5\nsketch:\n  dim: 128\n")
    cfg = load_config(path, ["sketch.dim=64", "select.omega=0.5", "corpus.paths=[a.jsonl, b]"])
    assert cfg.select.lam == 0.5 and cfg.sketch.dim == 64 and cfg.select.omega == 0.5
    assert cfg.corpus.paths == ["a.jsonl", "b"]
    assert load_config(None).select.max_records(1000) == 100
    assert load_config(None, ["select.k=7"]).select.max_records(1000) == 7
    assert load_config(None, ["select.k=7"]).select.max_records(5) == 5
    # the saved config round-trips
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(saved) == cfg


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["select.lam=abc"], "select.lam"),
        (["select.lam=-1"], "select.lam"),
        (["sketch.dimm=3"], "sketch.dimm: unknown key"),
        (["nope.x=1"], "nope: unknown key"),
        (["train.zero_stage=1"], "train.zero_stage"),
        (["select.fraction=null"], "select.fraction or select.k"),
        (["select"], "expected section.key=value"),
        (["select.method=less"], "select.target"),
        (["select.device=tpu"], "select.device"),
        (["select.shards=0"], "select.shards"),
        (["select.checkpoint_every=0"], "select.checkpoint_every"),
    ],
)
def test_bad_value_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value)


def test_cli_reports_bad_config_in_one_line_without_traceback():
    result = CliRunner().invoke(app, ["config", "--set", "select.alpha=0"])
    assert result.exit_code == 2
    assert "select.alpha" in result.output and "Traceback" not in result.output


def test_readme_config_reference_is_current():
    text = README.read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    block = text[text.index(start) + len(start) : text.index(end)].strip()
    assert block == config_reference_markdown(), "README config reference is stale: run `python -m spice_ray.config`"


def test_flat_lora_keys_of_older_configs_set_both_models(caplog):
    with caplog.at_level("WARNING", logger="spice_ray.config"):
        cfg = load_config(None, ["model.lora_r=4", "model.lora_target_modules=[q_proj]"])
    assert cfg.model.proxy_lora == cfg.model.target_lora
    assert (cfg.model.target_lora.r, cfg.model.target_lora.target_modules, cfg.model.target_lora.alpha) == (4, ["q_proj"], 16.0)
    assert "model.proxy_lora" in caplog.text
    with pytest.raises(ConfigError, match="model.lora_r and model.target_lora both given"):
        load_config(None, ["model.lora_r=4", "model.target_lora.r=2"])
    split = load_config(None, ["model.proxy_lora.r=4", "model.target_lora.r=64"])
    assert (split.model.proxy_lora.r, split.model.target_lora.r) == (4, 64)
