"""covseg.audit against a real MLflow server (artifacts on moto S3) and a real git + DVC repo of real CT files.

The scratch repo has two data versions: A (four real slices/masks) and B (one file replaced by another
real slice, one deleted, one added, one renamed). Two model versions are registered with the lineage tags
the pipeline writes (their commits, the data.dvc md5 at each) and promoted with covseg.registry.promote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pytest
import yaml
from helpers import mlflow_at

from covseg import promotion, registry
from covseg.audit import AuditError, audit_diff, audit_versions, format_audit, format_diff
from covseg.config import params_hash
from covseg.io import InputError
from covseg.telemetry import TELEMETRY_OFF

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MEDSEG = DATASETS / "medseg-100"
SLICES = DATASETS / "covid19-ct-seg-slices" / "images"
PIP = ["mlflow"]  # explicit: skips requirement inference
ECHO_CODE = Path(__file__).with_name("echo_model_code.py")
SLICE_OFFSETS = (-0.1, 0.05, 0.0, 0.05)  # per-slice Dice around each version's mean (the registry's view)


class Trivial(mlflow.pyfunc.PythonModel):
    """Stands in for a segmenter logged before models from code (pickled): the audit only reads the registry."""

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _sh(repo: Path, *cmd: str) -> str:
    env = {**os.environ, **TELEMETRY_OFF, "GIT_CONFIG_NOSYSTEM": "1"}
    done = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout.strip()


def _dvc(repo: Path, *args: str) -> str:
    return _sh(repo, sys.executable, "-m", "dvc", *args)


def _commit(repo: Path, message: str) -> tuple[str, str]:
    """`dvc add data`, commit; return (commit, data.dvc md5)."""
    _dvc(repo, "add", "-q", "data")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", message)
    md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    return _sh(repo, "git", "rev-parse", "HEAD"), md5


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A git + DVC repo with data versions A and B of real files."""
    if not MEDSEG.is_dir() or not SLICES.is_dir():
        pytest.skip(f"real datasets not found under {DATASETS}")
    repo = tmp_path_factory.mktemp("audit-repo")
    _sh(repo, "git", "init", "-q")
    _sh(repo, "git", "config", "user.name", "covseg tests")
    _sh(repo, "git", "config", "user.email", "tests@covseg.invalid")
    _dvc(repo, "init", "-q")
    data = repo / "data"
    data.mkdir()
    images = sorted((MEDSEG / "images").glob("*.jpg"))
    slices = sorted(SLICES.glob("*.jpg"))
    shutil.copyfile(images[0], data / "medseg_000.jpg")
    shutil.copyfile(images[1], data / "medseg_001.jpg")
    shutil.copyfile(sorted((MEDSEG / "masks").glob("*.png"))[0], data / "medseg_000_mask.png")
    shutil.copyfile(slices[0], data / slices[0].name)
    commit_a, md5_a = _commit(repo, "data A")

    shutil.copyfile(images[2], data / "medseg_001.jpg")  # modified: another real slice
    (data / "medseg_000_mask.png").unlink()  # deleted
    shutil.copyfile(slices[-1], data / slices[-1].name)  # added
    (data / "volume").mkdir()
    (data / slices[0].name).rename(data / "volume" / slices[0].name)  # renamed (same bytes)
    commit_b, md5_b = _commit(repo, "data B")
    assert md5_a != md5_b
    return {
        "repo": repo,
        "A": (commit_a, md5_a),
        "B": (commit_b, md5_b),
        "modified": ["data/medseg_001.jpg"],
        "deleted": ["data/medseg_000_mask.png"],
        "added": [f"data/{slices[-1].name}"],
        "renamed": [{"old": f"data/{slices[0].name}", "new": f"data/volume/{slices[0].name}"}],
    }


@pytest.fixture(scope="module")
def client(mlflow_server_any: str) -> Iterator[mlflow.MlflowClient]:
    """Point MLflow at the session server inside this module only; restore afterwards."""
    with mlflow_at(mlflow_server_any) as client:
        yield client


def _lineage(commit: str, md5: str, params: dict[str, Any], run: str) -> dict[str, str]:
    return {
        "git_commit": commit,
        "data_md5": md5,
        "params_hash": params_hash(params),
        "pipeline_run_id": run,
        "profile": params["profile"],
    }


@pytest.fixture(scope="module")
def registered(client: mlflow.MlflowClient, data_repo: dict[str, Any]) -> dict[str, Any]:
    """v1 trained on data A (logged the old way, pickled), v2 on data B (a model from code; better Dice:
    champion; v1 becomes challenger)."""
    name = _unique("covseg-audit")
    experiment_id = client.create_experiment(_unique("covseg-audit-tests"))
    client.create_registered_model(name)
    versions, per_slice = [], {}
    for (commit, md5), dice, params, python_model in (
        (data_repo["A"], 0.41, {"profile": "tiny", "seed": 0}, Trivial()),
        (data_repo["B"], 0.52, {"profile": "quick", "seed": 0}, str(ECHO_CODE)),
    ):
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_metrics({"eval.dice": dice, "eval.iou": dice * 0.8})
            info = mlflow.pyfunc.log_model(name="model", python_model=python_model, pip_requirements=PIP)
            uri, model_id = info.model_uri, info.model_id
            tags = {**_lineage(commit, md5, params, run.info.run_id[:12]), "eval_dice": f"{dice:.4f}"}
            mv = client.create_model_version(name, uri, run_id=run.info.run_id, tags=tags, model_id=model_id)
        per_slice[str(mv.version)] = tuple(dice + d for d in SLICE_OFFSETS)
        promotion.promote(
            client,
            name,
            promotion.Candidate(str(mv.version), dice, per_slice[str(mv.version)]),
            score_champion=lambda uri: per_slice[uri.rsplit("/", 1)[-1]],
            margin=0.01,
            floors={},
        )
        versions.append(str(mv.version))
    return {"name": name, "versions": versions, "uri": uri, "model_id": model_id}


def test_audit_versions_lists_data_version_params_metrics_and_aliases(client, data_repo, registered):
    rows = audit_versions(client, registered["name"])
    assert [r["version"] for r in rows] == registered["versions"]
    v1, v2 = rows
    assert (v1["git_commit"], v1["data_md5"]) == data_repo["A"]
    assert (v2["git_commit"], v2["data_md5"]) == data_repo["B"]
    assert v1["data_md5"].endswith(".dir") and v1["data_md5"] != v2["data_md5"]
    assert v1["params_hash"] == params_hash({"profile": "tiny", "seed": 0}) != v2["params_hash"]
    assert (v1["profile"], v2["profile"]) == ("tiny", "quick")
    assert v2["aliases"] == [registry.CHAMPION] and v1["aliases"] == [registry.CHALLENGER]
    assert v1["promotion_decision"] == v2["promotion_decision"] == registry.CHAMPION  # decided at the time
    assert v1["displaced_by_version"] == v2["version"] and v2["champion_version_before"] == v1["version"]
    assert (v1["eval_dice"], v1["candidate_dice"], v1["champion_dice"]) == (0.41, 0.41, None)
    assert (v2["candidate_dice"], v2["champion_dice"]) == (0.52, 0.41)
    assert v1["run_metrics"]["eval.dice"] == pytest.approx(0.41)
    assert v2["run_metrics"]["eval.iou"] == pytest.approx(0.52 * 0.8)
    assert (v1["model_format"], v2["model_format"]) == ("pickle", "code")
    assert v1["dice_difference"] is None  # the first champion had nothing to be compared with
    assert v2["dice_difference"] == pytest.approx(0.11) and v2["paired_slices"] == len(SLICE_OFFSETS)
    assert v2["dice_difference_low"] == pytest.approx(0.11) == v2["dice_difference_high"]  # same gain on each
    assert (v2["promotion_margin"], v2["dice_difference_confidence"]) == (0.01, 0.95)

    table = format_audit(rows)
    assert f"v{v1['version']}" in table and "challenger" in table and "0.5200" in table
    assert "+0.1100 [+0.1100, +0.1100]" in table and "pickle" in table and "code" in table
    assert "2 versions on 2 data versions" in table
    assert data_repo["A"][1] in table and data_repo["B"][1] in table
    assert audit_versions(client, _unique("no-such-model")) == []


def test_audit_diff_reports_exactly_the_changed_data_files(client, data_repo, registered):
    v1, v2 = registered["versions"]
    diff = audit_diff(client, v1, v2, repo=data_repo["repo"], name=registered["name"])
    assert diff["from"] == {
        "version": v1,
        "git_commit": data_repo["A"][0],
        "data_md5": data_repo["A"][1],
        "data_md5_at_commit": data_repo["A"][1],
    }
    assert (diff["to"]["git_commit"], diff["to"]["data_md5"]) == data_repo["B"]
    assert diff["modified"] == data_repo["modified"]
    assert diff["added"] == data_repo["added"]
    assert diff["deleted"] == data_repo["deleted"]
    assert diff["renamed"] == data_repo["renamed"]
    assert diff["not_in_cache"] == [] and diff["warnings"] == [] and diff["same_data"] is False

    text = format_diff(diff)
    assert "4 data files changed: 1 added, 1 deleted, 1 modified, 1 renamed" in text
    assert "M data/medseg_001.jpg" in text and "D data/medseg_000_mask.png" in text

    # Aliases name the same versions; a version against itself is the same data.
    assert (
        audit_diff(client, "@challenger", "champion", repo=data_repo["repo"], name=registered["name"])[
            "modified"
        ]
        == data_repo["modified"]
    )
    same = audit_diff(client, f"v{v2}", v2, repo=data_repo["repo"], name=registered["name"])
    assert same["same_data"] and not (same["added"] or same["deleted"] or same["modified"] or same["renamed"])
    assert "same data" in format_diff(same)


def _extra_version(client: mlflow.MlflowClient, registered: dict[str, Any], tags: dict[str, str]) -> str:
    return str(
        client.create_model_version(
            registered["name"], registered["uri"], tags=tags, model_id=registered["model_id"]
        ).version
    )


def test_audit_diff_errors_are_one_line(client, data_repo, registered, tmp_path):
    name, repo = registered["name"], data_repo["repo"]
    v1 = registered["versions"][0]
    unknown = _extra_version(
        client,
        registered,
        {**_lineage("0" * 40, data_repo["B"][1], {"profile": "tiny"}, "x"), "eval_dice": "0.3"},
    )
    untagged = _extra_version(client, registered, {"note": "registered by hand"})
    cases = [
        (unknown, f"git_commit {'0' * 40} is not a commit of the repository"),
        (untagged, "has no git_commit tag"),
        ("999", "no such registered model version or alias"),
        ("nobody", "no such registered model version or alias"),
    ]
    for other, message in cases:
        with pytest.raises(AuditError, match=message) as info:
            audit_diff(client, v1, other, repo=repo, name=name)
        assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)
        assert "\n" not in str(info.value)
    with pytest.raises(AuditError, match="not a git repository"):
        audit_diff(client, v1, registered["versions"][1], repo=tmp_path, name=name)
    rows = audit_versions(client, name)  # versions without lineage are listed, with None fields
    assert rows[-1]["git_commit"] is None and rows[-1]["data_md5"] is None and rows[-1]["aliases"] == []
    assert "4 versions on 3 data versions" in format_audit(rows)
