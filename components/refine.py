"""Refine component: rounds in which the segmenter's predictions, the localisers and the prior relabel."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE, use_tracking


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False, additional_funcs=[use_tracking])
def refine(
    slices: Input[Dataset],
    coarse_labels: Input[Dataset],
    fine_labels: Input[Dataset],
    segmenter: Input[Model],
    params_json: str,
    mlflow_tracking_uri: str,
    data_version: str,
    checkpoint_root: str,
    s3_endpoint_url: str,
    refined: Output[Model],
    metrics: Output[Metrics],
    num_nodes: int = 1,
    gpus_per_node: int = 1,
) -> None:
    """Runs the refinement rounds after the segmenter and keeps the round with the best in-domain AUC.

    Binds `covseg.stages.refine`, its epoch checkpoints kept by `covseg.checkpoint_store.durable_checkpoints`.

    Args:
        slices: The lungs output.
        coarse_labels: The coarse output (Grad-CAM maps).
        fine_labels: The MIL output (fine labels and patch-score maps).
        segmenter: The segment output (round 0).
        params_json: The merged parameter profile as JSON.
        mlflow_tracking_uri: MLflow server for the stage run; empty turns tracking off.
        data_version: The run's data version (DVC md5), a lineage tag of the MLflow run.
        checkpoint_root: Where epoch checkpoints outlive the task (see the segment component).
        s3_endpoint_url: S3 endpoint of an s3:// `checkpoint_root`; empty for AWS S3.
        refined: Output folder: the final ``segmenter.pt`` (+ JSON), ``round<r>/``, ``rounds.json``.
        metrics: The kept round and its in-domain slice AUC beside the HU-band baseline.
        num_nodes: Pods of a distributed run (a PyTorchJob of the Training Operator, `covseg.trainjob`);
            when `num_nodes` x `gpus_per_node` > 1 the stage trains there and this task waits for it.
        gpus_per_node: GPUs (processes) per pod of a distributed run.
    """
    import json

    from covseg import stages

    use_tracking(mlflow_tracking_uri, data_version)
    result = stages.run_training_task(
        "refine",
        {"lungs": slices, "coarse": coarse_labels, "mil": fine_labels, "segment": segmenter},
        refined,
        json.loads(params_json),
        checkpoint_root,
        s3_endpoint_url,
        num_nodes,
        gpus_per_node,
    )
    metrics.log_metric("final_round", result["final_round"])
    for key in ("slice_auc", "hu_band_auc", "lung_auc"):
        value = result["in_domain"].get(key)
        if isinstance(value, float) and value == value:
            metrics.log_metric(f"in_domain.{key}", value)
