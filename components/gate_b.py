"""Gate B component: Great Expectations on the fine labels, before the segmenter."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def gate_b(
    fine_labels: Input[Dataset], params_json: str, report: Output[Artifact], metrics: Output[Metrics]
) -> None:
    """Checks the fine-label statistics and the MIL negative-instance accuracy floor; fails the run when unfit.

    Binds `covseg.stages.gate_b`. On failure the task raises `covseg.gates.GateFailed`, so the segmenter never
    trains.

    Args:
        fine_labels: The MIL output.
        params_json: The merged parameter profile as JSON (thresholds under ``gate_b``).
        report: The gate's JSON report.
        metrics: ``expectations`` checked and ``passed`` (1).
    """
    import json

    from covseg import stages

    result = stages.gate_b(fine_labels.path, report.path, json.loads(params_json))
    metrics.log_metric("expectations", len(result["checks"]))
    metrics.log_metric("passed", 1.0)
