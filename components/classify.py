"""Classify component: the lesion / no-lesion slice classifier (slice labels only)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE, log_numbers, use_tracking


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False, additional_funcs=[log_numbers, use_tracking])
def classify(
    slices: Input[Dataset],
    params_json: str,
    mlflow_tracking_uri: str,
    data_version: str,
    checkpoint_root: str,
    s3_endpoint_url: str,
    classifier: Output[Model],
    metrics: Output[Metrics],
    num_nodes: int = 1,
    gpus_per_node: int = 1,
) -> None:
    """Trains the slice classifier, balanced by label and source; reports validation AUC and the source probe.

    Binds `covseg.stages.classify`, its epoch checkpoints kept by `covseg.checkpoint_store.durable_checkpoints`.

    Args:
        slices: The lungs output.
        params_json: The merged parameter profile as JSON.
        mlflow_tracking_uri: MLflow server for the stage run; empty turns tracking off.
        data_version: The run's data version (DVC md5), a lineage tag of the MLflow run.
        checkpoint_root: Where the epoch checkpoints outlive the task, so a rerun of a killed task resumes
            (`covseg.checkpoint_store`): ``s3://...`` on the cluster (the pipeline's default: under its
            pipeline root), a folder with kfp.local; empty keeps them in the task's temporary folder.
        s3_endpoint_url: S3 endpoint of an s3:// `checkpoint_root` (MinIO in dev); empty for AWS S3.
        classifier: Output folder: ``classifier.pt`` and ``metrics.json``.
        metrics: ``val_auc.<source>`` and ``probe.source_auc_val``, training and validation sizes.
        num_nodes: Pods of a distributed run (a PyTorchJob of the Training Operator, `covseg.trainjob`);
            when `num_nodes` x `gpus_per_node` > 1 the stage trains there and this task waits for it.
        gpus_per_node: GPUs (processes) per pod of a distributed run.
    """
    import json

    from covseg import stages

    use_tracking(mlflow_tracking_uri, data_version)
    result = stages.run_training_task(
        "classify",
        {"lungs": slices},
        classifier,
        json.loads(params_json),
        checkpoint_root,
        s3_endpoint_url,
        num_nodes,
        gpus_per_node,
    )
    log_numbers(metrics, {key: result[key] for key in ("val_auc", "probe", "n_train", "n_val")})
