"""Ingest on a tiny tree of real files: manifest schema, weak labels, slice order, rotation, splits, CLI."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from helpers import (
    MEDSEG,
    SEG_SLICES,
    build_ct_md,
    build_tiny_data,
    copy_file,
    dicom_tags,
    leftovers,
    make_project,
    real_labels,
    rewrite_dicom,
    run_covseg,
    series_files,
    sha256_tree,
    tiny_params,
    tree_state,
)

from covseg import stages
from covseg.ingest import MANIFEST, assign_splits
from covseg.io import read_dicom_series

# The manifest is the contract between ingest and every later stage: column -> kind.
SCHEMA = {
    "case_id": "str",
    "dataset": "str",
    "source": "str",
    "volume_id": "str",
    "slice_index": "int",
    "label": "int",
    "domain": "str",
    "spacing_x": "float",
    "spacing_y": "float",
    "spacing_z": "float",
    "height": "int",
    "width": "int",
    "file": "str",
    "z": "int",
    "sha256": "str",
    "raw_path": "str",
    "pix_min": "float",
    "pix_max": "float",
    "pix_mean": "float",
    "nan_count": "int",
    "mask_file": "str",
    "role": "str",
    "split": "str",
    "lesion_left": "int",
    "lesion_right": "int",
}
ROTATE = {"coronacases": 1, "radiopaedia": -1, "medseg": -1}  # as in params.yaml
P001_SPACING = (0.748046875, 0.748046875, 4.0)


def _kind(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    if pd.api.types.is_string_dtype(series) or series.map(type).eq(str).all():
        return "str"
    return str(series.dtype)


def _labels_by_instance() -> dict[tuple[str, int], int]:
    return {(r["case"], int(r["instance_number"])): int(r["lesion"]) for r in real_labels()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pd.DataFrame]:
    """(data dir, ingest dir, manifest) of one ingest of the tiny real tree."""
    root = tmp_path_factory.mktemp("tiny-ingest")
    data = build_tiny_data(root / "data")
    out = root / "artifacts" / "ingest"
    frame = stages.ingest(data, out, tiny_params())
    return data, out, frame


def test_manifest_schema_and_counts(tiny: tuple[Path, Path, pd.DataFrame]) -> None:
    _, out, returned = tiny
    manifest = pd.read_parquet(out / MANIFEST)
    assert list(manifest.columns) == list(SCHEMA)
    assert {col: _kind(manifest[col]) for col in manifest.columns} == SCHEMA
    pd.testing.assert_frame_equal(manifest, returned.reset_index(drop=True), check_dtype=False)
    assert manifest["case_id"].is_unique
    counts = manifest.groupby("dataset").size().to_dict()
    assert counts == {"covid-ct-md": 12, "covid19-ct-seg-slices": 4, "medseg-100": 2}
    assert manifest.groupby("dataset")["volume_id"].nunique().to_dict() == {
        "covid-ct-md": 2,
        "covid19-ct-seg-slices": 2,
        "medseg-100": 1,
    }
    assert set(manifest["source"]) == {"covid-ct-md", "coronacases", "radiopaedia", "medseg"}
    assert manifest["nan_count"].eq(0).all()
    hu = manifest[manifest["domain"] == "hu"]
    assert set(hu["dataset"]) == {"covid-ct-md"}
    assert hu["pix_min"].min() >= -1100 and hu["pix_max"].max() <= 4000
    eight = manifest[manifest["domain"] == "8bit"]
    assert eight["pix_min"].min() >= 0 and eight["pix_max"].max() <= 255
    assert eight[["spacing_x", "spacing_y", "spacing_z"]].isna().all().all()  # JPEG: no physical spacing
    for rel in manifest["file"]:
        assert (out / rel).is_file(), rel
    assert not list(out.parent.glob(".ingest*")), "scratch or backup folder left beside the output"


def test_dicom_labels_follow_instance_number(tiny: tuple[Path, Path, pd.DataFrame]) -> None:
    _, _, manifest = tiny
    by_instance = _labels_by_instance()
    by_file = {r["file"]: int(r["lesion"]) for r in real_labels()}
    dicom = manifest[manifest["dataset"] == "covid-ct-md"]
    for row in dicom.itertuples():
        case = row.volume_id.split("__")[1]
        instance = int(dicom_tags(Path(row.raw_path))["0020|0013"])
        assert row.label == by_instance[(case, instance)], row.case_id
        assert row.label == by_file[f"{case}/{Path(row.raw_path).name}"], row.case_id
    p001 = dicom[dicom["volume_id"] == "covid-ct-md__P001"].sort_values("z")
    assert sorted(set(p001["label"])) == [0, 1], "the tiny P001 window must hold both labels"


def test_labels_join_by_instance_not_by_file_name(tmp_path: Path) -> None:
    """File names on disk that lie about the instance: the labels must still follow InstanceNumber."""
    data = tmp_path / "data"
    build_ct_md(data, {"P001": 25})
    folder = data / "covid-ct-md" / "P001"
    names = sorted(p.name for p in folder.iterdir())
    staging = tmp_path / "staging"
    folder.rename(staging)
    folder.mkdir()
    for old, new in zip(names, reversed(names), strict=True):  # 0025.dcm now holds instance 35, ...
        (staging / old).rename(folder / new)
    params = tiny_params(sources={"covid-ct-md": tiny_params()["sources"]["covid-ct-md"]})
    frame = stages.ingest(data, tmp_path / "out", params)
    by_instance = _labels_by_instance()
    by_file = {r["file"]: int(r["lesion"]) for r in real_labels()}
    mismatches_by_name = 0
    for row in frame.itertuples():
        instance = int(dicom_tags(Path(row.raw_path))["0020|0013"])
        assert row.label == by_instance[("P001", instance)]
        mismatches_by_name += row.label != by_file[f"P001/{Path(row.raw_path).name}"]
    assert mismatches_by_name > 0, "the renaming must make a join by file name give other labels"


def test_slices_ordered_by_position_and_case_file_is_hu(tiny: tuple[Path, Path, pd.DataFrame]) -> None:
    _, out, manifest = tiny
    dicom = manifest[manifest["dataset"] == "covid-ct-md"]
    for volume_id, rows in dicom.groupby("volume_id"):
        rows = rows.sort_values("z")
        assert rows["z"].tolist() == list(range(len(rows))) == rows["slice_index"].tolist()
        assert rows["file"].nunique() == 1
        # LPS: z grows towards the head; InstanceNumber 1 is the cranial end, so instances fall.
        heights = [float(dicom_tags(Path(p))["0020|0032"].split("\\")[2]) for p in rows["raw_path"]]
        instances = [int(dicom_tags(Path(p))["0020|0013"]) for p in rows["raw_path"]]
        assert heights == sorted(heights) and len(set(heights)) == len(heights), volume_id
        assert instances == sorted(instances, reverse=True), volume_id
        image = sitk.ReadImage(str(out / rows["file"].iloc[0]))
        assert image.GetSize() == (512, 512, len(rows))
        assert image.GetPixelID() == sitk.sitkInt16
        row_mm, col_mm = (
            float(v) for v in dicom_tags(Path(rows["raw_path"].iloc[0]))["0028|0030"].split("\\")
        )
        spacing = (col_mm, row_mm, float(np.median(np.diff(heights))))
        assert spacing[2] == pytest.approx(4.0, abs=0.01)  # every second 2 mm slice kept
        assert image.GetSpacing() == pytest.approx(spacing, abs=1e-4)
        assert rows[["spacing_x", "spacing_y", "spacing_z"]].iloc[0].tolist() == pytest.approx(spacing)
        volume = sitk.GetArrayFromImage(image)
        for row in rows.itertuples():
            raw = sitk.GetArrayFromImage(sitk.ReadImage(row.raw_path))[0]  # one file, rescaled to HU
            np.testing.assert_array_equal(volume[row.z], raw, err_msg=row.case_id)
            assert (row.pix_min, row.pix_max) == (raw.min(), raw.max())
            assert row.pix_mean == pytest.approx(raw.mean())
        assert volume.min() >= -1024 - 1 and volume.max() > 0  # HU: air at -1024, bone above 0


def test_series_with_flipped_axes_keeps_labels_on_their_slices(tmp_path: Path) -> None:
    """A real series re-written with rows running posterior->anterior (ImageOrientationPatient 1,0,0,0,-1,0)."""
    folder = tmp_path / "flip"
    for src in series_files("P001", 25, 3):
        rewrite_dicom(src, folder / src.name, {"0020|0037": "1\\0\\0\\0\\-1\\0"})
    series = read_dicom_series(folder)
    volume = sitk.GetArrayFromImage(series.image)
    for z, path in enumerate(series.files):
        raw = sitk.GetArrayFromImage(sitk.ReadImage(path))[0]
        assert np.array_equal(volume[z], raw[::-1]), f"slice {z} is not {Path(path).name}"


def test_rotation_brings_jpegs_to_one_orientation(tiny: tuple[Path, Path, pd.DataFrame]) -> None:
    _, out, manifest = tiny
    eight = manifest[manifest["domain"] == "8bit"]
    assert len(eight) == 6
    for row in eight.itertuples():
        stem = row.case_id.split("__", 1)[1]
        original = MEDSEG / "images" if row.source == "medseg" else SEG_SLICES
        jpeg = sitk.GetArrayFromImage(sitk.ReadImage(str(original / f"{stem}.jpg")))
        case = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row.file)))
        assert jpeg.shape[0] != jpeg.shape[1], "pick non-square slices so a transpose is visible"
        assert case.shape == jpeg.shape[::-1] == (row.height, row.width), row.case_id
        np.testing.assert_array_equal(case, np.rot90(jpeg, ROTATE[row.source]))
        assert row.z == 0 and row.slice_index == int(stem.rsplit("_", 1)[1])


def test_eval_rows_carry_masks_and_no_label(tiny: tuple[Path, Path, pd.DataFrame]) -> None:
    _, out, manifest = tiny
    evals = manifest[manifest["role"] == "eval"]
    assert set(evals["dataset"]) == {"medseg-100"} and len(evals) == 2
    assert evals["label"].eq(-1).all() and evals["split"].eq("eval").all()
    assert not manifest.loc[manifest["role"] == "train", "mask_file"].astype(bool).any()
    assert not manifest.loc[manifest["role"] == "train", "split"].eq("eval").any()
    for row in evals.itertuples():
        stem = row.case_id.split("__", 1)[1]
        saved = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row.mask_file)))
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(MEDSEG / "masks" / f"{stem}.png")))
        raw = raw.max(axis=-1) if raw.ndim == 3 else raw
        assert saved.shape == (row.height, row.width)
        assert set(np.unique(saved)) <= {0, 255} and saved.any(), "real medseg masks hold lesions"
        np.testing.assert_array_equal(saved > 0, np.rot90(raw > 127, ROTATE["medseg"]))


def test_splits_are_per_volume(tiny: tuple[Path, Path, pd.DataFrame]) -> None:
    _, _, manifest = tiny
    assert set(manifest["split"]) <= {"train", "val", "eval"}
    assert manifest.groupby("volume_id")["split"].nunique().max() == 1
    raw_hash = manifest["sha256"].str.split(":").str[0]
    assert manifest.assign(h=raw_hash).groupby("h")["split"].nunique().max() == 1


def test_ingest_is_deterministic(tiny: tuple[Path, Path, pd.DataFrame], tmp_path: Path) -> None:
    """Same files at another place, another run: the same manifest (bar raw paths), the same bytes."""
    data, out, first = tiny
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(data, moved)
    second = stages.ingest(moved, tmp_path / "out", tiny_params())
    assert (
        second["raw_path"].str.replace(str(moved), "", regex=False).tolist()
        == first["raw_path"].str.replace(str(data), "", regex=False).tolist()
    )
    pd.testing.assert_frame_equal(first.drop(columns="raw_path"), second.drop(columns="raw_path"))
    assert sha256_tree(out / "cases") == sha256_tree(tmp_path / "out" / "cases")
    assert sha256_tree(out / "masks") == sha256_tree(tmp_path / "out" / "masks")


def test_nifti_source(tmp_path: Path) -> None:
    """kind: nifti — a real series saved as NIfTI, with a partial label CSV (other slices stay -1)."""
    series_dir = tmp_path / "series"
    for src in series_files("P001", 25, 4):
        copy_file(src, series_dir / src.name)
    volume = read_dicom_series(series_dir).image
    folder = tmp_path / "data" / "ct-nifti"
    folder.mkdir(parents=True)
    sitk.WriteImage(volume, str(folder / "vol01.nii.gz"))
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["case", "slice_index", "lesion"], ["vol01", 0, 1], ["vol01", 2, 0]])
    params = tiny_params(sources={"ct-nifti": {"kind": "nifti", "labels": "labels.csv", "role": "train"}})
    frame = stages.ingest(tmp_path / "data", tmp_path / "out", params)
    assert frame["label"].tolist() == [1, -1, 0, -1]
    assert frame["domain"].eq("hu").all() and frame["volume_id"].nunique() == 1
    assert frame[["spacing_x", "spacing_y", "spacing_z"]].iloc[0].tolist() == pytest.approx(P001_SPACING)
    assert frame["sha256"].str.split(":").str[1].tolist() == ["0", "1", "2", "3"]
    case = sitk.ReadImage(str(tmp_path / "out" / frame["file"].iloc[0]))
    assert case.GetSpacing() == pytest.approx(P001_SPACING, abs=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(case), sitk.GetArrayFromImage(volume))


def _synthetic(volumes: dict[str, tuple[str, int, str]], slices: int = 3) -> pd.DataFrame:
    """Rows for {volume_id: (source, max label, role)}: the positive volumes hold one positive slice."""
    rows = []
    for volume, (source, label, role) in volumes.items():
        for k in range(slices):
            rows.append(
                {
                    "volume_id": volume,
                    "source": source,
                    "role": role,
                    "label": label if k == 1 or label <= 0 else 0,
                }
            )
    return pd.DataFrame(rows)


def test_assign_splits_stratified_by_volume() -> None:
    volumes = {f"A-pos{i}": ("A", 1, "train") for i in range(8)}
    volumes |= {f"A-neg{i}": ("A", 0, "train") for i in range(4)}
    volumes |= {f"B-pos{i}": ("B", 1, "train") for i in range(5)}
    volumes |= {"C-only": ("C", 1, "train"), "E-0": ("E", -1, "eval"), "E-1": ("E", -1, "eval")}
    frame = _synthetic(volumes)
    split = assign_splits(frame, 0.25, "salt-1")
    frame = frame.assign(split=split)
    per_volume = frame.groupby("volume_id")["split"].agg(["nunique", "first"])
    assert per_volume["nunique"].eq(1).all(), "a volume in two splits leaks"
    chosen = per_volume["first"]
    val = set(chosen[chosen == "val"].index)
    assert len({v for v in val if v.startswith("A-pos")}) == 2  # ceil(0.25 * 8)
    assert len({v for v in val if v.startswith("A-neg")}) == 1  # ceil(0.25 * 4): both labels validated
    assert len({v for v in val if v.startswith("B-pos")}) == 2  # ceil(0.25 * 5)
    assert chosen["C-only"] == "train", "a lone volume of its stratum stays in train"
    assert chosen[["E-0", "E-1"]].eq("eval").all()
    assert frame.loc[frame["role"] == "train", "split"].isin(["train", "val"]).all()
    # Deterministic and independent of row order; the salt decides which volumes.
    shuffled = frame.drop(columns="split").sample(frac=1.0, random_state=3)
    again = assign_splits(shuffled, 0.25, "salt-1")
    assert again.groupby(shuffled["volume_id"]).first().to_dict() == chosen.to_dict()
    salts = [assign_splits(frame, 0.25, f"salt-{i}").groupby(frame["volume_id"]).first() for i in range(2, 7)]
    assert any(set(s[s == "val"].index) != val for s in salts)
    assert assign_splits(frame, 0.0, "salt-1").isin(["train", "eval"]).all()


def test_cli_ingest_end_to_end(tmp_path: Path) -> None:
    """`covseg ingest` as a user runs it: a tmp project (COVSEG_ROOT), params.yaml, data/ -> artifacts/."""
    project = make_project(tmp_path / "project")
    build_tiny_data(project / "data")
    raw_before = tree_state(project / "data")
    result = run_covseg(project, "ingest", "--profile", "tiny")
    assert result.returncode == 0, result.stderr
    for source in ("covid-ct-md", "coronacases", "radiopaedia", "medseg"):
        assert source in result.stdout
    manifest = pd.read_parquet(project / "artifacts" / "ingest" / MANIFEST)
    assert len(manifest) == 18 and manifest["raw_path"].str.startswith(str(project / "data")).all()
    assert leftovers(project / "artifacts") == ["ingest"]
    assert tree_state(project / "data") == raw_before, "ingest must only read data/"
