"""Session fixtures shared by the whole suite: real servers on loopback, telemetry off.

``moto_server`` starts a real moto S3 server (``moto_server`` from the venv) and ``mlflow_server`` a real
MLflow tracking server (sqlite backend store, artifacts proxied to ``s3://mlflow-artifacts`` on moto).
Both bind 127.0.0.1 on a free port, are started at most once per session and are torn down at its end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 60.0
MLFLOW_ARTIFACT_BUCKET = "mlflow-artifacts"

# Fake credentials: moto accepts anything; real ones must never reach a test.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "covseg-test-key",
    "AWS_SECRET_ACCESS_KEY": "covseg-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
TELEMETRY_OFF_ENV = {
    "GX_ANALYTICS_ENABLED": "False",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # keeps test logs readable
}


def _free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n_chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "<no log>"


@dataclass
class ServerProcess:
    """A server started in its own process group, logging to a file."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    _log_file: Any = field(repr=False, default=None)

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll ``probe`` until it returns True; raise with the log tail on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            if probe():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"{self.name} not ready after {timeout_s:.0f} s; log {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the process group (server + its workers); kill it if it lingers."""
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=timeout_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Workers left behind in the group after the leader exited.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log_file is not None:
            self._log_file.close()


def _start(name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> ServerProcess:
    log_file = log_path.open("ab")
    proc = subprocess.Popen(
        cmd,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # own process group, so teardown reaches the workers too
    )
    return ServerProcess(name=name, proc=proc, log_path=log_path, _log_file=log_file)


def _start_on_free_port(
    name: str,
    make_cmd: Callable[[int], list[str]],
    log_path: Path,
    env: dict[str, str],
    ready_url: Callable[[int], str],
    expect_body: bytes | None = None,
    tries: int = 3,
) -> tuple[ServerProcess, int]:
    """Start a server on a free port and wait until ``ready_url(port)`` answers.

    The port is free when chosen but may be taken before the server binds it (other sessions share the
    machine); a server that exits complaining about its address is restarted on another port.
    """
    for attempt in range(1, tries + 1):
        port = _free_port()
        server = _start(name, make_cmd(port), log_path, env)
        try:
            server.wait_ready(lambda p=port: _http_answers(ready_url(p), expect_body))
            return server, port
        except RuntimeError as exc:
            server.stop()
            in_use = "in use" in str(exc).lower() or "errno 98" in str(exc).lower()
            if attempt == tries or not in_use:
                raise
    raise AssertionError("unreachable")


def _template_db_path() -> Path:
    """Where a freshly migrated, empty MLflow sqlite store is cached (per user, per MLflow version)."""
    from importlib.metadata import version

    cache = Path(tempfile.gettempdir()) / f"covseg-test-cache-{os.getuid()}"
    return cache / f"mlflow-{version('mlflow')}-empty.db"


def _snapshot_db(src: Path, dst: Path) -> None:
    """Atomically copy sqlite ``src`` to ``dst`` with the sqlite backup API (safe while the server runs)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as source, sqlite3.connect(tmp) as target:
        source.backup(target)
    source.close()
    target.close()
    os.replace(tmp, dst)


def _http_answers(url: str, expect_body: bytes | None = None) -> bool:
    """True once ``url`` answers HTTP (any status unless ``expect_body`` is given)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return expect_body is None or expect_body in resp.read()
    except urllib.error.HTTPError:
        return expect_body is None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@pytest.fixture(scope="session", autouse=True)
def _telemetry_off() -> Iterator[None]:
    """Telemetry and analytics off for every test (and every server started from the tests)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in TELEMETRY_OFF_ENV.items():
            mp.setenv(key, value)
        yield


@dataclass(frozen=True)
class MotoServer:
    """Handle on the session's moto S3 server.

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT``; pass it to boto3 / DVC / MLflow as the S3 endpoint.
        port: TCP port of the server.
        log_path: server log file.
    """

    endpoint_url: str
    port: int
    log_path: Path

    def __getitem__(self, key: str) -> Any:  # dict-style access, e.g. moto_server["endpoint_url"]
        return getattr(self, key)

    def s3_client(self) -> Any:
        """A boto3 S3 client bound to this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it already exists); return ``s3://name``."""
        s3 = self.s3_client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real moto S3 server on 127.0.0.1 for the whole session.

    While it runs, the session environment holds fake AWS credentials, ``AWS_DEFAULT_REGION=us-east-1``
    and ``AWS_ENDPOINT_URL`` pointing at moto, so any boto3/aiobotocore client created by a test talks to
    moto even if the test forgets to pass an endpoint.
    """
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    env = {**os.environ, **FAKE_AWS_ENV, **TELEMETRY_OFF_ENV}
    env.pop("AWS_ENDPOINT_URL", None)
    server, port = _start_on_free_port(
        "moto_server",
        lambda port: [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        log_path,
        env,
        ready_url=lambda port: f"http://127.0.0.1:{port}/moto-api/",
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in FAKE_AWS_ENV.items():
                mp.setenv(key, value)
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
                mp.delenv(key, raising=False)
            yield MotoServer(endpoint_url=endpoint, port=port, log_path=log_path)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (sqlite store, artifacts proxied to moto S3); yields its tracking URI.

    The URI is ``http://127.0.0.1:PORT``. The server does not become the process-wide tracking URI: tests
    call ``mlflow.set_tracking_uri`` (and restore it) themselves, so tests that use a local store are
    unaffected. Registered-model names are shared by the whole session: use unique names per test.
    """
    workdir = tmp_path_factory.mktemp("mlflow")
    log_path = workdir / "mlflow_server.log"
    db_path = workdir / "mlflow.db"
    # A fresh sqlite store costs the server ~10 s of schema migrations; start from a cached empty store
    # (made by an earlier session right after its server came up) when there is one.
    template = _template_db_path()
    from_template = template.is_file()
    if from_template:
        shutil.copyfile(template, db_path)
    moto_server.create_bucket(MLFLOW_ARTIFACT_BUCKET)
    env = {
        **os.environ,
        **FAKE_AWS_ENV,
        **TELEMETRY_OFF_ENV,
        "MLFLOW_S3_ENDPOINT_URL": moto_server.endpoint_url,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: the server stays 2 processes
    }
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)

    def cmd(port: int) -> list[str]:
        return [
            str(BIN / "mlflow"), "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{db_path}",
            "--artifacts-destination", f"s3://{MLFLOW_ARTIFACT_BUCKET}",
            "--serve-artifacts",
            # The host check answers 403 to Host headers it does not know; name ours explicitly.
            "--allowed-hosts", f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost",
        ]  # fmt: skip

    try:
        server, port = _start_on_free_port(
            "mlflow server", cmd, log_path, env, lambda port: f"http://127.0.0.1:{port}/health", b"OK"
        )
    except RuntimeError:
        if from_template:  # a bad cached store must not break every later session too
            template.unlink(missing_ok=True)
        raise
    if not from_template:
        try:
            _snapshot_db(db_path, template)
        except (OSError, sqlite3.Error):
            pass  # only an optimisation
    uri = f"http://127.0.0.1:{port}"
    try:
        yield uri
    finally:
        server.stop()


@dataclass(frozen=True)
class TrainedTiny:
    """Outputs of the whole method chain (tiny profile) trained once on a handful of real slices."""

    data: Path
    artifacts: Path
    params: dict[str, Any]

    def stage(self, name: str) -> Path:
        return self.artifacts / name


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory) -> TrainedTiny:
    """Run ingest -> evaluate once per session (tracking off) on a tiny real data tree (~40 s on 2 cores)."""
    from helpers import build_tiny_data, tiny_params

    from covseg import stages

    root = tmp_path_factory.mktemp("trained-tiny")
    data = build_tiny_data(root / "data")
    params = tiny_params()
    out = root / "artifacts"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVSEG_TRACKING", "0")
        mp.setenv("COVSEG_PIPELINE_RUN_ID", "tiny-fixture")  # the segmenter's lineage names this run
        stages.ingest(data, out / "ingest", params)
        stages.gate0(out / "ingest", out / "gates" / "gate0.json", params)
        stages.lungs(out / "ingest", out / "lungs", params)
        stages.classify(out / "lungs", out / "classify", params, out / "checkpoints")
        stages.coarse(out / "lungs", out / "classify", out / "coarse", params)
        stages.mil(out / "lungs", out / "classify", out / "coarse", out / "mil", params, out / "checkpoints")
        stages.segment(out / "lungs", out / "mil", out / "segment", params, out / "checkpoints")
        stages.evaluate(out / "ingest", out / "lungs", out / "coarse", out / "mil", out / "segment",
                        out / "evaluate", params)
    return TrainedTiny(data=data, artifacts=out, params=params)
