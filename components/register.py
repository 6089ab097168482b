"""Register component: the segmenter as an MLflow model version, promoted to champion or not."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE, log_numbers, use_tracking


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False, additional_funcs=[log_numbers, use_tracking])
def register(
    ingested: Input[Dataset],
    segmenter: Input[Model],
    params_json: str,
    mlflow_tracking_uri: str,
    data_version: str,
    metrics: Output[Metrics],
) -> NamedTuple("RegisterOutputs", model_version=str, decision=str):
    """Logs the segmenter as the MLflow pyfunc model, registers a version and decides champion / challenger.

    Binds `covseg.stages.register`. Candidate and champion are scored on the same evaluation slices.

    Args:
        ingested: The ingest output (the evaluation slices).
        segmenter: The refine output (the final model; any folder holding a segmenter.pt).
        params_json: The merged parameter profile as JSON (``register``: model name, margin, floors).
        mlflow_tracking_uri: MLflow server holding the registry; empty skips registering (a run without
            MLflow, e.g. a local test run): the outputs are then ``""`` and ``"skipped"``.
        data_version: The run's data version (DVC md5), a lineage tag of the MLflow run.
        metrics: ``registered`` (1 or 0), the candidate's evaluation numbers (``candidate.dice``...) and
            ``promoted`` (1 when it took the champion alias).

    Returns:
        model_version: The registered version.
        decision: The promotion decision: ``champion`` or ``challenger``.
    """
    import json
    from collections import namedtuple

    if not mlflow_tracking_uri:  # a run without MLflow (local tests) has no registry to write to
        print("register: mlflow_tracking_uri is empty, nothing registered")
        metrics.log_metric("registered", 0.0)
        return namedtuple("RegisterOutputs", ["model_version", "decision"])("", "skipped")
    from covseg import stages

    use_tracking(mlflow_tracking_uri, data_version)
    result = stages.register(ingested.path, segmenter.path, json.loads(params_json))
    decision = str(result["decision"]["decision"])
    log_numbers(
        metrics,
        {"registered": 1.0, "candidate": result["candidate"], "promoted": float(decision == "champion")},
    )
    return namedtuple("RegisterOutputs", ["model_version", "decision"])(str(result["version"]), decision)
