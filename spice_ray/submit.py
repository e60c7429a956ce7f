"""``spice-ray submit``: send a run to a Ray cluster through the Job Submission API.

The submission id is derived from the run: its root, its config and a fingerprint of its input
files (corpus and eval paths: names, sizes, mtimes), so submitting the same run twice never starts
two jobs — a job that is pending, running or finished is reported, not repeated — while a run over
a grown corpus is a new submission. A failed or stopped one is retried under the next free ``-rN``
suffix, but only once its driver is really gone: Ray reports a job FAILED when its entrypoint's
shell dies even if the driver runs on, so a retry first checks the run root's lease
(:mod:`spice_ray.lease`) and refuses while a live run holds it. Retries resume: the stages' markers
and checkpoints under the run root make the rerun skip finished work.
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
    """A stable id for a run: its root's name plus a hash of the root, the resolved config and the
    input files' fingerprint."""
    from spice_ray.storage import files_key

    inputs = files_key([*cfg.corpus.paths, *cfg.eval.paths])
    digest = hashlib.sha256(f"{cfg.run.root}\n{cfg.fingerprint()}\n{inputs}".encode()).hexdigest()[:10]
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
    candidate, attempt, previous = base, 0, None
    while candidate in existing:
        if existing[candidate] in ACTIVE_OR_DONE:
            return candidate, f"already {existing[candidate].lower()}"
        attempt, previous = attempt + 1, candidate
        candidate = f"{base}-r{attempt}"
    holder = live_lease(cfg.run.root) if previous is not None else None
    if previous is not None and holder is not None:
        return previous, (
            f"not resubmitted: Ray reports it {existing[previous].lower()}, but run {holder.get('run_id')} "
            f"(host {holder.get('host')}, pid {holder.get('pid')}) still holds the run root's lease"
        )
    client.submit_job(
        entrypoint=entrypoint(config_path, overrides),
        submission_id=candidate,
        runtime_env=runtime_env,
        metadata={"spice_ray_root": cfg.run.root},
    )
    return candidate, "submitted" if attempt == 0 else f"resubmitted (attempt {attempt + 1})"


def live_lease(root: str) -> dict[str, Any] | None:
    """The run root's lease record when a live run holds it (None: free, or held by a dead driver)."""
    from spice_ray.lease import Lease
    from spice_ray.storage import Store

    lease = Lease(Store(root))
    holder = lease.read()
    return holder if holder is not None and lease.stale_reason(holder) is None else None
