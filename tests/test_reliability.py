"""Reliability: faults (training killed mid-epoch then resumed; the S3 endpoint down during `dvc push`;
leftovers of killed processes). Bad input, every kind of it, is test_bad_input.py.

The MLflow upload fault (no registered version without its artifacts) is
test_registry.py::test_log_segmenter_upload_failure_registers_nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    BIN,
    SEG_SLICES,
    cli_env,
    copy_file,
    make_project,
    require_shared,
    sha256_tree,
)
from test_bad_input import CORONA
from test_dvc_remote import _env as dvc_env
from test_dvc_remote import _run, _scratch_repo

EPOCHS = 6
BAR = re.compile(r"classify:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) ")


def test_killed_training_resumes_from_its_checkpoint(trained_tiny: Any, tmp_path: Path) -> None:
    """SIGKILL `covseg classify` after its first checkpoint; the rerun resumes there and finishes clean."""
    import torch

    project = make_project(tmp_path / "project")
    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    raw["tiny"]["classify"].update(epochs=EPOCHS, draws_per_epoch=128, probe_epochs=0)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    artifacts = project / "artifacts"
    artifacts.mkdir()
    (artifacts / "lungs").symlink_to(trained_tiny.stage("lungs"), target_is_directory=True)
    checkpoints = artifacts / "checkpoints"
    # One thread: on a shared 2-core machine OpenMP spinning makes 2 threads ~10x slower.
    env = cli_env(project, COVSEG_TRACKING="0", OMP_NUM_THREADS="1")
    command = [str(BIN / "covseg"), "classify"]

    first_err = tmp_path / "first.err"
    with open(first_err, "w", encoding="utf-8") as err:
        first = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 180
            while not list(checkpoints.glob("classifier-*.ckpt")):
                assert first.poll() is None, (
                    f"exited {first.returncode}: {first_err.read_text(errors='replace')}"
                )
                assert time.monotonic() < deadline, "no checkpoint after 180 s"
                time.sleep(0.01)
            os.kill(first.pid, signal.SIGKILL)
        finally:
            first.kill()
            first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    [checkpoint] = checkpoints.glob("classifier-*.ckpt")
    done = json.loads(torch.load(checkpoint, map_location="cpu", weights_only=True)["history"])
    assert 1 <= len(done) < EPOCHS, f"killed after {len(done)} epochs: not mid-training"
    assert not (artifacts / "classify").exists(), "a killed stage must not leave its output folder"
    [scratch] = [p.name for p in artifacts.iterdir() if p.name not in ("lungs", "checkpoints")]
    assert scratch.startswith(".classify.tmp-"), scratch  # hidden, never read; only the rename publishes

    second = subprocess.run(
        command,
        cwd=project,
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        check=False,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    counts = [(int(m[1]), int(m[2])) for m in BAR.finditer(second.stderr)]
    assert counts and counts[0] == (len(done), EPOCHS), (
        f"rerun did not start at epoch {len(done)}: {counts[:3]}"
    )
    assert min(c for c, _ in counts) == len(done) and counts[-1] == (EPOCHS, EPOCHS)
    history = json.loads((artifacts / "classify" / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert history[: len(done)] == done, "the finished epochs must come from the checkpoint"
    assert list(checkpoints.iterdir()) == [], "checkpoints must be removed once training completes"
    left = sorted(p.name for p in artifacts.iterdir() if p.name.startswith("."))
    assert left == [], f"the killed run's scratch folder must be swept by the rerun: {left}"


def set_dvc_remote(repo: Path, url: str, endpoint: str) -> None:
    """What `dvc remote add -d store URL` and `dvc remote modify --local store endpointurl E` write."""
    (repo / ".dvc" / "config").write_text(
        f"[core]\n    remote = store\n['remote \"store\"']\n    url = {url}\n"
    )
    (repo / ".dvc" / "config.local").write_text(f"['remote \"store\"']\n    endpointurl = {endpoint}\n")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_checkpoint_resumes_only_when_nothing_upstream_changed(tmp_path: Path) -> None:
    """A killed MIL run must not resume after an upstream parameter or an upstream output changed; it must
    resume when its inputs were only copied again (a pipeline task's retry downloads them anew)."""
    from covseg.config import load_params
    from covseg.training import checkpoint_path

    params = load_params("tiny")
    upstream = tmp_path / "classify"
    upstream.mkdir()
    (upstream / "classifier.pt").write_bytes(b"weights")
    name = checkpoint_path(tmp_path / "ckpt", "mil", params, [upstream])
    assert checkpoint_path(tmp_path / "ckpt", "mil", params, [upstream]) == name  # same run: resumes
    changed = {**params, "classify": {**params["classify"], "lr": 0.5}}  # not a MIL setting
    assert checkpoint_path(tmp_path / "ckpt", "mil", changed, [upstream]) != name
    time.sleep(0.01)
    downloaded = tmp_path / "again" / "classify"
    downloaded.mkdir(parents=True)
    (downloaded / "classifier.pt").write_bytes(b"weights")  # same bytes, a new file (new mtime)
    assert (downloaded / "classifier.pt").stat().st_mtime_ns != (
        upstream / "classifier.pt"
    ).stat().st_mtime_ns
    assert checkpoint_path(tmp_path / "ckpt", "mil", params, [downloaded]) == name
    (upstream / "classifier.pt").write_bytes(b"weights of a retrained classifier")
    assert checkpoint_path(tmp_path / "ckpt", "mil", params, [upstream]) != name


def test_dvc_push_with_s3_down_fails_bounded_then_succeeds_when_back(
    moto_server: Any, tmp_path: Path
) -> None:
    """Endpoint refused: botocore's bounded retries, then one readable ERROR line and exit != 0."""
    require_shared()
    repo = _scratch_repo(tmp_path / "repo")
    copy_file(SEG_SLICES / f"{CORONA}_1.jpg", repo / "data" / f"{CORONA}_1.jpg")
    dvc = str(BIN / "dvc")
    _run(repo, dvc, "add", "-q", "data")
    before = sha256_tree(repo / "data"), sha256_tree(repo / ".dvc" / "cache")
    bucket = f"covseg-down-{uuid.uuid4().hex[:8]}"
    port = _closed_port()
    set_dvc_remote(repo, f"s3://{bucket}/dvcstore", f"http://127.0.0.1:{port}")

    start = time.monotonic()
    down = subprocess.run(
        [dvc, "push"],
        cwd=repo,
        env=dvc_env(),
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
        check=False,
    )
    seconds = time.monotonic() - start
    assert down.returncode != 0
    assert seconds < 60, f"dvc push took {seconds:.0f} s against a closed port"
    errors = [line for line in down.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "Could not connect to the endpoint URL" in errors[0], down.stderr
    assert f"127.0.0.1:{port}" in errors[0] and "Traceback" not in down.stderr
    assert (sha256_tree(repo / "data"), sha256_tree(repo / ".dvc" / "cache")) == before

    moto_server.create_bucket(bucket)
    set_dvc_remote(repo, f"s3://{bucket}/dvcstore", moto_server.endpoint_url)
    _run(repo, dvc, "push", "-q")
    listing = moto_server.s3_client().list_objects_v2(Bucket=bucket, Prefix="dvcstore/")
    assert len(listing.get("Contents", [])) == 2  # the file and the .dir listing


def test_atomic_dir_sweeps_only_leftovers_of_dead_processes(tmp_path: Path) -> None:
    from covseg.io import atomic_dir

    child = subprocess.Popen(["true"])  # its pid names a process that has exited
    child.wait()
    stale = [tmp_path / f".out.tmp-{child.pid}-abc", tmp_path / f".out.old-{child.pid}"]
    live = [tmp_path / f".out.tmp-{os.getpid()}-xyz", tmp_path / ".other.tmp-1-q"]
    for folder in stale + live:
        folder.mkdir()
    with atomic_dir(tmp_path / "out") as scratch:
        (scratch / "f.txt").write_text("x")
    assert (tmp_path / "out" / "f.txt").read_text() == "x"
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in live)  # a running process's scratch, and another target's, stay


def test_durable_checkpoints_in_a_folder_keep_a_failed_stage_and_sweep_a_finished_one(tmp_path: Path) -> None:
    from covseg.checkpoint_store import durable_checkpoints

    root = tmp_path / "pipeline-root" / "checkpoints"
    (root / "mil").mkdir(parents=True)
    (root / "mil" / "mil-0000000000000000.ckpt").write_bytes(b"old key")
    (root / "segment").mkdir()
    (root / "segment" / "segmenter-1111111111111111.ckpt").write_bytes(b"another stage's")
    try:
        with durable_checkpoints(str(root), "mil") as folder:
            assert folder == root / "mil"
            (folder / "mil-2222222222222222.ckpt").write_bytes(b"epoch 3")
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert sorted(p.name for p in (root / "mil").iterdir()) == [
        "mil-0000000000000000.ckpt",
        "mil-2222222222222222.ckpt",
    ]
    with durable_checkpoints(str(root), "mil") as folder:
        (folder / "mil-2222222222222222.ckpt").unlink()  # what fit does when training completes
    assert list((root / "mil").iterdir()) == [], "a finished stage sweeps the old keys"
    assert (root / "segment" / "segmenter-1111111111111111.ckpt").is_file(), "and only its own folder"

    with durable_checkpoints("", "mil") as scratch:
        (scratch / "mil-3333333333333333.ckpt").write_bytes(b"lives with the task")
    assert not scratch.exists()


def test_durable_checkpoints_on_s3_mirror_each_epoch_and_survive_the_task(moto_server: Any) -> None:
    """The S3 mirror of a stage's checkpoints: pulled first, each rewrite uploaded while the stage runs,
    left on S3 when the stage fails (the rerun's), swept when a later run of the stage finishes."""
    from covseg.checkpoint_store import durable_checkpoints

    bucket = f"covseg-mirror-{uuid.uuid4().hex[:8]}"
    moto_server.create_bucket(bucket)
    s3 = moto_server.s3_client()
    s3.put_object(Bucket=bucket, Key="root/classify/classifier-0000000000000000.ckpt", Body=b"old key")
    s3.put_object(Bucket=bucket, Key="root/mil/mil-0000000000000000.ckpt", Body=b"another stage's")
    root, endpoint = f"s3://{bucket}/root", moto_server.endpoint_url

    def remote(stage: str) -> dict[str, bytes]:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"root/{stage}/").get("Contents", [])
        return {
            o["Key"].rsplit("/", 1)[1]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listing
        }

    def wait_for(stage: str, name: str, body: bytes) -> None:
        deadline = time.monotonic() + 20
        while remote(stage).get(name) != body:
            assert time.monotonic() < deadline, f"{name} not mirrored: {remote(stage)}"
            time.sleep(0.1)

    own = "classifier-2222222222222222.ckpt"
    try:
        with durable_checkpoints(root, "classify", endpoint, interval_s=0.1) as folder:
            assert (folder / "classifier-0000000000000000.ckpt").read_bytes() == b"old key"  # pulled
            for epoch in (1, 2):
                tmp = folder / f"{own}.tmp"
                tmp.write_bytes(f"after epoch {epoch}".encode())
                tmp.replace(folder / own)  # as fit writes them
                wait_for("classify", own, f"after epoch {epoch}".encode())
            raise RuntimeError("pod evicted")
    except RuntimeError:
        pass
    assert remote("classify") == {"classifier-0000000000000000.ckpt": b"old key", own: b"after epoch 2"}
    with durable_checkpoints(root, "classify", endpoint, interval_s=0.1) as folder:
        assert (folder / own).read_bytes() == b"after epoch 2"  # the rerun resumes from here
        (folder / own).unlink()
    assert remote("classify") == {}, "a finished stage leaves no checkpoint on S3"
    assert remote("mil") == {"mil-0000000000000000.ckpt": b"another stage's"}


def test_durable_checkpoints_out_of_reach_warn_once_and_train_on(caplog: pytest.LogCaptureFixture) -> None:
    """A wrong endpoint (or missing bucket) for the checkpoint root must not cost the training itself."""
    from covseg.checkpoint_store import durable_checkpoints

    start = time.monotonic()
    with (
        caplog.at_level("WARNING", logger="covseg.checkpoint_store"),
        durable_checkpoints(
            "s3://covseg-nowhere/root", "segment", f"http://127.0.0.1:{_closed_port()}"
        ) as folder,
    ):
        (folder / "segmenter-4444444444444444.ckpt").write_bytes(b"epoch 1")
    assert time.monotonic() - start < 30, "bounded: a short connect timeout and few retries"
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(
        "s3://covseg-nowhere/root/segment is out of reach (Could not connect to the endpoint"
    )
    assert warning.endswith("): this task's checkpoints will not outlive it") and "\n" not in warning
