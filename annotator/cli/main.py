"""The ``annotator`` command line.

Every command calls the services layer. Errors meant for users (:class:`AnnotatorError`)
are printed as one line on stderr with exit status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from annotator.config import (
    AcquisitionConfig,
    ClassConfig,
    EvaluationConfig,
    ModelConfig,
    PosteriorConfig,
    ProjectConfig,
    StrategyName,
    config_error,
    load_config,
)
from annotator.errors import AnnotatorError, ConfigError
from annotator.logs import configure_logging

logger = logging.getLogger(__name__)

STRATEGY_CHOICES = ", ".join(StrategyName.__args__)  # type: ignore[attr-defined]

app = typer.Typer(
    help="Label images with as few labels as possible: BayesVLM uncertainty ranks what to label next.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Check vision–language models.", no_args_is_help=True)
hessian_app = typer.Typer(
    help="Estimate posterior factors of a model's projections.", no_args_is_help=True
)
bench_app = typer.Typer(
    help="Benchmarks whose results go into docs/benchmarks.md.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(hessian_app, name="hessian")
app.add_typer(bench_app, name="bench")

F = TypeVar("F", bound=Callable[..., Any])

ALL_STRATEGIES = ("bald", "epig", "power-bald", "entropy", "margin", "random")

ProjectDir = Annotated[
    Path, typer.Argument(help="Project folder (contains annotator.yaml).", file_okay=False)
]


def user_errors(function: F) -> F:
    """Print user errors as one line and exit with status 2."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except AnnotatorError as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from error

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    log_level: Annotated[
        str, typer.Option(help="Log level: DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    log_json: Annotated[bool, typer.Option(help="Write logs as JSON lines.")] = False,
) -> None:
    configure_logging(log_level, json_format=log_json)


# --- projects -----------------------------------------------------------------------------


@app.command()
@user_errors
def init(
    project_dir: ProjectDir,
    images: Annotated[Path, typer.Option(help="Folder of images to label (searched recursively).")],
    class_name: Annotated[
        list[str] | None, typer.Option("--class", help="A class name; repeat for each class.")
    ] = None,
    classes_file: Annotated[
        Path | None, typer.Option(help="Text file with one class name per line.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="ARCH:TAG, hf-hub:ORG/NAME, a checkpoint path, or demo.")
    ] = "demo",
    arch: Annotated[
        str | None, typer.Option(help="open_clip architecture of a checkpoint path.")
    ] = None,
    factors: Annotated[
        str, typer.Option(help="Posterior factor folder (BayesVLM format), 'estimate' or 'demo'.")
    ] = "estimate",
    database: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL, e.g. postgresql+psycopg://host/db; default SQLite."),
    ] = None,
    evaluation_size: Annotated[
        float,
        typer.Option(help="Evaluation split: a count (>= 1) or a fraction of the pool (< 1)."),
    ] = 0.1,
    strategy: Annotated[
        str, typer.Option(help=f"Acquisition strategy: {STRATEGY_CHOICES}.")
    ] = "bald",
    batch_size: Annotated[int, typer.Option(help="Images per annotator batch.")] = 20,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="Start from this annotator.yaml instead of options."),
    ] = None,
) -> None:
    """Create a project folder with its config and database."""
    from annotator.services.project import create_project

    if config_file is not None:
        config = load_config(config_file)
    else:
        names = list(class_name or [])
        if classes_file is not None:
            names += [
                line.strip() for line in classes_file.read_text().splitlines() if line.strip()
            ]
        if not names:
            raise ConfigError(
                "no classes given; pass --class NAME for each class or --classes-file FILE"
            )
        if not images.is_dir():
            raise ConfigError(
                f"image folder {images} not found or not a folder; pass --images with the "
                "folder that contains the images to label"
            )
        try:
            config = ProjectConfig(
                name=project_dir.resolve().name,
                images=str(images.resolve()),
                database=database,
                classes=tuple(ClassConfig(name=n) for n in names),
                model=ModelConfig(spec=model, arch=arch),
                posterior=PosteriorConfig(factors=factors),
                evaluation=EvaluationConfig(size=evaluation_size),
                acquisition=AcquisitionConfig(strategy=_strategy(strategy), batch_size=batch_size),
            )
        except ValidationError as error:
            raise config_error(error, "options of annotator init") from error
    project = create_project(project_dir, config)
    typer.echo(f"created project {config.name!r} in {project.directory}")
    typer.echo(f"next: annotator ingest {project_dir}")


@app.command()
@user_errors
def ingest(
    project_dir: ProjectDir,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Validate new images, encode their features once, and rank the pool."""
    from annotator.services.ingest import ingest as run_ingest
    from annotator.services.project import open_project

    project = open_project(project_dir)
    report = run_ingest(project, progress=progress)
    _print_ingest(report)


def _print_ingest(report: Any) -> None:
    typer.echo(
        f"{report.discovered} files found, {report.new} new, {report.usable} usable, "
        f"{len(report.skipped)} skipped, {report.encoded} encoded, "
        f"{report.evaluation_images} in the evaluation split"
    )
    for path, reason in report.skipped:
        typer.echo(f"  skipped {path}: {reason}")


@app.command()
@user_errors
def status(project_dir: ProjectDir) -> None:
    """Show the pool, labels, rounds and the latest accuracy."""
    from annotator.services.project import open_project
    from annotator.services.summary import project_summary

    summary = project_summary(open_project(project_dir))
    for key, value in summary.as_rows():
        typer.echo(f"{key:<28} {value}")


@app.command()
@user_errors
def rank(
    project_dir: ProjectDir,
    top: Annotated[int, typer.Option(help="How many images to list.")] = 20,
    strategy: Annotated[
        str | None,
        typer.Option(
            help=f"Re-rank the current round with this strategy first: {STRATEGY_CHOICES}."
        ),
    ] = None,
) -> None:
    """List the most informative unlabelled images of the latest ranking."""
    from annotator.services.project import open_project
    from annotator.services.summary import top_of_ranking

    project = open_project(project_dir)
    if strategy is not None:
        from annotator.services.rounds import rerank

        rerank(project, strategy=_strategy(strategy))
    frame = top_of_ranking(project, top)
    typer.echo(frame.to_string(index=False))


@app.command()
@user_errors
def refit(project_dir: ProjectDir) -> None:
    """Refit the head on all acquisition labels and re-rank the pool as a new round."""
    from annotator.services.project import open_project
    from annotator.services.rounds import run_round

    result = run_round(open_project(project_dir), note="manual refit")
    _print_round(result.index, result.labels_spent, result.metrics)


def _print_round(index: int, labels: int, metrics: dict[str, Any]) -> None:
    bayes = metrics.get("bayes")
    if not bayes:
        typer.echo(f"round {index}: {labels} labels; no labelled evaluation images yet")
        return
    low, high = bayes["accuracy_low"], bayes["accuracy_high"]
    typer.echo(
        f"round {index}: {labels} labels, accuracy {bayes['accuracy']:.3f} "
        f"(95% interval {low:.3f}–{high:.3f}), ECE {bayes['ece']:.3f}, "
        f"on {metrics['evaluation_images']} evaluation images"
    )


@app.command()
@user_errors
def evaluate(
    project_dir: ProjectDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print all metrics as JSON.")] = False,
) -> None:
    """Print the latest round's metrics on the evaluation split."""
    from annotator.services.project import open_project
    from annotator.services.rounds import evaluate_latest

    project = open_project(project_dir)
    index, labels, metrics = evaluate_latest(project)
    if as_json:
        typer.echo(json.dumps({"round": index, "labels_spent": labels, **metrics}, indent=2))
    else:
        _print_round(index, labels, metrics)


@app.command()
@user_errors
def export(
    project_dir: ProjectDir,
    out: Annotated[Path, typer.Option(help="Output file or folder.")],
    export_format: Annotated[
        str, typer.Option("--format", help="csv, jsonl, or folders (a folder per class).")
    ] = "csv",
    include_evaluation: Annotated[
        bool, typer.Option(help="Include the evaluation split's labels.")
    ] = True,
    link: Annotated[
        bool, typer.Option(help="With --format folders: symbolic links, not copies.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Export the labelled set."""
    from annotator.services.export import export_labels
    from annotator.services.project import open_project

    result = export_labels(
        open_project(project_dir),
        out,
        export_format,
        include_evaluation=include_evaluation,
        link=link,
        overwrite=overwrite,
    )
    typer.echo(f"wrote {result.rows} labelled images to {result.path}")
    if result.rows == 0:
        typer.secho(
            "warning: no labelled images to export, so the output has no rows; label a batch "
            "in the web app first",
            fg=typer.colors.YELLOW,
            err=True,
        )


# --- simulation ---------------------------------------------------------------------------


@app.command()
@user_errors
def simulate(
    project_dir: Annotated[
        Path | None, typer.Argument(help="Project with an oracle file; omit with --dataset.")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="Labelled dataset: class folders or a CSV of path,label.")
    ] = None,
    model: Annotated[str, typer.Option(help="Model spec for --dataset.")] = "demo",
    arch: Annotated[
        str | None, typer.Option(help="Architecture of a checkpoint model spec.")
    ] = None,
    factors: Annotated[str, typer.Option(help="Posterior factors for --dataset.")] = "estimate",
    rounds: Annotated[int, typer.Option(help="Rounds per run.")] = 10,
    batch: Annotated[int, typer.Option(help="Labels per round.")] = 20,
    strategy: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Strategy; repeat for several, or 'all' for {', '.join(ALL_STRATEGIES)}."
        ),
    ] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Seed; repeat for several.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Use seeds 0..N-1 instead of --seed.")] = None,
    out: Annotated[Path, typer.Option(help="CSV with one row per round and run.")] = Path(
        "simulation.csv"
    ),
    plot: Annotated[
        list[Path] | None,
        typer.Option(help="Plot files (.png or .html); default: the CSV's name with both."),
    ] = None,
    held_out_class: Annotated[
        str | None,
        typer.Option(
            help="Leave this class out of the label set and report how well the epistemic "
            "uncertainty detects its images (column ood_auroc)."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Compare acquisition strategies by labelling from ground truth, round by round."""
    from annotator.services.simulate import run_simulation

    strategies = _strategies(strategy or ["bald", "random"])
    seed_list = list(range(seeds)) if seeds is not None else list(seed or [0])
    plots = plot if plot is not None else [out.with_suffix(".png"), out.with_suffix(".html")]
    frame = run_simulation(
        project_dir=project_dir,
        dataset=dataset,
        model=model,
        arch=arch,
        factors=factors,
        strategies=strategies,
        seeds=seed_list,
        rounds=rounds,
        batch_size=batch,
        out=out,
        plots=plots,
        progress=progress,
        held_out_class=held_out_class,
    )
    columns = ["accuracy", "ood_auroc"] if held_out_class else ["accuracy"]
    # The standard error across seeds, as the band of the plot.
    summary = frame.groupby(["strategy", "labels_spent"])[columns].agg(["mean", "sem"])
    typer.echo(summary.to_string())
    typer.echo(f"wrote {out} and {', '.join(map(str, plots))}")


def _strategy(name: str) -> StrategyName:
    valid = StrategyName.__args__  # type: ignore[attr-defined]
    if name not in valid:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(valid)}")
    return name  # type: ignore[return-value]


def _strategies(names: list[str]) -> list[str]:
    if "all" in names:
        return list(ALL_STRATEGIES)
    return [_strategy(n) for n in names]


# --- web app ------------------------------------------------------------------------------


@app.command()
@user_errors
def serve(
    project_dir: ProjectDir,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8501,
) -> None:
    """Serve the labelling web app for a project."""
    from annotator.services.project import open_project

    project = open_project(project_dir)
    project.close()
    _run_streamlit(project.directory, host, port)


def _run_streamlit(project_dir: Path, host: str, port: int) -> None:
    script = Path(__file__).resolve().parent.parent / "app" / "main.py"
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        # Annotators need no deploy, rerun or clear-cache buttons.
        "--client.toolbarMode",
        "viewer",
    ]
    env = {**os.environ, "ANNOTATOR_PROJECT": str(project_dir)}
    typer.echo(f"serving {project_dir} on http://{host}:{port} (Ctrl+C stops)")
    if os.name == "posix":
        # Become the Streamlit process, so that a SIGTERM or Ctrl+C sent to this process
        # reaches the server and no orphan keeps holding the port.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, command, env)
    try:
        completed = subprocess.run(command, env=env, check=False)
    except KeyboardInterrupt:
        return
    if completed.returncode not in (0, -2, 130):
        raise typer.Exit(code=completed.returncode)


@app.command()
@user_errors
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to build the demo project.")
    ] = Path("demo-project"),
    serve_app: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve the app afterwards.")
    ] = True,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8501,
    seed: Annotated[int, typer.Option(help="Seed of the demo data and model.")] = 0,
) -> None:
    """Build the offline digits demo (idempotently) and serve it."""
    from annotator.services.demo import build_demo_project

    build = build_demo_project(directory, seed=seed)
    _print_ingest(build.report)
    build.project.close()
    if serve_app:
        _run_streamlit(build.project.directory, host, port)


# --- models and factors -------------------------------------------------------------------


@models_app.command("check")
@user_errors
def models_check(
    spec: Annotated[
        str, typer.Argument(help="ARCH:TAG, hf-hub:ORG/NAME, a checkpoint path, or demo.")
    ],
    arch: Annotated[str | None, typer.Option(help="Architecture of a checkpoint path.")] = None,
) -> None:
    """Report whether a model spec can be loaded here; exit 1 when it cannot."""
    from annotator.models.loading import check_model
    from annotator.models.specs import ModelSpec

    result = check_model(ModelSpec.parse(spec, arch=arch))
    typer.echo(result.message)
    if not result.ok:
        raise typer.Exit(code=1)


@hessian_app.command("estimate")
@user_errors
def hessian_estimate(
    out: Annotated[Path, typer.Option(help="Output folder in the BayesVLM factor format.")],
    model: Annotated[str, typer.Option(help="Model spec.")] = "demo",
    arch: Annotated[str | None, typer.Option(help="Architecture of a checkpoint path.")] = None,
    pairs: Annotated[
        Path | None, typer.Option(help="CSV of path,caption image–caption pairs.")
    ] = None,
    project: Annotated[
        Path | None, typer.Option(help="Estimate from a project's pool with its class prompts.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per batch (the InfoNCE text set).")] = 64,
    num_data: Annotated[
        float | None,
        typer.Option(
            help="Effective number of data points n that scales the factors; "
            "default: the number of images used."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Estimate KFAC factors A and B of the image and text projections."""
    from annotator.services.hessian import estimate_pair_factors, estimate_project_factors

    if (pairs is None) == (project is None) and model != "demo":
        raise ConfigError("pass exactly one of --pairs CSV or --project DIR")
    if project is not None:
        from annotator.services.project import open_project

        directory = estimate_project_factors(
            open_project(project), output=out, progress=progress, num_data=num_data
        )
    else:
        directory = estimate_pair_factors(
            spec=model,
            arch=arch,
            pairs=pairs,
            output=out,
            batch_size=batch_size,
            num_data=num_data,
            progress=progress,
        )
    typer.echo(f"wrote factors to {directory}")


# --- benchmarks ---------------------------------------------------------------------------


@bench_app.command("scoring")
@user_errors
def bench_scoring(
    pool_size: Annotated[list[int] | None, typer.Option(help="Pool sizes; repeat.")] = None,
    classes: Annotated[list[int] | None, typer.Option(help="Class counts; repeat.")] = None,
    method_samples: Annotated[
        int | None, typer.Option(help="Logit samples per image of the method (default 100).")
    ] = None,
    factors: Annotated[
        Path | None,
        typer.Option(help="Published ViT-B-32 factor folder; default: random factors like them."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda; default: CUDA when present.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the table as CSV.")] = None,
) -> None:
    """Time the method's scoring against the matrix-product floor and weight-space Monte Carlo."""
    from annotator.bench.scoring import format_markdown, run_scoring_benchmark

    kwargs: dict[str, Any] = {"method_samples": method_samples, "device": device}
    if pool_size:
        kwargs["pool_sizes"] = tuple(pool_size)
    if classes:
        kwargs["class_counts"] = tuple(classes)
    if factors is not None:
        kwargs["factors_directory"] = factors
    frame = run_scoring_benchmark(**kwargs)
    typer.echo(format_markdown(frame))
    if out is not None:
        frame.to_csv(out, index=False)


@bench_app.command("cosine")
@user_errors
def bench_cosine(
    factors: Annotated[
        Path | None,
        typer.Option(help="Published ViT-B-32 factor folder; default: random factors like them."),
    ] = None,
    draws: Annotated[int, typer.Option(help="Monte Carlo draws of the projections.")] = 2_000,
) -> None:
    """Measure the cosine-moment approximation against Monte Carlo at D = 512."""
    from annotator.bench.scoring import format_markdown, measure_cosine_approximation

    frame = measure_cosine_approximation(num_draws=draws, factors_directory=factors)
    typer.echo(format_markdown(frame))


@bench_app.command("encode")
@user_errors
def bench_encode(
    arch: Annotated[
        str, typer.Option(help="open_clip architecture (random weights).")
    ] = "ViT-B-32",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    num_batches: Annotated[int, typer.Option(help="Batches to time.")] = 8,
    num_workers: Annotated[int | None, typer.Option(help="Decoding workers.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the table as CSV.")] = None,
) -> None:
    """Compare decode + preprocess + forward throughput against forward alone."""
    from annotator.bench.encode import run_encode_benchmark

    frame = run_encode_benchmark(
        arch=arch, batch_size=batch_size, num_batches=num_batches, num_workers=num_workers
    )
    typer.echo(frame.to_string(index=False))
    if out is not None:
        frame.to_csv(out, index=False)


@bench_app.command("study")
@user_errors
def bench_study(
    results: Annotated[Path, typer.Argument(help="CSV written by `annotator simulate`.")],
) -> None:
    """Summarise a simulation: ECE, labels needed against random, held-out AUROC (Markdown)."""
    import pandas as pd

    from annotator.bench.study import summarize, to_markdown

    if not results.is_file():
        raise ConfigError(f"simulation results {results} not found; run `annotator simulate` first")
    typer.echo(to_markdown(summarize(pd.read_csv(results))))


if __name__ == "__main__":
    app()
