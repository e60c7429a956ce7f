"""``spice-ray submit``: send a run to a Ray cluster through the Job Submission API.

The submission id is derived from the run (its root and its config), so submitting the same run
twice never starts two jobs: a job that is pending, running or finished is reported, not repeated,
and a failed or stopped one is retried under the next free ``-rN`` suffix. Retries resume: the
stages' markers and checkpoints under the run root make the rerun skip finished work.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from spice_ray.config import Config

ACTIVE_OR_DONE = {"PENDING", "RUNNING", "SUCCEEDED"}


def submission_id(cfg: Config) -> str:
    """A stable id for a run: its root's name plus a hash of the root and the resolved config."""
    digest = hashlib.sha256(f"{cfg.run.root}\n{cfg.fingerprint()}".encode()).hexdigest()[:10]
    name = re.sub(r"[^a-z0-9-]+", "-", Path(cfg.run.root).name.lower()).strip("-") or "run"
    return f"spice-{name}-{digest}"


def load_runtime_env(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {"working_dir": "."}
    env = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(env, dict):
        raise ValueError(f"{path}: a runtime env must be a mapping")
    return env


def entrypoint(config_path: str, overrides: list[str]) -> str:
    """The job's command: ``python -m spice_ray run`` with the config and overrides, shell-quoted."""
    parts = ["python", "-m", "spice_ray", "run", "--config", config_path]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def submit(
    cfg: Config,
    *,
    config_path: str,
    overrides: list[str],
    address: str | None,
    runtime_env: dict[str, Any],
) -> tuple[str, str]:
    """Submit (or find) the run's job; returns (submission id, what happened)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    base = submission_id(cfg)
    existing = {job.submission_id: str(job.status.value) for job in client.list_jobs() if job.submission_id}
    candidate, attempt = base, 0
    while candidate in existing:
        if existing[candidate] in ACTIVE_OR_DONE:
            return candidate, f"already {existing[candidate].lower()}"
        attempt += 1
        candidate = f"{base}-r{attempt}"
    client.submit_job(
        entrypoint=entrypoint(config_path, overrides),
        submission_id=candidate,
        runtime_env=runtime_env,
        metadata={"spice_ray_root": cfg.run.root},
    )
    return candidate, "submitted" if attempt == 0 else f"resubmitted (attempt {attempt + 1})"
