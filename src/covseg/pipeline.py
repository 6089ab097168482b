"""The KFP training pipeline from Python: compile it, run it locally with kfp.local, and fetch its raw data.

The pipeline itself is ``pipelines/training.py`` (components in ``components/``), beside this package in the
source checkout. `compile_pipeline` writes the YAML a Kubeflow Pipelines server runs; `run_local` runs the
same graph on this machine, each task in its own process with real artifacts passed between them.
`fetch_data` is what the ingest component calls to find the raw sources of a run (a folder, an S3 prefix,
or one version of the data in the project's DVC remote).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import uuid
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from covseg.io import InputError
from covseg.telemetry import TELEMETRY_OFF

CHECKOUT = Path(__file__).resolve().parents[2]
"""The source checkout holding ``pipelines/`` and ``components/`` (an editable install)."""

DEFAULT_PACKAGE = CHECKOUT / "pipelines" / "training.yaml"
_DOWNLOAD_THREADS = 16
_TELEMETRY_OFF = dict(TELEMETRY_OFF)


def _training_module() -> ModuleType:
    """`pipelines.training`, imported from the source checkout."""
    if not (CHECKOUT / "pipelines" / "training.py").is_file():
        raise FileNotFoundError(f"{CHECKOUT / 'pipelines' / 'training.py'} not found: compiling and running the "
                                "pipeline needs the covseg source checkout (pip install -e .)")
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module("pipelines.training")


def compile_pipeline(out: str | Path | None = None, profile: str = "quick") -> Path:
    """Compiles the training pipeline into a KFP v2 YAML package.

    Args:
        out: Where to write the package; default ``pipelines/training.yaml`` of the checkout (the golden file
            tests/test_pipeline.py compares against).
        profile: params.yaml profile (of the checkout) whose merged parameters become the default of the
            pipeline parameter ``params_json``.

    Returns:
        The path written.
    """
    from kfp import compiler

    from covseg.config import load_params

    training = _training_module()
    out = Path(out) if out is not None else DEFAULT_PACKAGE
    out.parent.mkdir(parents=True, exist_ok=True)
    params = load_params(profile, path=CHECKOUT / "params.yaml")
    compiler.Compiler().compile(training.training_pipeline, str(out),
                                pipeline_parameters={"params_json": training.params_to_json(params)})
    return out


def run_local(profile: str = "tiny", data_path: str | Path | None = None, pipeline_root: str | Path | None = None,
              *, data_version: str = "", mlflow_tracking_uri: str | None = None,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs the training pipeline on this machine with kfp.local (one subprocess per task, this Python).

    Every task runs the same component code as on the cluster, in a process of its own, reading and
    writing real artifact folders under `pipeline_root`; GPU placement, resources, retries and caching are
    cluster settings that kfp.local ignores. Runs stop at the first failed task (e.g. a failed gate).

    Args:
        profile: params.yaml profile (of the project: $COVSEG_ROOT or the nearest params.yaml).
        data_path: Raw sources; default the project's ``data_dir`` (``data/``). A folder or an s3:// URI.
        pipeline_root: Where the task outputs go; default ``<project>/local_outputs``.
        data_version: Passed to the pipeline (see `fetch_data`).
        mlflow_tracking_uri: MLflow for the stage runs and the registry; default ``$MLFLOW_TRACKING_URI``,
            else the project's ``sqlite:///mlflow.db`` (as ``covseg run``). Empty turns tracking off, which
            the register step refuses.
        overrides: Merged over the profile's parameters (e.g. ``{"register": {"name": "covseg-dev"}}``).

    Returns:
        ``{"evaluation": <Table-1 dict of evaluate's metrics.json>, "model_version": str, "decision": str,
        "run_dir": <folder of this run's task outputs>}``.

    Raises:
        RuntimeError: A task failed (kfp.local names it: ``Inner task failed: gate-a``).
    """
    from kfp import local

    from covseg import tracking
    from covseg.config import load_params, repo_root

    params = load_params(profile, overrides=overrides)
    training = _training_module()
    data = str(data_path) if data_path is not None else str(repo_root() / params["data_dir"])
    data_arg = data if data.startswith("s3://") else str(Path(data).resolve())
    root = Path(pipeline_root) if pipeline_root is not None else repo_root() / "local_outputs"
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri() if mlflow_tracking_uri is None else mlflow_tracking_uri
    env = {**_TELEMETRY_OFF, "COVSEG_PIPELINE_RUN_ID": f"local-{uuid.uuid4().hex[:12]}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the task subprocesses inherit this process's environment
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root.resolve()),
                   raise_on_error=True)
        with warnings.catch_warnings():
            # The components name the covseg image, which this Python stands in for.
            warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
            # Placement, resources and caching are cluster settings, ignored here by design (see above).
            warnings.filterwarnings("ignore", message=".*no effect in the current local runner")
            task = training.training_pipeline(params_json=training.params_to_json(params), data_path=data_arg,
                                              data_version=data_version, mlflow_tracking_uri=uri)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    evaluation = Path(task.outputs["evaluation"].path)
    return {"evaluation": json.loads((evaluation / "metrics.json").read_text()),
            "model_version": task.outputs["model_version"], "decision": task.outputs["decision"],
            "run_dir": evaluation.parents[1]}


def fetch_data(data_path: str, dest: str | Path, data_version: str = "", endpoint_url: str = "") -> Path:
    """Locates the raw sources of a pipeline run, downloading them into `dest` when they are on S3.

    Args:
        data_path: A local folder (returned as is); ``s3://bucket/prefix`` holding the raw layout (every object
            under it is copied); or, with `data_version`, the URL of the project's DVC remote.
        dest: Empty folder for the download (unused for a local folder).
        data_version: A DVC directory md5 (``outs[0].md5`` of ``data.dvc``, ``<32 hex>.dir``). With an s3://
            `data_path`, exactly that version is rebuilt from the DVC remote (``files/md5/<2>/<30>``
            objects, DVC 3 layout) and every file's md5 is checked. Ignored for a local folder.
        endpoint_url: S3 endpoint (MinIO); empty for ``$AWS_ENDPOINT_URL`` or AWS itself.

    Returns:
        The folder holding the raw sources.

    Raises:
        InputError: The folder, the version or an object is missing, or a download does not match its md5.
    """
    if not data_path.startswith("s3://"):
        folder = Path(data_path)
        if not folder.is_dir():
            raise InputError(folder, "raw data folder not found")
        return folder
    import boto3

    bucket, _, prefix = data_path[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    s3 = boto3.client("s3", endpoint_url=endpoint_url or None)
    dest = Path(dest)
    if data_version:
        files = _dvc_listing(s3, bucket, prefix, data_version, data_path)
    else:
        files = _prefix_listing(s3, bucket, prefix, data_path)
    _download_all(s3, bucket, files, dest)
    return dest


def _dvc_key(prefix: str, md5: str) -> str:
    return "/".join(part for part in (prefix, "files", "md5", md5[:2], md5[2:]) if part)


def _dvc_listing(s3: Any, bucket: str, prefix: str, version: str, url: str) -> list[tuple[str, str, str]]:
    """(key, relative path, md5) of every file of DVC directory `version` in the remote."""
    if not (version.endswith(".dir") and len(version) == 36):
        raise InputError(url, f"data_version {version!r} is not a DVC directory md5 (<32 hex>.dir)")
    try:
        body = s3.get_object(Bucket=bucket, Key=_dvc_key(prefix, version))["Body"].read()
    except s3.exceptions.NoSuchKey as exc:
        raise InputError(url, f"data version {version} not in this DVC remote (dvc push it first)") from exc
    entries = json.loads(body)
    return [(_dvc_key(prefix, e["md5"]), e["relpath"], e["md5"]) for e in entries]


def _prefix_listing(s3: Any, bucket: str, prefix: str, url: str) -> list[tuple[str, str, str]]:
    """(key, relative path, "") of every object under the prefix."""
    base = f"{prefix}/" if prefix else ""
    files = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        keys = [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        files += [(key, key[len(base):], "") for key in keys]
    if not files:
        raise InputError(url, "no objects under this S3 prefix")
    return files


def _download_all(s3: Any, bucket: str, files: list[tuple[str, str, str]], dest: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def fetch(item: tuple[str, str, str]) -> None:
        key, relpath, md5 = item
        target = dest / relpath
        if not target.resolve().is_relative_to(dest.resolve()):
            raise InputError(f"s3://{bucket}/{key}", f"relative path {relpath!r} leaves the download folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))
        if md5 and hashlib.md5(target.read_bytes()).hexdigest() != md5:
            raise InputError(f"s3://{bucket}/{key}", f"{relpath}: content does not match its md5 {md5}")

    with ThreadPoolExecutor(max_workers=_DOWNLOAD_THREADS) as pool:
        list(pool.map(fetch, files))
