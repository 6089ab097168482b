"""Shared test helpers: tiny `data/` trees built from the real CT files, tmp projects, DICOM surgery.

Everything is copied from the read-only ``../shared/datasets`` (beside the clone, also on CI) into a
test's ``tmp_path`` before it is modified; nothing is ever written next to the originals.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from covseg import telemetry

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CT_MD = SHARED_DATASETS / "covid-ct-md"
SEG_SLICES = SHARED_DATASETS / "covid19-ct-seg-slices" / "images"
MEDSEG = SHARED_DATASETS / "medseg-100"
BIN = Path(sys.executable).parent

# 6 consecutive kept files (every second instance) per series: P001 25..35 holds both labels (0,1,1,0,1,1).
SERIES_FIRST_INSTANCE = {"P001": 25, "normal001": 1}
N_SERIES_FILES = 6
# Two real JPEGs of one coronacases volume (rotate 1) and two of one radiopaedia volume (rotate -1).
SLICE_STEMS = (
    "coronacases_org_001_1",
    "coronacases_org_001_2",
    "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm_1",
    "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm_2",
)
MEDSEG_STEMS = ("medseg_000", "medseg_001")
# Rescale tags that GDCM's writer computes itself (copying them makes it throw).
_WRITER_OWNED_TAGS = {"0028|1052", "0028|1053"}
TELEMETRY_OFF = dict(telemetry.TELEMETRY_OFF)  # for subprocess environments (the one definition)


def require_shared() -> Path:
    """The shared dataset folder; skip the test (with the reason) where it is missing."""
    if not (CT_MD / "slice_labels.csv").is_file():
        pytest.skip(f"real data not found at {SHARED_DATASETS} (expected beside the clone)")
    return SHARED_DATASETS


def copy_file(src: Path, dst: Path) -> Path:
    """Copy bytes only (the originals are read-only; the copy must be writable)."""
    if not src.is_file():
        require_shared()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def series_files(case: str, first_instance: int, n: int = N_SERIES_FILES) -> list[Path]:
    """`n` consecutive kept files of a real COVID-CT-MD series (no gaps: the reader refuses them)."""
    require_shared()
    files = [CT_MD / case / f"{first_instance + 2 * i:04d}.dcm" for i in range(n)]
    missing = [f for f in files if not f.is_file()]
    assert not missing, f"shared data lacks {missing}"
    return files


def write_slice_labels(folder: Path, cases: Iterable[str]) -> Path:
    """Write `slice_labels.csv` holding the real rows of the files present under folder/<case>/."""
    present = {f"{c}/{p.name}" for c in cases for p in (folder / c).glob("*.dcm")}
    with open(CT_MD / "slice_labels.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        rows = [r for r in reader if r["file"] in present]
    out = folder / "slice_labels.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


def real_labels() -> list[dict[str, str]]:
    """All rows of the real COVID-CT-MD slice label table."""
    with open(CT_MD / "slice_labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def build_ct_md(data_dir: Path, series: dict[str, int] | None = None, n: int = N_SERIES_FILES) -> Path:
    """`data_dir/covid-ct-md/<case>/*.dcm` (real consecutive files) plus the matching slice_labels.csv."""
    folder = data_dir / "covid-ct-md"
    series = SERIES_FIRST_INSTANCE if series is None else series
    for case, first in series.items():
        for src in series_files(case, first, n):
            copy_file(src, folder / case / src.name)
    write_slice_labels(folder, series)
    return folder


def build_seg_slices(data_dir: Path, stems: Sequence[str] = SLICE_STEMS) -> Path:
    """`data_dir/covid19-ct-seg-slices/images/*.jpg` (real JPEGs)."""
    folder = data_dir / "covid19-ct-seg-slices"
    for stem in stems:
        copy_file(SEG_SLICES / f"{stem}.jpg", folder / "images" / f"{stem}.jpg")
    return folder


def build_medseg(data_dir: Path, stems: Sequence[str] = MEDSEG_STEMS) -> Path:
    """`data_dir/medseg-100/{images,masks}` (real JPEG slices and their binary PNG masks)."""
    folder = data_dir / "medseg-100"
    for stem in stems:
        copy_file(MEDSEG / "images" / f"{stem}.jpg", folder / "images" / f"{stem}.jpg")
        copy_file(MEDSEG / "masks" / f"{stem}.png", folder / "masks" / f"{stem}.png")
    return folder


def build_tiny_data(data_dir: Path) -> Path:
    """A tiny copy of all three real sources (2 short DICOM series, 4 JPEGs of 2 volumes, 2 medseg pairs)."""
    require_shared()
    data_dir.mkdir(parents=True, exist_ok=True)
    build_ct_md(data_dir)
    build_seg_slices(data_dir)
    build_medseg(data_dir)
    return data_dir


def tiny_params(sources: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """The repo's `tiny` profile; `sources` (if given) replaces the source table, `overrides` merge in."""
    from covseg.config import load_params

    params = load_params("tiny", path=REPO_ROOT / "params.yaml", overrides=overrides or None)
    if sources is not None:
        params["sources"] = sources
    return params


def default_sources() -> dict[str, Any]:
    """The source table of the repo's params.yaml (a fresh copy)."""
    return tiny_params()["sources"]


def make_project(root: Path, sources: dict[str, Any] | None = None, profile: str = "tiny") -> Path:
    """A tmp project: params.yaml copied from the repo (profile set, sources optionally replaced).

    The data goes to `root/data` (the params' data_dir), the outputs to `root/artifacts`.
    """
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["profile"] = profile
    raw["common"]["data_dir"] = "data"
    raw["common"]["artifacts_dir"] = "artifacts"
    if sources is not None:
        raw["common"]["sources"] = sources
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def cli_env(project: Path, **extra: str) -> dict[str, str]:
    """Environment for a `covseg` subprocess bound to `project` (telemetry off, no profile override)."""
    env = {**os.environ, **TELEMETRY_OFF, "COVSEG_ROOT": str(project), **extra}
    env.pop("COVSEG_PROFILE", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_covseg(project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed `covseg` console script in `project` (COVSEG_ROOT set), capturing output."""
    return subprocess.run(
        [str(BIN / "covseg"), *args],
        cwd=project,
        env=cli_env(project),
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        check=False,
    )


def invoke_cli(project: Path, *args: str) -> Any:
    """Run the `covseg` click group in-process (CliRunner) with COVSEG_ROOT=`project`; stderr kept apart."""
    from click.testing import CliRunner

    from covseg.cli import main

    env = {**TELEMETRY_OFF, "COVSEG_ROOT": str(project), "COVSEG_PROFILE": None}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines of a stderr capture (progress bars redraw with \\r: split on it too)."""
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line.startswith("error:")]


def sha256_tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under `folder` (detects any rewrite)."""
    return {rel: (digest, (folder / rel).stat().st_mtime_ns) for rel, digest in sha256_tree(folder).items()}


def dicom_tags(path: Path) -> dict[str, str]:
    """All public header tags of one DICOM file (SimpleITK spelling `gggg|eeee`), values stripped."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()}


def rewrite_dicom(src: Path, dst: Path, tags: dict[str, str]) -> Path:
    """Re-write a real DICOM slice with some header tags changed (pixels, UIDs and geometry kept)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(src))
    image = reader.Execute()
    for key in reader.GetMetaDataKeys():
        if key not in _WRITER_OWNED_TAGS:
            image.SetMetaData(key, reader.GetMetaData(key))
    for key, value in tags.items():
        image.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(dst))
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer.Execute(image)
    return dst


def truncate(path: Path, fraction: float = 0.5) -> Path:
    """Cut a file to `fraction` of its bytes."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(size * fraction))
    return path


def leftovers(artifacts: Path) -> list[str]:
    """Names under artifacts/ that a failed ingest must not leave (its output or scratch/backup folders)."""
    if not artifacts.exists():
        return []
    return sorted(p.name for p in artifacts.iterdir() if p.name == "ingest" or p.name.startswith(".ingest"))


def assert_refused(builder: Any, tmp_path: Path) -> None:
    """A bad-input builder's data is refused by the ingest stage and by the CLI.

    The stage raises one-line `InputError` naming the file (the expected problem may list alternatives
    separated by " | ") and leaves no output; `covseg ingest` exits 2 with one `error: <path>: <problem>`
    line, last on stderr, and no artifacts/ingest.
    """
    import pytest

    from covseg import stages
    from covseg.io import InputError

    require_shared()
    project = tmp_path / "project"
    sources, bad_path, problem = builder(project / "data")
    make_project(project, sources=sources)

    out = tmp_path / "stage" / "ingest"
    with pytest.raises(InputError) as info:
        stages.ingest(project / "data", out, tiny_params(sources=sources))
    assert Path(info.value.path) == bad_path
    assert any(alternative in info.value.problem for alternative in problem.split(" | ")), info.value.problem
    assert str(info.value) == f"{bad_path}: {info.value.problem}" and "\n" not in str(info.value)
    assert leftovers(out.parent) == []

    result = invoke_cli(project, "ingest", "--profile", "tiny")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = error_lines(result.stderr)
    assert lines == [f"error: {bad_path}: {info.value.problem}"], result.stderr
    assert result.stderr.replace("\r", "\n").strip().splitlines()[-1] == lines[0]
    assert leftovers(project / "artifacts") == []


@contextlib.contextmanager
def mlflow_at(uri: str) -> Iterator[Any]:
    """MLflow (tracking and, by default, registry) pointed at `uri` inside the block; yields a client.

    The explicitly set tracking URI and MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI are restored afterwards.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before = getattr(tracking_utils, "_tracking_uri", None)  # explicit URI only, not the resolved default
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # restored (or removed) by the monkeypatch
        mlflow.set_tracking_uri(uri)
        try:
            yield mlflow.MlflowClient(uri, uri)
        finally:
            mlflow.set_tracking_uri(before)  # None also clears MLFLOW_TRACKING_URI; mp restores it after


_UNPICKLED: list[str] | None = None


def _record_unpickling(event: str, args: tuple[Any, ...]) -> None:
    if event == "pickle.find_class" and _UNPICKLED is not None:
        _UNPICKLED.append(f"{args[0]}.{args[1]}")


@contextlib.contextmanager
def unpickled_globals() -> Iterator[list[str]]:
    """Inside the block, record every global a pickle load resolves (``module.name``; audit event
    ``pickle.find_class``, raised by the C and the Python unpickler). An empty list: nothing was unpickled
    that names a class or function."""
    global _UNPICKLED
    if not getattr(unpickled_globals, "hooked", False):
        sys.addaudithook(_record_unpickling)  # audit hooks cannot be removed: install once, switch by flag
        unpickled_globals.hooked = True  # type: ignore[attr-defined]
    _UNPICKLED = found = []
    try:
        yield found
    finally:
        _UNPICKLED = None


def is_pickle(path: Path) -> bool:
    """True for a pickle file (protocol 2+ header, or a .pkl/.pickle name) or a zip holding one (torch.save)."""
    import zipfile

    if path.suffix in (".pkl", ".pickle"):
        return True
    head = path.read_bytes()[:2]
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith((".pkl", ".pickle")) for name in archive.namelist())
    return False
