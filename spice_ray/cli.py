"""The ``spice-ray`` command line (also ``python -m spice_ray``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from spice_ray.config import Config, ConfigError, load_config
from spice_ray.logs import follow_stderr
from spice_ray.tables import print_json, print_table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SPICE data selection and fine-tuning on Ray.")
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (default: built-in defaults).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.key=value (repeatable).")]
RootOpt = Annotated[str | None, typer.Option("--root", help="Run root (same as --set run.root=...).")]


ExecutorOpt = Annotated[str | None, typer.Option("--executor", help="ray (default) or local: every stage in this process, no Ray.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show every library's log lines (Ray, transformers, ...).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the rows as JSON (raw values), for scripts.")]

EXIT_FAILED, EXIT_USAGE, EXIT_LEASE_HELD = 1, 2, 3


def _setup_logging(verbose: bool = False) -> None:
    """The terminal's log lines: stage lines and spice-ray's warnings; every line of every library with
    ``-v`` (:mod:`spice_ray.logs`)."""
    from spice_ray.logs import setup_console_logging

    setup_console_logging(verbose)


def _error(message: str, code: int) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _load(config: Path | None, overrides: list[str] | None, root: str | None, executor: str | None = None) -> Config:
    items = list(overrides or [])
    if root is not None:
        items.append(f"run.root={root}")
    if executor is not None:
        items.append(f"run.executor={executor}")
    try:
        return load_config(config, items)
    except ConfigError as e:
        # one line, whatever the terminal width (soft_wrap), and the message shown as is (escape)
        raise _error(str(e), EXIT_USAGE) from None


class _Bar:
    """A rich progress bar per task reported through :mod:`spice_ray.progress` (not with --verbose)."""

    def __enter__(self) -> _Bar:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        from spice_ray import progress

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=console, transient=True)
        self.tasks: dict[str, Any] = {}
        self.bar.start()  # from here sys.stderr is rich's proxy: log lines print above the bar
        follow_stderr()
        progress.listen(self.update)
        return self

    def update(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        from spice_ray import progress

        progress.listen(None)
        self.bar.stop()
        follow_stderr()


def _run(cfg: Config, stages: list[str] | None, verbose: bool = False) -> dict[str, Any]:
    """The pipeline, with the exit codes a scheduler acts on: 3 when another run holds the root,
    2 for a stage whose inputs have not finished, 1 for a failed stage (its traceback is in the
    run's driver.log under history/)."""
    from spice_ray.corpus.ingest import IngestError
    from spice_ray.lease import LeaseHeld, LeaseLost
    from spice_ray.pipeline import StageNotReady, run_pipeline
    from spice_ray.storage import StorageError

    _setup_logging(verbose)
    try:
        with contextlib.nullcontext() if verbose else _Bar():
            return run_pipeline(cfg, stages=stages)
    except LeaseHeld as e:
        raise _error(str(e), EXIT_LEASE_HELD) from None
    except LeaseLost as e:
        raise _error(str(e), EXIT_LEASE_HELD) from None
    except (StageNotReady, ConfigError, IngestError, StorageError) as e:
        raise _error(str(e), EXIT_USAGE) from None


def _print_summary(cfg: Config, outcomes: dict[str, Any]) -> None:
    from spice_ray.stages import stage

    console.rule("spice-ray run summary")
    for name, outcome in outcomes.items():
        state = "skipped (done earlier)" if outcome.skipped else f"{outcome.manifest.get('seconds', 0):.1f}s"
        console.print(f"[bold]{name:<7}[/bold] {state:<24} {escape(stage(name).describe(cfg, outcome.result))}", soft_wrap=True)


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None, root: RootOpt = None, executor: ExecutorOpt = None, verbose: VerboseOpt = False) -> None:
    """Run every configured stage (ingest → sketch → select → train → eval); finished stages are skipped."""
    cfg = _load(config, set_, root, executor)
    _print_summary(cfg, _run(cfg, None, verbose))


def _stage_command(stage: str):
    def command(config: ConfigOpt = None, set_: SetOpt = None, root: RootOpt = None, executor: ExecutorOpt = None, verbose: VerboseOpt = False) -> None:
        cfg = _load(config, set_, root, executor)
        _print_summary(cfg, _run(cfg, [stage], verbose))

    command.__doc__ = f"Run the {stage} stage only (its inputs must have finished)."
    return command


for _stage in ("ingest", "sketch", "select", "train"):
    app.command(name=_stage)(_stage_command(_stage))


DEMO = ["corpus.holdout_test=0.2", "eval.holdout=test"]  # the demo evaluates on a held-out fifth of its corpus


@app.command()
def demo(set_: SetOpt = None, root: RootOpt = None, executor: ExecutorOpt = None, verbose: VerboseOpt = False) -> None:
    """The whole pipeline on a generated corpus with the built-in tiny pre-trained model, on local
    Ray; then the question that matters: does SPICE's 10% train a better model than a random 10%?
    (three seeds each, paired, with a 95% interval; all the data once)"""
    from spice_ray.bench import demo_comparison
    from spice_ray.report import write_report

    cfg = _load(None, [*DEMO, *(set_ or [])], root, executor)
    outcomes = _run(cfg, None, verbose)
    _print_summary(cfg, outcomes)
    with contextlib.nullcontext() if verbose else _Bar():
        summary, bench_cfg = demo_comparison(cfg)
    console.rule("SPICE vs random vs full data, held-out loss (lower is better)")
    _print_comparison(summary, bench_cfg, arm=cfg.select.method)
    console.print(f"run root: {Path(cfg.run.root).resolve()}", soft_wrap=True)
    console.print(f"report:   {write_report(cfg.run.root)}", soft_wrap=True)
    console.print(f"bench:    {Path(cfg.run.root).resolve() / 'bench' / 'index.html'}", soft_wrap=True)


def _print_comparison(summary: dict[str, Any], bench_cfg: Any, arm: str | None = None) -> None:
    """Each split's comparison as a table, then (for ``arm``) the verdict in words."""
    from spice_ray.bench import full_data_note, split_title, table_rows, verdict

    for split in summary["splits"]:
        columns, rows = table_rows(summary, bench_cfg, split)
        print_table(console, columns, rows, title=split_title(summary, split))
        notes = [verdict(summary, bench_cfg, arm, split) if arm else None, full_data_note(summary, bench_cfg, split)]
        for note in filter(None, notes):
            console.print(escape(note))


@app.command()
def report(
    run_root: Annotated[str, typer.Argument(help="The run root to report on: a directory or an s3:// URI.")],
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Skip re-running the baselines.")] = False,
) -> None:
    """Write <run>/report/index.html (self-contained) and summary.md."""
    from spice_ray.report import write_report
    from spice_ray.storage import Store, StorageError, is_remote

    _setup_logging()
    try:
        if not (Store(run_root).exists("config.yaml") if is_remote(run_root) else Path(run_root).is_dir()):
            raise _error(f"no run at {run_root}", EXIT_USAGE)
        baselines: tuple[str, ...] = () if no_baselines else ("spice", "logdet", "random", "gradnorm")
        console.print(f"report: {write_report(run_root, baselines=baselines)}")
    except StorageError as e:
        raise _error(str(e), EXIT_USAGE) from None


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="First run root.")],
    run_b: Annotated[Path, typer.Argument(help="Second run root.")],
) -> None:
    """What changed between two runs: selection overlap, source mix, log det, eval."""
    from spice_ray.report import compare_runs

    for run_root in (run_a, run_b):
        if not run_root.is_dir():
            console.print(f"[red]error:[/red] no run at {run_root}")
            raise typer.Exit(2)
    text = compare_runs(run_a, run_b)
    if console.is_terminal:
        console.print(text, soft_wrap=True, markup=False, highlight=False)  # lines whole: the terminal wraps them
    else:
        console.file.write(text)  # piped: the Markdown as is, never re-wrapped


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="Config file, inside the working directory that is uploaded.")],
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray dashboard address (default: RAY_ADDRESS).")] = None,
    runtime_env: Annotated[Path | None, typer.Option("--runtime-env", help="Runtime env YAML.")] = Path("jobs/runtime_env.yaml"),
) -> None:
    """Submit a run to a Ray cluster as a job (idempotent: the id is derived from the run)."""
    from spice_ray.submit import load_runtime_env
    from spice_ray.submit import submit as submit_job

    cfg = _load(config, set_, None)
    try:
        rel = config.resolve().relative_to(Path.cwd())
    except ValueError:
        console.print(f"[red]error:[/red] {config} is outside the working directory that the job uploads")
        raise typer.Exit(2) from None
    env = load_runtime_env(runtime_env if runtime_env and runtime_env.exists() else None)
    job_id, what = submit_job(cfg, config_path=rel.as_posix(), overrides=list(set_ or []), address=address, runtime_env=env)
    console.print(f"{job_id}: {what}")
    where = f" --address {address}" if address else ""
    console.print(f"follow the logs:  ray job logs{where} --follow {job_id}")
    console.print(f"status:           ray job status{where} {job_id}")


RUN_COLUMNS = ("run", "state", "records", "sketched", "selected", "method", "log det", "eval loss", "redone")


def run_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """``list_runs`` rows as the cells of ``spice-ray runs`` (whole values)."""
    out = []
    for r in rows:
        state = f"{r['state']} (bench)" if r.get("inner") else r["state"]
        logdet = "" if r["logdet"] is None else f"{r['logdet']:.3f}"
        loss = "" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        counts = [str(r[k]) if r[k] is not None else "" for k in ("records", "sketched", "selected", "method")]
        out.append([r["run"], state, *counts, logdet, loss, ",".join(r["redone"])])
    return out


@app.command()
def runs(run_root: Annotated[Path, typer.Argument(help="A run root that has been run one or more times.")],
         json_: JsonOpt = False) -> None:
    """List a run root's recorded invocations with their counts and selection stats (a table on a
    terminal, tab-separated columns when piped, JSON with --json)."""
    from spice_ray.pipeline import list_runs

    rows = list_runs(run_root)
    if json_:
        print_json(console, rows)
        raise typer.Exit(0 if rows else 1)
    if not rows:
        console.print(f"no recorded runs under {escape(str(run_root))}", soft_wrap=True)
        raise typer.Exit(1)
    print_table(console, RUN_COLUMNS, run_rows(rows))


@app.command("eval")
def eval_command(
    run_root: Annotated[Path | None, typer.Argument(help="A run root whose train stage has finished (uses its config.yaml).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    lm_eval: Annotated[str | None, typer.Option("--lm-eval", help="lm-eval-harness tasks (comma-separated) for the exported model.")] = None,
    lm_eval_limit: Annotated[float | None, typer.Option("--lm-eval-limit", help="Examples per lm-eval task (a fraction if < 1).")] = None,
    lm_eval_include: Annotated[Path | None, typer.Option("--lm-eval-include", help="Directory of extra lm-eval task YAMLs.")] = None,
    lm_eval_batch_size: Annotated[int, typer.Option("--lm-eval-batch-size", help="lm-eval batch size.")] = 8,
) -> None:
    """Held-out loss / perplexity of the base and fine-tuned model (eval stage); optionally lm-eval tasks."""
    from spice_ray.evaluate import LM_EVAL_FILE, lm_eval_available, run_lm_eval

    if lm_eval and not lm_eval_available():  # say so before any work
        console.print("[red]error:[/red] --lm-eval needs lm-eval-harness: pip install 'spice-ray\\[eval]' (or pip install lm-eval)", soft_wrap=True)
        raise typer.Exit(2)
    if run_root is not None:
        if not (run_root / "config.yaml").is_file():
            console.print(f"[red]error:[/red] no run at {run_root} (no config.yaml)")
            raise typer.Exit(2)
        cfg = _load(config or run_root / "config.yaml", set_, str(run_root))
    else:
        cfg = _load(config, set_, None)
    outcomes = _run(cfg, ["eval"])
    _print_summary(cfg, outcomes)
    console.print(f"results:  {outcomes['eval'].result['results_file']}")
    if lm_eval:
        model_dir = outcomes["eval"].manifest["result"]["models"]["tuned"]
        tasks = [t.strip() for t in lm_eval.split(",") if t.strip()]
        out = Path(outcomes["eval"].result["results_file"]).parent / LM_EVAL_FILE
        results = run_lm_eval(
            model_dir, tasks, out_path=out, limit=lm_eval_limit, batch_size=lm_eval_batch_size,
            include_path=str(lm_eval_include) if lm_eval_include else None,
        )
        for task, metrics in results.get("results", {}).items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool))
            console.print(f"[bold]lm-eval[/bold] {task}: {shown}")
        console.print(f"lm-eval:  {out}")


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="Bench config: the pipeline's sections plus a 'bench:' section (arms, seeds).")],
    set_: SetOpt = None,
    root: RootOpt = None,
    executor: ExecutorOpt = None,
    verbose: VerboseOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Does the selection train a better model? Every arm × seed selected from one sketch set,
    fine-tuned from the same base and evaluated per source on the held-out splits; resumable.
    --json: the summary (results.json's content) instead of the tables."""
    from spice_ray.bench import load_bench, run_bench

    items = [*(set_ or []), *([f"run.root={root}"] if root else []), *([f"run.executor={executor}"] if executor else [])]
    try:
        cfg, bench_cfg = load_bench(config, items)
    except (ConfigError, FileNotFoundError) as e:
        raise _error(str(e), EXIT_USAGE) from None
    _setup_logging(verbose)
    with contextlib.nullcontext() if verbose else _Bar():
        summary = run_bench(cfg, bench_cfg)
    if json_:
        print_json(console, summary)
        return
    _print_comparison(summary, bench_cfg)
    console.print(f"results:  {Path(cfg.run.root) / 'bench' / 'results.md'} (and index.html)", soft_wrap=True)


@app.command()
def pretrain(
    out: Annotated[Path, typer.Argument(help="Directory to write the pre-trained model to (Hugging Face layout).")],
    corpus: Annotated[list[str], typer.Option("--corpus", help="Corpus files or folders (any input format; repeatable).")],
    model: Annotated[str, typer.Option("--model", help="The model to start from: a built-in, a local path or a hub id.")] = "builtin:tiny-llama",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 1000,
    block_size: Annotated[int, typer.Option("--block-size", help="Tokens per training block.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Blocks per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, cosine to 10%).")] = 3e-3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the init, the batches and the built-in.")] = 0,
) -> None:
    """Pre-train a (small) model on a corpus, every token, so a proxy knows the data before it is
    sketched. Keep the corpus disjoint from the pool you select from and the sets you evaluate on."""
    import tempfile

    from spice_ray.config import CorpusConfig
    from spice_ray.corpus.ingest import IngestError, ingest
    from spice_ray.models import is_builtin, load_tokenizer, materialize_builtin
    from spice_ray.models.pretrain import pretrain as run_pretrain

    _setup_logging()
    with tempfile.TemporaryDirectory(prefix="spice-pretrain-") as tmp:
        start = str(materialize_builtin(model, Path(tmp) / "init", seed=seed)) if is_builtin(model) else model
        tokenizer = load_tokenizer(start)
        try:
            result = ingest(CorpusConfig(paths=corpus, max_tokens=1 << 20), tokenizer, Path(tmp) / "ingest")
        except IngestError as e:
            raise _error(str(e), EXIT_USAGE) from None
        import pyarrow.parquet as pq

        from spice_ray.corpus.tokenize import render_text

        texts = [render_text(tokenizer, m) for m in pq.read_table(result.records_path, columns=["messages"]).column("messages").to_pylist()]
        log = run_pretrain(start, texts, out, steps=steps, block_size=block_size, batch_size=batch_size, lr=lr, seed=seed)
    console.print(f"pretrained on {result.n_kept} records: loss {log['loss_first']:.3f} → {log['loss_last']:.3f}; model: {out}")


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults, file and overrides) as YAML."""
    from spice_ray.config import dump_config

    console.print(dump_config(_load(config, set_, None)), end="")


def main() -> None:
    app()
