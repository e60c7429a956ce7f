"""What a stage declares (``spice_ray.stages.Stage``) is what it reads and returns.

- the config view (``Stage.view``): a declared section reads as before, anything else raises;
- a static check over the code each stage runs with its view: every ``cfg.<section>.<field>`` it
  reads is declared (``reads``, ``sees`` or a part's sections);
- the warm-up is the sketch stage's declared part: the train section is in its key, and readable,
  only while a warm-up runs;
- outputs: every ``needs`` names a declared output; a stage returning without one is refused;
- the completion markers (``Store.mark_done``) keep the bytes existing run roots and bench cells have.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from spice_ray.config import Config, load_config
from spice_ray.config_view import ConfigView, UndeclaredConfigRead
from spice_ray.pipeline import config_values, stage_key
from spice_ray.stages import STAGES, StageContext, stage, within_context
from spice_ray.storage import DONE_MARKER, STAGE_MARKER, Store

# ------------------------------------------------------------------------------------------ the view


def test_a_view_reads_what_is_declared_and_refuses_the_rest():
    cfg = Config()
    view = ConfigView(cfg, ("sketch", "corpus.max_tokens", "model.proxy_lora"), "sketch")
    assert view.sketch is cfg.sketch  # a section declared whole is the config's own object
    assert view.corpus.max_tokens == cfg.corpus.max_tokens
    assert view.model.proxy_lora is cfg.model.proxy_lora
    for read, name in ((lambda: view.train, "train"), (lambda: view.corpus.paths, "corpus.paths"),
                       (lambda: view.model.target, "model.target"), (lambda: view.run.root, "run")):
        with pytest.raises(UndeclaredConfigRead, match=f"stage sketch reads config {name}(,| )"):
            read()
    with pytest.raises(UndeclaredConfigRead, match="all of config model"):
        view.model.model_dump()
    with pytest.raises(UndeclaredConfigRead, match="the whole config"):
        view.model_dump()
    assert view.fingerprint("sketch") == cfg.fingerprint("sketch")
    with pytest.raises(UndeclaredConfigRead, match="all of config train"):
        view.fingerprint("train")


def test_a_view_assigns_declared_fields_and_copies_with_its_declarations():
    cfg = Config()
    view = ConfigView(cfg, ("corpus.max_tokens", "train"), "t")
    copy = view.model_copy(deep=True)
    copy.corpus.max_tokens = 7
    copy.train.lr = 0.5
    assert (copy.corpus.max_tokens, copy.train.lr) == (7, 0.5)
    assert (cfg.corpus.max_tokens, cfg.train.lr) == (1024, 2e-4), "the copy's writes stay in the copy"
    with pytest.raises(UndeclaredConfigRead, match="config corpus.too_long"):
        copy.corpus.too_long = "truncate"
    with pytest.raises(UndeclaredConfigRead):
        copy.select
    assert not hasattr(view, "__deepcopy__")  # probes of copy/pickle are plain AttributeErrors


def test_within_context_caps_max_tokens_in_the_stage_s_view():
    cfg = Config.model_validate({"corpus": {"max_tokens": 100_000, "too_long": "truncate"}})
    view = stage("eval").view(cfg)
    ctx = StageContext(cfg=view, executor=None, dirs=None, upstream={"ingest": {"max_tokens": 2048}}, root_uri="")
    capped = within_context(ctx)
    assert capped.corpus.max_tokens == 2048 and cfg.corpus.max_tokens == 100_000
    with pytest.raises(UndeclaredConfigRead, match="stage eval reads config train"):
        capped.train


# ------------------------------------------------------------------------------- the declarations


def _config_path(chain: list[str]) -> tuple[list[str], str | None]:
    """The config fields a chain of attribute names reads and the first non-field after them (a method)."""
    model: type[BaseModel] | None = Config
    path: list[str] = []
    for name in chain:
        if model is None:
            return path, None
        if name not in model.model_fields:
            return path, name
        path.append(name)
        ann = model.model_fields[name].annotation
        model = ann if inspect.isclass(ann) and issubclass(ann, BaseModel) else None
    return path, None


def _covered(path: list[str], declared: tuple[str, ...], whole: bool) -> bool:
    dotted = ".".join(path)
    return any(dotted == d or dotted.startswith(d + ".") or (not whole and d.startswith(dotted + ".")) for d in declared)


def _config_reads(fn) -> list[tuple[list[str], str | None]]:
    """Every config read in ``fn``'s source: attribute chains on ``cfg``, ``wcfg``, ``ctx.cfg`` and
    on names assigned a section of them (``s, m = cfg.sketch, cfg.model``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    roots: dict[str, list[str]] = {"cfg": [], "wcfg": []}

    def chain(node: ast.AST) -> list[str] | None:
        names = []
        while isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == "ctx" and names and names[-1] == "cfg":
            return names[-2::-1]
        if isinstance(node, ast.Name) and node.id in roots:
            return roots[node.id] + names[::-1]
        return None

    for node in ast.walk(tree):  # aliases first (a function's body assigns before it reads)
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            targets, values = node.targets[0], node.value
            pairs = zip(targets.elts, values.elts, strict=False) if isinstance(targets, ast.Tuple) and isinstance(values, ast.Tuple) \
                else [(targets, values)]
            for target, value in pairs:
                got = chain(value)
                if isinstance(target, ast.Name) and got and _config_path(got)[1] is None:
                    roots[target.id] = got
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # a chain is read once, whole
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            got = chain(node)
            if got:
                reads.append(_config_path(got))
    return reads


def _code_run_with_the_view():
    from spice_ray import evaluate, stages
    from spice_ray.sketch import stage as sketch_stage
    from spice_ray.train import trainer

    train = [trainer.run_train_stage, trainer.loop_config]
    return {
        "models": [stages.run_models],
        "ingest": [stages.run_ingest, stages.split_holdout],
        "sketch": [stages.run_sketch, stages.within_context, sketch_stage.run_sketch_stage, sketch_stage.sketch_spec,
                   sketch_stage.run_warmup, *train],
        "select": [stages.run_select],
        "train": [stages.run_train, stages.within_context, *train],
        "eval": [stages.run_eval, stages.within_context, evaluate.run_eval_stage, evaluate.prepare_eval_sets],
    }


def _undeclared(fn, declared: tuple[str, ...]) -> list[str]:
    bad = []
    for path, method in _config_reads(fn):
        if not path and method in (None, "model_copy"):  # the config itself, or a copy of it (a view of it)
            continue
        whole = method not in (None, "model_copy")  # model_dump, fingerprint …: all of it
        if not _covered(path, declared, whole):
            bad.append(f"{fn.__module__}.{fn.__name__}: cfg.{'.'.join(path)}{'.' + method if method else ''}")
    return bad


def test_every_stage_reads_only_what_it_declares():
    """Static: the config reads of the code each stage runs are covered by its declarations (with
    every part running). ``_code_run_with_the_view`` lists that code; extend it with the stage."""
    everything = Config.model_validate({"sketch": {"warmup_fraction": 0.1}})
    bad = []
    for s in STAGES:
        declared = s.declared(everything)
        for fn in _code_run_with_the_view()[s.name]:
            bad += [f"stage {s.name}: {line}" for line in _undeclared(fn, declared)]
    assert not bad, "undeclared config reads:\n" + "\n".join(bad)


def test_the_static_check_finds_an_undeclared_read():
    def run(ctx):
        s, m = ctx.cfg.sketch, ctx.cfg.model
        return s.dim, m.target, ctx.cfg.train.lr, m.proxy_lora.model_dump(), ctx.cfg.model_copy(deep=True)

    assert _undeclared(run, ("sketch", "model.proxy_lora")) == [
        f"{__name__}.run: cfg.model.target", f"{__name__}.run: cfg.train.lr"]
    assert _undeclared(run, ("sketch", "model", "train")) == []
    assert _undeclared(run, ("sketch", "model.target", "model.proxy_lora.r", "train")) == [
        f"{__name__}.run: cfg.model.proxy_lora.model_dump"]


def test_declared_names_exist_and_needs_name_declared_outputs():
    cfg = Config()
    for s in STAGES:
        config_values(cfg, s.reads)  # every read resolves
        for name in s.sees + tuple(sec for p in s.parts for sec in p.sections):
            assert _config_path(name.split("."))[1] is None and _config_path(name.split("."))[0] == name.split("."), name
        assert s.outputs, f"stage {s.name} declares no outputs"
        for need in s.needs:
            up, _, field = need.partition(".")
            assert field in stage(up).outputs, f"stage {s.name} needs {need}, which stage {up} does not declare"


def test_stage_inputs_read_only_what_the_stage_declares(tmp_path):
    (tmp_path / "opt.pt").write_bytes(b"x")
    (tmp_path / "t.txt").write_text("u1\n")
    for overrides in ([], [f"sketch.optimizer_state={tmp_path / 'opt.pt'}", f"select.target={tmp_path / 't.txt'}"],
                      ["sketch.warmup_fraction=0.2", f"eval.paths=[{tmp_path}]", f"corpus.paths=[{tmp_path}]"]):
        cfg = load_config(None, overrides)
        for s in STAGES:
            assert s.inputs(s.view(cfg)) == s.inputs(cfg)
            s.resources(s.view(cfg))


def test_a_stage_returning_without_a_declared_output_is_refused():
    sketch = stage("sketch")
    with pytest.raises(ValueError, match="stage sketch returned no sketches"):
        sketch.check_result({k: 0 for k in sketch.outputs if k != "sketches"})
    sketch.check_result(dict.fromkeys(sketch.outputs, 0) | {"extra": 1})  # more than declared is fine


# --------------------------------------------------------------------------------------- the warm-up


def _keys(cfg: Config, store: Store) -> dict[str, str]:
    manifests: dict = {}
    for s in STAGES:
        key = stage_key(s, cfg, {u: manifests[u] for u in s.upstream}, store)
        manifests[s.name] = {"key": key, "result": {f: f"{s.name}-{f}-{key[:8]}" for f in s.outputs}, "outputs": {}}
    return {name: m["key"] for name, m in manifests.items()}


def test_the_warm_up_is_the_sketch_stage_s_declared_part(tmp_path):
    sketch = stage("sketch")
    plain, warm = Config(), load_config(None, ["sketch.warmup_fraction=0.1"])
    with pytest.raises(UndeclaredConfigRead, match="stage sketch reads config train"):
        sketch.view(plain).train
    assert sketch.view(warm).train is warm.train
    assert sketch.key_inputs(plain) == [] and sketch.key_inputs(warm) == [warm.fingerprint("train")]
    store = Store(str(tmp_path))
    lr = _keys(load_config(None, ["train.lr=0.001"]), store)
    warm_lr = _keys(load_config(None, ["sketch.warmup_fraction=0.1", "train.lr=0.001"]), store)
    base, warm_keys = _keys(plain, store), _keys(warm, store)
    assert lr["sketch"] == base["sketch"] and lr["train"] != base["train"]  # no warm-up: train settings are train's
    assert warm_lr["sketch"] != warm_keys["sketch"]  # a warm-up trains with them


# ------------------------------------------------------------------------------------------ markers


def test_completion_markers_keep_their_names_and_bytes(tmp_path):
    store = Store(str(tmp_path))
    store.mark_done("sketch", "abc", marker=STAGE_MARKER)
    store.mark_done("bench/cells/random/f0.1/s0", "def")
    assert (tmp_path / "sketch" / "_SUCCESS").read_bytes() == b"abc\n"
    assert (tmp_path / "bench/cells/random/f0.1/s0/_DONE").read_bytes() == b"def\n"
    assert DONE_MARKER == "_DONE"
    (tmp_path / "sketch" / "warmup").mkdir()
    (tmp_path / "sketch" / "warmup" / "_DONE").write_text("old-key\n")  # as an earlier version wrote it
    assert store.done_key("sketch/warmup") == "old-key" and store.is_done("sketch/warmup", "old-key")
    assert store.done_key("select", marker=STAGE_MARKER) is None and not store.is_done("select", "abc")
    store.clear_done("sketch", marker=STAGE_MARKER)
    assert not (tmp_path / "sketch" / "_SUCCESS").exists() and store.done_key("sketch", marker=STAGE_MARKER) is None


def test_every_marker_goes_through_the_store_helpers():
    """No module but storage.py spells a marker's file name."""
    package = Path(__file__).resolve().parents[2] / "spice_ray"
    bad = [f"{p.relative_to(package)}:{node.lineno}" for p in package.rglob("*.py") if p.name != "storage.py"
           for node in ast.walk(ast.parse(p.read_text()))
           if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip("/").endswith(("_SUCCESS", "_DONE"))]
    assert not bad, bad
