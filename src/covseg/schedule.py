"""Scheduling the training pipeline on Kubeflow Pipelines.

`create_schedule` uploads a compiled pipeline to a KFP v2 API server and creates a recurring run of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

DEFAULT_SERVICE_ACCOUNT = "covseg-pipeline-runner"
"""Kubernetes ServiceAccount the runs execute as (infra/base/pipeline-runs/rbac.yaml)."""

# Field ranges of KFP's cron format (robfig/cron with a leading seconds field).
_CRON_FIELDS = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 6),
)
_CRON_NAMES = {
    "month": {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    "day of week": {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())},
}
_CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def normalize_cron(cron: str) -> str:
    """Checks a cron expression and returns it in KFP's six-field form.

    KFP's scheduler (robfig/cron) reads six fields: ``second minute hour day-of-month month
    day-of-week``. A standard five-field expression is accepted and gets ``0`` seconds prepended, so
    ``"0 3 * * 1"`` (03:00 on Mondays) becomes ``"0 0 3 * * 1"``. Descriptors such as ``@daily`` pass
    through unchanged. Times are UTC on the KFP server.

    Raises:
        ValueError: The expression is malformed or a value is out of range.
    """
    expr = " ".join(cron.split())
    if expr in _CRON_DESCRIPTORS:
        return expr
    fields = expr.split(" ")
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(f"cron {cron!r}: expected 5 or 6 fields, got {len(fields)}")
    for value, (name, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        _check_cron_field(cron, value, name, low, high)
    return " ".join(fields)


def _check_cron_field(cron: str, value: str, name: str, low: int, high: int) -> None:
    names = _CRON_NAMES.get(name, {})

    def number(token: str) -> int:
        token = token.upper()
        if token in names:
            return names[token]
        if not token.isdigit():
            raise ValueError(f"cron {cron!r}: bad {name} value {token!r}")
        if not low <= int(token) <= high:
            raise ValueError(f"cron {cron!r}: {name} {token} outside {low}-{high}")
        return int(token)

    for item in value.split(","):
        base, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"cron {cron!r}: bad step {step!r} in {name}")
        if base == "*" or (base == "?" and name in ("day of month", "day of week")):
            continue
        start, dash, end = base.partition("-")
        if dash:
            if number(start) > number(end):
                raise ValueError(f"cron {cron!r}: empty range {base!r} in {name}")
        else:
            number(start)


def create_schedule(
    endpoint: str,
    cron: str,
    pipeline_package: str = "pipelines/train_pipeline.yaml",
    experiment: str = "covseg",
    name: str = "covseg-retrain",
    params: dict | None = None,
    *,
    service_account: str | None = DEFAULT_SERVICE_ACCOUNT,
) -> str:
    """Creates a recurring run of a compiled pipeline on a KFP v2 server.

    Gets or creates the experiment; uploads the package as a new pipeline (named after the pipeline in
    it) or, when that pipeline exists, as a version named ``<pipeline>-<sha256[:12]>`` of the package
    (reused if it is already there); then creates an enabled recurring run with ``max_concurrency=1`` and
    ``no_catchup=True``: a retraining never overlaps the previous one, and a paused schedule does not
    backfill the runs it missed.

    Args:
        endpoint: KFP API URL, e.g. ``http://localhost:8080`` after
            ``kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80``.
        cron: Five-field (standard) or six-field (with seconds) cron expression, in UTC; five fields get
            ``0`` seconds prepended (see `normalize_cron`).
        pipeline_package: Compiled pipeline YAML.
        experiment: KFP experiment the schedule belongs to.
        name: Display name of the recurring run; must not already exist in the experiment.
        params: Pipeline parameters for every run.
        service_account: ServiceAccount the runs execute as; None for the KFP default (pipeline-runner).

    Returns:
        The recurring run's ID.

    Raises:
        ValueError: Bad cron expression, or a recurring run called ``name`` already exists.
        FileNotFoundError: No pipeline package at ``pipeline_package``.
    """
    import kfp
    import yaml

    cron6 = normalize_cron(cron)
    package = Path(pipeline_package)
    if not package.is_file():
        raise FileNotFoundError(f"pipeline package {package} not found (compile the pipeline first)")
    content = package.read_bytes()
    pipeline_name = next(yaml.safe_load_all(content))["pipelineInfo"]["name"]
    version_name = f"{pipeline_name}-{hashlib.sha256(content).hexdigest()[:12]}"

    # The client prints links to stdout (keep stdout for our result) and warns that it needs a KFP
    # server >= 2.0.0-beta.2 on every construction.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This client only works with", category=FutureWarning)
        client = kfp.Client(host=endpoint)
        experiment_id = client.create_experiment(name=experiment).experiment_id  # gets it if it exists
        existing = client.list_recurring_runs(
            experiment_id=experiment_id, filter=_equals("display_name", name)
        ).recurring_runs
        if existing:
            raise ValueError(
                f"recurring run {name!r} already exists in experiment {experiment!r} "
                f"(id {existing[0].recurring_run_id}); delete it first or choose another name"
            )
        pipeline_id, version_id = _upload(client, package, pipeline_name, version_name)
        recurring_run = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=name,
            description=f"{pipeline_name} on cron '{cron6}' (UTC)",
            cron_expression=cron6,
            max_concurrency=1,
            no_catchup=True,
            params=params or {},
            pipeline_id=pipeline_id,
            version_id=version_id,
            enabled=True,
            service_account=service_account,
        )
    return recurring_run.recurring_run_id


def _upload(client: Any, package: Path, pipeline_name: str, version_name: str) -> tuple[str, str]:
    """Returns (pipeline_id, version_id) of ``package`` on the server, uploading what is missing."""
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline_name).pipeline_id
        # A new pipeline has exactly one version: the package just uploaded.
        versions = client.list_pipeline_versions(pipeline_id, page_size=1).pipeline_versions
        if not versions:
            raise RuntimeError(f"pipeline {pipeline_name!r} was uploaded but has no version")
        return pipeline_id, versions[0].pipeline_version_id
    versions = client.list_pipeline_versions(
        pipeline_id, filter=_equals("display_name", version_name)
    ).pipeline_versions
    if versions:
        return pipeline_id, versions[0].pipeline_version_id
    version = client.upload_pipeline_version(str(package), version_name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def _equals(key: str, value: str) -> str:
    """A KFP list filter (JSON-serialised Filter proto) for ``key == value``."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})
