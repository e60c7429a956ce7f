#!/usr/bin/env python3
"""The CronJob fallback's pod: create this schedule tick's RayJob (once), then follow it to its end.

It runs in the spice-ray image (Python 3.11 + PyYAML, no kubectl) as the ServiceAccount whose Role
grants only `create` and `get` on rayjobs.ray.io: it cannot delete anything, so nothing that happens
to this pod (eviction, node drain, the Job's deadline) touches the RayJob or its GPU cluster.

* The RayJob's name comes from the Job's: the CronJob names its Jobs `<CRONJOB_NAME>-<scheduled time
  in minutes since the epoch>`, and the RayJob becomes `<SCHEDULE_NAME>-<minutes>` -- the name
  KubeRay's RayCronJob gives the same tick. A Job started by hand (`kubectl create job --from=...
  NAME`) gets `<SCHEDULE_NAME>-<NAME>`.
* Create is idempotent: AlreadyExists means an earlier pod of this Job (or the RayCronJob) created it,
  and this pod attaches to it. A retried pod never starts a second run.
* Then it polls the RayJob until `jobDeploymentStatus` is Complete or Failed. KubeRay's own retries
  (the RayJob's backoffLimit) happen inside that: a retry shows as Retrying/Initializing, not Failed.
* SIGTERM (eviction, drain, deadline): log and exit 143. The RayJob keeps running; the Job's next pod
  attaches to it again.

Environment: JOB_NAME (the downward-API label batch.kubernetes.io/job-name), CRONJOB_NAME,
SCHEDULE_NAME, RAYJOB_TEMPLATE (path of the RayJob manifest), NAMESPACE, POLL_SECONDS (60).

Exit codes, matched by the Job's podFailurePolicy:
  0   the RayJob succeeded
  10  RAYJOB_FAILED: it ended without success (Failed, or Complete with a job status other than
      SUCCEEDED, or it was deleted): FailJob, no pod retry -- the RayJob already retried itself, and
      the next tick resumes the same run root
  11  SETUP_ERROR: a bad name, template, or a request the API server refuses (RBAC): FailJob
  143 SIGTERM; anything else (API server unreachable for long, a crash): the Job retries the pod,
      which re-attaches to the same RayJob
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

RAYJOB_FAILED = 10
SETUP_ERROR = 11
MAX_RAYJOB_NAME = 47  # KubeRay: RayCluster names (<rayjob>-xxxxx) stay within 53 characters
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CREATE_ATTEMPTS = 5


class SetupError(Exception):
    """Retrying this pod cannot help."""


class Api(Protocol):
    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]: ...


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}", flush=True)


class KubeApi:
    """The in-cluster API server over HTTPS with the pod's ServiceAccount token (re-read per request:
    projected tokens rotate)."""

    def __init__(self, sa_dir: Path = SA_DIR) -> None:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.base = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        self.sa_dir = sa_dir
        self.context = ssl.create_default_context(cafile=str(sa_dir / "ca.crt"))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        token = (self.sa_dir / "token").read_text().strip()
        req = urllib.request.Request(
            self.base + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=30) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            try:
                return err.code, json.load(err)
            except ValueError:
                return err.code, {}


def rayjob_name(job_name: str, cronjob_name: str, schedule_name: str) -> str:
    """`<schedule>-<minutes>` for a scheduled Job `<cronjob>-<minutes>`; `<schedule>-<job>` otherwise."""
    prefix = cronjob_name + "-"
    tick = job_name[len(prefix) :] if job_name.startswith(prefix) and job_name[len(prefix) :].isdigit() else job_name
    name = f"{schedule_name}-{tick}"
    if len(name) > MAX_RAYJOB_NAME or not DNS1035.match(name):
        raise SetupError(
            f"RayJob name {name!r} (from Job {job_name!r}) is not a DNS-1035 label of at most "
            f"{MAX_RAYJOB_NAME} characters; name a manual Job shorter"
        )
    return name


def manifest_for(template: dict[str, Any], name: str, job_name: str) -> dict[str, Any]:
    if template.get("kind") != "RayJob":
        raise SetupError(f"the template is a {template.get('kind')!r}, not a RayJob")
    manifest = copy.deepcopy(template)
    meta = manifest.setdefault("metadata", {})
    meta.pop("generateName", None)
    meta.pop("namespace", None)
    meta["name"] = name
    meta.setdefault("annotations", {})["spice-ray/created-by-job"] = job_name
    return manifest


def create_or_attach(api: Api, namespace: str, manifest: dict[str, Any], sleep: Callable[[float], None] = time.sleep) -> None:
    name = manifest["metadata"]["name"]
    path = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            status, body = api.request("POST", path, manifest)
        except OSError as err:
            status, body = 0, {"message": str(err)}
        if status in (200, 201):
            log(f"created RayJob {namespace}/{name}")
            return
        if status == 409 and body.get("reason") == "AlreadyExists":
            log(f"RayJob {namespace}/{name} already exists (created for this tick before): attaching")
            return
        if status in (400, 403, 404, 422):
            raise SetupError(f"creating RayJob {name}: HTTP {status}: {body.get('message', body)}")
        log(f"creating RayJob {name}: HTTP {status or 'error'}: {body.get('message', '')} (attempt {attempt}/{CREATE_ATTEMPTS})")
        if attempt < CREATE_ATTEMPTS:
            sleep(min(60, 5 * 2**attempt))
    raise RuntimeError(f"could not create RayJob {name}; the Job's next pod tries again")


def outcome(rayjob: dict[str, Any]) -> int | None:
    """The exit code for a finished RayJob; None while it is not finished."""
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus")
    if deployment == "Complete":
        return 0 if status.get("jobStatus") == "SUCCEEDED" else RAYJOB_FAILED
    if deployment in ("Failed", "ValidationFailed"):
        return RAYJOB_FAILED
    return None


def follow(api: Api, namespace: str, name: str, poll: float, sleep: Callable[[float], None] = time.sleep) -> int:
    path = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs/{name}"
    last = None
    while True:
        try:
            status, body = api.request("GET", path)
        except OSError as err:  # the API server is briefly unreachable: the RayJob runs on regardless
            status, body = 0, {"message": str(err)}
        if status == 200:
            st = body.get("status") or {}
            state = (st.get("jobDeploymentStatus"), st.get("jobStatus"))
            if state != last:
                log(f"RayJob {name}: deployment {state[0] or '-'}, job {state[1] or '-'}")
                last = state
            code = outcome(body)
            if code is not None:
                if st.get("message"):
                    log(f"RayJob {name}: {st['message']}")
                return code
        elif status == 404:
            log(f"RayJob {name} no longer exists (deleted): not recreating it")
            return RAYJOB_FAILED
        elif status == 403:
            raise SetupError(f"reading RayJob {name}: HTTP 403: {body.get('message', body)}")
        else:
            log(f"reading RayJob {name}: HTTP {status or 'error'}: {body.get('message', '')} (retrying)")
        sleep(poll)


def on_sigterm(signum: int, frame: Any) -> None:
    log("terminated: exiting without touching the RayJob; the Job's next pod re-attaches to it")
    sys.exit(128 + signum)


def main(env: dict[str, str] | None = None, api: Api | None = None, sleep: Callable[[float], None] = time.sleep) -> int:
    env = dict(os.environ if env is None else env)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        name = rayjob_name(env["JOB_NAME"], env["CRONJOB_NAME"], env["SCHEDULE_NAME"])
        namespace = env.get("NAMESPACE") or (SA_DIR / "namespace").read_text().strip()
        template = yaml.safe_load(Path(env["RAYJOB_TEMPLATE"]).read_text())
        manifest = manifest_for(template, name, env["JOB_NAME"])
        api = api or KubeApi()
        create_or_attach(api, namespace, manifest, sleep)
        return follow(api, namespace, name, float(env.get("POLL_SECONDS", "60")), sleep)
    except (SetupError, KeyError, OSError, yaml.YAMLError) as err:
        log(f"setup error: {err!r}")
        return SETUP_ERROR


if __name__ == "__main__":
    sys.exit(main())
