"""covseg.schedule: cron handling and create_schedule against a fake KFP API.

The fake is a small stateful stand-in for the KFP v2beta1 REST API (http.server on 127.0.0.1, a free
port, its own thread). The real ``kfp.Client`` talks to it; the fake records every request so the
tests can check what a real server would have received. (No ``from __future__ import annotations``:
kfp reads the component's annotations as real types.)
"""

import email.parser
import email.policy
import itertools
import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from covseg import schedule

API = "/apis/v2beta1"


# --------------------------------------------------------------------------- fake KFP API server


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeKfp:
    """State of the fake server: what exists, and every request it received."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    experiments: list[dict] = field(default_factory=list)
    pipelines: list[dict] = field(default_factory=list)
    versions: list[dict] = field(default_factory=list)
    recurring_runs: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]


def _matches(item: dict, filter_json: str | None) -> bool:
    if not filter_json:
        return True
    for pred in json.loads(filter_json)["predicates"]:
        assert pred["operation"] in ("EQUALS", 1), pred  # protobuf JSON: enum name or number
        if item.get(pred["key"]) != pred["stringValue"]:
            return False
    return True


def _uploaded_file(req: Request) -> bytes:
    """The ``uploadfile`` part of a multipart/form-data body."""
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
        b"Content-Type: " + req.content_type.encode() + b"\r\n\r\n" + req.body
    )
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_payload(decode=True)
    raise AssertionError("no uploadfile part in the upload request")


def _handler(state: FakeKfp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self, method: str) -> Request:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            req = Request(
                method=method,
                path=url.path,
                query=dict(urllib.parse.parse_qsl(url.query)),
                body=self.rfile.read(length),
                content_type=self.headers.get("Content-Type", ""),
            )
            state.requests.append(req)
            return req

        def do_GET(self) -> None:  # noqa: N802
            self._serve(self._get, self._record("GET"))

        def do_POST(self) -> None:  # noqa: N802
            self._serve(self._post, self._record("POST"))

        def _serve(self, route: Any, req: Request) -> None:
            try:
                status, payload = route(req)
            except Exception as err:  # a request the fake did not expect: answer, and fail the test later
                state.errors.append(f"{req.method} {req.path}: {err!r}")
                status, payload = 500, {"error": repr(err)}
            self._reply(status, payload)

        def _get(self, req: Request) -> tuple[int, dict]:
            q, path = req.query, req.path
            if path == f"{API}/healthz":
                return (200, {"multi_user": False})
            if path == f"{API}/experiments":
                found = [e for e in state.experiments if _matches(e, q.get("filter"))]
                return (200, {"experiments": found, "total_size": len(found)})
            if path == f"{API}/pipelines":
                found = [p for p in state.pipelines if _matches(p, q.get("filter"))]
                return (200, {"pipelines": found, "total_size": len(found)})
            if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
                pipeline_id = path.split("/")[-2]
                found = [
                    v
                    for v in state.versions
                    if v["pipeline_id"] == pipeline_id and _matches(v, q.get("filter"))
                ]
                found = found[: int(q.get("page_size", 10))]
                return (200, {"pipeline_versions": found, "total_size": len(found)})
            if path == f"{API}/recurringruns":
                found = [
                    r
                    for r in state.recurring_runs
                    if r["experiment_id"] == q.get("experiment_id", r["experiment_id"])
                    and _matches(r, q.get("filter"))
                ]
                return (200, {"recurringRuns": found, "total_size": len(found)})
            return (404, {"error": f"fake KFP has no GET {path}"})

        def _post(self, req: Request) -> tuple[int, dict]:
            q, path = req.query, req.path
            if path == f"{API}/experiments":
                exp = {**req.json(), "experiment_id": state.new_id("exp")}
                state.experiments.append(exp)
                return (200, exp)
            if path == f"{API}/pipelines/upload":
                pipeline = {"pipeline_id": state.new_id("pipeline"), "display_name": q["name"]}
                state.pipelines.append(pipeline)
                state.versions.append(
                    {
                        "pipeline_id": pipeline["pipeline_id"],
                        "pipeline_version_id": state.new_id("version"),
                        "display_name": q["name"],
                        "spec": _uploaded_file(req).decode(),
                    }
                )
                return (200, pipeline)
            if path == f"{API}/pipelines/upload_version":
                version = {
                    "pipeline_id": q["pipelineid"],
                    "pipeline_version_id": state.new_id("version"),
                    "display_name": q["name"],
                    "spec": _uploaded_file(req).decode(),
                }
                state.versions.append(version)
                return (200, {k: v for k, v in version.items() if k != "spec"})
            if path == f"{API}/recurringruns":
                run = {**req.json(), "recurring_run_id": state.new_id("recurring")}
                state.recurring_runs.append(run)
                return (200, run)
            return (404, {"error": f"fake KFP has no POST {path}"})

    return Handler


@pytest.fixture()
def fake_kfp() -> Iterator[FakeKfp]:
    state = FakeKfp()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert state.errors == [], "the fake KFP server failed requests"


# --------------------------------------------------------------------------- a throwaway pipeline


def _compile_pipeline(path: Path, message_default: str = "hello") -> Path:
    """Compiles a one-step KFP pipeline (named covseg-schedule-test) to ``path``."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def say(message: str) -> str:
        return message

    @dsl.pipeline(name="covseg-schedule-test")
    def tiny(message: str = message_default) -> None:
        say(message=message)

    compiler.Compiler().compile(tiny, package_path=str(path))
    return path


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny.yaml")


# --------------------------------------------------------------------------- create_schedule


def test_create_schedule_uploads_pipeline_and_creates_recurring_run(fake_kfp: FakeKfp, package: Path) -> None:
    run_id = schedule.create_schedule(
        fake_kfp.url, "30 2 * * 1", pipeline_package=str(package), params={"message": "retrain"}
    )

    # The experiment was looked up, then created.
    (created_exp,) = fake_kfp.calls("POST", f"{API}/experiments")
    assert created_exp.json()["display_name"] == "covseg"
    # The package was uploaded as-is, under the pipeline's own name.
    (upload,) = fake_kfp.calls("POST", f"{API}/pipelines/upload")
    assert upload.query["name"] == "covseg-schedule-test"
    assert _uploaded_file(upload) == package.read_bytes()

    (create,) = fake_kfp.calls("POST", f"{API}/recurringruns")
    body = create.json()
    assert run_id == fake_kfp.recurring_runs[0]["recurring_run_id"]
    assert body["display_name"] == "covseg-retrain"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * 1"  # 5 fields -> seconds prepended
    assert "periodic_schedule" not in body["trigger"]
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["experiment_id"] == fake_kfp.experiments[0]["experiment_id"]
    assert body["service_account"] == "covseg-pipeline-runner"
    assert body["runtime_config"]["parameters"] == {"message": "retrain"}
    # It refers to the uploaded pipeline's version, not to an inline copy of the spec.
    (version,) = fake_kfp.versions
    assert body["pipeline_version_reference"] == {
        "pipeline_id": fake_kfp.pipelines[0]["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert "pipeline_spec" not in body


def test_existing_pipeline_gets_content_addressed_version(
    fake_kfp: FakeKfp, package: Path, tmp_path: Path
) -> None:
    schedule.create_schedule(fake_kfp.url, "0 3 * * *", pipeline_package=str(package), name="first")
    changed = _compile_pipeline(tmp_path / "changed.yaml", message_default="changed")
    schedule.create_schedule(fake_kfp.url, "0 4 * * *", pipeline_package=str(changed), name="second")
    schedule.create_schedule(fake_kfp.url, "0 5 * * *", pipeline_package=str(changed), name="third")

    assert len(fake_kfp.pipelines) == 1 and len(fake_kfp.experiments) == 1
    # The changed package became one new version; scheduling it again reused that version.
    (upload_version,) = fake_kfp.calls("POST", f"{API}/pipelines/upload_version")
    assert upload_version.query["pipelineid"] == fake_kfp.pipelines[0]["pipeline_id"]
    assert upload_version.query["name"].startswith("covseg-schedule-test-")
    assert _uploaded_file(upload_version) == changed.read_bytes()
    refs = [r["pipeline_version_reference"]["pipeline_version_id"] for r in fake_kfp.recurring_runs]
    assert refs[0] != refs[1] == refs[2] == fake_kfp.versions[1]["pipeline_version_id"]


def test_duplicate_schedule_name_is_refused(fake_kfp: FakeKfp, package: Path) -> None:
    schedule.create_schedule(fake_kfp.url, "0 3 * * *", pipeline_package=str(package))
    with pytest.raises(ValueError, match="already exists"):
        schedule.create_schedule(fake_kfp.url, "0 4 * * *", pipeline_package=str(package))
    assert len(fake_kfp.calls("POST", f"{API}/recurringruns")) == 1


def test_bad_input_fails_before_any_request(fake_kfp: FakeKfp, package: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cron"):
        schedule.create_schedule(fake_kfp.url, "0 25 * * *", pipeline_package=str(package))
    with pytest.raises(FileNotFoundError):
        schedule.create_schedule(fake_kfp.url, "0 3 * * *", pipeline_package=str(tmp_path / "none.yaml"))
    assert fake_kfp.requests == []


# --------------------------------------------------------------------------- cron


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        ("0 3 * * *", "0 0 3 * * *"),
        ("*/15 * * * *", "0 */15 * * * *"),
        ("0 9 * * MON-FRI", "0 0 9 * * MON-FRI"),
        ("  0  3 1,15 JAN-jun ? ", "0 0 3 1,15 JAN-jun ?"),
        ("30 0 9 ? * 1-5", "30 0 9 ? * 1-5"),
        ("@daily", "@daily"),
    ],
)
def test_normalize_cron_accepts(cron: str, expected: str) -> None:
    assert schedule.normalize_cron(cron) == expected


@pytest.mark.parametrize(
    "cron",
    [
        "",
        "* * * *",
        "0 0 0 * * * *",
        "60 * * * *",
        "0 24 * * *",
        "0 0 0 * *",  # day of month 0
        "0 0 * 13 *",
        "0 0 * * 7",
        "0 0 * * FUN",
        "*/0 * * * *",
        "5-1 * * * *",
        "0 ? * * *",  # '?' only in the day fields
        "@reboot",
    ],
)
def test_normalize_cron_rejects(cron: str) -> None:
    with pytest.raises(ValueError):
        schedule.normalize_cron(cron)
