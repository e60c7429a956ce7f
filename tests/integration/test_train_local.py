"""The train loop in one process, as the local executor trains (``LocalExecutor.train``: a
``LocalSession`` over the tokenized rows, world size 1): checkpoints and resume (plain torch, and
DeepSpeed under gloo), and the plain-torch engine's checkpoints read without unpickling. Each test
trains the built-in tiny model for a few steps. The stage's parts without training:
tests/unit/test_train.py; the 2-worker Ray Train runs: tests/integration/test_train_ray.py."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from spice_ray.testing import train_config, train_records


def _tokenized_table(tiny_model_dir: Path, n: int = 24):
    from spice_ray.models import load_tokenizer
    from spice_ray.train.trainer import tokenize_selection

    table = pa.Table.from_pylist(train_records(n)).select(["uid", "messages"])
    return tokenize_selection(table, load_tokenizer(str(tiny_model_dir)), max_tokens=1024)


@pytest.mark.parametrize("engine", ["torch", pytest.param("deepspeed", marks=[pytest.mark.slow, pytest.mark.deepspeed])])
@pytest.mark.timeout(300)
def test_local_session_loop_checkpoints_and_resumes(tiny_model_dir: Path, tmp_path: Path, engine: str) -> None:
    """``run_loop`` in this process (world size 1; DeepSpeed under gloo): 3 steps with a checkpoint
    at 2, then a second call that resumes at 3 and runs to 5 — the same steps as one run of 5."""
    import contextlib

    from spice_ray.train.loop import LocalSession, local_process_group, run_loop
    from spice_ray.train.trainer import loop_config

    table = _tokenized_table(tiny_model_dir)
    group = local_process_group(tmp_path / "pg") if engine == "deepspeed" else contextlib.nullcontext()
    with group:
        results = []
        for max_steps in (3, 5):
            cfg = train_config(max_steps=max_steps, num_workers=1, micro_batch_size=4, gradient_checkpointing=True, engine=engine)
            config = loop_config(
                cfg, model_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir),
                export_dir=str(tmp_path / "model"), use_gpu=False, pad_id=0, total_steps=5,  # one schedule: 3 steps, then resume to 5
            )
            session = LocalSession(table, tmp_path / "ckpt", keep=2)
            results.append(run_loop(config, session))
        straight = run_loop(dict(config, export_dir=str(tmp_path / "model-straight")), LocalSession(table, tmp_path / "ckpt-straight", keep=2))
    first, second = results
    assert [m["loss"] for m in second["history"]] == pytest.approx([m["loss"] for m in straight["history"]], rel=1e-6)
    assert first["resumed_from_step"] is None and [m["step"] for m in first["history"]] == [1, 2, 3]
    assert second["resumed_from_step"] == 3 and [m["step"] for m in second["history"]] == [1, 2, 3, 4, 5]
    assert second["history"][:3] == first["history"]
    assert second["steps_this_process"] == 2 and second["tokens_per_s"] > 0
    assert 0 <= first["padding_fraction"] < 1
    assert len(list((tmp_path / "ckpt").glob("checkpoint_*"))) == 2
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert first["engine"] == second["engine"] == engine
    if engine == "torch":  # its checkpoints are safetensors + JSON: nothing to unpickle
        files = {p.name for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
        assert files == {"train_state.json", "engine_state.json", "trainable.safetensors", "optimizer.safetensors"}


class _Planted:
    """Unpickling this creates a file: the stand-in for code an attacker plants in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_never_loaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The plain-torch engine's checkpoints (one-worker training, the warm-up) are read as
    safetensors + JSON: pickles planted beside them are never opened, and a checkpoint the run wrote
    itself that would need unpickling is refused."""
    import json

    import torch

    from spice_ray.models import add_lora, load_causal_lm
    from spice_ray.sketch.optimizer_state import CheckpointMismatch, load_training_state
    from spice_ray.train.loop import LocalSession, run_loop
    from spice_ray.train.trainer import loop_config

    marker = tmp_path / "pwned"
    table = _tokenized_table(tiny_model_dir)

    def run(max_steps: int) -> dict:
        cfg = train_config(max_steps=max_steps, num_workers=1, micro_batch_size=4, checkpoint_every=1, engine="torch")
        config = loop_config(cfg, model_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir),
                             export_dir=str(tmp_path / "model"), use_gpu=False, pad_id=0, total_steps=3)
        return run_loop(config, LocalSession(table, tmp_path / "ckpt", keep=2))

    run(2)
    latest = sorted((tmp_path / "ckpt").glob("checkpoint_*"))[-1]
    tag = json.loads((latest / "train_state.json").read_text())["tag"]
    for where in (latest / "optimizer.pt", latest / tag / "mp_rank_00_model_states.pt", latest / tag / "optimizer.pt"):
        torch.save({"state": _Planted(str(marker))}, where)
    assert run(3)["resumed_from_step"] == 2  # resumed past the planted files
    model = add_lora(load_causal_lm(str(tiny_model_dir)), r=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    state = load_training_state(sorted((tmp_path / "ckpt").glob("checkpoint_*"))[-1], model, pickles=False)
    assert state.format == "torch" and state.step == 3
    fake = tmp_path / "fake"
    (fake / "step_1").mkdir(parents=True)
    (fake / "train_state.json").write_text(json.dumps({"tag": "step_1"}))
    torch.save({"module": _Planted(str(marker))}, fake / "step_1" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointMismatch, match="refusing to unpickle"):
        load_training_state(fake, model, pickles=False)
    assert not marker.exists()
