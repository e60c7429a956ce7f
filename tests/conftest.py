"""Shared fixtures: one session-scoped local Ray, the real-data location, a tiny built-in model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before Ray is imported anywhere: keep Ray local, quiet and on loopback.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPICE_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
STORIES = SHARED / "models" / "stories260K"


def shared_data_or_skip() -> Path:
    if not any(SHARED_DATA.glob("*.jsonl")):
        pytest.skip(f"real corpus not found at {SHARED_DATA} (set SPICE_SHARED to the shared/ folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, 512 MiB object store, dashboard on)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=512 * 1024**2,
            include_dashboard=True,
            ignore_reinit_error=True,
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Llama (with its tokenizer), materialized once per test session."""
    from spice_ray.models import materialize_builtin

    return materialize_builtin("builtin:tiny-llama", tmp_path_factory.mktemp("models") / "tiny-llama")
