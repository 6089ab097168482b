"""The covseg training pipeline (KFP v2): ingest -> gate 0 -> lungs -> classify -> coarse -> gate A -> MIL ->
gate B -> segment -> refine -> evaluate -> register, one component per stage (``components/``).

Placement comes from ``infra/gpu_pool.json`` through `covseg.gpu_pool.load` (the file Terraform builds
the GPU node pool from): the GPU tasks (classify, coarse, mil, segment, refine) request one accelerator of its
resource, select its node label and tolerate its taint, and run the CUDA image. Every task requests and
limits CPU and memory. The training tasks (classify, MIL, segment, refine) keep their epoch checkpoints under
`checkpoint_root` (S3, beside the run's artifacts) and are retried: a killed pod's retry resumes after its
last finished epoch. kfp.local ignores placement and retries, so the same graph also runs on one machine
(`pipelines.runner.run_local`).

Compile with ``covseg pipeline compile`` (`pipelines.runner.compile_pipeline`), not by hand: the committed
``train_pipeline.yaml`` is a golden file that the tests recompile and compare.
"""

import json
from pathlib import Path
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Dataset

from components.classify import classify
from components.coarse import coarse
from components.evaluate import evaluate
from components.gate0 import gate0
from components.gate_a import gate_a
from components.gate_b import gate_b
from components.ingest import ingest
from components.lungs import lungs
from components.mil import mil
from components.refine import refine
from components.register import register
from components.segment import segment
from components.settings import CHECKPOINT_ROOT, GPU_IMAGE, MLFLOW_TRACKING_URI
from covseg import gpu_pool
from covseg.config import load_params
from covseg.trainjob import JOB_IMAGE_ENV

ROOT = Path(__file__).resolve().parents[1]
"""The checkout: its params.yaml gives the compiled default of `params_json`."""

PIPELINE_NAME = "covseg-training"
DEFAULT_PROFILE = "quick"

# (cpu request, cpu limit, memory request, memory limit) per task.
RESOURCES = {
    "ingest": ("1", "2", "4Gi", "8Gi"),
    "gate0": ("500m", "1", "2Gi", "4Gi"),
    "lungs": ("2", "4", "4Gi", "8Gi"),
    "classify": ("4", "8", "16Gi", "32Gi"),
    "coarse": ("2", "4", "8Gi", "16Gi"),
    "gate-a": ("500m", "1", "2Gi", "4Gi"),
    "mil": ("4", "8", "16Gi", "32Gi"),
    "gate-b": ("500m", "1", "2Gi", "4Gi"),
    "segment": ("4", "8", "16Gi", "32Gi"),
    "refine": ("4", "8", "16Gi", "32Gi"),
    "evaluate": ("2", "4", "4Gi", "8Gi"),
    "register": ("1", "2", "4Gi", "8Gi"),
}
GPU_TASKS = ("classify", "coarse", "mil", "segment", "refine")
TRACKED_TASKS = ("classify", "mil", "segment", "refine", "evaluate", "register")
TRAINING_TASKS = ("classify", "mil", "segment", "refine")
"""Tasks with epoch checkpoints under `checkpoint_root`: a retry after a killed pod resumes its training."""
RETRIED_TASKS = ("ingest", *TRAINING_TASKS, "register")
RETRIES = 2
"""Retries of the steps that talk to outside services (ingest: S3; register: the MLflow server) and of the
training steps (a preempted or evicted pod: the retry resumes from the last epoch checkpoint)."""

S3_SECRET = "covseg-s3"
"""Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the DVC remote and the checkpoint root
(infra/secrets.example.env)."""
S3_TASKS = ("ingest", *TRAINING_TASKS)


class TrainingOutputs(NamedTuple):
    """What a run returns."""

    evaluation: Dataset
    model_version: str
    decision: str


def params_to_json(params: dict) -> str:
    """The canonical JSON of a parameter set (sorted keys): what `params_json` carries."""
    return json.dumps(params, sort_keys=True)


DEFAULT_PARAMS_JSON = params_to_json(load_params(DEFAULT_PROFILE, path=ROOT / "params.yaml"))


def _configure(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """Name, resources, caching, retries, GPU placement and tracking wiring of one task."""
    cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[name]
    task.set_display_name(name)
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory_request).set_memory_limit(memory_limit)
    # register reads and changes the model registry (the current champion): a cached decision would be stale.
    task.set_caching_options(enable_caching=name != "register")
    if name in RETRIED_TASKS:
        task.set_retry(num_retries=RETRIES, backoff_duration="15s", backoff_factor=2.0)
    if name in GPU_TASKS:
        pool = gpu_pool.load()
        task.set_container_image(GPU_IMAGE)
        task.set_accelerator_type(pool["accelerator_resource"]).set_accelerator_limit(1)
        kubernetes.add_node_selector(
            task, label_key=pool["node_selector"]["key"], label_value=pool["node_selector"]["value"]
        )
        kubernetes.add_toleration(
            task,
            key=pool["toleration"]["key"],
            operator="Equal",
            value=pool["toleration"]["value"],
            effect=pool["toleration"]["effect"],
        )
    if name in TRACKED_TASKS:
        # The KFP API server labels every pod of a run with its run id: it tags the stage's MLflow run.
        kubernetes.use_field_path_as_env(
            task, env_name="COVSEG_PIPELINE_RUN_ID", field_path="metadata.labels['pipeline/runid']"
        )
    if name in TRAINING_TASKS:  # the image of the PyTorchJob a distributed run submits (covseg.trainjob)
        task.set_env_variable(JOB_IMAGE_ENV, GPU_IMAGE)
    if name in S3_TASKS:
        kubernetes.use_secret_as_env(
            task,
            secret_name=S3_SECRET,
            secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            },
            optional=True,
        )
    return task


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Weakly-supervised COVID-19 CT lesion segmentation: train, "
    "gate, evaluate and register the segmenter from slice-level labels.",
)
def training_pipeline(
    params_json: str = DEFAULT_PARAMS_JSON,
    data_path: str = "data",
    data_version: str = "",
    s3_endpoint_url: str = "",
    mlflow_tracking_uri: str = MLFLOW_TRACKING_URI,
    checkpoint_root: str = CHECKPOINT_ROOT,
    num_nodes: int = 1,
    gpus_per_node: int = 1,
) -> TrainingOutputs:
    """Trains, gates, evaluates and registers the covseg segmenter.

    Args:
        params_json: The merged parameter profile (``covseg params --profile NAME``) as JSON; defaults to the
            profile the pipeline was compiled with.
        data_path: Raw sources: a folder, an ``s3://`` prefix with the same layout, or (with `data_version`)
            the project's DVC remote, e.g. ``s3://covseg-dvc``.
        data_version: DVC md5 of the data (``data.dvc``); with an s3:// `data_path` that version is fetched
            and verified. Part of the ingest cache key: a new version re-runs everything downstream.
        s3_endpoint_url: S3 endpoint for `data_path` and `checkpoint_root` (MinIO in dev); empty for AWS S3.
        mlflow_tracking_uri: MLflow server of the stage runs and the model registry; empty runs without
            tracking and skips registering.
        checkpoint_root: Where classify, MIL and segment keep their epoch checkpoints (``s3://`` or a
            folder), keyed by parameters and inputs: a retried or rerun task resumes after its last finished
            epoch. Default: under the cluster's pipeline root. Empty: in the task's temporary folder.
        num_nodes: Distributed training: pods per training stage. When `num_nodes` x `gpus_per_node` > 1,
            classify, MIL, segment and refine each run as a PyTorchJob (Training Operator, `covseg.trainjob`:
            DDP under torchrun, one process per GPU) that their task submits and waits for; 1 x 1 trains in
            the task itself, as on kfp.local.
        gpus_per_node: Distributed training: GPUs (processes) per pod.

    Returns:
        evaluation: The evaluate output (``metrics.json``: Table-1 rows coarse / fine / each round / final /
            prior and the in-domain slice AUC beside the HU-band baseline, ``panel.png``).
        model_version: The registered model version (empty when registering was skipped).
        decision: Its promotion decision: ``champion``, ``challenger`` or ``skipped``.
    """
    tracking = {"mlflow_tracking_uri": mlflow_tracking_uri, "data_version": data_version}
    checkpoints = {
        "checkpoint_root": checkpoint_root,
        "s3_endpoint_url": s3_endpoint_url,
        "num_nodes": num_nodes,
        "gpus_per_node": gpus_per_node,
    }
    ingest_task = _configure(
        ingest(
            data_path=data_path,
            data_version=data_version,
            s3_endpoint_url=s3_endpoint_url,
            params_json=params_json,
        ),
        "ingest",
    )
    ingested = ingest_task.outputs["ingested"]
    gate0_task = _configure(gate0(ingested=ingested, params_json=params_json), "gate0")
    lungs_task = _configure(lungs(ingested=ingested, params_json=params_json), "lungs").after(gate0_task)
    slices = lungs_task.outputs["slices"]
    classify_task = _configure(
        classify(slices=slices, params_json=params_json, **tracking, **checkpoints), "classify"
    )
    classifier = classify_task.outputs["classifier"]
    coarse_task = _configure(coarse(slices=slices, classifier=classifier, params_json=params_json), "coarse")
    coarse_labels = coarse_task.outputs["coarse_labels"]
    gate_a_task = _configure(
        gate_a(classifier=classifier, coarse_labels=coarse_labels, params_json=params_json), "gate-a"
    )
    mil_task = _configure(
        mil(
            slices=slices,
            classifier=classifier,
            coarse_labels=coarse_labels,
            params_json=params_json,
            **tracking,
            **checkpoints,
        ),
        "mil",
    ).after(gate_a_task)
    fine_labels = mil_task.outputs["fine_labels"]
    gate_b_task = _configure(gate_b(fine_labels=fine_labels, params_json=params_json), "gate-b")
    segment_task = _configure(
        segment(slices=slices, fine_labels=fine_labels, params_json=params_json, **tracking, **checkpoints),
        "segment",
    ).after(gate_b_task)
    segmenter = segment_task.outputs["segmenter"]
    refine_task = _configure(
        refine(
            slices=slices,
            coarse_labels=coarse_labels,
            fine_labels=fine_labels,
            segmenter=segmenter,
            params_json=params_json,
            **tracking,
            **checkpoints,
        ),
        "refine",
    )
    refined = refine_task.outputs["refined"]
    evaluate_task = _configure(
        evaluate(
            ingested=ingested,
            slices=slices,
            coarse_labels=coarse_labels,
            fine_labels=fine_labels,
            segmenter=segmenter,
            refined=refined,
            params_json=params_json,
            **tracking,
        ),
        "evaluate",
    )
    register_task = _configure(
        register(ingested=ingested, segmenter=refined, params_json=params_json, **tracking), "register"
    ).after(evaluate_task)
    return TrainingOutputs(
        evaluation=evaluate_task.outputs["evaluation"],
        model_version=register_task.outputs["model_version"],
        decision=register_task.outputs["decision"],
    )
