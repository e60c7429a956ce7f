"""The ``spice-ray`` command line (also ``python -m spice_ray``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from spice_ray.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SPICE data selection and fine-tuning on Ray.")
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (default: built-in defaults).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.key=value (repeatable).")]
RootOpt = Annotated[str | None, typer.Option("--root", help="Run root (same as --set run.root=...).")]


def _setup_logging() -> None:
    level = os.environ.get("SPICE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _load(config: Path | None, overrides: list[str] | None, root: str | None) -> Config:
    items = list(overrides or [])
    if root is not None:
        items.append(f"run.root={root}")
    try:
        return load_config(config, items)
    except ConfigError as e:
        # one line, whatever the terminal width (soft_wrap), and the message shown as is (escape)
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _run(cfg: Config, stages: list[str] | None) -> dict[str, Any]:
    from spice_ray.pipeline import run_pipeline

    _setup_logging()
    return run_pipeline(cfg, stages=stages)


def _eval_line(name: str, entry: dict[str, Any]) -> str:
    def fmt(m: dict[str, Any] | None) -> str:
        return "n/a" if not m or m.get("loss") is None else f"loss {m['loss']:.4f} (ppl {m['perplexity']:.2f})"

    base = f"base {fmt(entry.get('base'))} → " if "base" in entry else ""
    return f"{name} ({entry.get('n', 0)} rows, {entry.get('tokens', 0)} tokens): {base}tuned {fmt(entry.get('tuned'))}"


def _print_summary(cfg: Config, outcomes: dict[str, Any]) -> None:
    console.rule("spice-ray run summary")
    for name, outcome in outcomes.items():
        r = outcome.manifest.get("result", {})
        state = "skipped (done earlier)" if outcome.skipped else f"{outcome.manifest.get('seconds', 0):.1f}s"
        if name == "ingest":
            line = f"{r['n_in']} rows in, {r['n_kept']} kept, {r['n_quarantined']} quarantined {r['reasons']}"
        elif name == "sketch":
            line = f"{r['n_sketches']} sketches, d={cfg.sketch.dim}"
        elif name == "select":
            frac = r["k_selected"] / max(1, r["n_candidates"])
            line = (
                f"{r['method']}: {r['k_selected']} of {r['n_candidates']} ({frac:.1%}), "
                f"log det {r['logdet']:.3f}, mean conflict {r['mean_conflict']:.4f}, stop: {r['stop_reason']}"
            )
        elif name == "train":
            line = f"{r['steps']} steps, final loss {r['loss']:.4f}, model: {r['model']}"
        elif name == "eval":
            line = "; ".join(_eval_line(s, e) for s, e in r.get("sets", {}).items()) or "no eval sets"
        else:
            line = f"proxy {r.get('proxy')}"
        console.print(f"[bold]{name:<7}[/bold] {state:<24} {line}")


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None, root: RootOpt = None) -> None:
    """Run every configured stage (ingest → sketch → select → train); finished stages are skipped."""
    cfg = _load(config, set_, root)
    _print_summary(cfg, _run(cfg, None))


def _stage_command(stage: str):
    def command(config: ConfigOpt = None, set_: SetOpt = None, root: RootOpt = None) -> None:
        cfg = _load(config, set_, root)
        _print_summary(cfg, _run(cfg, [stage]))

    command.__doc__ = f"Run the {stage} stage only (its inputs must have finished)."
    return command


for _stage in ("ingest", "sketch", "select", "train"):
    app.command(name=_stage)(_stage_command(_stage))


@app.command()
def demo(set_: SetOpt = None, root: RootOpt = None) -> None:
    """The whole pipeline on a generated corpus with the built-in tiny model, on local Ray."""
    cfg = _load(None, set_, root)
    outcomes = _run(cfg, None)
    _print_summary(cfg, outcomes)
    from spice_ray.report import write_report

    console.print(f"run root: {Path(cfg.run.root).resolve()}")
    console.print(f"report:   {write_report(cfg.run.root)}")


@app.command()
def report(
    run_root: Annotated[Path, typer.Argument(help="The run root to report on.")],
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Skip re-running the baselines.")] = False,
) -> None:
    """Write <run>/report/index.html (self-contained) and summary.md."""
    from spice_ray.report import write_report

    _setup_logging()
    if not run_root.is_dir():
        console.print(f"[red]error:[/red] no run at {run_root}")
        raise typer.Exit(2)
    baselines: tuple[str, ...] = () if no_baselines else ("spice", "logdet", "random", "gradnorm")
    console.print(f"report: {write_report(run_root, baselines=baselines)}")


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
    console.print(compare_runs(run_a, run_b))


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


@app.command()
def runs(run_root: Annotated[Path, typer.Argument(help="A run root that has been run one or more times.")]) -> None:
    """List a run root's recorded invocations with their counts and selection stats."""
    from rich.table import Table

    from spice_ray.pipeline import list_runs

    rows = list_runs(run_root)
    if not rows:
        console.print(f"no recorded runs under {run_root}")
        raise typer.Exit(1)
    table = Table("run", "records", "quarantined", "sketched", "selected", "method", "log det", "mean conflict", "redone")
    for r in rows:
        logdet = "" if r["logdet"] is None else f"{r['logdet']:.3f}"
        conflict = "" if r["mean_conflict"] is None else f"{r['mean_conflict']:.4f}"
        table.add_row(r["run"], *(str(r[k] if r[k] is not None else "") for k in ("records", "quarantined", "sketched", "selected", "method")), logdet, conflict, ",".join(r["redone"]))
    console.print(table)


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
    console.print(f"results:  {Path(cfg.run.root) / 'eval' / 'results.json'}")
    if lm_eval:
        model_dir = outcomes["eval"].manifest["result"]["models"]["tuned"]
        tasks = [t.strip() for t in lm_eval.split(",") if t.strip()]
        out = Path(cfg.run.root) / "eval" / LM_EVAL_FILE
        results = run_lm_eval(
            model_dir, tasks, out_path=out, limit=lm_eval_limit, batch_size=lm_eval_batch_size,
            include_path=str(lm_eval_include) if lm_eval_include else None,
        )
        for task, metrics in results.get("results", {}).items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool))
            console.print(f"[bold]lm-eval[/bold] {task}: {shown}")
        console.print(f"lm-eval:  {out}")


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults, file and overrides) as YAML."""
    from spice_ray.config import dump_config

    console.print(dump_config(_load(config, set_, None)), end="")


def main() -> None:
    app()
