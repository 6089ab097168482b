"""MLflow tracking for every stage: params, metrics, figures, and lineage tags.

Tracking URI: $MLFLOW_TRACKING_URI when set, else the embedded default `sqlite:///<repo>/mlflow.db` with
artifacts under `<repo>/mlartifacts`. `COVSEG_TRACKING=0` turns stage logging off (the stages' outputs
are the same either way). Every run of one pipeline execution shares the tag `pipeline_run_id`
($COVSEG_PIPELINE_RUN_ID, else a new id written to `artifacts/pipeline_run_id`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

from covseg import telemetry
from covseg.config import params_hash, repo_root

EXPERIMENT = "covseg"


def enabled() -> bool:
    """False when ``COVSEG_TRACKING`` is 0 / false / off: stages then log nothing to MLflow."""
    return os.environ.get("COVSEG_TRACKING", "1") not in ("0", "false", "off")


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the repo's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def configure() -> None:
    """Point mlflow at the tracking URI and the `covseg` experiment (created on first use)."""
    import mlflow

    telemetry.disable()
    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        location = None
        if tracking_uri().startswith("sqlite:"):
            location = (repo_root() / "mlartifacts").as_uri()
        mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)


def pipeline_run_id(params: dict[str, Any]) -> str:
    """The id shared by the stage runs of one pipeline execution."""
    if env := os.environ.get("COVSEG_PIPELINE_RUN_ID"):
        return env
    marker = repo_root() / params.get("artifacts_dir", "artifacts") / "pipeline_run_id"
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(uuid.uuid4().hex[:12])
    return marker.read_text().strip()


def lineage(params: dict[str, Any]) -> dict[str, str]:
    """The lineage tags: git commit, data version (`data.dvc` md5), params hash and pipeline run id."""
    root = repo_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("COVSEG_GIT_COMMIT", "unknown")
    data_md5 = "unknown"
    dvc_file = root / "data.dvc"
    if dvc_file.is_file():
        import yaml

        outs = yaml.safe_load(dvc_file.read_text()).get("outs", [{}])
        data_md5 = str(outs[0].get("md5", "unknown"))
    elif env := os.environ.get("COVSEG_DATA_MD5"):
        data_md5 = env
    return {
        "git_commit": commit,
        "data_md5": data_md5,
        "params_hash": params_hash(params),
        "pipeline_run_id": pipeline_run_id(params),
        "profile": str(params.get("profile")),
    }


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value


def flatten(value: dict[str, Any]) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    _flatten("", value, out)
    return out


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], section: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage (None when tracking is off), tagged with the lineage."""
    if not enabled():
        yield None
        return
    import mlflow

    configure()
    tags = {"stage": stage, **lineage(params)}
    with mlflow.start_run(run_name=f"{stage}-{tags['pipeline_run_id']}", tags=tags) as run:
        logged = {
            "profile": params.get("profile"),
            "seed": params.get("seed"),
            "image_size": params.get("image_size"),
        }
        if section and section in params:
            logged.update({f"{section}.{k}": v for k, v in flatten(params[section]).items()})
        mlflow.log_params({k: str(v)[:500] for k, v in logged.items()})
        yield run


def log_metrics(run: Any, metrics: dict[str, Any], prefix: str = "") -> None:
    """Log every finite number of a (nested) dict as a metric."""
    if run is None:
        return
    import math

    import mlflow

    flat = {
        f"{prefix}{k}": float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    mlflow.log_metrics({k.replace("@", "_"): v for k, v in flat.items()})


def log_history(run: Any, history: list[dict[str, Any]], prefix: str) -> None:
    """Per-epoch metrics (loss curves) as MLflow metric histories."""
    if run is None:
        return
    import mlflow

    for record in history:
        step = int(record["epoch"])
        mlflow.log_metrics(
            {
                f"{prefix}.{k}": float(v)
                for k, v in record.items()
                if k != "epoch" and isinstance(v, int | float)
            },
            step=step,
        )
