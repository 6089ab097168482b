"""`covseg` command line: one command per stage, each a thin binding of `covseg.stages`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from covseg.config import load_params, repo_root

EXIT_BAD_INPUT = 2


def table_rows(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Table-1 rows of an evaluation table in print order: coarse, fine, each round, final, prior."""
    names = [
        "coarse",
        "fine",
        *sorted((k for k in table if k.startswith("round")), key=lambda k: int(k[5:])),
        "final",
        "prior",
    ]
    return {name: table[name] for name in names if name in table}


def _friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bad input and failed gates into one clear line on stderr and a non-zero exit."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from covseg.errors import GateFailed, InputError

        try:
            return func(*args, **kwargs)
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except GateFailed as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


def _artifacts(params: dict[str, Any], *parts: str) -> Path:
    return repo_root() / params["artifacts_dir"] / Path(*parts)


profile_option = click.option("--profile", default=None, help="params.yaml profile: tiny | quick | full.")


@click.group()
def main() -> None:
    """Weakly-supervised COVID-19 lesion segmentation for chest CT."""


@main.group()
def data() -> None:
    """Raw data under DVC."""


@data.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Path(path_type=Path), default=None, help="Default: ./data")
@click.option(
    "--update",
    is_flag=True,
    help="If the target holds data: replace it when the source changed (a new data version).",
)
@_friendly_errors
def data_import(source: Path, target: Path | None, update: bool) -> None:
    """Copy raw sources (e.g. ../shared/datasets) into data/ and track it with DVC."""
    from covseg.data import import_sources, source_changes

    target = target or repo_root() / "data"
    changes = source_changes(source, target) if update and target.is_dir() and source.is_dir() else None
    count = import_sources(source, target, update=update)
    if changes is not None and count == 0:
        click.echo(f"{target} is up to date with {source}")
        return
    if changes is not None:
        click.echo(
            "new data version: "
            + ", ".join(f"{len(v)} {k}" for k, v in changes.items())
            + " (`covseg audit diff` lists them per model version)"
        )
    click.echo(f"imported {count} files into {target}")


@main.command()
@profile_option
@_friendly_errors
def ingest(profile: str | None) -> None:
    """Read every source in data/ into artifacts/ingest (cases + manifest.parquet)."""
    from covseg.ingest import summary_table

    params = load_params(profile)
    frame = _run_stage("ingest", params)
    click.echo(summary_table(frame).to_string(index=False))


@main.command()
@profile_option
@_friendly_errors
def gate0(profile: str | None) -> None:
    """Gate 0 (Great Expectations) on the raw-data manifest."""

    params = load_params(profile)
    result = _run_stage("gate0", params)
    click.echo(f"gate0 passed: {len(result['checks'])} expectations")


def _run_stage(name: str, params: dict[str, Any]) -> Any:
    """Run stage `name` of the stage table (`covseg.layout`) on this project's data/ and artifacts/."""
    from covseg import stages

    return stages.run_stage(name, _artifacts(params), repo_root() / params["data_dir"], params)


@main.command()
@profile_option
@_friendly_errors
def lungs(profile: str | None) -> None:
    """Lung masks + harmonised canonical slices -> artifacts/lungs."""

    params = load_params(profile)
    index = _run_stage("lungs", params)
    click.echo(f"{len(index)} slices, median lung fraction {index['lung_fraction'].median():.3f}")


@main.command()
@profile_option
@_friendly_errors
def classify(profile: str | None) -> None:
    """Train the lesion/no-lesion slice classifier -> artifacts/classify."""

    params = load_params(profile)
    result = _run_stage("classify", params)
    click.echo(json.dumps({"val_auc": result["val_auc"], "probe": result["probe"]}, indent=2))


@main.command()
@profile_option
@_friendly_errors
def coarse(profile: str | None) -> None:
    """Grad-CAM coarse labels -> artifacts/coarse."""

    params = load_params(profile)
    stats = _run_stage("coarse", params)
    click.echo(f"{len(stats)} coarse labels, mean area {stats['area_fraction_of_lung'].mean():.3f} of lung")


@main.command()
@profile_option
@_friendly_errors
def mil(profile: str | None) -> None:
    """MIL refinement (5x5 patches, easy -> hard) -> fine labels in artifacts/mil."""

    params = load_params(profile)
    result = _run_stage("mil", params)
    click.echo(json.dumps(result["quality"], indent=2))


@main.command()
@profile_option
@_friendly_errors
def segment(profile: str | None) -> None:
    """Train the U-Net segmenter on the fine labels -> artifacts/segment."""

    params = load_params(profile)
    result = _run_stage("segment", params)
    click.echo(
        f"segmenter trained on {result['n_train']} slices; last loss {result['history'][-1]['loss']:.4f}; "
        f"Dice against the fine labels of {result['n_val_fine']} validation positives "
        f"{result['val_fine_dice']:.3f}; in-domain slice AUC "
        f"{result['in_domain'].get('slice_auc', float('nan')):.3f}"
    )


@main.command()
@profile_option
@_friendly_errors
def refine(profile: str | None) -> None:
    """Refinement rounds: the segmenter's predictions (with prior and localisers) relabel -> artifacts/refine."""

    params = load_params(profile)
    result = _run_stage("refine", params)
    for record in result["rounds"]:
        ranking = record.get("in_domain", {})
        click.echo(
            f"round {record['round']}: label agreement with the previous round "
            f"{record['agreement'] if record['agreement'] is None else round(record['agreement'], 3)}, "
            f"in-domain slice AUC {ranking.get('slice_auc', float('nan')):.3f}"
        )
    click.echo(f"kept round {result['final_round']} (stopped by {result['stopped_by']})")


@main.command("gate-a")
@profile_option
@_friendly_errors
def gate_a(profile: str | None) -> None:
    """Gate A (Great Expectations) on the coarse labels and the classifier's validation AUC."""

    params = load_params(profile)
    result = _run_stage("gate_a", params)
    click.echo(f"gate A passed: {len(result['checks'])} expectations")


@main.command("gate-b")
@profile_option
@_friendly_errors
def gate_b(profile: str | None) -> None:
    """Gate B (Great Expectations) on the fine labels and the MIL instance accuracy."""

    params = load_params(profile)
    result = _run_stage("gate_b", params)
    click.echo(f"gate B passed: {len(result['checks'])} expectations")


def _table(rows: dict[str, dict[str, Any]]) -> str:
    keys = ("dice", "iou", "ppv", "sensitivity", "specificity")
    lines = [f"{'':<10}" + "".join(f"{k:>12}" for k in keys) + f"{'slices':>8}"]
    for name, row in rows.items():
        lines.append(f"{name:<10}" + "".join(f"{row[k]:>12.3f}" for k in keys) + f"{row['n_slices']:>8}")
    return "\n".join(lines)


@main.command("evaluate-stage")
@profile_option
@_friendly_errors
def evaluate_stage(profile: str | None) -> None:
    """The evaluate stage: Table-1 rows (coarse, fine, each round, final, prior) -> artifacts/evaluate."""

    params = load_params(profile)
    table = _run_stage("evaluate", params)
    rows = table_rows(table)
    click.echo("threshold 0.5\n" + _table(rows))
    click.echo(
        "adaptive (Inf-Net: 2 x mean probability)\n" + _table({k: v["adaptive"] for k, v in rows.items()})
    )
    ranking = table.get("in_domain", {})
    if ranking.get("n_slices"):
        click.echo(
            f"in-domain validation ({ranking['n_slices']} HU slices, {ranking['n_positive']} with lesions): "
            f"slice AUC of the predicted lesion area {ranking['slice_auc']:.3f} vs HU-band baseline "
            f"{ranking['hu_band_auc']:.3f} (lung area {ranking['lung_area_auc']:.3f}); "
            f"per-lung AUC {ranking['lung_auc']:.3f}"
        )


RENAMED = {"evaluate-pipeline": "evaluate-stage"}
"""Old command names, kept as hidden aliases that print a one-line deprecation notice."""
STAGE_COMMANDS = {"evaluate": "evaluate-stage"}
"""CLI command of a stage whose name is not its `covseg.layout` name with `_` -> `-`."""


def _deprecated_alias(old: str, new: str) -> click.Command:
    """A hidden command `old` that runs command `new` after a one-line notice on stderr."""
    command = main.commands[new]
    return click.Command(
        old,
        callback=command.callback,
        params=command.params,
        help=command.help,
        hidden=True,
        deprecated=f"Use 'covseg {new}'.",
    )


for old_name, new_name in RENAMED.items():
    main.add_command(_deprecated_alias(old_name, new_name))


@main.command()
@click.option(
    "--model", required=True, help="Model folder (segmenter.pt) or MLflow URI, e.g. models:/covseg@champion"
)
@click.option(
    "--data", required=True, type=click.Path(path_type=Path), help="Folder with images/* and masks/*.png"
)
@click.option(
    "--rotate",
    default=-1,
    show_default=True,
    help="np.rot90 k bringing the slices to the radiological view (medseg-100 layout: -1)",
)
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="json", show_default=True)
@_friendly_errors
def evaluate(model: str, data: Path, rotate: int, fmt: str) -> None:
    """Dice, IoU, PPV, sensitivity, specificity of a model on a folder of masked slices."""
    from covseg.evaluate import evaluate_folder

    result = evaluate_folder(model, data, rotate=rotate)
    if fmt == "json":
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(_table({"0.5": result, "adaptive": result["adaptive"]}))


@main.command()
@profile_option
@_friendly_errors
def register(profile: str | None) -> None:
    """Log + register the segmenter in MLflow; promote it to champion if it beats the current one."""

    params = load_params(profile)
    result = _run_stage("register", params)
    d = result["decision"]
    click.echo(f"{params['register']['name']} v{result['version']}: {d['decision']} ({d['reason']})")


@main.command()
def models() -> None:
    """List registered versions of covseg with aliases, data version and Dice."""
    import mlflow

    from covseg.tracking import configure

    configure()
    client = mlflow.MlflowClient()
    # search results carry no aliases in MLflow 3.17: read them from the registered model
    by_version: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model("covseg").aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    for mv in sorted(client.search_model_versions("name = 'covseg'"), key=lambda m: int(m.version)):
        aliases = ",".join(by_version.get(str(mv.version), [])) or "-"
        dice = mv.tags.get("candidate_dice", mv.tags.get("eval_dice", "nan"))
        click.echo(
            f"v{mv.version:<4} {aliases:<20} dice={float(dice):.3f} "
            f"data={mv.tags.get('data_md5', '?')[:12]} commit={mv.tags.get('git_commit', '?')[:8]} "
            f"{mv.tags.get('promotion_decision', '')}"
        )


@main.command()
@profile_option
@click.option("--from-stage", default="ingest", help="Skip the stages before this one.")
@_friendly_errors
def run(profile: str | None, from_stage: str) -> None:
    """Run the whole pipeline in this process (ingest -> evaluate), printing each stage's summary."""
    from covseg.layout import STAGES

    ctx = click.get_current_context()
    order = [main.commands[STAGE_COMMANDS.get(s.name, s.name.replace("_", "-"))] for s in STAGES]
    names = [c.name for c in order]
    from_stage = RENAMED.get(from_stage, from_stage)
    if from_stage not in names:
        raise click.BadParameter(f"choose one of {', '.join(names)}", param_hint="--from-stage")
    import time

    timings = {}
    for command in order[names.index(from_stage) :]:
        click.echo(f"== {command.name}")
        start = time.perf_counter()
        ctx.invoke(command, profile=profile)
        timings[command.name] = time.perf_counter() - start
    click.echo(
        "== wall time per stage (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"; total {sum(timings.values()):.0f}"
    )


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option(
    "--model",
    required=True,
    help="Model folder (segmenter.pt + .json) or MLflow URI, e.g. models:/covseg@champion",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder (replaced if it holds an earlier prediction).",
)
@click.option(
    "--rotate",
    default=0,
    show_default=True,
    help="2-D slices only: np.rot90 k bringing the slice to the radiological view (medseg-100: -1).",
)
@click.option("--batch-size", default=32, show_default=True, help="Slices per batch.")
@click.option("--threshold", default=0.5, show_default=True, help="Lesion probability threshold.")
@click.option(
    "--allow-identified", is_flag=True, help="Accept DICOM headers that still carry patient identity."
)
@_friendly_errors
def predict(
    input_path: Path,
    model: str,
    out_dir: Path,
    rotate: int,
    batch_size: int,
    threshold: float,
    allow_identified: bool,
) -> None:
    """Segment a DICOM series folder, a NIfTI volume or a PNG/JPEG slice: masks, report.json, overlay.png."""
    from covseg.predict import format_summary, predict_study

    report = predict_study(
        input_path,
        model,
        out_dir,
        batch_size=batch_size,
        rotate=rotate,
        threshold=threshold,
        allow_identified=allow_identified,
    )
    click.echo(format_summary(report))
    click.echo(f"outputs in {out_dir}")


@main.group()
def pipeline() -> None:
    """The Kubeflow pipeline: compile it, or run it locally through kfp.local."""


@pipeline.command("compile")
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Default: pipelines/train_pipeline.yaml"
)
@profile_option
def pipeline_compile(out: Path | None, profile: str | None) -> None:
    """Compile pipelines/train_pipeline.py (the profile's parameters become the default params_json)."""
    from pipelines.runner import compile_pipeline

    click.echo(f"compiled {compile_pipeline(out, profile or 'quick')}")


@pipeline.command("run")
@click.option(
    "--local", is_flag=True, required=True, help="Run with kfp.local.SubprocessRunner (no cluster)."
)
@profile_option
@click.option("--data", "data_path", default=None, help="Data folder or s3:// DVC remote (default: data/).")
@click.option("--data-version", default="", help="data.dvc md5 to fetch from an s3:// DVC remote.")
@click.option("--pipeline-root", type=click.Path(path_type=Path), default=None)
@click.option("--mlflow-uri", default=None, help="Tracking URI (default: $MLFLOW_TRACKING_URI or mlflow.db).")
def pipeline_run(
    local: bool,
    profile: str | None,
    data_path: str | None,
    data_version: str,
    pipeline_root: Path | None,
    mlflow_uri: str | None,
) -> None:
    """Run the same pipeline the cluster runs, task by task in local subprocesses."""
    import re

    from pipelines.runner import run_local

    try:
        result = run_local(
            profile or "tiny",
            data_path,
            pipeline_root,
            data_version=data_version,
            mlflow_tracking_uri=mlflow_uri,
        )
    except RuntimeError as exc:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
        click.echo(f"error: pipeline failed: {plain[-1] if plain else exc}", err=True)
        sys.exit(1)
    rows = table_rows(result["evaluation"])
    click.echo(_table(rows))
    click.echo(f"model version {result['model_version'] or '-'}: {result['decision']}")


@main.group()
def schedule() -> None:
    """Recurring retraining on a Kubeflow Pipelines endpoint."""


@schedule.command("create")
@click.option("--cron", required=True, help="Cron expression, 5 fields (or KFP's 6 with seconds).")
@click.option("--endpoint", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
@click.option(
    "--package", default="pipelines/train_pipeline.yaml", show_default=True, help="Compiled pipeline."
)
@click.option("--experiment", default="covseg", show_default=True)
@click.option("--name", default="covseg-retrain", show_default=True)
@click.option("--param", "params", multiple=True, help="Pipeline parameter KEY=VALUE (repeatable).")
def schedule_create(
    cron: str, endpoint: str, package: str, experiment: str, name: str, params: tuple[str, ...]
) -> None:
    """Create a recurring run (max concurrency 1, no catch-up) of the compiled pipeline."""
    from covseg.schedule import create_schedule

    values = dict(p.split("=", 1) for p in params)
    run_id = create_schedule(endpoint, cron, package, experiment, name, values or None)
    click.echo(f"recurring run {run_id} created: {name} ({cron}) on {endpoint}")


@main.group(invoke_without_command=True)
@click.option("--name", default="covseg", show_default=True, help="Registered model name.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
@_friendly_errors
def audit(ctx: click.Context, name: str, fmt: str) -> None:
    """Every registered version with its data version (data.dvc md5, commit), params, Dice and aliases."""
    ctx.ensure_object(dict).update(name=name, fmt=fmt)
    if ctx.invoked_subcommand is not None:
        return
    import mlflow

    from covseg.audit import audit_versions, format_audit
    from covseg.tracking import configure

    configure()
    rows = audit_versions(mlflow.MlflowClient(), name)
    click.echo(json.dumps(rows, indent=2) if fmt == "json" else format_audit(rows))


@audit.command("diff")
@click.argument("v1")
@click.argument("v2")
@click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="git + DVC repository the versions were trained from. Default: this repo.",
)
@click.pass_context
@_friendly_errors
def audit_diff_cmd(ctx: click.Context, v1: str, v2: str, repo: Path | None) -> None:
    """Data files added/deleted/modified/renamed between the data of versions V1 and V2 (number or alias)."""
    import mlflow

    from covseg.audit import audit_diff, format_diff
    from covseg.tracking import configure

    configure()
    diff = audit_diff(mlflow.MlflowClient(), v1, v2, repo=repo or repo_root(), name=ctx.obj["name"])
    click.echo(json.dumps(diff, indent=2) if ctx.obj["fmt"] == "json" else format_diff(diff))


@main.command("params")
@profile_option
def show_params(profile: str | None) -> None:
    """Print the merged parameters of a profile."""
    click.echo(json.dumps(load_params(profile), indent=2))


if __name__ == "__main__":
    main()
