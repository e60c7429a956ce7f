"""Shared fixtures: one session-scoped local Ray, the executors and a tiny built-in model; and the
markers of a test by what it costs.

Tests are in three folders by cost: ``unit/`` (in this process only: no subprocess, browser, Ray,
DeepSpeed, server, pipeline run, stage run or training loop: ``make test-fast``), ``integration/``
(one stage or drill on Ray, DeepSpeed or the local executor; a pipeline run with stand-in stages;
the one-process training loop; a subprocess or a headless browser) and ``e2e/`` (whole runs, real
servers, the real corpus). Everything outside ``unit/`` is marked ``slow``; a test using
the session's Ray is marked ``ray``. Heavy modules (torch, transformers, Ray) are imported inside
tests and fixtures, not at collection.
"""

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

RAY_FIXTURES = {"ray_session", "ray_executor"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts or "e2e" in parts:
            item.add_marker(pytest.mark.slow)
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


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
def ray_executor(ray_session):
    """The Ray executor on the session's Ray."""
    from spice_ray.ray_executor import RayExecutor

    return RayExecutor(verbose=True)


@pytest.fixture
def local_executor():
    from spice_ray.executor import LocalExecutor

    return LocalExecutor()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Llama (with its tokenizer), materialized once per test session."""
    from spice_ray.models import materialize_builtin

    return materialize_builtin("builtin:tiny-llama", tmp_path_factory.mktemp("models") / "tiny-llama")
