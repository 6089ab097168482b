"""Coarse component: Grad-CAM coarse labels on the positive slices."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def coarse(
    slices: Input[Dataset],
    classifier: Input[Model],
    params_json: str,
    coarse_labels: Output[Dataset],
    metrics: Output[Metrics],
) -> None:
    """Thresholds the classifier's Grad-CAM inside the lungs into coarse lesion labels.

    Binds `covseg.stages.coarse`.

    Args:
        slices: The lungs output.
        classifier: The classify output.
        params_json: The merged parameter profile as JSON.
        coarse_labels: Output folder: ``coarse.npz`` and the per-slice statistics ``coarse.parquet``.
        metrics: Label count, mean label area (fraction of the lung) and share of empty labels.
    """
    import json

    from covseg import stages

    stats = stages.coarse(slices.path, classifier.path, coarse_labels.path, json.loads(params_json))
    metrics.log_metric("labels", len(stats))
    if len(stats):
        metrics.log_metric("mean_area_fraction_of_lung", float(stats["area_fraction_of_lung"].mean()))
        metrics.log_metric("empty_share", float(stats["empty"].astype(float).mean()))
