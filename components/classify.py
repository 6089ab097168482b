"""Classify component: the lesion / no-lesion slice classifier (slice labels only)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE, log_numbers, use_tracking


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False, additional_funcs=[log_numbers, use_tracking])
def classify(slices: Input[Dataset], params_json: str, mlflow_tracking_uri: str, data_version: str,
             classifier: Output[Model], metrics: Output[Metrics]) -> None:
    """Trains the slice classifier, balanced by label and source; reports validation AUC and the source probe.

    Binds `covseg.stages.classify`. Epoch checkpoints go to a temporary folder that lives as long as the task.

    Args:
        slices: The lungs output.
        params_json: The merged parameter profile as JSON.
        mlflow_tracking_uri: MLflow server for the stage run; empty turns tracking off.
        data_version: The run's data version (DVC md5), a lineage tag of the MLflow run.
        classifier: Output folder: ``classifier.pt`` and ``metrics.json``.
        metrics: ``val_auc.<source>`` and ``probe.source_auc_val``, training and validation sizes.
    """
    import json
    import tempfile

    from covseg import stages

    use_tracking(mlflow_tracking_uri, data_version)
    with tempfile.TemporaryDirectory(prefix="covseg-ckpt-") as checkpoints:
        result = stages.classify(slices.path, classifier.path, json.loads(params_json), checkpoints)
    log_numbers(metrics, {key: result[key] for key in ("val_auc", "probe", "n_train", "n_val")})
