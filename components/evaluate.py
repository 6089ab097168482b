"""Evaluate component: Table-1 metrics of the coarse and fine labels, each refinement round and the final model."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE, log_numbers, use_tracking


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False, additional_funcs=[log_numbers, use_tracking])
def evaluate(
    ingested: Input[Dataset],
    slices: Input[Dataset],
    coarse_labels: Input[Dataset],
    fine_labels: Input[Dataset],
    segmenter: Input[Model],
    refined: Input[Model],
    params_json: str,
    mlflow_tracking_uri: str,
    data_version: str,
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    panel: Output[HTML],
) -> None:
    """Scores the coarse labels, the fine labels and the segmenter on the evaluation slices (pixel masks).

    Binds `covseg.stages.evaluate`: Dice, IoU, PPV, sensitivity, specificity per slice, averaged, at threshold
    0.5 and at the Inf-Net adaptive threshold.

    Args:
        ingested: The ingest output (the evaluation masks).
        slices: The lungs output.
        coarse_labels: The coarse output.
        fine_labels: The MIL output.
        segmenter: The segment output (round 0).
        refined: The refine output (each round and the final model).
        params_json: The merged parameter profile as JSON.
        mlflow_tracking_uri: MLflow server for the stage run; empty turns tracking off.
        data_version: The run's data version (DVC md5), a lineage tag of the MLflow run.
        evaluation: Output folder: ``metrics.json`` (the table) and ``panel.png``.
        metrics: Every number of the table, e.g. ``final.dice``, ``final.adaptive.dice``.
        panel: The method panel (CT, Grad-CAM, coarse, fine, final, ground truth) as a page for the KFP UI.
    """
    import base64
    import html
    import json
    from pathlib import Path

    from covseg import stages

    use_tracking(mlflow_tracking_uri, data_version)
    table = stages.evaluate(
        ingested.path,
        slices.path,
        coarse_labels.path,
        fine_labels.path,
        segmenter.path,
        refined.path,
        evaluation.path,
        json.loads(params_json),
    )
    log_numbers(metrics, table)
    figure = Path(evaluation.path) / "panel.png"
    image = "<p>no panel</p>"
    if figure.is_file():
        image = f'<img alt="method panel" src="data:image/png;base64,{base64.b64encode(figure.read_bytes()).decode()}">'
    Path(panel.path).write_text(
        f"<!doctype html><title>covseg evaluation</title>{image}"
        f"<pre>{html.escape(json.dumps(table, indent=2))}</pre>"
    )
