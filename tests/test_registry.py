"""The registry (covseg.model_logging, .promotion, .lease, .retry, .serving) against real MLflow servers.

Every test that uses the registry runs twice: MLflow on a sqlite store and MLflow on a real PostgreSQL
server (as in the prod overlay), both with artifacts on a real moto S3 server. Most tests use a tiny conv net logged from
``tiny_model_code.py``; one model is logged per store, and promotion tests register further versions of
that logged model under their own registered-model names, so they stay independent and fast. The real
segmenter goes through the register stage in the tests at the end.
"""

from __future__ import annotations

import math
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from helpers import BIN, mlflow_at
from PIL import Image
from tiny_model_code import TinyNet

from covseg import lease, model_logging, promotion, registry, retry
from covseg.lease import PromotionLeaseTimeout
from covseg.model_logging import RegistrationError
from covseg.promotion import Candidate, Champion, decide, paired_evidence
from covseg.registry import CHALLENGER, CHAMPION

LINEAGE = {
    "git_commit": "0123abc",
    "data_md5": "d41d8cd98f00b204e9800998ecf8427e",
    "params_hash": "p-42",
    "pipeline_run_id": "local-test",
}
PIP = ["mlflow", "torch", "numpy", "safetensors"]  # explicit: skips requirement inference (seconds)
TINY_CODE = Path(__file__).with_name("tiny_model_code.py")


def _eval_set() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 1, 16, 16)).astype(np.float32)
    y = (x > 0.2).astype(np.float32)
    return x, y


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    inter = float((pred * target).sum())
    return 2 * inter / (float(pred.sum() + target.sum()) + 1e-8)


def scores_on_eval_set(model_uri: str) -> tuple[float, ...]:
    """What the pipeline's score function does: load the model by URI, Dice of each evaluation slice."""
    x, y = _eval_set()
    pred = mlflow.pyfunc.load_model(model_uri).predict(x)
    return tuple(_dice(p, t) for p, t in zip(pred, y, strict=True))


def _candidate(version: str, per_slice: tuple[float, ...], **metrics: float) -> Candidate:
    return Candidate(version, float(np.mean(per_slice)), tuple(per_slice), metrics)


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
            model_code=TINY_CODE,
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
        "scores": scores_on_eval_set(f"models:/{name}/{mv.version}"),
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
        "tiny_model_code.py",
        "weights.safetensors",
        "preprocessing.json",
        "requirements.txt",
    } <= stored
    assert not [k for k in stored if k.endswith((".pkl", ".pt"))], stored
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
            model_code=TINY_CODE,
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
        "model_code": TINY_CODE,
        "artifacts": {},
        "input_example": x[:1],
        "pip_requirements": PIP,
    }
    with pytest.raises(ValueError, match="git_commit"):
        model_logging.log_segmenter(TinyNet(), tags={"data_md5": "x"}, **kwargs)
    assert mlflow.active_run() is None
    with pytest.raises(RegistrationError, match="active MLflow run"):
        model_logging.log_segmenter(TinyNet(), tags=LINEAGE, **kwargs)
    from tiny_model_code import TinySegmenter

    with pytest.raises(ValueError, match="would be pickled"):  # an object, not a code file
        model_logging.log_segmenter(TinyNet(), tags=LINEAGE, **{**kwargs, "model_code": TinySegmenter()})


def test_load_champion_by_alias_and_predict(client, logged):
    name = _unique("covseg-load")
    v = _new_version(client, name, logged)
    out = promotion.promote(
        client,
        name,
        _candidate(v, logged["scores"]),
        score_champion=scores_on_eval_set,
        margin=0.0,
        floors={},
    )
    assert out["decision"] == CHAMPION
    x, _ = _eval_set()
    pred = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").predict(x)
    with torch.no_grad():
        expected = (torch.sigmoid(logged["net"](torch.from_numpy(x))) > 0.5).float().numpy()
    assert pred.shape == x.shape and set(np.unique(pred)) <= {0.0, 1.0}
    np.testing.assert_array_equal(pred, expected)


# ------------------------------------------------------------------------------------------------
# promote: aliases and tags (the registry bookkeeping; the evidence itself is tested further down)
# ------------------------------------------------------------------------------------------------


def test_promote_no_champion_yet(client, logged):
    name = _unique("covseg-first")
    v1, v2 = _new_version(client, name, logged), _new_version(client, name, logged)
    # Fails a floor: even with no champion it only becomes challenger.
    out = promotion.promote(
        client,
        name,
        _candidate(v1, logged["scores"], sensitivity=0.1),
        score_champion=None,
        margin=0.01,
        floors={"dice": 0.0, "sensitivity": 0.5},
    )
    assert out["decision"] == CHALLENGER and out["floor_failures"] == ["sensitivity=0.1000<0.5000"]
    assert _aliases(client, name) == {CHALLENGER: v1}
    # Passes the floors: takes champion.
    out = promotion.promote(
        client,
        name,
        _candidate(v2, logged["scores"], sensitivity=0.8),
        score_champion=scores_on_eval_set,
        margin=0.01,
        floors={"dice": 0.0},
    )
    assert out["decision"] == CHAMPION and out["champion_version_before"] is None and out["evidence"] is None
    assert _aliases(client, name) == {CHAMPION: v2, CHALLENGER: v1}
    tags = _tags(client, name, v2)
    assert tags[registry.TAG_DECISION] == CHAMPION
    assert float(tags[registry.TAG_CANDIDATE_DICE]) == pytest.approx(np.mean(logged["scores"]))
    assert tags[registry.TAG_CHAMPION_DICE] == tags[registry.TAG_CHAMPION_BEFORE] == "none"
    assert tags[registry.TAG_DIFFERENCE] == tags[registry.TAG_DIFFERENCE_LOW] == "none"
    assert client.search_registered_models(f"name = '{name}{lease.LEASE_SUFFIX}'") == []


def test_promote_challenger_wins(client, logged):
    name = _unique("covseg-wins")
    v1, v2 = _new_version(client, name, logged), _new_version(client, name, logged)
    promotion.promote(
        client, name, _candidate(v1, logged["scores"]), score_champion=None, margin=0.0, floors={}
    )
    # The champion is re-scored slice by slice through the score function (model loaded from S3 by version).
    seen: list[str] = []

    def score_fn(uri: str) -> tuple[float, ...]:
        seen.append(uri)
        return scores_on_eval_set(uri)

    better = tuple(min(1.0, x + 0.2) for x in logged["scores"])
    out = promotion.promote(
        client, name, _candidate(v2, better), score_champion=score_fn, margin=0.02, floors={"dice": 0.0}
    )
    assert seen == [f"models:/{name}/{v1}"]
    assert out["decision"] == CHAMPION and out["displaced_version"] == v1
    assert math.isclose(out["champion_dice"], np.mean(logged["scores"]))
    assert out["evidence"]["low"] > 0.02 and out["evidence"]["n_slices"] == len(better)
    assert _aliases(client, name) == {CHAMPION: v2, CHALLENGER: v1}
    t2, t1 = _tags(client, name, v2), _tags(client, name, v1)
    assert t2[registry.TAG_DECISION] == CHAMPION and t2[registry.TAG_CHAMPION_BEFORE] == v1
    assert float(t2[registry.TAG_DIFFERENCE]) == pytest.approx(np.mean(better) - np.mean(logged["scores"]))
    assert float(t2[registry.TAG_DIFFERENCE_LOW]) == pytest.approx(out["evidence"]["low"])
    assert float(t2[registry.TAG_MARGIN]) == 0.02 and t2[registry.TAG_PAIRED_SLICES] == str(len(better))
    assert t1[registry.TAG_DISPLACED_BY] == v2


def test_promote_champion_holds_against_a_gain_below_the_margin(client, logged):
    name = _unique("covseg-holds")
    v1, v2 = _new_version(client, name, logged), _new_version(client, name, logged)
    promotion.promote(
        client, name, _candidate(v1, logged["scores"]), score_champion=None, margin=0.0, floors={}
    )
    slightly = tuple(x + 0.01 for x in logged["scores"])  # better on every slice, but by less than the margin
    out = promotion.promote(
        client, name, _candidate(v2, slightly), score_champion=scores_on_eval_set, margin=0.02, floors={}
    )
    assert out["decision"] == CHALLENGER and "does not clear margin 0.0200" in out["reason"]
    assert out["evidence"]["low"] == pytest.approx(0.01) == out["evidence"]["high"]
    assert _aliases(client, name) == {CHAMPION: v1, CHALLENGER: v2}
    t2 = _tags(client, name, v2)
    assert t2[registry.TAG_DECISION] == CHALLENGER and t2[registry.TAG_CHAMPION_BEFORE] == v1
    assert float(t2[registry.TAG_DIFFERENCE]) == pytest.approx(0.01)
    assert registry.TAG_DISPLACED_BY not in _tags(client, name, v1)
    # Without a score function the champion cannot be compared slice by slice: it holds.
    v3 = _new_version(client, name, logged)
    out = promotion.promote(
        client,
        name,
        _candidate(v3, tuple(x + 0.5 for x in logged["scores"])),
        score_champion=None,
        margin=0.0,
        floors={},
    )
    assert out["decision"] == CHALLENGER and "not scored on these slices" in out["reason"]


# ------------------------------------------------------------------------------------------------
# promote: concurrency, lease
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_start", ["better", "worse"])
def test_concurrent_promotions_end_with_one_champion_the_better(client, logged, head_start):
    name = _unique("covseg-race")
    v_worse, v_better = _new_version(client, name, logged), _new_version(client, name, logged)
    base = np.linspace(0.4, 0.8, 12)
    scores = {v_worse: tuple(base), v_better: tuple(base + 0.15)}
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
                _candidate(version, scores[version]),
                score_champion=lambda uri: (time.sleep(0.3), scores[uri.rsplit("/", 1)[-1]])[1],
                margin=0.01,
                floors={"dice": 0.5},
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
# the real segmenter: register stage, no pickle, MLflow's loader and server give the CLI's masks
# ------------------------------------------------------------------------------------------------

MEDSEG_STEM, MEDSEG_ROTATE = "medseg_000", -1  # medseg-100 slices reach the radiological view with rot90 k=-1


N_EVAL_SLICES = 12


@pytest.fixture(scope="module")
def eval_ingest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real medseg-100 slices with their radiologist masks (each holds a lesion), ingested: the evaluation
    slices of the register stage in these tests."""
    from helpers import MEDSEG, build_medseg, default_sources, require_shared, tiny_params

    from covseg import stages

    require_shared()
    root = tmp_path_factory.mktemp("eval-ingest")
    build_medseg(root / "data", sorted(p.stem for p in (MEDSEG / "masks").glob("*.png"))[:N_EVAL_SLICES])
    stages.ingest(
        root / "data", root / "ingest", tiny_params(sources={"medseg-100": default_sources()["medseg-100"]})
    )
    return root / "ingest"


@pytest.fixture(scope="module")
def blind_segment(trained_tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny segmenter with its output bias at -1000: a broken model that finds no lesion."""
    from covseg.segment import MODEL, load_segmenter
    from covseg.training import save_model

    model, meta = load_segmenter(trained_tiny.stage("segment"))
    with torch.no_grad():
        model.final_conv.bias.fill_(-1000.0)
    out = tmp_path_factory.mktemp("blind-segment")
    save_model(model, out / MODEL, meta)
    return out


def _register_stage(segment_dir: Path, ingest_dir: Path, params: dict[str, Any], name: str) -> dict[str, Any]:
    """`covseg register` (the stage function) for one segment folder, into registered model `name`."""
    from mlflow.tracking import fluent

    from covseg import stages

    params = {**params, "max_eval_slices": 0, "register": {**params["register"], "name": name}}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("COVSEG_TRACKING", raising=False)
        mp.setenv("COVSEG_PIPELINE_RUN_ID", "registry-tests")
        # the stage sets the process-wide active experiment; give it back afterwards
        mp.setattr(fluent, "_active_experiment_id", getattr(fluent, "_active_experiment_id", None))
        return stages.register(ingest_dir, segment_dir, params)


@pytest.fixture(scope="module")
def promotion_sequence(
    client: mlflow.MlflowClient, trained_tiny: Any, eval_ingest: Path, blind_segment: Path
) -> dict[str, Any]:
    """Four versions through the register stage, in this order: the blind model (the first: champion), the
    trained one (clearly better), the blind one again (clearly worse), the trained one again (the same)."""
    name = _unique("covseg-stage")
    trained = trained_tiny.stage("segment")
    steps = {
        step: _register_stage(segment, eval_ingest, trained_tiny.params, name)
        for step, segment in (
            ("first", blind_segment),
            ("better", trained),
            ("worse", blind_segment),
            ("same", trained),
        )
    }
    return {"name": name, "steps": steps, "aliases": _aliases(client, name)}


@pytest.fixture(scope="module")
def registered_segmenter(promotion_sequence: dict[str, Any]) -> dict[str, Any]:
    """The tiny chain's trained segmenter as registered by the register stage."""
    name, version = promotion_sequence["name"], promotion_sequence["steps"]["better"]["version"]
    return {"name": name, "uri": f"models:/{name}/{version}"}


def test_register_stage_promotes_by_paired_evidence(client, promotion_sequence, trained_tiny):
    """Clearly better takes champion, clearly worse and the same model again do not (margin from params.yaml)."""
    name, steps = promotion_sequence["name"], promotion_sequence["steps"]
    margin = trained_tiny.params["register"]["margin"]
    first, better, worse, same = (steps[k]["decision"] for k in ("first", "better", "worse", "same"))
    assert first["decision"] == CHAMPION and first["evidence"] is None
    assert steps["first"]["candidate"]["dice"] == 0.0  # the blind model finds nothing
    assert better["decision"] == CHAMPION and better["displaced_version"] == first["version"]
    assert better["evidence"]["low"] > margin and better["evidence"]["n_slices"] == N_EVAL_SLICES
    assert better["evidence"]["difference"] == pytest.approx(steps["better"]["candidate"]["dice"])
    assert worse["decision"] == CHALLENGER and worse["evidence"]["high"] < 0
    assert worse["evidence"]["difference"] == pytest.approx(-better["evidence"]["difference"])
    assert same["decision"] == CHALLENGER
    assert (same["evidence"]["difference"], same["evidence"]["low"], same["evidence"]["high"]) == (
        0.0,
        0.0,
        0.0,
    )
    assert promotion_sequence["aliases"] == {CHAMPION: better["version"], CHALLENGER: same["version"]}
    tags = _tags(client, name, better["version"])
    assert float(tags[registry.TAG_DIFFERENCE_LOW]) == pytest.approx(better["evidence"]["low"])
    assert float(tags[registry.TAG_MARGIN]) == margin and tags[registry.TAG_PAIRED_SLICES] == str(
        N_EVAL_SLICES
    )
    assert "lower bound clears margin" in tags[registry.TAG_REASON]


@pytest.fixture(scope="module")
def cli_mask(trained_tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """`covseg predict` with the trained segment folder on a real medseg-100 slice: (slice, mask), both in
    the radiological view (what the served model takes and gives)."""
    from helpers import MEDSEG, copy_file, invoke_cli, make_project

    from covseg.io import read_slice

    root = tmp_path_factory.mktemp("cli-predict")
    jpeg = copy_file(MEDSEG / "images" / f"{MEDSEG_STEM}.jpg", root / f"{MEDSEG_STEM}.jpg")
    out = root / "out"
    done = invoke_cli(
        make_project(root / "project"),
        "predict",
        str(jpeg),
        "--model",
        str(trained_tiny.stage("segment")),
        "--out",
        str(out),
        "--rotate",
        str(MEDSEG_ROTATE),
    )
    assert done.exit_code == 0, done.stderr
    view = np.ascontiguousarray(np.rot90(read_slice(jpeg), MEDSEG_ROTATE)).astype(np.float32)
    mask = np.rot90(np.asarray(Image.open(out / "lesion_mask.png")) > 0, MEDSEG_ROTATE)
    assert mask.shape == view.shape
    return view, mask


def test_registered_model_holds_no_pickle_and_loads_without_unpickling(
    client, registered_segmenter, cli_mask, tmp_path, monkeypatch
):
    from helpers import is_pickle, unpickled_globals
    from mlflow.models import Model

    from covseg import serving

    uri = registered_segmenter["uri"]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert {"MLmodel", "serving_code.py", "weights.safetensors", "segmenter.json"} <= {p.name for p in files}
    assert [str(p.relative_to(local)) for p in files if is_pickle(p)] == []
    pyfunc = Model.load(str(local)).flavors["python_function"]
    assert serving.storage_format(pyfunc) == "code" and "python_model" not in pyfunc

    view, mask = cli_mask
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # MLflow's own guard, on top
    with unpickled_globals() as unpickled:
        served = mlflow.pyfunc.load_model(uri).predict(view[None], params={"domain": "8bit"})
        own = serving.load_registered_segmenter(uri).predict_slices([view], "8bit")[0].prob >= 0.5
    assert unpickled == []
    assert served.shape == (1, *view.shape) and served.dtype == np.uint8
    np.testing.assert_array_equal(served[0].astype(bool), mask)
    np.testing.assert_array_equal(own, mask)


def test_mlflow_models_serve_gives_the_cli_mask(client, registered_segmenter, cli_mask, tmp_path):
    import json
    import os
    import urllib.request

    import servers

    env = {
        **os.environ,
        **servers.SERVER_ENV,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # the server runs the venv's uvicorn
    server, port = servers.start_on_free_port(
        "mlflow models serve",
        lambda port: [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            registered_segmenter["uri"],
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        tmp_path / "serve.log",
        env,
        probe=lambda port: servers.http_answers(f"http://127.0.0.1:{port}/ping", b""),
        ready_timeout_s=180,  # downloads and loads the model first (over a minute on a busy 2-core machine)
    )
    view, mask = cli_mask
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"inputs": view[None].tolist(), "params": {"domain": "8bit"}}).encode(),
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            served = np.asarray(json.loads(response.read())["predictions"])
    finally:
        server.stop()
    assert served.shape == (1, *view.shape)
    np.testing.assert_array_equal(served[0].astype(bool), mask)


def test_legacy_pickled_version_is_scored_from_its_weights_alone(
    client, experiment_id, trained_tiny, cli_mask
):
    """A version logged the old way (a CloudPickle of the PythonModel) still loads for scoring and audit,
    from its weight files: the pickle is never loaded (MLflow's own loader, as a control, does load it)."""
    from helpers import unpickled_globals
    from mlflow.models import Model

    from covseg import serving

    segment = trained_tiny.stage("segment")
    name = _unique("covseg-legacy")
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=serving.CovsegModel(),
            signature=serving.signature(),
            pip_requirements=PIP,
            artifacts={
                serving.SEGMENTER_PT: str(segment / "segmenter.pt"),
                serving.SEGMENTER_META: str(segment / "segmenter.json"),
            },
        )
    uri = f"models:/{name}/{mlflow.register_model(info.model_uri, name, tags=LINEAGE).version}"
    assert serving.storage_format(Model.load(uri).flavors["python_function"]) == "pickle"
    view, mask = cli_mask
    with unpickled_globals() as unpickled:
        legacy = serving.load_registered_segmenter(uri)
    assert not [g for g in unpickled if g.startswith(("covseg", "cloudpickle", "mlflow"))], unpickled
    np.testing.assert_array_equal(legacy.predict_slices([view], "8bit")[0].prob >= 0.5, mask)
    with unpickled_globals() as control:
        mlflow.pyfunc.load_model(uri)
    assert "covseg.serving.CovsegModel" in control


def test_a_model_that_is_not_a_segmenter_is_refused_in_one_line(client, experiment_id):
    from covseg import serving
    from covseg.io import InputError

    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("echo_model_code.py")),
            pip_requirements=PIP,
        )
    with pytest.raises(InputError, match="not a covseg segmenter model") as refused:
        serving.load_registered_segmenter(info.model_uri)
    assert str(refused.value).startswith(info.model_uri) and "\n" not in str(refused.value)


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
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert upgraded.returncode == 0, upgraded.stderr[-2000:]
    assert query(_other_database(dsn, "upgrade_check"), "SELECT version_num FROM alembic_version") == [
        (_alembic_head(),)
    ]


# ------------------------------------------------------------------------------------------------
# decide (pure), retries (pure)
# ------------------------------------------------------------------------------------------------


SLICES = (0.6, 0.7, 0.5, 0.8, 0.4, 0.9)


def _shifted(by: float) -> tuple[float, ...]:
    return tuple(x + by for x in SLICES)


@pytest.mark.parametrize(
    ("cand", "champ", "margin", "floors", "alias", "reason_part"),
    [
        (Candidate("1", 0.5), None, 0.01, {"dice": 0.3}, CHAMPION, "no champion yet"),
        (Candidate("1", 0.2), None, 0.01, {"dice": 0.3}, CHALLENGER, "dice=0.2000<0.3000"),
        (_candidate("2", _shifted(0.1)), Champion("1", 0.65, SLICES), 0.05, {}, CHAMPION, "clears margin"),
        (
            _candidate("2", _shifted(0.04)),
            Champion("1", 0.65, SLICES),
            0.05,
            {},
            CHALLENGER,
            "does not clear",
        ),
        (
            _candidate("2", _shifted(0.05)),
            Champion("1", 0.65, SLICES),
            0.05,
            {},
            CHALLENGER,
            "does not clear",
        ),
        (_candidate("2", SLICES), Champion("1", 0.65, SLICES), 0.0, {}, CHALLENGER, "does not clear"),  # same
        (_candidate("2", _shifted(-0.1)), Champion("1", 0.65, SLICES), 0.0, {}, CHALLENGER, "does not clear"),
        (_candidate("2", SLICES, ppv=0.1), Champion("1", 0.5, SLICES), 0.0, {"ppv": 0.2}, CHALLENGER, "ppv="),
        (_candidate("2", SLICES), Champion("1", 0.5, SLICES), 0.0, {"ppv": 0.2}, CHALLENGER, "ppv missing"),
        (Candidate("2", float("nan")), None, 0.0, {}, CHALLENGER, "not a finite"),
        (
            _candidate("2", _shifted(0.3)),
            Champion("1", 0.6),
            0.0,
            {},
            CHALLENGER,
            "not scored on these slices",
        ),
        (Candidate("1", 0.1), Champion("1", 0.1, SLICES), 0.5, {}, CHAMPION, "already holds"),
    ],
)
def test_decide(cand, champ, margin, floors, alias, reason_part):
    d = decide(cand, champ, margin, floors)
    assert d.alias == alias and reason_part in d.reason
    assert d.champion_version_before == (champ.version if champ else None)
    assert d.as_tags()[registry.TAG_DECISION] == alias


def test_decide_rejects_negative_margin_and_unpaired_scores():
    with pytest.raises(ValueError, match="margin"):
        decide(Candidate("1", 0.5), None, -0.1, {})
    with pytest.raises(ValueError, match="same slices"):
        decide(_candidate("2", SLICES), Champion("1", 0.5, SLICES[:-1]), 0.0, {})


def test_paired_evidence_is_an_interval_around_the_mean_difference():
    same = paired_evidence(SLICES, SLICES)
    assert (same.difference, same.low, same.high, same.n_slices) == (0.0, 0.0, 0.0, len(SLICES))
    rng = np.random.default_rng(3)
    champion = rng.uniform(0.2, 0.8, 50)
    candidate = champion + 0.03 + rng.normal(0, 0.05, 50)
    ev = paired_evidence(candidate, champion, confidence=0.95)
    assert ev.low < ev.difference < ev.high and ev.difference == pytest.approx(np.mean(candidate - champion))
    assert ev == paired_evidence(candidate, champion, confidence=0.95)  # deterministic
    wider = paired_evidence(candidate, champion, confidence=0.99)
    assert wider.low < ev.low and wider.high > ev.high
    # the interval shrinks like 1/sqrt(n): 4x the slices, about half the width
    many = paired_evidence(np.tile(candidate, 4), np.tile(champion, 4))
    assert (many.high - many.low) == pytest.approx((ev.high - ev.low) / 2, rel=0.25)


SEEDS_FIXTURE = Path(__file__).parent / "fixtures" / "promotion" / "quick_segment_seeds.json"


def test_the_quick_segmenter_retrained_with_another_seed_is_never_promoted():
    """Recorded per-slice Dice of the quick segmenter retrained with three seeds (see the fixture's
    `command`): under params.yaml's register settings no seed takes champion from another, while the old
    rule (a higher mean Dice) would have promoted in half the pairs and a confidence bound alone (margin 0)
    in some."""
    import itertools
    import json

    from helpers import REPO_ROOT

    from covseg.config import load_params

    cfg = load_params("quick", path=REPO_ROOT / "params.yaml")["register"]
    seeds = {
        seed: tuple(scores)
        for seed, scores in json.loads(SEEDS_FIXTURE.read_text())["per_slice_dice"].items()
    }
    assert len(seeds) == 3 and len({len(s) for s in seeds.values()}) == 1

    def by_rule(margin: float) -> list[str]:
        return [
            decide(
                _candidate(cand, seeds[cand]),
                Champion(champ, float(np.mean(seeds[champ])), seeds[champ]),
                margin,
                {},
                cfg["confidence"],
            ).alias
            for champ, cand in itertools.permutations(seeds, 2)
        ]

    assert by_rule(cfg["margin"]) == [CHALLENGER] * 6
    assert CHAMPION in by_rule(0.0)  # the interval alone does not absorb seed noise: the margin does
    old_rule = [
        np.mean(seeds[cand]) > np.mean(seeds[champ]) for champ, cand in itertools.permutations(seeds, 2)
    ]
    assert sum(old_rule) == 3


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
        retry.with_retries(down, what="t", attempts=3, base_delay_s=1, max_delay_s=1.5, sleep=sleeps.append)
    assert len(sleeps) == 2 and max(sleeps) <= 1.5
