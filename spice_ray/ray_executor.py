"""The Ray executor: the one place that turns a stage's declared resources into Ray arguments.

- ``call``: one Ray task (``num_cpus``, ``num_gpus``; one retry) — the selection, the eval, the
  sketch fidelity check.
- ``map_batches``: a Ray Data pipeline over the records parquet, filtered to the uids to do, in
  length-sorted windows, through an ``ActorPoolStrategy`` pool of the worker class (built once per
  actor); results stream back to the driver as they finish, so the caller can persist each one.
- ``train``: ``TorchTrainer`` (Ray Train V2) running the stage's worker function with a
  ``RaySession`` over the tokenized rows, ``RunConfig(name, storage)`` so a rerun with the same
  storage resumes from its latest checkpoint, ``FailureConfig`` restarts.

GPU use is decided here once: a unit of work with ``gpus=None`` gets one GPU when the cluster has
any. Custom resources (``Resources.custom``, from a section's ``resources``) go to every unit as
Ray's ``resources=`` (tasks, actors, the actor pool) or into Ray Train's ``resources_per_worker``
(:func:`ray_resources`), so work lands only on nodes started with them. Ray's own logs stay off the
terminal unless ``verbose`` (they go to the run's driver.log), and so does the false alarm Ray's
core worker logs when a Ray Data actor pool starts (:data:`spice_ray.logs.RAY_FALSE_ALARMS`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from spice_ray.executor_types import RecordBatches, Resources, TrainFunc
from spice_ray.logs import drop_native_lines
from spice_ray.storage import is_uri

logger = logging.getLogger(__name__)

RUN_NAME = "ray_train"


def _starts_local_cluster(address: str | None) -> bool:
    """Whether ``ray.init(address)`` would start a new Ray on this machine (no address given, no
    RAY_ADDRESS, no ``ray start`` cluster found here)."""
    if address not in (None, "auto", "local"):
        return False
    if address == "local":
        return True
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except Exception:  # a private helper: when it moves, judge by the environment alone
        return address is None and not os.environ.get("RAY_ADDRESS")


def init_ray(address: str | None = None, *, verbose: bool = False) -> None:
    """Start or join Ray. A Ray this process starts is local: on 127.0.0.1, without usage stats and
    without token authentication unless RAY_AUTH_MODE says otherwise (Ray ≥ 2.5x turns it on for a
    new local cluster and says so on the terminal). Without ``verbose``, Ray's Python loggers reach
    the run's driver.log, not the terminal (:func:`spice_ray.logs.route_framework_logs`), and its
    workers' output stays in Ray's session logs (``log_to_driver=False``)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if _starts_local_cluster(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a single-machine Ray on loopback: no token to manage
    if verbose:
        ray.init(address=address, ignore_reinit_error=True)
        return
    import ray.data  # configures Ray Data's loggers, which route_framework_logs then takes over

    from spice_ray.logs import route_framework_logs, route_raylet_notices

    route_framework_logs()
    route_raylet_notices()
    ray.init(address=address, ignore_reinit_error=True, logging_level=logging.INFO, log_to_driver=False)
    route_framework_logs()  # ray.init may have set levels or handlers again
    ray.data.DataContext.get_current().enable_progress_bars = False  # the CLI draws the one bar


def ray_resources(resources: Resources) -> dict[str, Any]:
    """The ``resources=`` keyword of a Ray task, actor or actor pool for ``resources.custom`` (empty:
    no keyword, Ray's own default)."""
    return {"resources": {str(k): float(v) for k, v in resources.custom.items()}} if resources.custom else {}


def train_resources_per_worker(resources: Resources) -> dict[str, float]:
    """Ray Train's ``resources_per_worker``: the CPUs and the custom resources of one worker (GPUs go
    through ``use_gpu``)."""
    return {"CPU": resources.cpus, **ray_resources(resources).get("resources", {})}


def _logged(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` in a Ray worker with INFO logging (its lines reach the driver with ``verbose``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return fn(*args, **kwargs)


def _keep_uids(batch: pa.Table, values_ref: Any) -> pa.Table:
    import pyarrow.compute as pc
    import ray

    return batch.filter(pc.is_in(batch.column("uid"), value_set=ray.get(values_ref)))


def _sort_by_length(batch: pa.Table) -> pa.Table:
    return batch.sort_by([("n_tokens", "ascending"), ("uid", "ascending")])


class RayExecutor:
    """Stages' work on a Ray cluster (local Ray when no address is given and none is running)."""

    name = "ray"

    def __init__(self, address: str | None = None, verbose: bool = False) -> None:
        self.address = address
        self.verbose = verbose

    def _ray(self):
        import ray

        init_ray(self.address, verbose=self.verbose)
        return ray

    def has_gpus(self) -> bool:
        return self._ray().cluster_resources().get("GPU", 0) > 0

    def gpus(self, resources: Resources) -> float:
        if resources.gpus is not None:
            return resources.gpus
        return 1.0 if self.has_gpus() else 0.0

    def call(self, fn: Callable[..., Any], *args: Any, resources: Resources, **kwargs: Any) -> Any:
        ray = self._ray()
        name = getattr(fn, "__name__", "task")
        task = ray.remote(_logged).options(num_cpus=resources.cpus, num_gpus=self.gpus(resources), max_retries=1, name=name,
                                           **ray_resources(resources))
        return ray.get(task.remote(fn, *args, **kwargs))

    def map_batches(self, worker: type, kwargs: dict[str, Any], batches: RecordBatches, resources: Resources) -> Iterator[pa.Table]:
        """Length grouping without a global sort (an all-to-all shuffle): windows of 16 batches are
        sorted by n_tokens, so each batch spans a narrow range of lengths; the repartition (order
        preserving, no shuffle) spreads the work over the actors (one parquet file may be one block)."""
        ray = self._ray()
        from ray.data import ActorPoolStrategy

        ds = ray.data.read_parquet(batches.records).select_columns(list(batches.columns))
        n = ds.count()
        if batches.uids is not None:
            ref = ray.put(pa.array(sorted(batches.uids), pa.string()))
            ds = ds.map_batches(_keep_uids, fn_kwargs={"values_ref": ref}, batch_format="pyarrow")
            n = len(batches.uids)
        if "n_tokens" in batches.columns:
            ds = ds.map_batches(_sort_by_length, batch_size=16 * batches.batch_size, batch_format="pyarrow")
        ds = ds.repartition(max(1, min(n // max(1, batches.batch_size), 4 * resources.workers)))
        out = ds.map_batches(
            worker,
            fn_constructor_kwargs=kwargs,
            batch_size=batches.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=resources.workers),
            num_cpus=resources.cpus,
            num_gpus=self.gpus(resources),
            **ray_resources(resources),
        )
        with contextlib.nullcontext() if self.verbose else drop_native_lines():  # the pool's start-up false alarm
            yield from out.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)

    def train(self, train_func: TrainFunc, loop_config: dict[str, Any], *, rows: str, storage: str,
              resources: Resources, max_failures: int, keep: int, callbacks: list[Any] | None = None,
              data_config: Any | None = None) -> tuple[dict[str, Any], str | None]:
        """``train_func(loop_config, RaySession())`` on every Ray Train worker (see the module docstring)."""
        ray = self._ray()
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from spice_ray.train.session import ray_train_worker

        ctx = ray.data.DataContext.get_current()
        before = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True  # the rows' (seeded) order is the training order
        try:
            ds = ray.data.read_parquet(rows)  # a dataset keeps a copy of the context it was made in
        finally:
            ctx.execution_options.preserve_order = before
        trainer = TorchTrainer(
            functools.partial(ray_train_worker, train_func),  # takes the config alone, as TorchTrainer asks
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=resources.workers, use_gpu=bool(loop_config["use_gpu"]),
                resources_per_worker=train_resources_per_worker(resources),
            ),
            run_config=RunConfig(
                name=RUN_NAME,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=keep),
                failure_config=FailureConfig(max_failures=max_failures),
                callbacks=list(callbacks or []),
            ),
            datasets={"train": ds},
            **({"dataset_config": data_config} if data_config is not None else {}),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        prune_unregistered_checkpoints(f"{storage}/{RUN_NAME}", result)
        if not result.return_value:
            raise RuntimeError("the train loop returned nothing on rank 0")
        return result.return_value, result.checkpoint.path if result.checkpoint is not None else None

    def shutdown(self) -> None:
        pass  # a Ray started by this process ends with it; one we joined belongs to the cluster


def prune_unregistered_checkpoints(run_dir: str, result: Any) -> None:
    """Delete checkpoint directories Ray Train never registered: a worker group that died while
    a checkpoint was being reported can leave one behind, outside ``keep_checkpoints``. Ray never
    resumes from those (it resumes from its registered ones), so they only take space."""
    import shutil

    kept = {Path(c.path).name for c, _ in (result.best_checkpoints or [])}
    path = Path(run_dir)
    if is_uri(run_dir) or not kept or not path.is_dir():
        return
    for d in path.glob("checkpoint_*"):
        if d.is_dir() and d.name not in kept:
            logger.warning("removing %s: a checkpoint Ray Train never registered (interrupted report)", d)
            shutil.rmtree(d, ignore_errors=True)
