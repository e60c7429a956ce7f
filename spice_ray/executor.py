"""Executors: where a stage's work runs. Stages say *what* to run and *with which resources*; an
executor says *where*.

- :class:`LocalExecutor` runs everything in this process, without Ray (small inputs, tests,
  benchmarks, a laptop): a sketch worker over the record batches in turn, the selection and the
  eval as plain calls, training with one worker. A stage gets the CPU threads it declares
  (``max(1, int(cpus))``, as Ray gives an actor), so the numbers are the same as on Ray.
- :class:`spice_ray.ray_executor.RayExecutor` (the default, for clusters) runs the same work as a
  Ray Data actor pool, Ray tasks and Ray Train workers. It is the only module that talks to Ray
  about resources.

Both produce the same artifacts bit for bit on CPU (``tests/e2e/test_pipeline.py``). What they
share (:class:`Resources`, :class:`RecordBatches`, ``TrainFunc``) lives in
:mod:`spice_ray.executor_types` and is re-exported here, so ``ray_executor`` never imports this
module (which imports it in ``make_executor``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

# defined there, shared with ray_executor
from spice_ray.executor_types import RecordBatches, Resources, TrainFunc, resources_of  # noqa: F401

logger = logging.getLogger(__name__)

EXECUTORS = ("ray", "local")


class Executor(Protocol):
    name: str

    def has_gpus(self) -> bool: ...

    def gpus(self, resources: Resources) -> float:
        """GPUs a unit of work gets: the declared number, else one when the executor has GPUs."""
        ...

    def call(self, fn: Callable[..., Any], *args: Any, resources: Resources, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with ``resources`` (in-process, or one Ray task)."""
        ...

    def map_batches(self, worker: type, kwargs: dict[str, Any], batches: RecordBatches, resources: Resources) -> Iterator[pa.Table]:
        """``worker(**kwargs)`` applied to every batch of records; yields each result as it is ready."""
        ...

    def train(self, train_func: TrainFunc, loop_config: dict[str, Any], *, rows: str, storage: str, resources: Resources,
              max_failures: int, keep: int, callbacks: list[Any] | None = None,
              data_config: Any | None = None) -> tuple[dict[str, Any], str | None]:
        """Run ``train_func(loop_config, session)`` on every worker, as ``TorchTrainer(train_func,
        train_loop_config=loop_config)`` does, over the tokenized ``rows`` parquet with checkpoints under
        ``storage`` (the session: :mod:`spice_ray.train.session`); (rank 0's return value, the latest
        checkpoint's path)."""
        ...

    def shutdown(self) -> None: ...


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sorted_batches(table: pa.Table, batch_size: int) -> list[pa.Table]:
    """``table`` sorted by (n_tokens, uid) and cut into ``batch_size`` rows: similar lengths together."""
    if "n_tokens" in table.column_names:
        table = table.sort_by([("n_tokens", "ascending"), ("uid", "ascending")])
    return [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]


def read_record_batches(batches: RecordBatches) -> list[pa.Table]:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from spice_ray.storage import resolve_filesystem

    fs, path = resolve_filesystem(batches.records)
    dataset = pads.dataset(path, format="parquet", filesystem=fs)
    where = None if batches.uids is None else pc.field("uid").isin(pa.array(sorted(batches.uids), pa.string()))
    return sorted_batches(dataset.to_table(columns=list(batches.columns), filter=where), batches.batch_size)


def local_checkpoint_dir(storage: str) -> Path:
    """``storage`` itself when local; for a remote run root, a node-local directory keyed by it (the
    local executor writes checkpoints with plain file operations)."""
    import hashlib
    import os

    from spice_ray.storage import is_remote

    if not is_remote(storage):
        return Path(storage).expanduser().resolve()
    cache = Path(os.environ.get("SPICE_CACHE", Path.home() / ".cache" / "spice-ray"))
    return cache / "checkpoints" / hashlib.sha256(storage.encode()).hexdigest()[:24]


class LocalExecutor:
    """Everything in this process (see the module docstring)."""

    name = "local"

    def has_gpus(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def gpus(self, resources: Resources) -> float:
        if resources.gpus is not None:
            return resources.gpus
        return 1.0 if self.has_gpus() else 0.0

    def call(self, fn: Callable[..., Any], *args: Any, resources: Resources, **kwargs: Any) -> Any:
        with torch_threads(resources.threads):
            return fn(*args, **kwargs)

    def map_batches(self, worker: type, kwargs: dict[str, Any], batches: RecordBatches, resources: Resources) -> Iterator[pa.Table]:
        with torch_threads(resources.threads):
            instance = worker(**kwargs)
            for batch in read_record_batches(batches):
                yield instance(batch)

    def train(self, train_func: TrainFunc, loop_config: dict[str, Any], *, rows: str, storage: str, resources: Resources,
              max_failures: int, keep: int, callbacks: list[Any] | None = None,
              data_config: Any | None = None) -> tuple[dict[str, Any], str | None]:
        import pyarrow.parquet as pq

        from spice_ray.config import TrainConfig
        from spice_ray.storage import ensure_local
        from spice_ray.train.engine import resolved_engine
        from spice_ray.train.session import LocalSession, local_process_group

        if resources.workers != 1:
            raise ValueError(f"the local executor trains with one worker, not {resources.workers}: set train.num_workers=1")
        if callbacks or data_config is not None:
            raise ValueError("train callbacks and data configs (fault drills) need the ray executor")
        table = pq.read_table(ensure_local(rows))
        session = LocalSession(table, local_checkpoint_dir(storage), keep=keep)
        config = dict(loop_config, torch_threads=resources.threads)
        needs_group = resolved_engine(TrainConfig.model_validate(config["train"])) == "deepspeed"
        group = local_process_group(session.root / ".pg-rendezvous") if needs_group else contextlib.nullcontext()
        with group:
            result = train_func(config, session)
        assert result is not None
        with session.latest_checkpoint() as latest:
            return result, latest

    def shutdown(self) -> None:
        pass


def make_executor(name: str, *, address: str | None = None, verbose: bool | None = None) -> Executor:
    """The executor called ``name``. ``verbose`` (default: $SPICE_VERBOSE): Ray's own logs on the terminal."""
    import os

    if verbose is None:
        verbose = os.environ.get("SPICE_VERBOSE", "") not in ("", "0")
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        from spice_ray.ray_executor import RayExecutor

        return RayExecutor(address=address, verbose=verbose)
    raise ValueError(f"unknown executor {name!r}: one of {', '.join(EXECUTORS)}")
