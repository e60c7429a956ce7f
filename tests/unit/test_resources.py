"""Custom Ray resources: config sections → ``Resources`` → Ray's arguments (tasks, actors, the actor
pool, Ray Train's ``resources_per_worker``). The two-node drill (tests/e2e/test_two_nodes.py) places
real work with them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from spice_ray.config import Config, ConfigError, load_config
from spice_ray.executor import Resources
from spice_ray.ray_executor import RayExecutor, ray_resources, train_resources_per_worker


def test_sections_take_custom_resources_and_none_by_default():
    cfg = load_config(None, ["sketch.resources={spread: 1}", "select.resources.gpu_pool=0.5", "train.resources={spread: 1}",
                             "eval.resources={node_a: 2}"])
    assert cfg.sketch.resources == {"spread": 1.0} and cfg.select.resources == {"gpu_pool": 0.5}
    assert cfg.train.resources == {"spread": 1.0} and cfg.eval.resources == {"node_a": 2.0}
    defaults = Config()
    assert defaults.sketch.resources == defaults.select.resources == defaults.train.resources == defaults.eval.resources == {}


@pytest.mark.parametrize(("value", "message"), [
    ("{CPU: 1}", "custom resources only, not 'CPU'"),
    ("{GPU: 1, spread: 1}", "custom resources only, not 'GPU'"),
    ("{memory: 1000}", "not 'memory'"),
    ("{spread: -1}", "sketch.resources.spread: Input should be greater than or equal to 0"),
    ("{spread: lots}", "sketch.resources.spread"),
    ("[spread]", "sketch.resources: Input should be a valid dictionary"),
])
def test_ray_s_own_or_bad_resources_are_refused_in_one_line(value, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"sketch.resources={value}"])
    assert message in str(err.value) and "sketch.resources" in str(err.value) and "\n" not in str(err.value)


def test_resources_become_ray_arguments():
    spread = Resources(cpus=0.5, workers=2, custom={"spread": 1})
    assert ray_resources(spread) == {"resources": {"spread": 1.0}}
    assert train_resources_per_worker(spread) == {"CPU": 0.5, "spread": 1.0}
    assert ray_resources(Resources()) == {}  # no keyword: Ray's defaults, as before
    assert train_resources_per_worker(Resources(cpus=2)) == {"CPU": 2}
    assert hash(spread) == hash(Resources(cpus=0.5, workers=2))  # still a value (custom is not hashed)


def test_stages_declare_their_sections_resources():
    from spice_ray.executor import resources_of
    from spice_ray.stages import stage

    cfg = load_config(None, ["sketch.resources={spread: 1}", "sketch.num_workers=2"])
    assert resources_of(cfg.sketch) == Resources(cpus=0.5, gpus=None, workers=2, custom={"spread": 1.0})
    assert stage("sketch").resources(cfg) == resources_of(cfg.sketch)


def test_one_function_maps_every_section_s_resource_fields():
    """Four sections, four spellings of the same thing (the user-facing names stay): one Resources each."""
    from spice_ray.executor import resources_of

    cfg = load_config(None, ["sketch.num_cpus_per_worker=2", "sketch.num_gpus_per_worker=0.5", "sketch.num_workers=3",
                             "select.num_cpus=1.5", "select.num_gpus=1", "select.resources={pool: 1}",
                             "train.cpus_per_worker=4", "train.use_gpu=false", "train.num_workers=2", "train.resources={a: 2}",
                             "eval.num_cpus=3", "eval.num_gpus=0.25", "eval.resources={b: 1}"])
    assert resources_of(cfg.sketch) == Resources(cpus=2, gpus=0.5, workers=3)
    assert resources_of(cfg.select) == Resources(cpus=1.5, gpus=1.0, custom={"pool": 1.0})
    assert resources_of(cfg.train) == Resources(cpus=4, gpus=0.0, workers=2, custom={"a": 2.0})
    assert resources_of(Config().train).gpus is None  # use_gpu None: a GPU when the executor has any
    assert resources_of(cfg.eval) == Resources(cpus=3, gpus=0.25, custom={"b": 1.0})
    assert resources_of(Config().eval) == Resources(cpus=0.5, gpus=None)
    with pytest.raises(TypeError, match="no resources in a CorpusConfig"):
        resources_of(cfg.corpus)


def test_a_ray_task_gets_the_custom_resources(monkeypatch):
    options: dict = {}

    class Task:
        def options(self, **kw):
            options.update(kw)
            return self

        def remote(self, *args, **kwargs):
            return "ref"

    fake_ray = SimpleNamespace(remote=lambda fn: Task(), get=lambda ref: "done", cluster_resources=lambda: {})
    monkeypatch.setattr(RayExecutor, "_ray", lambda self: fake_ray)
    assert RayExecutor().call(len, [1], resources=Resources(cpus=0.5, gpus=0, custom={"spread": 1})) == "done"
    assert options == {"num_cpus": 0.5, "num_gpus": 0, "max_retries": 1, "name": "len", "resources": {"spread": 1.0}}
    options.clear()
    RayExecutor().call(len, [1], resources=Resources(cpus=0.5, gpus=0))
    assert "resources" not in options
