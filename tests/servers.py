"""Real servers for the tests, on 127.0.0.1: moto S3, PostgreSQL, and MLflow on a sqlite or Postgres store.

Each server runs in its own process group, logs to a file, binds a free loopback port (restarted on another
port when that port was taken meanwhile) and is stopped with its whole group. The context managers here
start and stop them; ``conftest.py`` turns them into session fixtures.

PostgreSQL is Debian's ``postgresql`` package (``.ci/run`` installs it when missing). Postgres refuses to
run as root, so as root the server runs as the package's ``postgres`` user (``runuser``), with its data
directory in a fresh temporary folder owned by that user.
"""

from __future__ import annotations

import glob
import os
import secrets
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covseg.telemetry import TELEMETRY_OFF

BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 60.0
MLFLOW_ARTIFACT_BUCKET = "mlflow-artifacts"

# Fake credentials: moto accepts anything; real ones must never reach a test.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "covseg-test-key",
    "AWS_SECRET_ACCESS_KEY": "covseg-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
SERVER_ENV = {
    **TELEMETRY_OFF,
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # keeps test logs readable
}
"""Environment of every test and every server started from the tests (telemetry off, no progress bars)."""

POSTGRES_OS_USER = "postgres"  # created by Debian's postgresql package
POSTGRES_DB, POSTGRES_ROLE = "mlflow", "mlflow"


def free_port() -> int:
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
    stop_signal: int = signal.SIGTERM
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
        """Stop the process group (server + its workers) with ``stop_signal``; kill it if it lingers."""
        if self.proc.poll() is None:
            for sig in (self.stop_signal, signal.SIGKILL):
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


def start(
    name: str, cmd: list[str], log_path: Path, env: dict[str, str], stop_signal: int = signal.SIGTERM
) -> ServerProcess:
    """Start ``cmd`` in a new process group with stdout and stderr appended to ``log_path``."""
    log_file = log_path.open("ab")
    proc = subprocess.Popen(
        cmd,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # own process group, so teardown reaches the workers too
    )
    return ServerProcess(name=name, proc=proc, log_path=log_path, stop_signal=stop_signal, _log_file=log_file)


def http_answers(url: str, expect_body: bytes | None = None) -> bool:
    """True once ``url`` answers HTTP (any status unless ``expect_body`` is given)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return expect_body is None or expect_body in resp.read()
    except urllib.error.HTTPError:
        return expect_body is None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_on_free_port(
    name: str,
    make_cmd: Callable[[int], list[str]],
    log_path: Path,
    env: dict[str, str],
    probe: Callable[[int], bool],
    tries: int = 3,
    stop_signal: int = signal.SIGTERM,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> tuple[ServerProcess, int]:
    """Start a server on a free port and wait until ``probe(port)`` is true.

    The port is free when chosen but may be taken before the server binds it (other sessions share the
    machine); a server that exits complaining about its address is restarted on another port.
    """
    for attempt in range(1, tries + 1):
        port = free_port()
        server = start(name, make_cmd(port), log_path, env, stop_signal)
        try:
            server.wait_ready(lambda p=port: probe(p), ready_timeout_s)
            return server, port
        except RuntimeError as exc:
            server.stop()
            text = str(exc).lower()
            in_use = "in use" in text or "errno 98" in text or "could not bind" in text
            if attempt == tries or not in_use:
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# moto S3
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MotoServer:
    """Handle on a moto S3 server.

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


@contextmanager
def moto(workdir: Path) -> Iterator[MotoServer]:
    """A moto S3 server (``moto_server`` from the venv) on 127.0.0.1."""
    log_path = workdir / "moto_server.log"
    env = {**os.environ, **FAKE_AWS_ENV, **SERVER_ENV}
    env.pop("AWS_ENDPOINT_URL", None)
    server, port = start_on_free_port(
        "moto_server",
        lambda port: [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        log_path,
        env,
        probe=lambda port: http_answers(f"http://127.0.0.1:{port}/moto-api/"),
    )
    try:
        yield MotoServer(endpoint_url=f"http://127.0.0.1:{port}", port=port, log_path=log_path)
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresServer:
    """Handle on a PostgreSQL server.

    Attributes:
        dsn: SQLAlchemy URL of the ``mlflow`` database, as in the prod overlay's Secret
            (``postgresql+psycopg2://mlflow:PASSWORD@127.0.0.1:PORT/mlflow``).
        port: TCP port of the server.
        version: the server's version string (``SHOW server_version``).
        log_path: server log file.
    """

    dsn: str
    port: int
    version: str
    log_path: Path


def postgres_bindir() -> Path:
    """Folder of Debian's PostgreSQL server binaries (``initdb``, ``postgres``), the newest installed.

    Raises:
        RuntimeError: PostgreSQL is not installed (with the command that installs it).
    """
    if found := os.environ.get("COVSEG_PG_BINDIR"):
        return Path(found)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    if on_path := shutil.which("initdb"):
        return Path(on_path).resolve().parent
    raise RuntimeError(
        "PostgreSQL server binaries not found (initdb): run .ci/run, or as root "
        "`apt-get install -y postgresql`, or set COVSEG_PG_BINDIR"
    )


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """``cmd`` run as the ``postgres`` OS user when we are root (Postgres refuses to run as root)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", POSTGRES_OS_USER, "--", *cmd]


def _pg_connect(port: int, password: str, dbname: str = "postgres") -> Any:
    import psycopg2

    return psycopg2.connect(
        host="127.0.0.1", port=port, user=POSTGRES_ROLE, password=password, dbname=dbname, connect_timeout=2
    )


def _pg_answers(port: int, password: str) -> bool:
    import psycopg2

    try:
        _pg_connect(port, password).close()
        return True
    except psycopg2.OperationalError:
        return False


@contextmanager
def postgres(workdir: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 with an empty database ``mlflow`` owned by role ``mlflow``.

    The cluster is initialised in a fresh temporary folder (password authentication, no Unix socket) and
    deleted with the server.
    """
    bindir = postgres_bindir()
    log_path = workdir / "postgres.log"
    role_pw = secrets.token_urlsafe(16)  # the mlflow role's password, this session only
    root = Path(tempfile.mkdtemp(prefix="covseg-pg-"))  # /tmp: reachable by the postgres user
    data, pwfile = root / "data", root / "pwfile"
    pwfile.write_text(role_pw)
    if os.geteuid() == 0:
        shutil.chown(root, POSTGRES_OS_USER)
        shutil.chown(pwfile, POSTGRES_OS_USER)
    env = {**os.environ, **SERVER_ENV, "LC_ALL": "C"}
    try:
        init = subprocess.run(
            _as_postgres_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    POSTGRES_ROLE,
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                ]
            ),
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        server, port = start_on_free_port(
            "postgres",
            lambda port: _as_postgres_user(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",  # a throw-away test cluster
                ]
            ),
            log_path,
            env,
            probe=lambda port: _pg_answers(port, role_pw),
            stop_signal=signal.SIGINT,  # "fast" shutdown: do not wait for clients to disconnect
        )
        try:
            conn = _pg_connect(port, role_pw)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {POSTGRES_DB} OWNER {POSTGRES_ROLE}")
                cur.execute("SHOW server_version")
                version = str(cur.fetchone()[0])
            conn.close()
            yield PostgresServer(
                dsn=f"postgresql+psycopg2://{POSTGRES_ROLE}:{role_pw}@127.0.0.1:{port}/{POSTGRES_DB}",
                port=port,
                version=version,
                log_path=log_path,
            )
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------


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


@contextmanager
def mlflow(backend_store_uri: str, s3: MotoServer, workdir: Path) -> Iterator[str]:
    """A real MLflow tracking server (artifacts proxied to ``s3://mlflow-artifacts`` on moto); yields its URI.

    The URI is ``http://127.0.0.1:PORT``. An empty store is migrated by the server when it starts.
    """
    s3.create_bucket(MLFLOW_ARTIFACT_BUCKET)
    env = {
        **os.environ,
        **FAKE_AWS_ENV,
        **SERVER_ENV,
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
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
            "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", f"s3://{MLFLOW_ARTIFACT_BUCKET}",
            "--serve-artifacts",
            # The host check answers 403 to Host headers it does not know; name ours explicitly.
            "--allowed-hosts", f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost",
        ]  # fmt: skip

    server, port = start_on_free_port(
        "mlflow server",
        cmd,
        workdir / "mlflow_server.log",
        env,
        probe=lambda port: http_answers(f"http://127.0.0.1:{port}/health", b"OK"),
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextmanager
def mlflow_on_sqlite(s3: MotoServer, workdir: Path) -> Iterator[str]:
    """:func:`mlflow` on a sqlite store in ``workdir``.

    A fresh sqlite store costs the server ~10 s of schema migrations; the store starts from a cached empty
    one (made by an earlier session right after its server came up) when there is one.
    """
    db_path = workdir / "mlflow.db"
    template = _template_db_path()
    from_template = template.is_file()
    if from_template:
        shutil.copyfile(template, db_path)
    with ExitStack() as stack:
        try:
            uri = stack.enter_context(mlflow(f"sqlite:///{db_path}", s3, workdir))
        except RuntimeError:
            if from_template:  # a bad cached store must not break every later session too
                template.unlink(missing_ok=True)
            raise
        if not from_template:
            try:
                _snapshot_db(db_path, template)
            except (OSError, sqlite3.Error):
                pass  # only an optimisation
        yield uri
