"""Gate 0 component: Great Expectations on the raw-data manifest."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def gate0(
    ingested: Input[Dataset], params_json: str, report: Output[Artifact], metrics: Output[Metrics]
) -> None:
    """Validates the manifest (intensity ranges, spacing, labels, split leaks); fails the run when unfit.

    Binds `covseg.stages.gate0`. On failure the task raises `covseg.gates.GateFailed` (each failed expectation
    in its message and the log), so no later task runs.

    Args:
        ingested: The ingest output.
        params_json: The merged parameter profile as JSON.
        report: The gate's JSON report (every expectation and its outcome).
        metrics: ``expectations`` checked and ``passed`` (1).
    """
    import json

    from covseg import stages

    result = stages.gate0(ingested.path, report.path, json.loads(params_json))
    metrics.log_metric("expectations", len(result["checks"]))
    metrics.log_metric("passed", 1.0)
