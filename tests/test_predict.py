"""`covseg predict` (covseg.predict.predict_study) on real studies with the session's tiny trained model.

A real COVID-CT-MD series (6 consecutive kept files of P001), NIfTI volumes written from it (LPS and RAS
on disk), and a real medseg-100 JPEG: masks on the input's grid, a report whose numbers follow from the
masks, the output folder guarded, and the MLflow pyfunc giving the same mask. Bad studies given to
`predict_study` are refused in test_bad_input.py, with every other kind of bad input.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import BIN, MEDSEG, TELEMETRY_OFF, copy_file, mlflow_at, series_files

from covseg.dicom_seg import LEFT_LUNG_SEGMENT, LESION_SEGMENT, RIGHT_LUNG_SEGMENT, SEG_FILE
from covseg.io import IDENTIFYING_TAGS, InputError, Study, read_dicom_series, read_slice
from covseg.predict import (
    LEFT,
    LESION_NII,
    LESION_PNG,
    LUNG_NII,
    LUNG_PNG,
    OVERLAY,
    REPORT,
    RIGHT,
    LesionSegmenter,
    StudyMasks,
    build_report,
    predict_study,
)

FIRST_INSTANCE, N_FILES = 25, 6
MEDSEG_STEM, MEDSEG_ROTATE = "medseg_000", -1


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _assert_same_geometry(mask: sitk.Image, reference: sitk.Image) -> None:
    assert mask.GetSize() == reference.GetSize()
    for got, want in zip(_geometry(mask)[1:], _geometry(reference)[1:], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def model_dir(trained_tiny) -> Path:
    return trained_tiny.stage("segment")


@pytest.fixture(scope="module")
def segmenter(model_dir: Path) -> LesionSegmenter:
    return LesionSegmenter.load(model_dir)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("series") / "P001"
    for src in series_files("P001", FIRST_INSTANCE, N_FILES):
        copy_file(src, folder / src.name)
    return folder


@pytest.fixture(scope="module")
def series_without_uids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 real files of COVID-CT-MD normal002: empty SOPInstanceUID, UUID-style study and series UIDs."""
    folder = tmp_path_factory.mktemp("series-no-uids") / "normal002"
    for src in series_files("normal002", 1, N_FILES):
        copy_file(src, folder / src.name)
    return folder


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_file(
        MEDSEG / "images" / f"{MEDSEG_STEM}.jpg", tmp_path_factory.mktemp("slice") / f"{MEDSEG_STEM}.jpg"
    )


@pytest.fixture(scope="module")
def dicom_run(series: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("predict") / "P001-out"
    report = predict_study(series, model_dir, out, batch_size=4)  # 6 slices: two batches
    return out, report


def test_dicom_outputs_on_the_series_grid(
    dicom_run: tuple[Path, dict], series: Path, model_dir: Path
) -> None:
    out, report = dicom_run
    assert sorted(p.name for p in out.iterdir()) == sorted([LESION_NII, LUNG_NII, REPORT, OVERLAY, SEG_FILE])
    assert json.loads((out / REPORT).read_text()) == report and report["outputs"]["dicom_seg"] == SEG_FILE
    image = read_dicom_series(series).image  # the LPS-oriented series
    lesion_img, lung_img = sitk.ReadImage(str(out / LESION_NII)), sitk.ReadImage(str(out / LUNG_NII))
    for mask in (lesion_img, lung_img):
        _assert_same_geometry(mask, image)
    lesion, lung = sitk.GetArrayFromImage(lesion_img), sitk.GetArrayFromImage(lung_img)
    assert set(np.unique(lesion)) <= {0, 1} and set(np.unique(lung)) == {0, RIGHT, LEFT}
    assert lesion.any(), "the tiny model finds lesion on these COVID slices"
    assert not (lesion.astype(bool) & (lung == 0)).any(), "lesion outside the lung mask"
    assert report["n_slices"] == N_FILES == lesion.shape[0]
    assert report["input"]["kind"] == "dicom" and report["input"]["size"] == list(image.GetSize())
    assert sorted(report["input"]["instance_numbers"]) == list(
        range(FIRST_INSTANCE, FIRST_INSTANCE + 2 * N_FILES, 2)
    )
    assert sitk.ReadImage(str(out / OVERLAY)).GetSize()[0] > 300


def test_dicom_report_follows_from_the_masks(
    dicom_run: tuple[Path, dict], series: Path, model_dir: Path
) -> None:
    out, report = dicom_run
    lesion, lung = _array(out / LESION_NII).astype(bool), _array(out / LUNG_NII)
    voxel_ml = float(np.prod(read_dicom_series(series).image.GetSpacing())) / 1000.0
    assert report["voxel_ml"] == pytest.approx(voxel_ml, rel=1e-9)
    sides = {"right": lung == RIGHT, "left": lung == LEFT, "both": lung > 0}
    for side, region in sides.items():
        n_lesion, n_lung = int((lesion & region).sum()), int(region.sum())
        assert report["voxels"][side] == {"lesion": n_lesion, "lung": n_lung}
        assert report["lesion_ml"][side] == pytest.approx(n_lesion * voxel_ml, rel=1e-9)
        assert report["lung_ml"][side] == pytest.approx(n_lung * voxel_ml, rel=1e-9)
        assert report["lesion_percent_of_lung"][side] == pytest.approx(100 * n_lesion / n_lung, rel=1e-9)
    assert report["lesion_ml"]["right"] + report["lesion_ml"]["left"] == pytest.approx(
        report["lesion_ml"]["both"]
    )
    assert min(report["lung_ml"]["right"], report["lung_ml"]["left"]) > 0.3 * report["lung_ml"]["both"] / 2
    # patient's left = high column index in the LPS array (radiological view: right of the image)
    left_cols, right_cols = np.nonzero(lung == LEFT)[2], np.nonzero(lung == RIGHT)[2]
    assert left_cols.mean() > right_cols.mean()
    per_slice = report["per_slice"]
    assert [s["lesion_voxels"] for s in per_slice] == lesion.reshape(len(lesion), -1).sum(axis=1).tolist()
    assert sum(s["lung_voxels"] for s in per_slice) == report["voxels"]["both"]["lung"]
    assert report["overlay_slices"] and all(
        per_slice[z]["lesion_voxels"] > 0 for z in report["overlay_slices"]
    )
    model = report["model"]
    assert model["source"] == "folder" and model["uri"] == str(model_dir.resolve())
    assert model["version"].startswith("sha256:")
    assert model["meta"] == json.loads((model_dir / "segmenter.json").read_text())
    assert {"data_md5", "git_commit"} <= model.keys()
    # the model folder carries the lineage of the run that trained it (segmenter.json), and the report says it
    assert model["pipeline_run_id"] == model["meta"]["pipeline_run_id"] == "tiny-fixture"
    assert (
        model["data_md5"] == model["meta"]["data_md5"] and model["git_commit"] == model["meta"]["git_commit"]
    )
    assert report["seconds"] >= sum(report["timing_s"].values()) * 0.99 > 0


def _pixels_to_nifti_index(header: Any, mask: sitk.Image) -> tuple[np.ndarray, ...]:
    """Index arrays (z, y, x) into `mask`'s array of every pixel (row, column) of a DICOM instance, from the
    instance's own geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing)."""
    rows, cols = int(header.Rows), int(header.Columns)
    origin = np.array([float(v) for v in header.ImagePositionPatient])
    along_row, along_col = np.array([float(v) for v in header.ImageOrientationPatient]).reshape(2, 3)
    row_mm, col_mm = (float(v) for v in header.PixelSpacing)  # spacing between rows, between columns
    r, c = np.mgrid[0:rows, 0:cols]
    points = origin + c[..., None] * col_mm * along_row + r[..., None] * row_mm * along_col
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    index = (points - np.array(mask.GetOrigin())) @ direction / np.array(mask.GetSpacing())
    x, y, z = np.rint(index).astype(int).transpose(2, 0, 1)
    assert (
        (x >= 0).all() and (x < mask.GetSize()[0]).all() and (y >= 0).all() and (y < mask.GetSize()[1]).all()
    )
    return z, y, x


def _check_seg_against_nifti(out: Path, series: Path) -> None:
    """The SEG in `out`, read back with highdicom: each frame names its source instance in `series`, lies on
    that instance's grid and holds the NIfTI masks' voxels there (lesion, right lung, left lung)."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(out / SEG_FILE)
    sources = {
        str(h.SOPInstanceUID): h
        for h in (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.iterdir()))
    }
    first = next(iter(sources.values()))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert (
        seg.StudyInstanceUID == first.StudyInstanceUID
        and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    )
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == set(sources)
    descriptions = {n: seg.get_segment_description(n) for n in seg.get_segment_numbers()}
    assert {n: d.SegmentLabel for n, d in descriptions.items()} == {
        LESION_SEGMENT: "COVID-19 lesion",
        RIGHT_LUNG_SEGMENT: "right lung",
        LEFT_LUNG_SEGMENT: "left lung",
    }
    assert [descriptions[n].segmented_property_type.value for n in sorted(descriptions)] == [
        "52988006",
        "3341006",
        "44029006",
    ]  # SNOMED CT: lesion, right lung, left lung
    lesion_img, lung_img = sitk.ReadImage(str(out / LESION_NII)), sitk.ReadImage(str(out / LUNG_NII))
    lesion, lung = sitk.GetArrayFromImage(lesion_img), sitk.GetArrayFromImage(lung_img)
    expected = {
        LESION_SEGMENT: lesion == 1,
        RIGHT_LUNG_SEGMENT: lung == RIGHT,
        LEFT_LUNG_SEGMENT: lung == LEFT,
    }
    # frame by frame: its source instance (per-frame derivation), its position, its pixels
    n_frames = 0
    for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        header = sources[uid]
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in header.ImagePositionPatient], atol=1e-3)
        frame = seg.pixel_array[i].astype(bool)
        np.testing.assert_array_equal(frame, expected[number][_pixels_to_nifti_index(header, lesion_img)])
        n_frames += 1
    # no frame left out but the empty ones (highdicom omits those)
    non_empty = sum(
        int(expected[n][_pixels_to_nifti_index(h, lesion_img)].any())
        for h in sources.values()
        for n in expected
    )
    assert n_frames == non_empty > len(sources)
    by_instance = seg.get_pixels_by_source_instance(list(sources), segment_numbers=sorted(expected))
    for k, header in enumerate(sources.values()):
        where = _pixels_to_nifti_index(header, lesion_img)
        for j, number in enumerate(sorted(expected)):
            np.testing.assert_array_equal(by_instance[k, ..., j].astype(bool), expected[number][where])


def test_dicom_seg_frames_reference_their_instances(dicom_run: tuple[Path, dict], series: Path) -> None:
    _check_seg_against_nifti(dicom_run[0], series)


def _store_flipped(series: Path, folder: Path) -> Path:
    """The series re-written with rows and columns stored in reverse (ImageOrientationPatient -1,0,0,0,-1,0,
    as some scanners store a study): the same anatomy in the same patient coordinates."""
    folder.mkdir()
    for path in sorted(series.iterdir()):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        image = reader.Execute()
        flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, ::-1, ::-1].copy())
        flipped.SetSpacing(image.GetSpacing())
        far_corner = image.TransformIndexToPhysicalPoint([image.GetSize()[0] - 1, image.GetSize()[1] - 1, 0])
        flipped.SetOrigin(far_corner)
        flipped.SetDirection([-1, 0, 0, 0, -1, 0, 0, 0, 1])
        for key in reader.GetMetaDataKeys():
            if key not in ("0028|1052", "0028|1053", "0020|0032", "0020|0037"):  # the writer sets these
                flipped.SetMetaData(key, reader.GetMetaData(key))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / path.name))
        writer.Execute(flipped)
    return folder


def test_dicom_seg_of_a_series_stored_flipped(
    series: Path, dicom_run: tuple[Path, dict], segmenter: LesionSegmenter, tmp_path: Path
) -> None:
    """Frames lie on each instance's stored grid, not on the LPS grid the masks are computed on."""
    flipped = _store_flipped(series, tmp_path / "P001-flipped")
    assert read_dicom_series(flipped).file_orientation == "RAS"
    predict_study(flipped, segmenter, tmp_path / "out")
    np.testing.assert_array_equal(_array(tmp_path / "out" / LESION_NII), _array(dicom_run[0] / LESION_NII))
    _check_seg_against_nifti(tmp_path / "out", flipped)


def test_no_dicom_seg_for_a_series_without_instance_uids(
    series_without_uids: Path, segmenter: LesionSegmenter, tmp_path: Path
) -> None:
    """A SEG cannot reference instances without UIDs: masks and report as usual, the SEG left out, and why."""
    from covseg.predict import format_summary

    report = predict_study(series_without_uids, segmenter, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [LESION_NII, LUNG_NII, REPORT, OVERLAY]
    )
    assert report["outputs"]["dicom_seg"] is None
    assert report["outputs"]["dicom_seg_skipped"] == "the source series has no valid StudyInstanceUID"
    assert "no DICOM SEG: the source series has no valid StudyInstanceUID" in format_summary(report)
    assert report["n_slices"] == N_FILES and "write_seg" not in report["timing_s"]


IDENTITY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "OtherPatientIDs",
    "PatientAddress",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
)


def _identity(dataset: Any) -> dict[str, str]:
    return {k: str(dataset.get(k, "") or "") for k in IDENTITY_KEYWORDS}


def _passes_phi_rule(dataset: Any) -> bool:
    """covseg.io's rule on a pydicom header: no PatientName / PatientBirthDate, or declared de-identified."""
    named = any(str(dataset.get(keyword, "") or "").strip() for keyword in IDENTIFYING_TAGS.values())
    return not named or str(dataset.get("PatientIdentityRemoved", "")).upper() == "YES"


@pytest.mark.parametrize("declared", [False, True])
def test_dicom_seg_carries_no_more_identity_than_its_source(
    declared: bool, series: Path, segmenter: LesionSegmenter, tmp_path: Path
) -> None:
    """The SEG copies the source's patient and study identity, no more and no private tags: a source without
    a name gives a SEG without one, a declared de-identified one (PatientIdentityRemoved YES, a pseudonymous
    name) gives a SEG that declares it too, so it passes the same PHI rule as its source."""
    import pydicom

    folder = tmp_path / "P001"
    folder.mkdir()
    for path in sorted(series.iterdir())[:3]:
        dataset = pydicom.dcmread(path)
        if declared:
            dataset.PatientName = "Pseudonym^0042"
            dataset.PatientIdentityRemoved = "YES"
            dataset.DeidentificationMethod = "site pseudonymisation"
        dataset.save_as(folder / path.name)
    predict_study(folder, segmenter, tmp_path / "out")
    seg = pydicom.dcmread(tmp_path / "out" / SEG_FILE, stop_before_pixels=True)
    source = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
    assert _identity(seg) == _identity(source)
    assert _passes_phi_rule(source) and _passes_phi_rule(seg)
    assert not [e.tag for e in seg.iterall() if e.tag.is_private], "private tags copied"
    if declared:
        assert seg.PatientIdentityRemoved == "YES" and str(seg.PatientName) == "Pseudonym^0042"
    else:
        assert not str(seg.PatientName) and "PatientIdentityRemoved" not in seg


def test_dicom_seg_of_an_allowed_identified_source_keeps_its_identity(
    series: Path, segmenter: LesionSegmenter, tmp_path: Path
) -> None:
    """--allow-identified: the SEG belongs to the same patient in a PACS, so it carries the same identity."""
    import pydicom

    folder = tmp_path / "P001"
    folder.mkdir()
    for path in sorted(series.iterdir())[:3]:
        dataset = pydicom.dcmread(path)
        dataset.PatientName, dataset.PatientBirthDate = "Doe^Jane", "19800101"
        dataset.save_as(folder / path.name)
    with pytest.raises(InputError, match="PatientName, PatientBirthDate"):
        predict_study(folder, segmenter, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    predict_study(folder, segmenter, tmp_path / "out", allow_identified=True)
    seg = pydicom.dcmread(tmp_path / "out" / SEG_FILE, stop_before_pixels=True)
    assert _identity(seg) == _identity(pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True))
    assert str(seg.PatientName) == "Doe^Jane" and seg.PatientBirthDate == "19800101"
    assert not _passes_phi_rule(
        seg
    )  # as identified as its source: covseg would refuse it without the flag too


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_nifti_mask_in_the_file_geometry(
    orientation: str, series: Path, dicom_run: tuple[Path, dict], segmenter: LesionSegmenter, tmp_path: Path
) -> None:
    """A NIfTI stored in any axis order gets its mask on the file's own grid, with the DICOM run's voxels."""
    volume = tmp_path / f"P001-{orientation}.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(read_dicom_series(series).image, orientation), str(volume))
    report = predict_study(volume, segmenter, tmp_path / "out")
    source = sitk.ReadImage(str(volume))
    for name in (LESION_NII, LUNG_NII):
        _assert_same_geometry(sitk.ReadImage(str(tmp_path / "out" / name)), source)
    lesion_lps = sitk.GetArrayFromImage(
        sitk.DICOMOrient(sitk.ReadImage(str(tmp_path / "out" / LESION_NII)), "LPS")
    )
    dicom_out, dicom_report = dicom_run
    np.testing.assert_array_equal(lesion_lps, _array(dicom_out / LESION_NII))
    assert (
        report["input"]["kind"] == "nifti" and report["input"]["file_geometry"]["orientation"] == orientation
    )
    assert report["voxels"] == dicom_report["voxels"]
    assert report["lesion_ml"] == pytest.approx(dicom_report["lesion_ml"])


def test_jpeg_slice(jpeg: Path, segmenter: LesionSegmenter, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = predict_study(jpeg, segmenter, out, rotate=MEDSEG_ROTATE)
    assert sorted(p.name for p in out.iterdir()) == sorted([LESION_PNG, LUNG_PNG, REPORT, OVERLAY])
    image = read_slice(jpeg)
    lesion, lung = _array(out / LESION_PNG), _array(out / LUNG_PNG)
    assert lesion.shape == lung.shape == image.shape  # the input's own size and orientation
    assert set(np.unique(lesion)) <= {0, 255} and set(np.unique(lung)) == {0, 255}
    lesion, lung = lesion > 0, lung > 0
    assert lesion.any() and not (lesion & ~lung).any()
    assert report["units"] == "pixels" and report["n_slices"] == 1
    assert (
        report["input"]["size"] == [image.shape[1], image.shape[0]]
        and report["input"]["rotate"] == MEDSEG_ROTATE
    )
    assert report["voxels"]["both"] == {"lesion": int(lesion.sum()), "lung": int(lung.sum())}
    assert report["lesion_px"]["both"] == int(lesion.sum())
    assert report["lesion_percent_of_lung"]["both"] == pytest.approx(100 * lesion.sum() / lung.sum())
    assert report["lesion_px"]["left"] + report["lesion_px"]["right"] == report["lesion_px"]["both"]
    # the same path as LesionSegmenter.predict_slices on the slice in the radiological view
    pred = segmenter.predict_slices([np.ascontiguousarray(np.rot90(image, MEDSEG_ROTATE))], "8bit")[0]
    np.testing.assert_array_equal(np.rot90(pred.prob >= 0.5, -MEDSEG_ROTATE), lesion)


def test_build_report_counts_a_known_volume() -> None:
    """build_report alone, on a volume whose lesion and lung voxels are placed by hand."""
    z, h, w = 3, 8, 10
    image = sitk.GetImageFromArray(np.full((z, h, w), -1000, dtype=np.int16))
    image.SetSpacing((0.5, 0.8, 2.5))  # one voxel: 1 mm3 = 0.001 mL
    study = Study(Path("/data/P9"), "dicom", sitk.GetArrayFromImage(image), "hu", image=image)
    sides = np.zeros((z, h, w), dtype=np.uint8)
    sides[:, 1:7, 1:4] = RIGHT  # 18 voxels per slice
    sides[:, 1:5, 6:9] = LEFT  # 12 voxels per slice
    lesion = np.zeros((z, h, w), dtype=bool)
    lesion[1, 2:4, 1:3] = True  # 4 right-lung voxels on slice 1
    lesion[2, 1, 6:9] = True  # 3 left-lung voxels on slice 2
    masks = StudyMasks(lesion=lesion, sides=sides, midline=4.5, split="components")
    before = (lesion.copy(), sides.copy())
    report = build_report(study, masks, {"source": "test"}, 0.5, "2026-01-01T00:00:00+00:00", n_overlay=6)
    assert report == build_report(
        study, masks, {"source": "test"}, 0.5, "2026-01-01T00:00:00+00:00", n_overlay=6
    )
    np.testing.assert_array_equal(lesion, before[0])
    np.testing.assert_array_equal(sides, before[1])
    assert report["units"] == "mL" and report["voxel_ml"] == pytest.approx(0.001)
    assert report["voxels"] == {
        "right": {"lesion": 4, "lung": 54},
        "left": {"lesion": 3, "lung": 36},
        "both": {"lesion": 7, "lung": 90},
    }
    assert report["lesion_ml"] == pytest.approx({"right": 0.004, "left": 0.003, "both": 0.007})
    assert report["lung_ml"] == pytest.approx({"right": 0.054, "left": 0.036, "both": 0.090})
    assert report["lesion_percent_of_lung"] == pytest.approx(
        {"right": 400 / 54, "left": 300 / 36, "both": 700 / 90}
    )
    assert [s["lesion_voxels"] for s in report["per_slice"]] == [0, 4, 3]
    assert [s["percent"] for s in report["per_slice"]] == pytest.approx([0.0, 400 / 30, 300 / 30])
    assert report["overlay_slices"] == [1, 2]  # the slices with lesion, in z order
    assert report["lr_split"] == {"method": "components", "midline_column": 4.5}
    assert report["input"]["size"] == [w, h, z] and report["created"] == "2026-01-01T00:00:00+00:00"
    assert "timing_s" not in report  # the writer adds the timings


def test_build_report_of_a_slice_is_in_pixels() -> None:
    """A 2-D slice has no spacing: pixels, and the size of the slice as given (before `rotate`)."""
    given = np.zeros((6, 4), dtype=np.uint8)  # 6 rows, 4 columns on disk
    view = np.rot90(given, 1)[None]  # rotated to the radiological view: 4 x 6
    study = Study(Path("/data/s.png"), "slice", view, "8bit", rotate=1)
    sides = np.zeros(view.shape, dtype=np.uint8)
    sides[0, :, :3], sides[0, :, 3:] = RIGHT, LEFT
    lesion = np.zeros(view.shape, dtype=bool)
    report = build_report(study, StudyMasks(lesion, sides, 2.5, "midline"), {}, 0.5, "now", n_overlay=6)
    assert (
        report["units"] == "pixels" and report["input"]["size"] == [4, 6] and report["input"]["rotate"] == 1
    )
    assert report["lesion_px"] == {"right": 0, "left": 0, "both": 0}
    assert report["lung_px"] == {"right": 12, "left": 12, "both": 24}
    assert report["overlay_slices"] == [0]  # no lesion anywhere: the slice with the most lung


def test_output_folder_is_guarded(
    series: Path, jpeg: Path, segmenter: LesionSegmenter, tmp_path: Path
) -> None:
    """The output replaces an earlier prediction, never the input or an unrelated folder."""
    before = sorted(p.name for p in series.iterdir())
    with pytest.raises(InputError, match="holds the input"):
        predict_study(series, segmenter, series)
    with pytest.raises(InputError, match="holds the input"):
        predict_study(jpeg, segmenter, jpeg.parent, rotate=MEDSEG_ROTATE)
    assert sorted(p.name for p in series.iterdir()) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="not an earlier covseg prediction"):
        predict_study(jpeg, segmenter, foreign, rotate=MEDSEG_ROTATE)
    assert (foreign / "thesis.tex").read_text() == "precious"
    out = tmp_path / "again"
    first = predict_study(jpeg, segmenter, out, rotate=MEDSEG_ROTATE)
    (out / "stale.txt").write_text("from an older run")
    second = predict_study(jpeg, segmenter, out, rotate=MEDSEG_ROTATE)
    assert not (out / "stale.txt").exists() and second["voxels"] == first["voxels"]


@pytest.fixture
def tracking(mlflow_server: str) -> Any:
    """MLflow pointed at the session server for one test (tracking URI restored afterwards)."""
    with mlflow_at(mlflow_server) as client:
        yield client


def _register(tracking: Any, model_dir: Path, lineage: dict[str, str]) -> tuple[str, str]:
    """Log the model folder as the covseg pyfunc, register it under a fresh name, alias it champion."""
    import mlflow
    import mlflow.pyfunc

    from covseg import serving

    name = f"covseg-predict-{uuid.uuid4().hex[:8]}"
    experiment = tracking.create_experiment(name)
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=serving.CovsegModel(),
            artifacts={
                serving.SEGMENTER_PT: str(model_dir / "segmenter.pt"),
                serving.SEGMENTER_META: str(model_dir / "segmenter.json"),
            },
            signature=serving.signature(),
            pip_requirements=["mlflow", "torch", "numpy"],
        )
    version = mlflow.register_model(info.model_uri, name, tags=lineage)
    tracking.set_registered_model_alias(name, "champion", version.version)
    return name, str(version.version)


def test_mlflow_pyfunc_gives_the_cli_mask(
    tracking: Any, model_dir: Path, jpeg: Path, segmenter: LesionSegmenter, tmp_path: Path
) -> None:
    import mlflow.pyfunc

    lineage = {"data_md5": "0123456789abcdef0123456789abcdef", "git_commit": "feedc0de"}
    name, number = _register(tracking, model_dir, lineage)
    view = np.ascontiguousarray(np.rot90(read_slice(jpeg), MEDSEG_ROTATE))
    served = mlflow.pyfunc.load_model(f"models:/{name}/{number}").predict(
        view[None].astype(np.float32), params={"domain": "8bit"}
    )
    direct = segmenter.predict_slices([view], "8bit")[0].prob >= 0.5
    assert served.shape == (1, *view.shape) and served.dtype == np.uint8
    np.testing.assert_array_equal(served[0].astype(bool), direct)

    report = predict_study(jpeg, f"models:/{name}@champion", tmp_path / "out", rotate=MEDSEG_ROTATE)
    cli_mask = _array(tmp_path / "out" / LESION_PNG) > 0
    np.testing.assert_array_equal(np.rot90(served[0].astype(bool), -MEDSEG_ROTATE), cli_mask)
    model = report["model"]
    assert model["source"] == "mlflow" and model["name"] == name and model["version"] == number
    assert model["data_md5"] == lineage["data_md5"] and model["git_commit"] == lineage["git_commit"]
    assert "champion" in model["aliases"]


def test_cli_predict(jpeg: Path, model_dir: Path, tmp_path: Path) -> None:
    """`covseg predict` binds predict_study (skipped until the command is in covseg.cli)."""
    from click.testing import CliRunner

    from covseg.cli import EXIT_BAD_INPUT, main

    if "predict" not in main.commands:
        pytest.skip("covseg.cli has no `predict` command yet")
    runner = CliRunner()
    out = tmp_path / "out"
    ok = runner.invoke(
        main,
        ["predict", str(jpeg), "--model", str(model_dir), "--out", str(out), "--rotate", str(MEDSEG_ROTATE)],
    )
    assert ok.exit_code == 0, ok.output
    assert (out / LESION_PNG).is_file() and "% of lung" in ok.output
    bad = runner.invoke(
        main,
        ["predict", str(tmp_path / "nope.jpg"), "--model", str(model_dir), "--out", str(tmp_path / "out2")],
    )
    assert bad.exit_code == EXIT_BAD_INPUT and "error:" in bad.output and not (tmp_path / "out2").exists()


def test_cli_predict_prints_no_library_warnings(
    tracking: Any,
    mlflow_server: str,
    model_dir: Path,
    jpeg: Path,
    series: Path,
    series_without_uids: Path,
    tmp_path: Path,
) -> None:
    """What a user sees of `covseg predict` (a fresh process): the summary, no library warning on stderr.

    A real slice through a registered model (MLflow's type-hint advice fires when the pyfunc class is
    imported), the real DICOM series through the model folder (every writer, DICOM SEG included), and a
    real series with invalid UIDs (pydicom warns about each when it reads them).
    """
    name, _ = _register(tracking, model_dir, {})
    env = {**os.environ, **TELEMETRY_OFF, "MLFLOW_TRACKING_URI": mlflow_server}
    runs = {
        "slice": [str(jpeg), "--model", f"models:/{name}@champion", "--rotate", str(MEDSEG_ROTATE)],
        "series": [str(series), "--model", str(model_dir)],
        "series without UIDs": [str(series_without_uids), "--model", str(model_dir)],
    }
    for label, args in runs.items():
        out = tmp_path / label.replace(" ", "-")
        done = subprocess.run(
            [str(BIN / "covseg"), "predict", *args, "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert "warning" not in (done.stderr + done.stdout).lower(), f"{label}: {done.stderr}"
        assert not [line for line in done.stderr.splitlines() if line.strip()], f"{label}: {done.stderr}"
        assert "% of lung" in done.stdout and (out / REPORT).is_file(), label
