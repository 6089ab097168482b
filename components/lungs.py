"""Lungs component: threshold lung masks and harmonised canonical slices."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def lungs(
    ingested: Input[Dataset], params_json: str, slices: Output[Dataset], metrics: Output[Metrics]
) -> None:
    """Segments the lungs (no network) and writes the lung-masked, harmonised slices every later stage uses.

    Binds `covseg.stages.lungs`.

    Args:
        ingested: The ingest output.
        params_json: The merged parameter profile as JSON.
        slices: Output folder: ``slices.npz`` (images, lung masks) and ``index.parquet``.
        metrics: Slice count and median lung fraction.
    """
    import json

    from covseg import stages

    index = stages.lungs(ingested.path, slices.path, json.loads(params_json))
    metrics.log_metric("slices", len(index))
    metrics.log_metric("median_lung_fraction", float(index["lung_fraction"].median()))
