"""Distributed training on Kubernetes: a Training Operator `PyTorchJob` (kubeflow.org/v1), built, submitted
and watched with the official `kubernetes` client.

Why the PyTorchJob of the Training Operator (v1.9.0, the release whose CRD is vendored in
tests/fixtures/kubeflow/) rather than Kubeflow Trainer's `TrainJob` (trainer.kubeflow.org/v1alpha1): a
PyTorchJob is self-contained (image, command, replicas, nodes), where a TrainJob also needs a cluster-wide
`ClusterTrainingRuntime` installed and kept in step with it. The operator runs one pod per node, sets the
torchrun environment (`PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR`,
`PET_MASTER_PORT`) and the command is `torchrun ... -m covseg.launch STAGE ...`, which reads it.

Placement: GPU pods get the GPU pool's nodeSelector and toleration from `infra/gpu_pool.json`
(`covseg.gpu_pool`), the one source Terraform also reads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
OPERATOR_VERSION = "v1.9.0"
CONTAINER = "pytorch"  # the operator finds the training container by this name


class TrainJobFailed(RuntimeError):
    """The PyTorchJob ended Failed (or never ended in time); carries the job's reason and message."""

    def __init__(self, name: str, reason: str, message: str) -> None:
        super().__init__(f"PyTorchJob {name} failed: {reason}: {message}")
        self.name, self.reason, self.message = name, reason, message


def torchrun_command(
    stage: str,
    artifacts: str,
    data: str,
    params: str,
    inputs: dict[str, str] | None = None,
    output_uri: str = "",
    checkpoint_root: str = "",
    s3_endpoint_url: str = "",
) -> list[str]:
    """The container command of every replica: torchrun reads nodes, node rank, processes per node and the
    master's address from the PET_* environment the operator sets; `covseg.launch` downloads the
    `inputs` (name -> s3:// prefix, e.g. a KFP input artifact's URI), trains, and rank 0 uploads the output to
    `output_uri` (the KFP output artifact's URI). `params`: a JSON file in the image, or the JSON itself."""
    command = ["torchrun", "-m", "covseg.launch", stage, artifacts, data, params]
    for name, url in sorted((inputs or {}).items()):
        command += ["--input", f"{name}={url}"]
    for flag, value in (
        ("--output-uri", output_uri),
        ("--checkpoint-root", checkpoint_root),
        ("--s3-endpoint-url", s3_endpoint_url),
    ):
        if value:
            command += [flag, value]
    return command


def pytorchjob_manifest(
    name: str,
    image: str,
    command: Sequence[str],
    num_nodes: int,
    gpus_per_node: int,
    namespace: str = "kubeflow",
    pool: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    service_account: str | None = None,
    cpu: str = "4",
    memory: str = "16Gi",
    backoff_limit: int = 2,
    ttl_seconds_after_finished: int = 86400,
    secret_env: str = "",
) -> dict[str, Any]:
    """A PyTorchJob running `command` on `num_nodes` pods (one Master, num_nodes - 1 Workers) of
    `gpus_per_node` GPUs each, one process per GPU (one process per pod on CPU-only pods, gpus_per_node=0).

    With GPUs the pods get `pool`'s accelerator resource, nodeSelector and toleration (default: the GPU pool
    of `infra/gpu_pool.json`)."""
    if num_nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"num_nodes must be >= 1 and gpus_per_node >= 0 (got {num_nodes}, {gpus_per_node})")
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": list(command),
        "env": [{"name": k, "value": v} for k, v in sorted((env or {}).items())],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
    }
    if secret_env:  # S3 credentials from the pipeline's secret, never written into the manifest
        container["envFrom"] = [{"secretRef": {"name": secret_env, "optional": True}}]
    pod: dict[str, Any] = {"containers": [container]}
    if service_account:
        pod["serviceAccountName"] = service_account
    if gpus_per_node > 0:
        if pool is None:
            from covseg import gpu_pool

            pool = gpu_pool.load()
        gpus = str(gpus_per_node)
        container["resources"]["requests"][pool["accelerator_resource"]] = gpus
        container["resources"]["limits"][pool["accelerator_resource"]] = gpus
        pod["nodeSelector"] = {pool["node_selector"]["key"]: pool["node_selector"]["value"]}
        pod["tolerations"] = [
            {
                "key": pool["toleration"]["key"],
                "operator": "Equal",
                "value": pool["toleration"]["value"],
                "effect": pool["toleration"]["effect"],
            }
        ]
    replica = {
        "restartPolicy": "OnFailure",
        "template": {"metadata": {"labels": {"app": "covseg-train"}}, "spec": pod},
    }
    replicas: dict[str, Any] = {"Master": {"replicas": 1, **replica}}
    if num_nodes > 1:
        replicas["Worker"] = {"replicas": num_nodes - 1, **replica}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "covseg"}},
        "spec": {
            "nprocPerNode": str(max(gpus_per_node, 1)),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": {
                "backoffLimit": backoff_limit,
                "cleanPodPolicy": "None",
                "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            },
        },
    }


def custom_objects_api(api_client: Any = None) -> Any:
    """`CustomObjectsApi` on `api_client`, else on the in-cluster service account (a KFP task's pod), else
    on ~/.kube/config."""
    from kubernetes import client, config

    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            import os

            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # $KUBECONFIG as it is now
    return client.CustomObjectsApi(api_client)


def submit(manifest: dict[str, Any], api: Any) -> dict[str, Any]:
    """Create the job; returns the object the API server stored."""
    return api.create_namespaced_custom_object(
        GROUP, VERSION, manifest["metadata"]["namespace"], PLURAL, manifest
    )


def _outcome(obj: dict[str, Any]) -> tuple[str, str, str] | None:
    """("Succeeded" | "Failed", reason, message) once a terminal condition is True, else None."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return condition["type"], condition.get("reason", ""), condition.get("message", "")
    return None


def wait(
    name: str, namespace: str, api: Any, timeout_s: float = 24 * 3600, watch_timeout_s: int = 300
) -> dict[str, Any]:
    """Watch the job until a terminal condition; returns the object when Succeeded, raises `TrainJobFailed`
    with the job's reason when Failed, deleted, or still running after `timeout_s`. A watch the server
    closes (its timeout) is re-opened from the last resource version seen."""
    from kubernetes import watch

    deadline = time.monotonic() + timeout_s
    version = None
    while time.monotonic() < deadline:
        stream = watch.Watch().stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=version,
            timeout_seconds=int(max(1, min(watch_timeout_s, deadline - time.monotonic()))),
        )
        for event in stream:
            obj = event["object"]
            version = (obj.get("metadata") or {}).get("resourceVersion", version)
            if event["type"] == "DELETED":
                raise TrainJobFailed(name, "Deleted", "the job was deleted before it finished")
            outcome = _outcome(obj)
            if outcome is None:
                continue
            if outcome[0] == "Succeeded":
                return obj
            raise TrainJobFailed(name, outcome[1] or "Failed", outcome[2])
    raise TrainJobFailed(name, "Timeout", f"not finished after {timeout_s:.0f} s")


def run(manifest: dict[str, Any], api: Any = None, timeout_s: float = 24 * 3600) -> dict[str, Any]:
    """Submit the job and wait for it (what the pipeline's training task does in distributed mode)."""
    api = api or custom_objects_api()
    submit(manifest, api)
    return wait(manifest["metadata"]["name"], manifest["metadata"]["namespace"], api, timeout_s)


def job_name(stage: str, run_id: str) -> str:
    """A DNS-1123 name, unique per pipeline run and stage (`covseg-<stage>-<run id>`, at most 63 chars)."""
    import re

    slug = re.sub(r"[^a-z0-9-]+", "-", f"covseg-{stage}-{run_id}".lower()).strip("-")
    return slug[:63].rstrip("-")


def launch_stage(
    stage: str,
    run_id: str,
    image: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    output_uri: str,
    num_nodes: int,
    gpus_per_node: int,
    checkpoint_root: str = "",
    s3_endpoint_url: str = "",
    namespace: str = "kubeflow",
    service_account: str = "covseg-pipeline-runner",
    env: dict[str, str] | None = None,
    api: Any = None,
    timeout_s: float = 24 * 3600,
    secret_env: str = "",
) -> dict[str, Any]:
    """What a pipeline training task does in distributed mode: run `stage` as a PyTorchJob of `num_nodes`
    pods with `gpus_per_node` GPUs each, inputs read from and the output written to the task's artifact
    URIs, and wait; raises `TrainJobFailed` (failing the task) with the job's reason."""
    import json

    command = torchrun_command(
        stage,
        "/tmp/covseg/artifacts",
        "/tmp/covseg/data",
        json.dumps(params, sort_keys=True),
        inputs,
        output_uri,
        checkpoint_root,
        s3_endpoint_url,
    )
    manifest = pytorchjob_manifest(
        job_name(stage, run_id),
        image,
        command,
        num_nodes,
        gpus_per_node,
        namespace=namespace,
        env=env,
        service_account=service_account,
        secret_env=secret_env,
    )
    return run(manifest, api, timeout_s)


JOB_IMAGE_ENV = "COVSEG_JOB_IMAGE"
"""Image of a training task's PyTorchJob pods: the pipeline sets it on its training tasks (the CUDA image)."""
S3_SECRET = "covseg-s3"
"""The Secret the pipeline's S3 tasks read their credentials from; the job's pods read the same one."""


def train_in_job(
    stage: str,
    input_uris: dict[str, str],
    output_uri: str,
    output_path: str,
    params: dict[str, Any],
    num_nodes: int,
    gpus_per_node: int,
    checkpoint_root: str = "",
    s3_endpoint_url: str = "",
    api: Any = None,
    timeout_s: float = 24 * 3600,
) -> dict[str, Any]:
    """A pipeline training task in distributed mode: `launch_stage` as a PyTorchJob, then the output rank 0
    uploaded to `output_uri` brought into `output_path` (the task's output artifact); returns the stage's
    result as the stage wrote it (`metrics.json`; `rounds.json` for refine)."""
    import json
    import os
    from pathlib import Path

    from covseg.data import download_prefix

    image = os.environ.get(JOB_IMAGE_ENV, "")
    if not image:
        raise ValueError(f"${JOB_IMAGE_ENV} names no image: the pipeline sets it on its training tasks")
    launch_stage(
        stage,
        os.environ.get("COVSEG_PIPELINE_RUN_ID", "run"),
        image,
        params,
        input_uris,
        output_uri,
        num_nodes,
        gpus_per_node,
        checkpoint_root,
        s3_endpoint_url,
        api=api,
        timeout_s=timeout_s,
        secret_env=S3_SECRET,
    )
    if not download_prefix(output_uri, output_path, s3_endpoint_url):
        raise TrainJobFailed(
            job_name(stage, os.environ.get("COVSEG_PIPELINE_RUN_ID", "run")),
            "NoOutput",
            f"the job succeeded but wrote nothing under {output_uri}",
        )
    result = Path(output_path) / ("rounds.json" if stage == "refine" else "metrics.json")
    return json.loads(result.read_text())
