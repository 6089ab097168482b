"""covseg.registry against a real MLflow server whose artifacts live on a real moto S3 server.

The model here is a tiny conv net with a tiny PythonModel (the real segmenter wrapper lives elsewhere).
One model is logged per module; promotion tests register further versions of that same logged model
under their own registered-model names, so they stay independent and fast.
"""

from __future__ import annotations

import math
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from helpers import BIN, mlflow_at

from covseg import lease, model_logging, promotion, registry, retry
from covseg.lease import PromotionLeaseTimeout
from covseg.model_logging import RegistrationError
from covseg.promotion import Candidate, Champion, decide
from covseg.registry import CHALLENGER, CHAMPION

LINEAGE = {
    "git_commit": "0123abc",
    "data_md5": "d41d8cd98f00b204e9800998ecf8427e",
    "params_hash": "p-42",
    "pipeline_run_id": "local-test",
}
PIP = ["mlflow", "torch", "numpy"]  # explicit: skips requirement inference (seconds)


class TinyNet(torch.nn.Module):
    """1-channel conv: logits map the size of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TinySegmenter(mlflow.pyfunc.PythonModel):
    """CT slices (N,1,H,W float32) in, binary masks (N,1,H,W float32) out."""

    def load_context(self, context):
        self.net = TinyNet()
        self.net.load_state_dict(torch.load(context.artifacts["state_dict"], weights_only=True))
        self.net.eval()

    def predict(self, context, model_input, params=None):
        with torch.no_grad():
            prob = torch.sigmoid(self.net(torch.as_tensor(np.asarray(model_input, dtype=np.float32))))
        return (prob > 0.5).float().numpy()


def _eval_set() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 1, 16, 16)).astype(np.float32)
    y = (x > 0.2).astype(np.float32)
    return x, y


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    inter = float((pred * target).sum())
    return 2 * inter / (float(pred.sum() + target.sum()) + 1e-8)


def score_on_eval_set(model_uri: str) -> float:
    """What the pipeline's score function does: load the model by URI, Dice on the evaluation set."""
    x, y = _eval_set()
    return _dice(mlflow.pyfunc.load_model(model_uri).predict(x), y)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def client(mlflow_server_any: str) -> Iterator[mlflow.MlflowClient]:
    """Point MLflow (tracking and, by default, registry) at the session server; restore afterwards."""
    with mlflow_at(mlflow_server_any) as client:
        yield client


@pytest.fixture(scope="module")
def experiment_id(client: mlflow.MlflowClient) -> str:
    """This module's experiment (passed explicitly: the process-wide active experiment is left alone)."""
    return client.create_experiment(_unique("covseg-registry-tests"))


@pytest.fixture(scope="module")
def logged(
    client: mlflow.MlflowClient, experiment_id: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One segmenter logged and registered through log_segmenter (the path under test)."""
    torch.manual_seed(0)
    net = TinyNet()
    extra = tmp_path_factory.mktemp("extra") / "preprocessing.json"
    extra.write_text('{"input": "HU", "window": [-1000, 400]}')
    name = _unique("covseg")
    x, _ = _eval_set()
    with mlflow.start_run(experiment_id=experiment_id) as run:
        t0 = time.perf_counter()
        mv = model_logging.log_segmenter(
            net,
            pyfunc_model=TinySegmenter(),
            artifacts={"preprocessing": str(extra)},
            input_example=x[:1],
            tags={**LINEAGE, "note": "unit"},
            registered_name=name,
            pip_requirements=PIP,
        )
        seconds = time.perf_counter() - t0
    return {
        "name": name,
        "mv": mv,
        "net": net,
        "run_id": run.info.run_id,
        "seconds": seconds,
        "dice": score_on_eval_set(f"models:/{name}/{mv.version}"),
    }


def _new_version(client: mlflow.MlflowClient, name: str, logged: dict[str, Any]) -> str:
    """Another registered version backed by the (fully uploaded) logged model."""
    mv = mlflow.register_model(logged["mv"].source, name, tags=LINEAGE)
    return str(mv.version)


def _tags(client: mlflow.MlflowClient, name: str, version: str) -> dict[str, str]:
    return client.get_model_version(name, version).tags


def _aliases(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


# ------------------------------------------------------------------------------------------------
# log_segmenter
# ------------------------------------------------------------------------------------------------


def test_log_segmenter_registers_version_with_lineage_and_artifacts_on_s3(client, logged, moto_server):
    mv = logged["mv"]
    assert mv.status == "READY" and mv.run_id == logged["run_id"]
    assert {k: mv.tags[k] for k in LINEAGE} == LINEAGE and mv.tags["note"] == "unit"
    info = mlflow.models.get_model_info(f"models:/{logged['name']}/{mv.version}")
    assert info.signature is not None and info.signature.inputs.inputs[0].shape == (-1, 1, 16, 16)
    keys = [o["Key"] for o in moto_server.s3_client().list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    model_id = mv.model_id or mv.source.split("/")[-1]
    stored = {k.rsplit("/", 1)[-1] for k in keys if model_id in k}
    assert {
        "MLmodel",
        "python_model.pkl",
        "state_dict.pt",
        "preprocessing.json",
        "requirements.txt",
    } <= stored
    assert logged["seconds"] < 20, f"log_segmenter took {logged['seconds']:.1f} s"


def test_log_segmenter_upload_failure_registers_nothing(client, moto_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_server.endpoint_url)
    exp_id = client.create_experiment(_unique("no-bucket"), artifact_location="s3://covseg-no-such-bucket/x")
    name = _unique("covseg-fail")
    x, _ = _eval_set()
    with (
        mlflow.start_run(experiment_id=exp_id),
        pytest.raises(RegistrationError, match="nothing was registered"),
    ):
        model_logging.log_segmenter(
            TinyNet(),
            pyfunc_model=TinySegmenter(),
            artifacts={},
            input_example=x[:1],
            tags=LINEAGE,
            registered_name=name,
            pip_requirements=PIP,
        )
    assert client.search_model_versions(f"name = '{name}'") == []


def test_log_segmenter_refuses_missing_lineage_or_run(client):
    x, _ = _eval_set()
    kwargs = {
        "pyfunc_model": TinySegmenter(),
        "artifacts": {},
        "input_example": x[:1],
        "pip_requirements": PIP,
    }
    with pytest.raises(ValueError, match="git_commit"):
        model_logging.log_segmenter(TinyNet(), tags={"data_md5": "x"}, **kwargs)
    assert mlflow.active_run() is None
    with pytest.raises(RegistrationError, match="active MLflow run"):
        model_logging.log_segmenter(TinyNet(), tags=LINEAGE, **kwargs)


def test_load_champion_by_alias_and_predict(client, logged):
    name = _unique("covseg-load")
    v = _new_version(client, name, logged)
    out = promotion.promote(
        client,
        name,
        v,
        logged["dice"],
        score_fn_for_champion=score_on_eval_set,
        margin=0.0,
        floors={},
        candidate_metrics={},
    )
    assert out["decision"] == CHAMPION
    x, _ = _eval_set()
    pred = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").predict(x)
    with torch.no_grad():
        expected = (torch.sigmoid(logged["net"](torch.from_numpy(x))) > 0.5).float().numpy()
    assert pred.shape == x.shape and set(np.unique(pred)) <= {0.0, 1.0}
    np.testing.assert_array_equal(pred, expected)


# ------------------------------------------------------------------------------------------------
# promote: the three cases
# ------------------------------------------------------------------------------------------------


def test_promote_no_champion_yet(client, logged):
    name = _unique("covseg-first")
    v1, v2 = _new_version(client, name, logged), _new_version(client, name, logged)
    # Fails a floor: even with no champion it only becomes challenger.
    out = promotion.promote(
        client,
        name,
        v1,
        0.9,
        score_fn_for_champion=None,
        margin=0.01,
        floors={"dice": 0.3, "sensitivity": 0.5},
        candidate_metrics={"sensitivity": 0.1},
    )
    assert out["decision"] == CHALLENGER and out["floor_failures"] == ["sensitivity=0.1000<0.5000"]
    assert _aliases(client, name) == {CHALLENGER: v1}
    # Passes the floors: takes champion.
    out = promotion.promote(
        client,
        name,
        v2,
        0.7,
        score_fn_for_champion=score_on_eval_set,
        margin=0.01,
        floors={"dice": 0.3},
        candidate_metrics={"sensitivity": 0.8},
    )
    assert out["decision"] == CHAMPION and out["champion_version_before"] is None
    assert _aliases(client, name) == {CHAMPION: v2, CHALLENGER: v1}
    tags = _tags(client, name, v2)
    assert tags[registry.TAG_DECISION] == CHAMPION and float(tags[registry.TAG_CANDIDATE_DICE]) == 0.7
    assert tags[registry.TAG_CHAMPION_DICE] == "none" and tags[registry.TAG_CHAMPION_BEFORE] == "none"
    assert client.search_registered_models(f"name = '{name}{lease.LEASE_SUFFIX}'") == []


def test_promote_challenger_wins(client, logged):
    name = _unique("covseg-wins")
    v1, v2 = _new_version(client, name, logged), _new_version(client, name, logged)
    promotion.promote(
        client,
        name,
        v1,
        logged["dice"],
        score_fn_for_champion=None,
        margin=0.0,
        floors={},
        candidate_metrics={},
    )
    # The champion is re-evaluated through the score function (model loaded from S3 by version URI).
    seen: list[str] = []

    def score_fn(uri: str) -> float:
        seen.append(uri)
        return score_on_eval_set(uri)

    out = promotion.promote(
        client,
        name,
        v2,
        logged["dice"] + 0.05,
        score_fn_for_champion=score_fn,
        margin=0.02,
        floors={"dice": 0.1},
        candidate_metrics={},
    )
    assert seen == [f"models:/{name}/{v1}"]
    assert out["decision"] == CHAMPION and out["displaced_version"] == v1
    assert math.isclose(out["champion_dice"], logged["dice"])
    assert _aliases(client, name) == {CHAMPION: v2, CHALLENGER: v1}
    t2, t1 = _tags(client, name, v2), _tags(client, name, v1)
    assert t2[registry.TAG_DECISION] == CHAMPION and t2[registry.TAG_CHAMPION_BEFORE] == v1
    assert math.isclose(float(t2[registry.TAG_CHAMPION_DICE]), logged["dice"])
    assert t1[registry.TAG_DISPLACED_BY] == v2


def test_promote_champion_holds(client, logged):
    name = _unique("covseg-holds")
    v1, v2 = _new_version(client, name, logged), _new_version(client, name, logged)
    promotion.promote(
        client, name, v1, 0.80, score_fn_for_champion=None, margin=0.0, floors={}, candidate_metrics={}
    )
    out = promotion.promote(
        client, name, v2, 0.81, score_fn_for_champion=None, margin=0.02, floors={}, candidate_metrics={}
    )  # better, but not by the margin
    assert out["decision"] == CHALLENGER and out["champion_dice"] == 0.80
    assert _aliases(client, name) == {CHAMPION: v1, CHALLENGER: v2}
    t2 = _tags(client, name, v2)
    assert t2[registry.TAG_DECISION] == CHALLENGER and t2[registry.TAG_CHAMPION_BEFORE] == v1
    assert float(t2[registry.TAG_CHAMPION_DICE]) == 0.80 and float(t2[registry.TAG_CANDIDATE_DICE]) == 0.81
    assert registry.TAG_DISPLACED_BY not in _tags(client, name, v1)


# ------------------------------------------------------------------------------------------------
# promote: concurrency, lease
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_start", ["better", "worse"])
def test_concurrent_promotions_end_with_one_champion_the_better(client, logged, head_start):
    name = _unique("covseg-race")
    v_worse, v_better = _new_version(client, name, logged), _new_version(client, name, logged)
    scores = {v_worse: 0.60, v_better: 0.80}
    barrier = threading.Barrier(2)
    results: dict[str, Any] = {}

    def run(version: str) -> None:
        barrier.wait()
        if (version == v_better) != (head_start == "better"):
            time.sleep(0.05)
        try:
            # Slow champion evaluation widens the window between reading the alias and setting it.
            results[version] = promotion.promote(
                client,
                name,
                version,
                scores[version],
                score_fn_for_champion=lambda uri: (time.sleep(0.3), scores[uri.rsplit("/", 1)[-1]])[1],
                margin=0.01,
                floors={"dice": 0.5},
                candidate_metrics={},
            )
        except BaseException as exc:  # surfaced by the assertion below
            results[version] = exc

    threads = [threading.Thread(target=run, args=(v,)) for v in (v_worse, v_better)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(isinstance(r, dict) for r in results.values()), results
    assert _aliases(client, name) == {CHAMPION: v_better, CHALLENGER: v_worse}
    loser = _tags(client, name, v_worse)
    assert loser[registry.TAG_DECISION] == CHALLENGER or loser.get(registry.TAG_DISPLACED_BY) == v_better
    # Exactly one version claims the champion title: decided champion and never displaced.
    holders = [
        v
        for v in (v_worse, v_better)
        if _tags(client, name, v)[registry.TAG_DECISION] == CHAMPION
        and registry.TAG_DISPLACED_BY not in _tags(client, name, v)
    ]
    assert holders == [v_better]


def test_promotion_lease_is_exclusive_and_expired_leases_are_broken(client):
    name = _unique("covseg-lease")
    lease_name = f"{name}{lease.LEASE_SUFFIX}"
    with lease.promotion_lease(client, name, ttl_s=30):
        with pytest.raises(PromotionLeaseTimeout), lease.promotion_lease(client, name, timeout_s=0.5):
            pass
    assert client.search_registered_models(f"name = '{lease_name}'") == []
    with lease.promotion_lease(client, name, ttl_s=0.2) as stale_owner:
        time.sleep(0.3)  # the holder stalls past its expiry; the next promoter breaks the lease
        with lease.promotion_lease(client, name, timeout_s=5) as new_owner:
            assert client.get_registered_model(lease_name).tags["lease_owner"] == new_owner != stale_owner
        # Releasing the stale lease later must not delete someone else's lease (here: none left).
    assert client.search_registered_models(f"name = '{lease_name}'") == []


# ------------------------------------------------------------------------------------------------
# the PostgreSQL store
# ------------------------------------------------------------------------------------------------


def _alembic_head() -> str:
    """The newest schema revision of the installed MLflow (what `mlflow db upgrade` migrates to)."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    return ScriptDirectory.from_config(_get_alembic_config("postgresql://")).get_current_head()


def _other_database(dsn: str, database: str) -> str:
    return f"{dsn.rsplit('/', 1)[0]}/{database}"


def test_postgres_store_holds_the_registry_and_db_upgrade_migrates(mlflow_server_postgres, postgres_server):
    """Not sqlite pretending: a model registered through the server is a row in PostgreSQL, whose schema is
    MLflow's newest; `mlflow db upgrade` (the prod migration path) brings an empty database to the same."""
    import psycopg2

    name = _unique("covseg-pg")
    with mlflow_at(mlflow_server_postgres) as pg_client:
        pg_client.create_registered_model(name)
    dsn = postgres_server.dsn.replace("postgresql+psycopg2://", "postgresql://")

    def query(url: str, sql: str, *args: str) -> list[tuple]:
        conn = psycopg2.connect(url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    assert query(dsn, "SELECT name FROM registered_models WHERE name = %s", name) == [(name,)]
    assert query(dsn, "SELECT version_num FROM alembic_version") == [(_alembic_head(),)]
    query(dsn, "CREATE DATABASE upgrade_check")
    upgraded = subprocess.run(
        [str(BIN / "mlflow"), "db", "upgrade", _other_database(postgres_server.dsn, "upgrade_check")],
        capture_output=True, text=True, timeout=300, check=False)
    assert upgraded.returncode == 0, upgraded.stderr[-2000:]
    assert query(_other_database(dsn, "upgrade_check"), "SELECT version_num FROM alembic_version") == [
        (_alembic_head(),)]


# ------------------------------------------------------------------------------------------------
# decide (pure), retries (pure)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cand", "champ", "margin", "floors", "alias", "reason_part"),
    [
        (Candidate("1", 0.5), None, 0.01, {"dice": 0.3}, CHAMPION, "no champion yet"),
        (Candidate("1", 0.2), None, 0.01, {"dice": 0.3}, CHALLENGER, "dice=0.2000<0.3000"),
        (Candidate("2", 0.8), Champion("1", 0.7), 0.05, {}, CHAMPION, "> champion v1"),
        (Candidate("2", 0.74), Champion("1", 0.7), 0.05, {}, CHALLENGER, "<= champion v1"),
        (Candidate("2", 0.75), Champion("1", 0.7), 0.05, {}, CHALLENGER, "<= champion v1"),  # tie at margin
        (Candidate("2", 0.9, {"ppv": 0.1}), Champion("1", 0.5), 0.0, {"ppv": 0.2}, CHALLENGER, "ppv="),
        (Candidate("2", 0.9), Champion("1", 0.5), 0.0, {"ppv": 0.2}, CHALLENGER, "ppv missing"),
        (Candidate("2", float("nan")), None, 0.0, {}, CHALLENGER, "not a finite"),
        (Candidate("2", 0.9), Champion("1", None), 0.0, {}, CHALLENGER, "no usable score"),
        (Candidate("1", 0.1), Champion("1", 0.1), 0.5, {}, CHAMPION, "already holds"),
    ],
)
def test_decide(cand, champ, margin, floors, alias, reason_part):
    d = decide(cand, champ, margin, floors)
    assert d.alias == alias and reason_part in d.reason
    assert d.champion_version_before == (champ.version if champ else None)
    assert d.as_tags()[registry.TAG_DECISION] == alias


def test_decide_rejects_negative_margin():
    with pytest.raises(ValueError):
        decide(Candidate("1", 0.5), None, -0.1, {})


def test_with_retries_backs_off_on_connection_errors_only():
    import requests

    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            try:
                raise requests.exceptions.ConnectionError("refused")
            except requests.exceptions.ConnectionError as inner:
                raise RuntimeError("API request failed") from inner  # wrapped, as MLflow does
        return "ok"

    assert retry.with_retries(flaky, what="t", attempts=4, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and all(0 < s <= 8 for s in sleeps)

    def broken() -> None:
        calls.append(1)
        raise ValueError("bad input")

    calls.clear()
    with pytest.raises(ValueError):
        retry.with_retries(broken, what="t", sleep=sleeps.append)
    assert len(calls) == 1

    def down() -> None:
        raise ConnectionRefusedError("down")

    sleeps.clear()
    with pytest.raises(ConnectionRefusedError):
        retry.with_retries(
            down, what="t", attempts=3, base_delay_s=1, max_delay_s=1.5, sleep=sleeps.append
        )
    assert len(sleeps) == 2 and max(sleeps) <= 1.5
