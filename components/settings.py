"""What every covseg component shares: its container images and two helpers embedded in the components.

The helpers are plain functions handed to ``@dsl.component(additional_funcs=...)``: KFP copies their source
into each component, so they may use only the standard library and names the component source imports
(``from kfp import dsl``).
"""

import os

from kfp import dsl

BASE_IMAGE = os.environ.get("COVSEG_IMAGE", "ghcr.io/covseg/covseg:0.1.0")
"""CPU image of every component (docker/Dockerfile); override with $COVSEG_IMAGE when compiling."""

GPU_IMAGE = os.environ.get("COVSEG_GPU_IMAGE", "ghcr.io/covseg/covseg-gpu:0.1.0")
"""CUDA image (docker/Dockerfile.gpu) the pipeline sets on its GPU tasks; override with $COVSEG_GPU_IMAGE."""

MLFLOW_TRACKING_URI = "http://mlflow.covseg.svc.cluster.local:5000"
"""The in-cluster MLflow server (infra/base/covseg/mlflow.yaml): the pipeline's default tracking URI."""

CHECKPOINT_ROOT = "s3://covseg-pipelines/v2/artifacts/covseg-checkpoints"
"""Where the training tasks' epoch checkpoints outlive their pods: under the pipeline root that
infra/base/pipeline-runs/kfp-launcher.yaml sets (``defaultPipelineRoot``); the pipeline's default."""


def log_numbers(metrics: dsl.Metrics, values: dict, prefix: str = "") -> None:
    """Logs every finite number of a nested dict into a KFP Metrics artifact.

    Args:
        metrics: The component's ``Output[Metrics]``.
        values: Possibly nested dict; nested keys are joined with dots (``final.dice``).
        prefix: Prepended to every metric name.
    """
    import math

    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            log_numbers(metrics, value, f"{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            metrics.log_metric(name, float(value))


def use_tracking(mlflow_tracking_uri: str, data_version: str = "") -> None:
    """Points covseg's MLflow tracking at ``mlflow_tracking_uri``; an empty URI turns stage tracking off.

    The lineage tags of every stage run: the pipeline run id comes from ``$COVSEG_PIPELINE_RUN_ID`` (on the
    cluster the pipeline maps it from the pod label ``pipeline/runid``; ``pipelines.runner.run_local`` sets it
    locally); the data version from `data_version` (``$COVSEG_DATA_MD5``, used where no ``data.dvc`` is at
    hand, as in the images).
    """
    import os

    if data_version:
        os.environ["COVSEG_DATA_MD5"] = data_version
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
        os.environ.pop("COVSEG_TRACKING", None)
    else:
        os.environ["COVSEG_TRACKING"] = "0"
