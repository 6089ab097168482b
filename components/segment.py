"""Segment component: the supervised U-Net trained on the fine (pseudo) labels."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE, use_tracking


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False, additional_funcs=[use_tracking])
def segment(
    slices: Input[Dataset],
    fine_labels: Input[Dataset],
    params_json: str,
    mlflow_tracking_uri: str,
    data_version: str,
    checkpoint_root: str,
    s3_endpoint_url: str,
    segmenter: Output[Model],
    metrics: Output[Metrics],
    num_nodes: int = 1,
    gpus_per_node: int = 1,
) -> None:
    """Trains the U-Net on the lung-masked slices and their fine labels.

    Binds `covseg.stages.segment`, its epoch checkpoints kept by `covseg.checkpoint_store.durable_checkpoints`.

    Args:
        slices: The lungs output.
        fine_labels: The MIL output.
        params_json: The merged parameter profile as JSON.
        mlflow_tracking_uri: MLflow server for the stage run; empty turns tracking off.
        data_version: The run's data version (DVC md5), a lineage tag of the MLflow run.
        checkpoint_root: Where the epoch checkpoints outlive the task, so a rerun of a killed task resumes
            (`covseg.checkpoint_store`): ``s3://...`` on the cluster (the pipeline's default: under its
            pipeline root), a folder with kfp.local; empty keeps them in the task's temporary folder.
        s3_endpoint_url: S3 endpoint of an s3:// `checkpoint_root` (MinIO in dev); empty for AWS S3.
        segmenter: Output folder: ``segmenter.pt`` (+ its JSON metadata) and ``metrics.json``.
        metrics: Training size and the last epoch's loss.
        num_nodes: Pods of a distributed run (a PyTorchJob of the Training Operator, `covseg.trainjob`);
            when `num_nodes` x `gpus_per_node` > 1 the stage trains there and this task waits for it.
        gpus_per_node: GPUs (processes) per pod of a distributed run.
    """
    import json

    from covseg import stages

    use_tracking(mlflow_tracking_uri, data_version)
    result = stages.run_training_task(
        "segment",
        {"lungs": slices, "mil": fine_labels},
        segmenter,
        json.loads(params_json),
        checkpoint_root,
        s3_endpoint_url,
        num_nodes,
        gpus_per_node,
    )
    metrics.log_metric("n_train", result["n_train"])
    if result["history"]:
        metrics.log_metric("last_loss", float(result["history"][-1]["loss"]))
