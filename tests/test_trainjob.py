"""The distributed path's Kubernetes job (`covseg.trainjob`), offline.

* the PyTorchJob manifest validates against the Training Operator's own CRD schema (v1.9.0, vendored in
  tests/fixtures/kubeflow/), made strict the way `kubectl --validate=strict` is: an unknown field is an
  error, so a misspelt field fails here rather than being pruned silently by the API server;
* submission and watching go through the real `kubernetes` client against a fake API server on 127.0.0.1
  that records each request and answers with scripted job states.
"""

from __future__ import annotations

import copy
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from covseg import gpu_pool, trainjob

CRD = Path(__file__).parent / "fixtures" / "kubeflow" / f"pytorchjobs-{trainjob.OPERATOR_VERSION}.yaml"


def _strict(node: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties and keeps no
    unknown fields (Kubernetes' strict field validation)."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def validator() -> Any:
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == trainjob.KIND and crd["spec"]["group"] == trainjob.GROUP
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == trainjob.VERSION]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _errors(validator: Any, manifest: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def _manifest(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "name": "covseg-segment-1",
        "image": "ghcr.io/example/covseg:cuda",
        "command": trainjob.torchrun_command(
            "segment",
            "/tmp/artifacts",
            "/tmp/data",
            '{"seed": 1}',
            {"lungs": "s3://b/run/lungs", "mil": "s3://b/run/mil"},
            "s3://b/run/segment",
            "s3://b/ckpt",
        ),
        "num_nodes": 2,
        "gpus_per_node": 4,
        "service_account": "covseg-pipeline-runner",
        "env": {"COVSEG_TRACKING": "1"},
    }
    return trainjob.pytorchjob_manifest(**{**args, **kw})


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 0), (1, 1), (2, 4), (8, 8)])
def test_manifest_validates_against_the_operator_crd(validator: Any, nodes: int, gpus: int) -> None:
    manifest = _manifest(num_nodes=nodes, gpus_per_node=gpus)
    assert _errors(validator, manifest) == []
    spec = manifest["spec"]
    assert spec["nprocPerNode"] == str(max(gpus, 1))
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
    pod = replicas["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["command"][:3] == ["torchrun", "-m", "covseg.launch"]
    assert container["command"][-8:] == [
        "--input",
        "lungs=s3://b/run/lungs",
        "--input",
        "mil=s3://b/run/mil",
        "--output-uri",
        "s3://b/run/segment",
        "--checkpoint-root",
        "s3://b/ckpt",
    ]
    pool = gpu_pool.load()
    if gpus:  # placement from the one source Terraform also reads
        assert container["resources"]["limits"][pool["accelerator_resource"]] == str(gpus)
        assert pod["nodeSelector"] == {pool["node_selector"]["key"]: pool["node_selector"]["value"]}
        assert pod["tolerations"] == [{**pool["toleration"], "operator": "Equal"}]
    else:
        assert (
            "nodeSelector" not in pod and pool["accelerator_resource"] not in container["resources"]["limits"]
        )


def test_schema_rejects_what_the_operator_would(validator: Any) -> None:
    bad = _manifest()
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    assert any("replicas" in e for e in _errors(validator, bad))
    typo = _manifest()
    typo["spec"]["nProcPerNode"] = "4"  # the elastic policy's spelling, not the spec's
    assert any("nProcPerNode" in e for e in _errors(validator, typo))
    no_replicas = _manifest()
    del no_replicas["spec"]["pytorchReplicaSpecs"]
    assert _errors(validator, no_replicas)
    with pytest.raises(ValueError):
        trainjob.pytorchjob_manifest("x", "img", ["true"], num_nodes=0, gpus_per_node=1)


# ---------------------------------------------------------------------------------------------------
# a fake Kubernetes API server on loopback


class FakeApiServer:
    """Records every request; answers POSTs of PyTorchJobs with 201 and watches with scripted events.

    `script[name]` is a list of watch responses, one per watch request, each a list of (type, status)."""

    def __init__(self, script: dict[str, list[list[tuple[str, dict[str, Any]]]]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.requests: list[dict[str, Any]] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.version = 100
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a watch body ends when the connection closes

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                server.requests.append({"method": "POST", "path": self.path, "body": body})
                stored = copy.deepcopy(body)
                server.version += 1
                stored["metadata"].update(resourceVersion=str(server.version), uid="fake-uid")
                server.jobs[stored["metadata"]["name"]] = stored
                self._send(201, json.dumps(stored).encode())

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                server.requests.append({"method": "GET", "path": url.path, "query": query})
                name = query.get("fieldSelector", "").removeprefix("metadata.name=")
                if query.get("watch") not in ("true", "True") or name not in server.jobs:
                    self._send(404, b'{"kind":"Status","status":"Failure","reason":"NotFound","code":404}')
                    return
                events = server.script[name].pop(0) if server.script[name] else []
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                for kind, status in events:
                    obj = copy.deepcopy(server.jobs[name])
                    server.version += 1
                    obj["metadata"]["resourceVersion"] = str(server.version)
                    obj["status"] = status
                    self.wfile.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                    self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def api(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return trainjob.custom_objects_api(client.ApiClient(configuration))

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _condition(kind: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "conditions": [
            {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
            {"type": kind, "status": "True", "reason": reason, "message": message},
        ]
    }


RUNNING = _condition("Running", "PyTorchJobRunning")


def test_submit_then_watch_until_succeeded() -> None:
    manifest = _manifest(name="job-ok", namespace="kubeflow")
    script = {
        "job-ok": [
            [("ADDED", {})],  # the first watch ends (server timeout) before the job does
            [("MODIFIED", RUNNING), ("MODIFIED", _condition("Succeeded", "PyTorchJobSucceeded"))],
        ]
    }
    with FakeApiServer(script) as server:
        result = trainjob.run(manifest, server.api(), timeout_s=60)
    assert result["metadata"]["name"] == "job-ok"
    post, *watches = server.requests
    assert (
        post["method"] == "POST" and post["path"] == "/apis/kubeflow.org/v1/namespaces/kubeflow/pytorchjobs"
    )
    assert post["body"] == manifest  # the manifest itself went to the API server
    assert len(watches) == 2 and all(w["path"] == post["path"] for w in watches)
    assert all(w["query"]["fieldSelector"] == "metadata.name=job-ok" for w in watches)
    assert "resourceVersion" not in watches[0]["query"]
    assert watches[1]["query"]["resourceVersion"] == "102"  # re-opened after the last event it saw


def test_failed_job_fails_with_its_reason() -> None:
    manifest = _manifest(name="job-bad", namespace="covseg")
    failed = _condition("Failed", "PyTorchJobFailed", "Worker 0 exited with code 137 (OOMKilled)")
    with FakeApiServer({"job-bad": [[("ADDED", RUNNING), ("MODIFIED", failed)]]}) as server:
        with pytest.raises(trainjob.TrainJobFailed) as caught:
            trainjob.run(manifest, server.api(), timeout_s=60)
    assert caught.value.reason == "PyTorchJobFailed" and "OOMKilled" in str(caught.value)
    assert [r["method"] for r in server.requests] == ["POST", "GET"]


def test_deleted_job_fails() -> None:
    with FakeApiServer({"job-gone": [[("ADDED", RUNNING), ("DELETED", RUNNING)]]}) as server:
        with pytest.raises(trainjob.TrainJobFailed, match="Deleted"):
            trainjob.run(_manifest(name="job-gone"), server.api(), timeout_s=60)


def test_pipeline_runner_may_create_and_watch_the_job_kind() -> None:
    """The runner's Role (infra/base/pipeline-runs/rbac.yaml) grants exactly what `trainjob.run` calls."""
    docs = list(
        yaml.safe_load_all(
            (Path(__file__).parents[1] / "infra" / "base" / "pipeline-runs" / "rbac.yaml").read_text()
        )
    )
    (role,) = [d for d in docs if d["kind"] == "Role"]
    rules = [r for r in role["rules"] if trainjob.GROUP in r["apiGroups"]]
    assert rules == [
        {
            "apiGroups": [trainjob.GROUP],
            "resources": [trainjob.PLURAL],
            "verbs": ["create", "get", "list", "watch"],
        }
    ]


def test_launch_stage_submits_the_stage_command_and_waits(validator: Any) -> None:
    params = {"seed": 1, "segment": {"epochs": 2}}
    name = trainjob.job_name("segment", "Run_2026-12-02T11:00:00Z")
    assert name == "covseg-segment-run-2026-12-02t11-00-00z" and len(trainjob.job_name("x", "y" * 100)) == 63
    script = {name: [[("ADDED", RUNNING), ("MODIFIED", _condition("Succeeded", "PyTorchJobSucceeded"))]]}
    with FakeApiServer(script) as server:
        trainjob.launch_stage(
            "segment",
            "Run_2026-12-02T11:00:00Z",
            "img:1",
            params,
            {"lungs": "s3://b/r/lungs", "mil": "s3://b/r/mil"},
            "s3://b/r/segment",
            num_nodes=2,
            gpus_per_node=4,
            api=server.api(),
            timeout_s=60,
        )
    body = server.requests[0]["body"]
    assert _errors(validator, body) == []
    (container,) = body["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[3:5] == ["segment", "/tmp/covseg/artifacts"] and json.loads(command[6]) == params
    assert "--output-uri" in command and command[command.index("--output-uri") + 1] == "s3://b/r/segment"
    assert (
        body["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1 and body["spec"]["nprocPerNode"] == "4"
    )


def test_segment_component_in_distributed_mode_runs_the_job_and_takes_its_output(
    validator: Any, moto_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's `num_nodes` x `gpus_per_node` > 1: the segment task (its KFP function, called as the
    executor calls it) submits the stage as a PyTorchJob through the real client (kubeconfig -> the fake API
    server), waits for it, then brings the output rank 0 uploaded (here: put on moto S3 as the job would)
    into its output artifact and logs the stage's metrics from it."""
    from kfp import dsl
    from kfp.dsl.types import artifact_types
    from servers import FAKE_AWS_ENV

    from components.segment import segment

    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    bucket = moto_server.create_bucket("covseg-run").removeprefix("s3://")
    s3 = moto_server.s3_client()
    result = {"n_train": 12, "history": [{"epoch": 0, "loss": 0.7}, {"epoch": 1, "loss": 0.5}]}
    s3.put_object(Bucket=bucket, Key="r1/segment/metrics.json", Body=json.dumps(result).encode())
    s3.put_object(Bucket=bucket, Key="r1/segment/segmenter.pt", Body=b"rank 0's weights")
    name = trainjob.job_name("segment", "r1")
    script = {name: [[("ADDED", RUNNING), ("MODIFIED", _condition("Succeeded", "PyTorchJobSucceeded"))]]}
    with FakeApiServer(script) as server:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
                    "users": [{"name": "fake", "user": {"token": "t"}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {"cluster": "fake", "user": "fake", "namespace": "kubeflow"},
                        }
                    ],
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv(trainjob.JOB_IMAGE_ENV, "ghcr.io/covseg/covseg-gpu:test")
        monkeypatch.setenv("COVSEG_PIPELINE_RUN_ID", "r1")
        # the KFP launcher mounts an s3:// artifact under /s3/; here under tmp_path
        monkeypatch.setattr(artifact_types, "_S3_LOCAL_MOUNT_PREFIX", f"{tmp_path}/s3/")
        out = dsl.Model(uri=f"s3://{bucket}/r1/segment")
        metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
        lungs, mil = dsl.Dataset(uri=f"s3://{bucket}/r1/lungs"), dsl.Dataset(uri=f"s3://{bucket}/r1/mil")
        segment.python_func(
            slices=lungs,
            fine_labels=mil,
            params_json=json.dumps({"seed": 1}),
            mlflow_tracking_uri="",
            data_version="",
            checkpoint_root="",
            s3_endpoint_url=moto_server.endpoint_url,
            segmenter=out,
            metrics=metrics,
            num_nodes=2,
            gpus_per_node=2,
        )
    post = server.requests[0]
    assert post["method"] == "POST" and _errors(validator, post["body"]) == []
    (container,) = post["body"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/covseg/covseg-gpu:test"
    assert container["envFrom"] == [{"secretRef": {"name": trainjob.S3_SECRET, "optional": True}}]
    command = container["command"]
    assert command[command.index("--output-uri") + 1] == f"s3://{bucket}/r1/segment"
    assert f"lungs=s3://{bucket}/r1/lungs" in command and f"mil=s3://{bucket}/r1/mil" in command
    assert Path(out.path) == tmp_path / "s3" / bucket / "r1" / "segment"
    assert (Path(out.path) / "segmenter.pt").read_bytes() == b"rank 0's weights"
    assert metrics.metadata == {"n_train": 12.0, "last_loss": 0.5}
