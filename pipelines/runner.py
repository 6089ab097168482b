"""The training pipeline from Python: compile it, or run it on this machine with kfp.local.

`compile_pipeline` writes the YAML a Kubeflow Pipelines server runs (``covseg pipeline compile``);
`run_local` runs the same graph here (``covseg pipeline run --local``), each task in its own process with
real artifacts passed between them. The graph itself is `pipelines.train_pipeline`.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

from covseg.config import load_params, repo_root
from covseg.telemetry import TELEMETRY_OFF
from pipelines import train_pipeline

DEFAULT_PACKAGE = Path(train_pipeline.__file__).with_suffix(".yaml")
"""``pipelines/train_pipeline.yaml``: the compiled package, committed as a golden file."""

_TELEMETRY_OFF = dict(TELEMETRY_OFF)


def compile_pipeline(out: str | Path | None = None, profile: str = "quick") -> Path:
    """Compiles the training pipeline into a KFP v2 YAML package.

    Args:
        out: Where to write the package; default ``pipelines/train_pipeline.yaml`` (the golden file
            tests/test_pipeline.py compares against).
        profile: params.yaml profile (of the checkout) whose merged parameters become the default of the
            pipeline parameter ``params_json``.

    Returns:
        The path written.
    """
    from kfp import compiler

    out = Path(out) if out is not None else DEFAULT_PACKAGE
    out.parent.mkdir(parents=True, exist_ok=True)
    params = load_params(profile, path=train_pipeline.ROOT / "params.yaml")
    compiler.Compiler().compile(
        train_pipeline.training_pipeline,
        str(out),
        pipeline_parameters={"params_json": train_pipeline.params_to_json(params)},
    )
    return out


def run_local(
    profile: str = "tiny",
    data_path: str | Path | None = None,
    pipeline_root: str | Path | None = None,
    *,
    data_version: str = "",
    mlflow_tracking_uri: str | None = None,
    overrides: dict[str, Any] | None = None,
    checkpoint_root: str | Path | None = None,
) -> dict[str, Any]:
    """Runs the training pipeline on this machine with kfp.local (one subprocess per task, this Python).

    Every task runs the same component code as on the cluster, in a process of its own, reading and
    writing real artifact folders under `pipeline_root`; GPU placement, resources, retries and caching are
    cluster settings that kfp.local ignores. Runs stop at the first failed task (e.g. a failed gate).

    Args:
        profile: params.yaml profile (of the project: $COVSEG_ROOT or the nearest params.yaml).
        data_path: Raw sources; default the project's ``data_dir`` (``data/``). A folder or an s3:// URI.
        pipeline_root: Where the task outputs go; default ``<project>/local_outputs``.
        data_version: Passed to the pipeline (see `covseg.data.fetch_data`).
        mlflow_tracking_uri: MLflow for the stage runs and the registry; default ``$MLFLOW_TRACKING_URI``,
            else the project's ``sqlite:///mlflow.db`` (as ``covseg run``). Empty turns tracking off, which
            the register step refuses.
        overrides: Merged over the profile's parameters (e.g. ``{"register": {"name": "covseg-dev"}}``).
        checkpoint_root: Where the training tasks keep their epoch checkpoints; default
            ``<pipeline_root>/checkpoints``, so a rerun after a killed run resumes its training.

    Returns:
        ``{"evaluation": <Table-1 dict of evaluate's metrics.json>, "model_version": str, "decision": str,
        "run_dir": <folder of this run's task outputs>}``.

    Raises:
        RuntimeError: A task failed (kfp.local names it: ``Inner task failed: gate-a``).
    """
    from kfp import local

    from covseg import tracking

    params = load_params(profile, overrides=overrides)
    data = str(data_path) if data_path is not None else str(repo_root() / params["data_dir"])
    data_arg = data if data.startswith("s3://") else str(Path(data).resolve())
    root = Path(pipeline_root) if pipeline_root is not None else repo_root() / "local_outputs"
    root.mkdir(parents=True, exist_ok=True)
    checkpoints = str(checkpoint_root) if checkpoint_root is not None else str(root.resolve() / "checkpoints")
    uri = tracking.tracking_uri() if mlflow_tracking_uri is None else mlflow_tracking_uri
    env = {**_TELEMETRY_OFF, "COVSEG_PIPELINE_RUN_ID": f"local-{uuid.uuid4().hex[:12]}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the task subprocesses inherit this process's environment
    try:
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(root.resolve()),
            raise_on_error=True,
        )
        with warnings.catch_warnings():
            # The components name the covseg image, which this Python stands in for.
            warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
            # Placement, resources and caching are cluster settings, ignored here by design (see above).
            warnings.filterwarnings("ignore", message=".*no effect in the current local runner")
            task = train_pipeline.training_pipeline(
                params_json=train_pipeline.params_to_json(params),
                data_path=data_arg,
                data_version=data_version,
                mlflow_tracking_uri=uri,
                checkpoint_root=checkpoints,
            )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    evaluation = Path(task.outputs["evaluation"].path)
    return {
        "evaluation": json.loads((evaluation / "metrics.json").read_text()),
        "model_version": task.outputs["model_version"],
        "decision": task.outputs["decision"],
        "run_dir": evaluation.parents[1],
    }
