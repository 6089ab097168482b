"""DVC data versioning for real: push to a moto S3 remote, lose everything local, pull it back bit-exact.

Runs `git`, `dvc` and `covseg` as subprocesses in a scratch repository under tmp_path (never in the project).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    BIN,
    MEDSEG,
    SEG_SLICES,
    TELEMETRY_OFF,
    build_ct_md,
    copy_file,
    error_lines,
    invoke_cli,
    make_project,
    require_shared,
    sha256_tree,
)

FAKE_KEY, FAKE_SECRET = "covseg-test-key", "covseg-test-secret"


def _env() -> dict[str, str]:
    """Fake credentials only, and no AWS_ENDPOINT_URL: the remote's `endpointurl` alone must reach moto."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(TELEMETRY_OFF)
    env.update(AWS_ACCESS_KEY_ID=FAKE_KEY, AWS_SECRET_ACCESS_KEY=FAKE_SECRET, AWS_DEFAULT_REGION="us-east-1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    return env


def _run(cwd: Path, *cmd: str, timeout: float = 120) -> str:
    result = subprocess.run(
        list(cmd),
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def _scratch_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    _run(root, "git", "init", "-q")
    _run(root, "git", "config", "user.name", "covseg tests")
    _run(root, "git", "config", "user.email", "tests@covseg.invalid")
    _run(root, "git", "config", "commit.gpgsign", "false")
    _run(root, str(BIN / "dvc"), "init", "-q")
    return root


def _real_files(target: Path) -> Path:
    """A few real files of each kind: DICOM + labels, JPEG, mask PNG."""
    build_ct_md(target, {"P001": 25}, n=3)
    copy_file(
        SEG_SLICES / "coronacases_org_001_1.jpg",
        target / "covid19-ct-seg-slices" / "images" / "coronacases_org_001_1.jpg",
    )
    copy_file(MEDSEG / "images" / "medseg_000.jpg", target / "medseg-100" / "images" / "medseg_000.jpg")
    copy_file(MEDSEG / "masks" / "medseg_000.png", target / "medseg-100" / "masks" / "medseg_000.png")
    return target


def _dvc_out(repo: Path) -> dict:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]


def test_push_delete_pull_round_trip(moto_server: Any, tmp_path: Path) -> None:
    require_shared()
    repo = _scratch_repo(tmp_path / "repo")
    data = _real_files(repo / "data")
    before = sha256_tree(data)
    assert len(before) == 7

    dvc = str(BIN / "dvc")
    _run(repo, dvc, "add", "-q", "data")
    out = _dvc_out(repo)
    assert out["path"] == "data" and out["nfiles"] == 7 and out["md5"].endswith(".dir")

    bucket = f"covseg-dvc-{uuid.uuid4().hex[:8]}"
    moto_server.create_bucket(bucket)
    _run(repo, dvc, "remote", "add", "-d", "store", f"s3://{bucket}/dvcstore")
    _run(repo, dvc, "remote", "modify", "--local", "store", "endpointurl", moto_server.endpoint_url)
    assert moto_server.endpoint_url not in (repo / ".dvc" / "config").read_text(), (
        "endpoint belongs in config.local"
    )
    _run(repo, dvc, "push", "-q")

    listing = moto_server.s3_client().list_objects_v2(Bucket=bucket, Prefix="dvcstore/")
    keys = [obj["Key"] for obj in listing.get("Contents", [])]
    assert len(keys) == 7 + 1, keys  # every file plus the .dir manifest, content-addressed
    assert any(key.endswith(".dir") for key in keys)

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    _run(repo, dvc, "pull", "-q")
    assert sha256_tree(data) == before


def test_data_import_gives_a_reproducible_data_version(tmp_path: Path) -> None:
    """`covseg data import` of the same files twice (the 2nd from a later copy): the same data.dvc md5."""
    require_shared()
    source = _real_files(tmp_path / "source")
    original = sha256_tree(source)
    repo = _scratch_repo(tmp_path / "repo")
    versions = []
    for src in (source, Path(shutil.copytree(source, tmp_path / "source-copy"))):
        printed = _run(repo, str(BIN / "covseg"), "data", "import", str(src), "--to", str(repo / "data"))
        assert f"imported 7 files into {repo / 'data'}" in printed
        out = _dvc_out(repo)
        assert out["path"] == "data" and out["nfiles"] == 7
        assert sha256_tree(repo / "data") == original
        assert not list(repo.glob(".data.*")), "scratch folder left beside data/"
        versions.append(out["md5"])
        shutil.rmtree(repo / "data")  # start the next import from nothing
        (repo / "data.dvc").unlink()
    assert versions[0] == versions[1]
    assert sha256_tree(source) == original, "import must only read its source"


def test_data_import_update_notices_a_new_data_version(tmp_path: Path) -> None:
    """`covseg data import --update` (what `make run` calls): a source that gained slices replaces data/ and
    gives a new data.dvc md5 with the added files named; an unchanged source changes nothing."""
    require_shared()
    source = _real_files(tmp_path / "source")
    repo = _scratch_repo(tmp_path / "repo")
    covseg = str(BIN / "covseg")
    _run(repo, covseg, "data", "import", str(source), "--to", str(repo / "data"))
    first = _dvc_out(repo)
    printed = _run(repo, covseg, "data", "import", "--update", str(source), "--to", str(repo / "data"))
    assert "is up to date" in printed and _dvc_out(repo) == first
    # the dataset grows the way covid-ct-md did: more instances of the same series
    extra = source / "covid-ct-md" / "P001" / "extra.dcm"
    shutil.copyfile(next((source / "covid-ct-md" / "P001").glob("*.dcm")), extra)
    printed = _run(repo, covseg, "data", "import", "--update", str(source), "--to", str(repo / "data"))
    assert "new data version: 1 added, 0 removed, 0 changed" in printed, printed
    second = _dvc_out(repo)
    assert second["nfiles"] == first["nfiles"] + 1 and second["md5"] != first["md5"]
    assert sha256_tree(repo / "data") == sha256_tree(source)
    assert not list(repo.glob(".data.*")), "scratch or backup folder left beside data/"


@pytest.mark.parametrize("case", ["target-not-empty", "missing-source"])
def test_data_import_refuses(case: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    source = tmp_path / "source"
    if case != "missing-source":
        copy_file(SEG_SLICES / "coronacases_org_001_1.jpg", source / "a.jpg")
    target = project / "data"
    copy_file(SEG_SLICES / "coronacases_org_001_2.jpg", target / "old.jpg")
    result = invoke_cli(project, "data", "import", str(source), "--to", str(target))
    assert result.exit_code == 2
    expected = {
        "target-not-empty": f"error: {target}: already holds data; remove it first",
        "missing-source": f"error: {source.resolve()}: source folder not found",
    }[case]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["old.jpg"]
