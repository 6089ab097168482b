"""The KFP training pipeline: the compiled YAML (golden file, GPU placement, resources, gate order, checkpoint
root), the whole graph run by kfp.local on real CT slices fetched from a DVC remote on moto S3, the gate-A
stop, and a training task killed mid-run that resumes from its checkpoints on S3.

kfp.local runs every component in its own process with this venv's Python (no image), reading and writing
real artifact folders; only the cluster settings (placement, resources, retries, caching) are ignored.
"""

import difflib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from helpers import (
    BIN,
    REPO_ROOT,
    TELEMETRY_OFF,
    build_ct_md,
    build_medseg,
    build_seg_slices,
    require_shared,
    sha256_tree,
)

from covseg import layout

GOLDEN = REPO_ROOT / "pipelines" / "train_pipeline.yaml"
SDK_VERSION_KEYS = {"sdkVersion"}
STAGES = tuple(s.name.replace("_", "-") for s in layout.STAGES)
GPU_TASKS = {"classify", "coarse", "mil", "segment", "refine"}
TRAINING_TASKS = {s.name for s in layout.STAGES if s.trains}
ROW_KEYS = ("dice", "iou", "ppv", "sensitivity", "specificity")
# Four short real DICOM series (both labels in train and in validation), two JPEG volumes, four medseg pairs:
# every split the stages need, in a tree small enough for kfp.local's one-process-per-task on 2 cores.
SERIES = {"P001": 25, "cap001": 85, "normal001": 61, "normal002": 61}
SLICES = (
    "coronacases_org_001_50",
    "coronacases_org_001_51",
    "coronacases_org_001_52",
    "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm_9",
    "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm_10",
    "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm_11",
)
MEDSEG = ("medseg_000", "medseg_001", "medseg_002", "medseg_003")
# The tiny profile trains one epoch on a handful of slices: its Grad-CAM labels may come out empty, which
# gate A's area floor would (rightly) refuse. This test is about the pipeline, not about label quality.
TINY_OVERRIDES = {"gate_a": {"area_min": 0.0}, "gate_b": {"area_min": 0.0}}


# --- compiled YAML ---------------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _without_sdk_version(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_sdk_version(v) for k, v in node.items() if k not in SDK_VERSION_KEYS}
    if isinstance(node, list):
        return [_without_sdk_version(v) for v in node]
    return node


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The pipeline compiled now, in a fresh process with the default images (pipeline spec, platform spec)."""
    out = tmp_path_factory.mktemp("compiled") / "train_pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if k not in ("COVSEG_IMAGE", "COVSEG_GPU_IMAGE")}
    code = "import sys; from pipelines.runner import compile_pipeline; compile_pipeline(sys.argv[1])"
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return _load_yaml(out)


def test_compiled_pipeline_matches_golden_file(compiled: list[dict[str, Any]]) -> None:
    assert GOLDEN.is_file(), f"{GOLDEN} missing: compile it with `covseg pipeline compile` and commit it"
    fresh, golden = _without_sdk_version(compiled), _without_sdk_version(_load_yaml(GOLDEN))
    if fresh != golden:
        diff = difflib.unified_diff(
            yaml.safe_dump_all(golden).splitlines(),
            yaml.safe_dump_all(fresh).splitlines(),
            "pipelines/train_pipeline.yaml (committed)",
            "compiled now",
            lineterm="",
            n=2,
        )
        pytest.fail(
            "pipelines/train_pipeline.yaml is out of date with components/, pipelines/, params.yaml or "
            "infra/gpu_pool.json: recompile with `covseg pipeline compile` and commit it.\n"
            + "\n".join(list(diff)[:80])
        )


def _tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return spec["root"]["dag"]["tasks"]


def _executor(spec: dict[str, Any], task: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return label, spec["deploymentSpec"]["executors"][label]["container"]


def test_placement_and_resources_come_from_gpu_pool_json(compiled: list[dict[str, Any]]) -> None:
    from covseg import gpu_pool

    pool = gpu_pool.load()
    spec, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = _tasks(spec)
    assert set(tasks) == set(STAGES)
    for name, task in tasks.items():
        label, container = _executor(spec, task)
        resources = container.get("resources", {})
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert resources.get(key), f"{name}: no {key}"
        placement = k8s.get(label, {})
        if name in GPU_TASKS:
            assert resources["accelerator"]["resourceType"] == pool["accelerator_resource"], name
            assert resources["accelerator"]["resourceCount"] == "1", name
            selector = pool["node_selector"]
            assert placement["nodeSelector"] == {"labels": {selector["key"]: selector["value"]}}, name
            toleration = pool["toleration"]
            expected = {
                "key": toleration["key"],
                "operator": "Equal",
                "value": toleration["value"],
                "effect": toleration["effect"],
            }
            assert placement["tolerations"] == [expected], name
            assert "covseg-gpu" in container["image"], f"{name} must run the CUDA image"
        else:
            assert "accelerator" not in resources and "nodeSelector" not in placement, name
            assert "tolerations" not in placement, name
            assert "covseg-gpu" not in container["image"], name


def test_gates_guard_the_next_stage_and_retries_caching_are_set(compiled: list[dict[str, Any]]) -> None:
    """A failed gate fails its task, and KFP runs a task only after every task it depends on succeeded."""
    tasks = _tasks(compiled[0])
    assert "gate0" in tasks["lungs"]["dependentTasks"]
    assert "gate-a" in tasks["mil"]["dependentTasks"]
    assert "gate-b" in tasks["segment"]["dependentTasks"]
    for name, task in tasks.items():
        retries = task.get("retryPolicy", {}).get("maxRetryCount", 0)
        assert (retries > 0) == (name in {"ingest", "register"} | TRAINING_TASKS), name
        assert task["cachingOptions"].get("enableCache", False) == (name != "register"), name


def test_training_tasks_resume_from_checkpoints_under_the_pipeline_root(
    compiled: list[dict[str, Any]],
) -> None:
    """classify, MIL and segment get the checkpoint root (default: the cluster's pipeline root, where
    infra's kfp-launcher puts it) and the S3 credentials to reach it; a retry of a killed pod resumes."""
    spec, platform = compiled
    launcher = yaml.safe_load(
        (REPO_ROOT / "infra" / "base" / "pipeline-runs" / "kfp-launcher.yaml").read_text()
    )
    default = spec["root"]["inputDefinitions"]["parameters"]["checkpoint_root"]["defaultValue"]
    assert default.startswith(launcher["data"]["defaultPipelineRoot"].rstrip("/") + "/")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, task in _tasks(spec).items():
        parameters = task["inputs"]["parameters"]
        assert ("checkpoint_root" in parameters) == (name in TRAINING_TASKS), name
        label, _ = _executor(spec, task)
        secrets = [s["secretName"] for s in k8s.get(label, {}).get("secretAsEnv", [])]
        assert ("covseg-s3" in secrets) == (name in TRAINING_TASKS | {"ingest"}), name
    for name in TRAINING_TASKS:
        parameters = _tasks(spec)[name]["inputs"]["parameters"]
        assert parameters["checkpoint_root"] == {"componentInputParameter": "checkpoint_root"}
        assert parameters["s3_endpoint_url"] == {"componentInputParameter": "s3_endpoint_url"}


def test_training_tasks_can_run_distributed(compiled: list[dict[str, Any]]) -> None:
    """`num_nodes` / `gpus_per_node` reach the four training tasks (1 x 1 by default: train in the task), and
    each knows the image of the PyTorchJob it would submit (covseg.trainjob)."""
    from covseg.trainjob import JOB_IMAGE_ENV

    spec, _ = compiled
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["num_nodes"]["defaultValue"] == 1 and defaults["gpus_per_node"]["defaultValue"] == 1
    for name, task in _tasks(spec).items():
        parameters = task["inputs"]["parameters"]
        _, container = _executor(spec, task)
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        distributed = name in TRAINING_TASKS
        assert ("num_nodes" in parameters and "gpus_per_node" in parameters) == distributed, name
        assert (JOB_IMAGE_ENV in env) == distributed, name
        if distributed:
            assert parameters["num_nodes"] == {"componentInputParameter": "num_nodes"}
            assert env[JOB_IMAGE_ENV] == container["image"] and "covseg-gpu" in env[JOB_IMAGE_ENV]


# --- kfp.local on real data from a DVC remote ------------------------------------------------------------------


def _run(cwd: Path, *cmd: str) -> None:
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        "GIT_CONFIG_NOSYSTEM": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{' '.join(cmd)}: {result.stdout}\n{result.stderr}"


class DvcRemote:
    """A scratch repository whose `data/` was `dvc push`ed to moto S3."""

    def __init__(self, url: str, version: str, data: Path) -> None:
        self.url, self.version, self.data = url, version, data


@pytest.fixture(scope="module")
def dvc_remote(moto_server: Any, tmp_path_factory: pytest.TempPathFactory) -> DvcRemote:
    require_shared()
    repo = tmp_path_factory.mktemp("dvc-repo")
    data = repo / "data"
    build_ct_md(data, SERIES)
    build_seg_slices(data, SLICES)
    build_medseg(data, MEDSEG)
    _run(repo, "git", "init", "-q")
    _run(repo, str(BIN / "dvc"), "init", "-q")
    _run(repo, str(BIN / "dvc"), "add", "-q", "data")
    bucket = f"covseg-dvc-{uuid.uuid4().hex[:8]}"
    moto_server.create_bucket(bucket)
    url = f"s3://{bucket}/dvcstore"
    _run(repo, str(BIN / "dvc"), "remote", "add", "-d", "store", url)
    _run(
        repo,
        str(BIN / "dvc"),
        "remote",
        "modify",
        "--local",
        "store",
        "endpointurl",
        moto_server.endpoint_url,
    )
    _run(repo, str(BIN / "dvc"), "push", "-q")
    version = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    return DvcRemote(url, version, data)


@pytest.fixture(scope="module")
def local_run(dvc_remote: DvcRemote, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One kfp.local run of the training pipeline (tiny profile, tracking off): data from the DVC remote."""
    from pipelines.runner import run_local

    root = tmp_path_factory.mktemp("kfp-local")
    started = time.monotonic()
    # The task processes inherit this environment: moto's endpoint and fake credentials (moto_server).
    result = run_local(
        "tiny",
        data_path=dvc_remote.url,
        pipeline_root=root,
        data_version=dvc_remote.version,
        mlflow_tracking_uri="",
        overrides=TINY_OVERRIDES,
    )
    result["seconds"] = time.monotonic() - started
    yield result


@pytest.mark.slow
def test_local_run_trains_and_evaluates_end_to_end(local_run: dict[str, Any]) -> None:
    run_dir = local_run["run_dir"]
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(STAGES), "every task ran"
    table = local_run["evaluation"]
    for row in ("coarse", "fine", "final"):
        for key in ROW_KEYS:
            assert 0.0 <= table[row][key] <= 1.0, (row, key, table[row][key])
            assert 0.0 <= table[row]["adaptive"][key] <= 1.0, (row, "adaptive", key)
        assert table[row]["n_slices"] == len(MEDSEG)
    # Real artifacts, handed from task to task as folders.
    assert (run_dir / "ingest" / "ingested" / "manifest.parquet").is_file()
    assert (run_dir / "classify" / "classifier" / "classifier.pt").is_file()
    assert (run_dir / "segment" / "segmenter" / "segmenter.pt").is_file()
    assert "<img" in (run_dir / "evaluate" / "panel").read_text()
    executor_output = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    logged = executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["final.dice"] == pytest.approx(table["final"]["dice"])
    assert (local_run["model_version"], local_run["decision"]) == ("", "skipped"), (
        "no MLflow: nothing registered"
    )
    # Epoch checkpoints went under the pipeline root, one folder per training stage, swept once it finished.
    checkpoints = run_dir.parent / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(TRAINING_TASKS)
    assert [p for p in checkpoints.rglob("*") if p.is_file()] == []
    print(f"kfp.local run: {local_run['seconds']:.0f} s")


@pytest.mark.slow
def test_ingest_read_the_dvc_version_it_was_given(local_run: dict[str, Any], dvc_remote: DvcRemote) -> None:
    from covseg.ingest import MANIFEST

    ingest = local_run["run_dir"] / "ingest"
    manifest = pd.read_parquet(ingest / "ingested" / MANIFEST)
    images = [p for p in dvc_remote.data.rglob("*") if p.suffix in (".dcm", ".jpg")]
    assert len(manifest) == len(images) == 4 * 6 + len(SLICES) + len(MEDSEG)
    metadata = json.loads((ingest / "executor_output.json").read_text())["artifacts"]["ingested"][
        "artifacts"
    ][0]
    assert metadata["metadata"]["data_version"] == dvc_remote.version


def _corrupt_coarse_labels(run_dir: Path, out: Path) -> Path:
    """A copy of the run's real coarse labels where one positive slice's label spills out of the lung."""
    import numpy as np

    from covseg.cam import MAPS, STATS, cam_rows, label_stats
    from covseg.training import SliceSet

    coarse = Path(shutil.copytree(run_dir / "coarse" / "coarse_labels", out))
    slices = SliceSet.load(run_dir / "lungs" / "slices")
    maps = dict(np.load(coarse / MAPS))
    rows = cam_rows(slices.index)
    positive = rows[(rows["label"] == 1) & rows["split"].isin(["train", "val"])]["row"].to_numpy()
    assert len(positive) > 0
    maps["coarse"][positive[0]] = True  # the whole slice: body, table and air outside the lungs
    np.savez_compressed(coarse / MAPS, **maps)
    old = pd.read_parquet(coarse / STATS)
    stats = label_stats(slices, maps["coarse"], rows).assign(classifier_p=old["classifier_p"].to_numpy())
    stats.to_parquet(coarse / STATS, index=False)
    return coarse


def test_gate_a_failure_stops_the_run_before_mil(local_run: dict[str, Any], tmp_path: Path) -> None:
    """Real coarse labels, corrupted, fed through kfp.local to the real gate A and MIL components.

    The training pipeline's own wiring (mil depends on gate-a) is checked on the compiled YAML above; here
    kfp.local executes that edge: gate A's task fails and the MIL task never starts.
    """
    from kfp import dsl, local

    from components.gate_a import gate_a
    from components.mil import mil
    from covseg.config import load_params

    run_dir = local_run["run_dir"]
    coarse = _corrupt_coarse_labels(run_dir, tmp_path / "coarse")

    @dsl.pipeline(name="gate-a-then-mil")
    def gate_a_then_mil(params_json: str) -> None:
        slices = dsl.importer(
            artifact_uri=str(run_dir / "lungs" / "slices"), artifact_class=dsl.Dataset
        ).output
        classifier = dsl.importer(
            artifact_uri=str(run_dir / "classify" / "classifier"), artifact_class=dsl.Model
        ).output
        labels = dsl.importer(artifact_uri=str(coarse), artifact_class=dsl.Dataset).output
        gate = gate_a(classifier=classifier, coarse_labels=labels, params_json=params_json)
        mil(
            slices=slices,
            classifier=classifier,
            coarse_labels=labels,
            params_json=params_json,
            mlflow_tracking_uri="",
            data_version="",
            checkpoint_root=str(tmp_path / "checkpoints"),
            s3_endpoint_url="",
        ).after(gate)

    root = tmp_path / "outputs"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    params = load_params("tiny", overrides=TINY_OVERRIDES)
    with pytest.raises(RuntimeError, match="Inner task failed: .*gate-a"):
        gate_a_then_mil(params_json=json.dumps(params))
    (run,) = root.iterdir()
    assert not (run / "mil").exists(), "MIL ran after a failed gate A"
    report = json.loads((run / "gate-a" / "report").read_text())
    assert report["success"] is False
    assert any("inside_lung_fraction" in failure for failure in report["failures"]), report["failures"]


def test_register_component_registers_the_segmenter(
    local_run: dict[str, Any], mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from kfp import dsl
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from components.register import register
    from covseg.config import load_params

    name = f"covseg-kfp-{uuid.uuid4().hex[:8]}"
    params = load_params("tiny", overrides={**TINY_OVERRIDES, "register": {"name": name}})
    run_dir = local_run["run_dir"]
    # The component sets these for its process; the monkeypatch gives them back to the other tests.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("COVSEG_TRACKING", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("COVSEG_PIPELINE_RUN_ID", "kfp-register-test")
    before = getattr(tracking_utils, "_tracking_uri", None)
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    try:
        out = register.python_func(
            ingested=dsl.Dataset(uri=str(run_dir / "ingest" / "ingested")),
            segmenter=dsl.Model(uri=str(run_dir / "segment" / "segmenter")),
            params_json=json.dumps(params),
            mlflow_tracking_uri=mlflow_server,
            data_version="0123456789abcdef0123456789abcdef.dir",
            metrics=metrics,
        )
        version = mlflow.MlflowClient(mlflow_server, mlflow_server).get_model_version(name, out.model_version)
    finally:
        mlflow.set_tracking_uri(before)
    assert out.model_version == "1" and out.decision in ("champion", "challenger")
    assert version.tags["promotion_decision"] == out.decision
    assert metrics.metadata["registered"] == 1.0
    assert 0.0 <= metrics.metadata["candidate.dice"] <= 1.0


# --- fetch_data: where the cluster's ingest finds the raw data -------------------------------------------------


def test_fetch_data_rebuilds_a_dvc_version_and_checks_it(
    dvc_remote: DvcRemote, moto_server: Any, tmp_path: Path
) -> None:
    from covseg.data import fetch_data
    from covseg.errors import InputError

    dest = fetch_data(dvc_remote.url, tmp_path / "ok", dvc_remote.version, moto_server.endpoint_url)
    assert sha256_tree(dest) == sha256_tree(dvc_remote.data)

    with pytest.raises(InputError, match="not in this DVC remote"):
        fetch_data(dvc_remote.url, tmp_path / "missing", "0" * 32 + ".dir", moto_server.endpoint_url)
    with pytest.raises(InputError, match="not a DVC directory md5"):
        fetch_data(dvc_remote.url, tmp_path / "bad", "latest", moto_server.endpoint_url)

    # One object of the version rewritten in the remote: the download no longer matches its md5.
    bucket, _, prefix = dvc_remote.url[len("s3://") :].partition("/")
    s3 = moto_server.s3_client()
    listing = json.loads(
        s3.get_object(
            Bucket=bucket, Key=f"{prefix}/files/md5/{dvc_remote.version[:2]}/{dvc_remote.version[2:]}"
        )["Body"].read()
    )
    victim = listing[0]["md5"]
    s3.put_object(Bucket=bucket, Key=f"{prefix}/files/md5/{victim[:2]}/{victim[2:]}", Body=b"not the file")
    try:
        with pytest.raises(InputError, match="does not match its md5"):
            fetch_data(dvc_remote.url, tmp_path / "tampered", dvc_remote.version, moto_server.endpoint_url)
    finally:
        original = (dvc_remote.data / listing[0]["relpath"]).read_bytes()
        s3.put_object(Bucket=bucket, Key=f"{prefix}/files/md5/{victim[:2]}/{victim[2:]}", Body=original)


def test_fetch_data_from_a_plain_prefix_and_a_folder(moto_server: Any, tmp_path: Path) -> None:
    from covseg.data import fetch_data
    from covseg.errors import InputError

    bucket = f"covseg-raw-{uuid.uuid4().hex[:8]}"
    moto_server.create_bucket(bucket)
    s3 = moto_server.s3_client()
    files = {"covid-ct-md/slice_labels.csv": b"case,file\n", "medseg-100/images/a.jpg": b"\xff\xd8jpeg"}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"raw/v1/{key}", Body=body)
    dest = fetch_data(f"s3://{bucket}/raw/v1/", tmp_path / "dest", endpoint_url=moto_server.endpoint_url)
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    with pytest.raises(InputError, match="no objects"):
        fetch_data(f"s3://{bucket}/raw/v2", tmp_path / "none", endpoint_url=moto_server.endpoint_url)

    assert fetch_data(str(tmp_path), tmp_path / "unused") == tmp_path
    with pytest.raises(InputError, match="raw data folder not found"):
        fetch_data(str(tmp_path / "nowhere"), tmp_path / "unused")


# --- a killed training task resumes from checkpoints under the pipeline root -------------------------------------

RESUME_EPOCHS = 6
BAR = re.compile(r"classify:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) ")
# A pipeline of one training task, run by kfp.local in its own process group (killed as a pod would be).
CLASSIFY_ONLY = """
import sys
from kfp import dsl, local
from components.classify import classify

pipeline_root, lungs, params_json, checkpoint_root, endpoint = sys.argv[1:6]


@dsl.pipeline(name="classify-only")
def classify_only() -> None:
    slices = dsl.importer(artifact_uri=lungs, artifact_class=dsl.Dataset).output
    classify(slices=slices, params_json=params_json, mlflow_tracking_uri="", data_version="",
             checkpoint_root=checkpoint_root, s3_endpoint_url=endpoint)


local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=True)
classify_only()
"""


def _classify_task(
    pipeline_root: Path,
    lungs: Path,
    params: dict[str, Any],
    checkpoint_root: str,
    endpoint: str,
    log: Path,
    kill_when: Any = None,
) -> subprocess.Popen[bytes]:
    """Runs CLASSIFY_ONLY; with `kill_when`, SIGKILLs its whole process group once `kill_when()` is true."""
    env = {**os.environ, **TELEMETRY_OFF, "OMP_NUM_THREADS": "1"}  # 1 thread: 2 spin-waiting ones crawl here
    cmd = [
        sys.executable,
        "-c",
        CLASSIFY_ONLY,
        str(pipeline_root),
        str(lungs),
        json.dumps(params),
        checkpoint_root,
        endpoint,
    ]
    with open(log, "wb") as out:
        task = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        if kill_when is None:
            task.wait(timeout=300)
            return task
        deadline = time.monotonic() + 240
        while not kill_when():
            assert task.poll() is None, f"finished before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint on S3 after 240 s"
            time.sleep(0.05)
        os.killpg(task.pid, signal.SIGKILL)  # the driver and the task process: the pod is gone
        task.wait(timeout=30)
        return task
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
            task.wait(timeout=30)


def _classifier_output(pipeline_root: Path, log: Path) -> Path:
    """The classifier folder of the one finished run under `pipeline_root`."""
    done = [
        p
        for p in pipeline_root.glob("classify-only-*/classify/classifier")
        if (p / "classifier.pt").is_file()
    ]
    assert len(done) == 1, log.read_text()[-3000:]
    return done[0]


@pytest.mark.slow
def test_killed_training_task_resumes_from_checkpoints_on_s3(
    trained_tiny: Any, moto_server: Any, tmp_path: Path
) -> None:
    """A classify task killed mid-training (SIGKILL, like a lost pod) reruns and resumes after its last epoch.

    The checkpoints live on (moto) S3 as on the cluster, and the rerun reads its input from a fresh copy
    (new files, same bytes, as a new pod downloads it): the rerun skips the finished epochs and ends with
    the weights of an uninterrupted run; a checkpoint of an old key is swept once the stage finishes.
    """
    import torch

    from covseg.config import load_params

    params = load_params("tiny")
    params["classify"].update(epochs=RESUME_EPOCHS, draws_per_epoch=256, probe_epochs=0)
    bucket = f"covseg-ckpt-{uuid.uuid4().hex[:8]}"
    moto_server.create_bucket(bucket)
    s3 = moto_server.s3_client()
    stale = "checkpoints/classify/classifier-0123456789abcdef.ckpt"
    s3.put_object(Bucket=bucket, Key=stale, Body=b"a killed run's checkpoint from before a parameter change")
    root, endpoint = f"s3://{bucket}/checkpoints", moto_server.endpoint_url

    def checkpoints() -> list[str]:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix="checkpoints/classify/").get("Contents", [])
        return [o["Key"] for o in listing]

    killed = _classify_task(
        tmp_path / "outputs",
        trained_tiny.stage("lungs"),
        params,
        root,
        endpoint,
        tmp_path / "killed.log",
        kill_when=lambda: len(checkpoints()) > 1,
    )
    assert killed.returncode == -signal.SIGKILL
    [key] = [k for k in checkpoints() if k != stale]
    state = torch.load(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()), weights_only=True)
    done = json.loads(state["history"])
    assert 1 <= len(done) < RESUME_EPOCHS, f"killed after {len(done)} epochs: not mid-training"

    lungs_again = Path(shutil.copytree(trained_tiny.stage("lungs"), tmp_path / "downloaded-again" / "lungs"))
    log = tmp_path / "rerun.log"
    rerun = _classify_task(tmp_path / "outputs", lungs_again, params, root, endpoint, log)
    assert rerun.returncode == 0, log.read_text()[-3000:]
    counts = [(int(m[1]), int(m[2])) for m in BAR.finditer(log.read_text())]
    assert counts and counts[0] == (len(done), RESUME_EPOCHS), (
        f"rerun did not start at {len(done)}: {counts[:3]}"
    )
    resumed = _classifier_output(tmp_path / "outputs", log)
    history = json.loads((resumed / "metrics.json").read_text())["history"]
    assert history[: len(done)] == done and [h["epoch"] for h in history] == list(range(RESUME_EPOCHS))
    assert checkpoints() == [], "the finished stage sweeps its own checkpoint and the old key's"

    log = tmp_path / "uninterrupted.log"
    whole = _classify_task(tmp_path / "whole", trained_tiny.stage("lungs"), params, "", "", log)
    assert whole.returncode == 0, log.read_text()[-3000:]
    uninterrupted = _classifier_output(tmp_path / "whole", log)
    assert json.loads((uninterrupted / "metrics.json").read_text()) == json.loads(
        (resumed / "metrics.json").read_text()
    ), "losses and validation AUC of the resumed run"
    a, b = (torch.load(folder / "classifier.pt", weights_only=True) for folder in (resumed, uninterrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights of the resumed run"
