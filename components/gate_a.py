"""Gate A component: Great Expectations on the coarse labels, before MIL."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def gate_a(
    classifier: Input[Model],
    coarse_labels: Input[Dataset],
    params_json: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
) -> None:
    """Checks the coarse-label statistics and the classifier's validation AUC floor; fails the run when unfit.

    Binds `covseg.stages.gate_a`. On failure the task raises `covseg.gates.GateFailed`, so MIL never runs.

    Args:
        classifier: The classify output (its ``metrics.json`` holds the validation AUC).
        coarse_labels: The coarse output.
        params_json: The merged parameter profile as JSON (thresholds under ``gate_a``).
        report: The gate's JSON report.
        metrics: ``expectations`` checked and ``passed`` (1).
    """
    import json

    from covseg import stages

    result = stages.gate_a(classifier.path, coarse_labels.path, report.path, json.loads(params_json))
    metrics.log_metric("expectations", len(result["checks"]))
    metrics.log_metric("passed", 1.0)
