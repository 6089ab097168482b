"""Reliability: the bad-input kinds that test_bad_input / test_gate0 do not cover yet, one summary over every
kind, and faults (training killed mid-epoch then resumed; the S3 endpoint down during `dvc push`).

Every broken input is made from real files copied into tmp_path. The MLflow upload fault (no registered
version without its artifacts) is test_registry.py::test_log_segmenter_upload_failure_registers_nothing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from helpers import (
    BIN,
    MEDSEG,
    SEG_SLICES,
    assert_refused,
    build_medseg,
    build_seg_slices,
    cli_env,
    copy_file,
    error_lines,
    invoke_cli,
    make_project,
    require_shared,
    rewrite_dicom,
    series_files,
    sha256_tree,
    tiny_params,
    truncate,
)
from test_bad_input import BUILDERS as EXISTING_BUILDERS
from test_bad_input import CORONA, Builder, _p001, _src
from test_dvc_remote import _env as dvc_env
from test_dvc_remote import _run, _scratch_repo

from covseg import stages
from covseg.gates import GateFailed
from covseg.ingest import MANIFEST
from covseg.io import TAG_MODALITY, InputError, read_dicom_series

P001_PIXEL_SPACING = b"0.748046875\\0.748046875"  # PixelSpacing (0028,0030) as stored in every P001 file
NIFTI_SOURCE = {"ct-nifti": {"kind": "nifti", "role": "train"}}
_VOLUME: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------------
# New bad-input kinds: builders with test_bad_input's signature (data -> sources, bad path, problem)
# ------------------------------------------------------------------------------------------------


def _patch_header_value(path: Path, old: bytes, new: bytes) -> Path:
    """Replace one header value in place, same length (so no DICOM element length changes)."""
    assert len(old) == len(new)
    body = path.read_bytes()
    assert body.count(old) == 1, f"{old!r} occurs {body.count(old)} times in {path}"
    path.write_bytes(body.replace(old, new))
    return path


def _real_volume(scratch: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A real CT volume (3 P001 slices, HU, 4x downsampled in-plane) and its spacing; read once."""
    if not _VOLUME:
        image = read_dicom_series(_p001(scratch)).image
        sx, sy, sz = image.GetSpacing()
        _VOLUME["array"] = sitk.GetArrayFromImage(image)[:, ::4, ::4].copy()
        _VOLUME["spacing"] = (4 * sx, 4 * sy, sz)
    return _VOLUME["array"].copy(), _VOLUME["spacing"]


def _write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, ...], vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def cr_modality(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = _p001(data)
    bad = rewrite_dicom(folder / "0027.dcm", folder / "0027.dcm", {TAG_MODALITY: "CR"})
    return _src("covid-ct-md"), bad, "modality is 'CR', expected 'CT'"


def mixed_series(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = _p001(data)
    for src in series_files("normal001", 1, 2):  # another patient's series dropped into P001/
        copy_file(src, folder / src.name)
    return _src("covid-ct-md"), folder, "expected one DICOM series, found 2"


def duplicated_slice(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = _p001(data)
    shutil.copyfile(folder / "0027.dcm", folder / "0027-copy.dcm")
    return _src("covid-ct-md"), folder, "two slices share one position (duplicated slice)"


def non_square_dicom_pixels(data: Path) -> tuple[dict[str, Any], Path, str]:
    bad = _patch_header_value(_p001(data) / "0027.dcm", P001_PIXEL_SPACING, b"0.748046875\\1.496093750")
    return _src("covid-ct-md"), bad, "non-square pixels"


def zero_spacing_dicom(data: Path) -> tuple[dict[str, Any], Path, str]:
    bad = _patch_header_value(_p001(data) / "0027.dcm", P001_PIXEL_SPACING, b"0.000000000\\0.000000000")
    return _src("covid-ct-md"), bad, "missing or non-positive pixel spacing (0.0, 0.0)"


def zero_spacing_nifti(data: Path) -> tuple[dict[str, Any], Path, str]:
    array, spacing = _real_volume(data.parent / "scratch")
    bad = _write_nifti(data / "ct-nifti" / "vol01.nii", array, spacing)
    header = bytearray(bad.read_bytes())
    assert struct.unpack_from("<i", header, 0)[0] == 348, "expected a NIfTI-1 header"
    assert struct.unpack_from("<f", header, 84)[0] == pytest.approx(spacing[1])  # pixdim[2]
    struct.pack_into("<f", header, 84, 0.0)
    bad.write_bytes(bytes(header))
    return NIFTI_SOURCE, bad, "missing or non-positive pixel spacing"


def non_square_nifti(data: Path) -> tuple[dict[str, Any], Path, str]:
    array, (sx, _, sz) = _real_volume(data.parent / "scratch")
    bad = _write_nifti(data / "ct-nifti" / "vol01.nii.gz", array, (sx, 2 * sx, sz))
    return NIFTI_SOURCE, bad, "non-square pixels"


def constant_nifti(data: Path) -> tuple[dict[str, Any], Path, str]:
    array, spacing = _real_volume(data.parent / "scratch")
    bad = _write_nifti(data / "ct-nifti" / "vol01.nii.gz", np.full_like(array, -1000), spacing)
    return NIFTI_SOURCE, bad, "volume is constant (no image content)"


def four_d_nifti(data: Path) -> tuple[dict[str, Any], Path, str]:
    array, spacing = _real_volume(data.parent / "scratch")
    bad = _write_nifti(data / "ct-nifti" / "vol01.nii.gz", np.stack([array, array]), (*spacing, 1.0))
    return NIFTI_SOURCE, bad, "expected a 3-D scalar volume, got 4-D with 1 component(s)"


def truncated_nifti(data: Path) -> tuple[dict[str, Any], Path, str]:
    array, spacing = _real_volume(data.parent / "scratch")
    bad = truncate(_write_nifti(data / "ct-nifti" / "vol01.nii.gz", array, spacing), 0.5)
    return NIFTI_SOURCE, bad, "truncated"


def truncated_jpeg_tail(data: Path) -> tuple[dict[str, Any], Path, str]:
    """Cut after the header: libjpeg still decodes it (grey fill, a warning), unlike test_bad_input's 1 %."""
    build_seg_slices(data)
    bad = truncate(data / "covid19-ct-seg-slices" / "images" / f"{CORONA}_2.jpg", 0.6)
    return _src("covid19-ct-seg-slices"), bad, "truncated JPEG (no end-of-image marker)"


def lesion_label_outside_0_1(data: Path) -> tuple[dict[str, Any], Path, str]:
    _p001(data)
    table = data / "covid-ct-md" / "slice_labels.csv"
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    fields = list(rows[0])
    line = next(n for n, row in enumerate(rows, start=2) if row["file"] == "P001/0027.dcm")
    rows[line - 2]["lesion"] = "2"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return _src("covid-ct-md"), table, f"line {line}: lesion must be 0 or 1, got 2"


def mask_label_map(data: Path) -> tuple[dict[str, Any], Path, str]:
    """A {0,1} label-map mask: binarised at >127 it would silently become an empty ground truth."""
    build_medseg(data)
    mask = data / "medseg-100" / "masks" / "medseg_001.png"
    binary = sitk.GetArrayFromImage(sitk.ReadImage(str(MEDSEG / "masks" / "medseg_001.png"))) > 127
    sitk.WriteImage(sitk.GetImageFromArray(binary.astype(np.uint8)), str(mask))
    return _src("medseg-100"), mask, "mask values [0, 1] are a label map, expected {0,255}"


NEW_BUILDERS: dict[str, Builder] = {b.__name__: b for b in (
    cr_modality, mixed_series, duplicated_slice, non_square_dicom_pixels, zero_spacing_dicom,
    zero_spacing_nifti, non_square_nifti, constant_nifti, four_d_nifti, truncated_nifti, truncated_jpeg_tail,
    lesion_label_outside_0_1, mask_label_map,
)}
assert not set(NEW_BUILDERS) & set(EXISTING_BUILDERS)


@pytest.mark.parametrize("name", list(NEW_BUILDERS))
def test_new_bad_input_is_refused_by_stage_and_cli(name: str, tmp_path: Path) -> None:
    """As test_bad_input: an InputError naming the file, one `error:` line, exit 2, no output folder."""
    assert_refused(NEW_BUILDERS[name], tmp_path)


# ------------------------------------------------------------------------------------------------
# Kinds caught after ingest: a duplicate slice across splits (gate 0), path traversal in the manifest
# ------------------------------------------------------------------------------------------------


def _duplicate_across_splits(data: Path) -> dict[str, Any]:
    """The same real JPEG under two volume names: the volume split puts one of them in `val`."""
    images = build_seg_slices(data, (f"{CORONA}_1", f"{CORONA}_2")) / "images"
    copy_file(SEG_SLICES / f"{CORONA}_1.jpg", images / "coronacases_org_002_1.jpg")
    return _src("covid19-ct-seg-slices")


HASH_LEAK = "hashes: ExpectColumnMaxToBeBetween(column=n_splits, max_value=1)"


def duplicate_slice_across_splits(data: Path) -> tuple[dict[str, Any], Path, str]:
    """As a builder for the summary: the failure names gate 0's report (written beside data/)."""
    return _duplicate_across_splits(data), data.parent / "gate0.json", HASH_LEAK


def test_duplicate_slice_across_splits_stops_at_gate0(tmp_path: Path) -> None:
    require_shared()
    project = tmp_path / "project"
    make_project(project, sources=_duplicate_across_splits(project / "data"))
    assert invoke_cli(project, "ingest", "--profile", "tiny").exit_code == 0
    manifest = pd.read_parquet(project / "artifacts" / "ingest" / MANIFEST)
    assert set(manifest["split"]) == {"train", "val"} and manifest["sha256"].duplicated().sum() == 1

    result = invoke_cli(project, "gate0", "--profile", "tiny")
    report = project / "artifacts" / "gates" / "gate0.json"
    assert result.exit_code == 2
    lines = error_lines(result.stderr)
    assert lines == [f"error: gate gate0 failed (1 expectation(s)); report: {report}"], result.stderr
    assert HASH_LEAK in result.stderr
    body = json.loads(report.read_text(encoding="utf-8"))
    assert body["success"] is False and [f.split(": observed")[0] for f in body["failures"]] == [HASH_LEAK]


def _ingest_with_traversal(root: Path, column: str, how: str) -> tuple[Path, str]:
    """A real ingest (medseg) whose manifest then names a file outside the ingest folder."""
    data = root / "data"
    build_medseg(data)
    ingest_dir = root / "artifacts" / "ingest"
    stages.ingest(data, ingest_dir, tiny_params(sources=_src("medseg-100")))
    manifest = pd.read_parquet(ingest_dir / MANIFEST)
    outside = root / "outside" / "evil.nii.gz"  # a readable file, so only the check can stop it
    copy_file(ingest_dir / manifest.loc[0, "file"], outside)
    name = "../../outside/evil.nii.gz" if how == "dotdot" else str(outside)
    assert (ingest_dir / name).resolve() == outside.resolve()
    manifest.loc[0, column] = name
    manifest.to_parquet(ingest_dir / MANIFEST, index=False)
    return ingest_dir, name


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_manifest_path_traversal_is_refused(how: str, tmp_path: Path) -> None:
    require_shared()
    project = make_project(tmp_path / "project", sources=_src("medseg-100"))
    ingest_dir, name = _ingest_with_traversal(project, "file", how)
    result = invoke_cli(project, "lungs", "--profile", "tiny")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    manifest = ingest_dir / MANIFEST
    assert error_lines(result.stderr) == [
        f"error: {manifest}: file {name!r} points outside {ingest_dir} (path traversal)"], result.stderr
    assert not [p.name for p in (project / "artifacts").iterdir() if "lungs" in p.name]

    # The other reader of manifest names (the register step's evaluation): mask_file.
    from covseg.evaluate import evaluate_ingested

    other = tmp_path / "other"
    ingest_dir, name = _ingest_with_traversal(other, "mask_file", how)
    with pytest.raises(InputError, match=r"mask_file .* points outside .*\(path traversal\)"):
        evaluate_ingested(None, ingest_dir)


# ------------------------------------------------------------------------------------------------
# Summary: every kind, through the stages a user would run, must be refused for the right reason
# ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the pipeline did with one kind of bad input."""

    kind: str
    error: Exception | None
    expected_path: Path
    expected_problem: str

    @property
    def rejected(self) -> bool:
        """Refused, naming the expected file (or gate report) and problem."""
        if isinstance(self.error, InputError):
            return Path(self.error.path) == self.expected_path and any(
                alt in self.error.problem for alt in self.expected_problem.split(" | "))
        if isinstance(self.error, GateFailed):
            return self.error.report == self.expected_path and self.expected_problem in str(self.error)
        return False


def _front_door(root: Path, builder: Builder) -> Outcome:
    """Ingest, then gate 0 (what `covseg run` does first), on the data one builder made."""
    sources, bad, problem = builder(root / "data")
    params = tiny_params(sources=sources)
    error = None
    try:
        stages.ingest(root / "data", root / "ingest", params)
        stages.gate0(root / "ingest", root / "gate0.json", params)
    except (InputError, GateFailed) as exc:
        error = exc
    return Outcome(builder.__name__, error, bad, problem)


def _manifest_traversal(root: Path) -> Outcome:
    """Ingest, then the lungs stage (the first reader of the manifest's file names)."""
    ingest_dir, _ = _ingest_with_traversal(root, "file", "dotdot")
    error = None
    try:
        stages.lungs(ingest_dir, root / "lungs", tiny_params(sources=_src("medseg-100")))
    except InputError as exc:
        error = exc
    return Outcome("manifest_path_traversal", error, ingest_dir / MANIFEST, "path traversal")


def test_every_bad_input_kind_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_shared()
    runs: dict[str, Callable[[Path], Outcome]] = {
        name: (lambda root, b=builder: _front_door(root, b))
        for name, builder in {**EXISTING_BUILDERS, **NEW_BUILDERS,
                              "duplicate_slice_across_splits": duplicate_slice_across_splits}.items()
    }
    runs["manifest_path_traversal"] = _manifest_traversal
    outcomes = [run(tmp_path / name) for name, run in runs.items()]

    rejected = [o.kind for o in outcomes if o.rejected]
    accepted = [o.kind for o in outcomes if o.error is None]
    misreported = {o.kind: str(o.error) for o in outcomes if o.error is not None and not o.rejected}
    with capsys.disabled():
        print(f"\n{len(rejected)} kinds rejected, {len(accepted)} accepted")
    assert accepted == [], f"accepted bad input: {accepted}"
    assert misreported == {}, misreported
    assert len(rejected) == len(runs) >= 15


# ------------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------------

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
                assert first.poll() is None, f"exited {first.returncode}: {first_err.read_text(errors='replace')}"
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

    second = subprocess.run(command, cwd=project, env=env, capture_output=True, encoding="utf-8",
                            errors="replace", timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    counts = [(int(m[1]), int(m[2])) for m in BAR.finditer(second.stderr)]
    assert counts and counts[0] == (len(done), EPOCHS), f"rerun did not start at epoch {len(done)}: {counts[:3]}"
    assert min(c for c, _ in counts) == len(done) and counts[-1] == (EPOCHS, EPOCHS)
    history = json.loads((artifacts / "classify" / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert history[:len(done)] == done, "the finished epochs must come from the checkpoint"
    assert list(checkpoints.iterdir()) == [], "checkpoints must be removed once training completes"
    left = sorted(p.name for p in artifacts.iterdir() if p.name.startswith("."))
    assert left == [], f"the killed run's scratch folder must be swept by the rerun: {left}"


def set_dvc_remote(repo: Path, url: str, endpoint: str) -> None:
    """What `dvc remote add -d store URL` and `dvc remote modify --local store endpointurl E` write."""
    (repo / ".dvc" / "config").write_text(f"[core]\n    remote = store\n['remote \"store\"']\n    url = {url}\n")
    (repo / ".dvc" / "config.local").write_text(f"['remote \"store\"']\n    endpointurl = {endpoint}\n")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_checkpoint_resumes_only_when_nothing_upstream_changed(tmp_path: Path) -> None:
    """A killed MIL run must not resume after an upstream parameter or an upstream output changed."""
    import os

    from covseg.config import load_params
    from covseg.training import checkpoint_path

    params = load_params("tiny")
    upstream = tmp_path / "classify"
    upstream.mkdir()
    (upstream / "classifier.pt").write_bytes(b"weights")
    name = checkpoint_path(tmp_path / "ckpt", "mil", params, [upstream])
    assert checkpoint_path(tmp_path / "ckpt", "mil", params, [upstream]) == name  # same run: resumes
    changed = {**params, "classify": {**params["classify"], "tissue_ceiling": 0.6}}  # not a MIL setting
    assert checkpoint_path(tmp_path / "ckpt", "mil", changed, [upstream]) != name
    stat = (upstream / "classifier.pt").stat()
    os.utime(upstream / "classifier.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # retrained
    assert checkpoint_path(tmp_path / "ckpt", "mil", params, [upstream]) != name


def test_dvc_push_with_s3_down_fails_bounded_then_succeeds_when_back(moto_server: Any, tmp_path: Path) -> None:
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
    down = subprocess.run([dvc, "push"], cwd=repo, env=dvc_env(), capture_output=True, encoding="utf-8",
                          errors="replace", timeout=120, check=False)
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
