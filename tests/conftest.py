"""Session fixtures shared by the whole suite: real servers on loopback, telemetry off.

The servers themselves (start, readiness, teardown) are in ``servers.py``; here they become session
fixtures. ``moto_server`` is a real moto S3 server, ``mlflow_server`` a real MLflow tracking server on a
sqlite store and ``mlflow_server_postgres`` one on a real PostgreSQL server, as in the prod overlay (both
with artifacts proxied to ``s3://mlflow-artifacts`` on moto). Each binds 127.0.0.1 on a free port, is
started at most once per session and is torn down at its end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import servers
from servers import FAKE_AWS_ENV, SERVER_ENV, MotoServer, PostgresServer


@pytest.fixture(scope="session", autouse=True)
def _telemetry_off() -> Iterator[None]:
    """Telemetry and analytics off for every test (and every server started from the tests)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SERVER_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real moto S3 server on 127.0.0.1 for the whole session.

    While it runs, the session environment holds fake AWS credentials, ``AWS_DEFAULT_REGION=us-east-1``
    and ``AWS_ENDPOINT_URL`` pointing at moto, so any boto3/aiobotocore client created by a test talks to
    moto even if the test forgets to pass an endpoint.
    """
    with servers.moto(tmp_path_factory.mktemp("moto")) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_AWS_ENV.items():
            mp.setenv(key, value)
        mp.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(key, raising=False)
        yield server


@pytest.fixture(scope="session")
def mlflow_server(moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (sqlite store, artifacts proxied to moto S3); yields its tracking URI.

    The URI is ``http://127.0.0.1:PORT``. The server does not become the process-wide tracking URI: tests
    call ``mlflow.set_tracking_uri`` (and restore it) themselves, so tests that use a local store are
    unaffected. Registered-model names are shared by the whole session: use unique names per test.
    """
    with servers.mlflow_on_sqlite(moto_server, tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL server on 127.0.0.1 (Debian's package) with an empty database ``mlflow``."""
    with servers.postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server_postgres(
    moto_server: MotoServer, postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real MLflow tracking server on the PostgreSQL store (as in the prod overlay); yields its URI."""
    with servers.mlflow(postgres_server.dsn, moto_server, tmp_path_factory.mktemp("mlflow-pg")) as uri:
        yield uri


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def mlflow_server_any(request: pytest.FixtureRequest) -> str:
    """Each MLflow server in turn (sqlite store, then PostgreSQL): a module using it runs once per store."""
    return request.getfixturevalue(
        {"sqlite": "mlflow_server", "postgres": "mlflow_server_postgres"}[request.param]
    )


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

    from covseg.stages import run_all

    root = tmp_path_factory.mktemp("trained-tiny")
    data = build_tiny_data(root / "data")
    params = tiny_params()
    out = root / "artifacts"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVSEG_TRACKING", "0")
        mp.setenv("COVSEG_PIPELINE_RUN_ID", "tiny-fixture")  # the segmenter's lineage names this run
        run_all(out, data, params, until="evaluate")
    return TrainedTiny(data=data, artifacts=out, params=params)
