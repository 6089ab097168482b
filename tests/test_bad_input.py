"""Bad input, every kind in one corpus (`BUILDERS`): each a clear InputError naming the file, one `error:` line
from the CLI, exit 2, nothing half-written; plus the kinds only caught after ingest (a slice in two splits:
gate 0; path traversal in the manifest) and one summary over all of them. Last, the bad studies and model
folders `covseg predict` (`predict_study`) refuses before writing anything.

Every broken file is a real file copied into tmp_path and then damaged there.
"""

from __future__ import annotations

import csv
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from helpers import (
    MEDSEG,
    SEG_SLICES,
    assert_refused,
    build_ct_md,
    build_medseg,
    build_seg_slices,
    build_tiny_data,
    copy_file,
    default_sources,
    dicom_tags,
    error_lines,
    invoke_cli,
    leftovers,
    make_project,
    require_shared,
    rewrite_dicom,
    series_files,
    tiny_params,
    tree_state,
    truncate,
    write_slice_labels,
)

from covseg import stages
from covseg.gates import GateFailed
from covseg.ingest import MANIFEST
from covseg.io import (
    TAG_BIRTH_DATE,
    TAG_IDENTITY_REMOVED,
    TAG_MODALITY,
    TAG_PATIENT_ID,
    TAG_PATIENT_NAME,
    InputError,
    read_dicom_series,
)

# A builder fills data/ and returns (sources for params.yaml, the path the error must name, the problem).
Builder = Callable[[Path], tuple[dict[str, Any], Path, str]]
CORONA = "coronacases_org_001"
P001_PIXEL_SPACING = b"0.748046875\\0.748046875"  # PixelSpacing (0028,0030) as stored in every P001 file
NIFTI_SOURCE = {"ct-nifti": {"kind": "nifti", "role": "train"}}
_VOLUME: dict[str, Any] = {}


def _src(*names: str) -> dict[str, Any]:
    every = default_sources()
    return {name: every[name] for name in names}


def _p001(data: Path, n: int = 3) -> Path:
    build_ct_md(data, {"P001": 25}, n=n)
    return data / "covid-ct-md" / "P001"


def corrupt_dicom(data: Path) -> tuple[dict[str, Any], Path, str]:
    bad = truncate(_p001(data) / "0027.dcm", 0.5)
    return _src("covid-ct-md"), bad, "not a readable DICOM file (corrupt or truncated)"


def zero_byte_dicom(data: Path) -> tuple[dict[str, Any], Path, str]:
    bad = truncate(_p001(data) / "0029.dcm", 0.0)
    return _src("covid-ct-md"), bad, "empty file (0 bytes)"


def mr_modality(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = _p001(data)
    bad = rewrite_dicom(folder / "0027.dcm", folder / "0027.dcm", {TAG_MODALITY: "MR"})
    return _src("covid-ct-md"), bad, "modality is 'MR', expected 'CT'"


def empty_series_folder(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_ct_md(data, {"normal001": 1}, n=3)
    empty = data / "covid-ct-md" / "P001"  # sorts before normal001
    empty.mkdir()
    return _src("covid-ct-md"), empty, "empty folder: no DICOM files"


def gap_in_series(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = _p001(data, n=5)
    (folder / "0029.dcm").unlink()  # steps 4, 8, 4 mm
    return _src("covid-ct-md"), folder, "gap in slice positions after"


def series_without_label_row(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = _p001(data)
    table = data / "covid-ct-md" / "slice_labels.csv"
    table.write_text(
        "".join(line for line in table.read_text().splitlines(keepends=True) if "P001/0029.dcm" not in line)
    )
    return _src("covid-ct-md"), folder / "0029.dcm", "no label for case P001 instance 29 in slice_labels.csv"


def missing_label_table(data: Path) -> tuple[dict[str, Any], Path, str]:
    _p001(data)
    table = data / "covid-ct-md" / "slice_labels.csv"
    table.unlink()
    return _src("covid-ct-md"), table, "slice label table not found"


def identified_dicom(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = _p001(data)
    bad = rewrite_dicom(
        folder / "0029.dcm", folder / "0029.dcm", {TAG_PATIENT_NAME: "Doe^Jane", TAG_BIRTH_DATE: "19800101"}
    )
    return _src("covid-ct-md"), bad, "DICOM header carries patient identity (PatientName, PatientBirthDate)"


def birth_date_only(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = _p001(data)
    bad = rewrite_dicom(folder / "0025.dcm", folder / "0025.dcm", {TAG_BIRTH_DATE: "19800101"})
    return _src("covid-ct-md"), bad, "DICOM header carries patient identity (PatientBirthDate)"


def mask_shape_mismatch(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_medseg(data)
    mask = data / "medseg-100" / "masks" / "medseg_001.png"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array[:-10])), str(mask))
    return (
        _src("medseg-100"),
        mask,
        f"mask shape {(array.shape[0] - 10, array.shape[1])} differs from its image",
    )


def missing_mask(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_medseg(data)
    mask = data / "medseg-100" / "masks" / "medseg_000.png"
    mask.unlink()
    return _src("medseg-100"), mask, "file not found"


def nan_nifti(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = data / "ct-nifti"
    folder.mkdir(parents=True)
    volume = sitk.GetImageFromArray(np.full((4, 32, 32), np.nan, dtype=np.float32))
    volume.SetSpacing((0.75, 0.75, 4.0))
    bad = folder / "vol01.nii.gz"
    sitk.WriteImage(volume, str(bad))
    # SimpleITK's NIfTI reader turns NaN into 0; the raw scan of the float data still names the NaN
    return (
        {"ct-nifti": {"kind": "nifti", "role": "train"}},
        bad,
        "volume contains NaN or infinite values (4096 voxels)",
    )


def missing_source_folder(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_seg_slices(data)  # medseg-100 is configured but absent
    return (
        _src("covid19-ct-seg-slices", "medseg-100"),
        data / "medseg-100",
        "source 'medseg-100' from params.yaml not found",
    )


def zero_byte_jpeg(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_seg_slices(data)
    bad = truncate(data / "covid19-ct-seg-slices" / "images" / f"{CORONA}_2.jpg", 0.0)
    return _src("covid19-ct-seg-slices"), bad, "empty file (0 bytes)"


def truncated_jpeg(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_seg_slices(data)
    bad = truncate(data / "covid19-ct-seg-slices" / "images" / f"{CORONA}_2.jpg", 0.01)
    return _src("covid19-ct-seg-slices"), bad, "not a readable image (corrupt or truncated)"


def rgb_jpeg(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_seg_slices(data)
    bad = data / "covid19-ct-seg-slices" / "images" / f"{CORONA}_2.jpg"
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG_SLICES / f"{CORONA}_2.jpg")))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey] * 3, axis=-1), isVector=True), str(bad))
    return _src("covid19-ct-seg-slices"), bad, "expected a greyscale slice, got 3 channels"


def png_16bit(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_seg_slices(data)
    bad = data / "covid19-ct-seg-slices" / "images" / f"{CORONA}_3.png"
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG_SLICES / f"{CORONA}_3.jpg")))
    sitk.WriteImage(sitk.GetImageFromArray(grey.astype(np.uint16) * 257), str(bad))
    return _src("covid19-ct-seg-slices"), bad, "expected 8-bit pixels, got 16-bit unsigned integer"


def unknown_subsource(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_seg_slices(data)
    bad = copy_file(
        SEG_SLICES / f"{CORONA}_3.jpg", data / "covid19-ct-seg-slices" / "images" / "mystery_1.jpg"
    )
    return _src("covid19-ct-seg-slices"), bad, "file name matches no sub-source"


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
    """Cut after the header: libjpeg still decodes it (grey fill, a warning), unlike truncated_jpeg's 1 %."""
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


BUILDERS: dict[str, Builder] = {
    b.__name__: b
    for b in (
        corrupt_dicom,
        zero_byte_dicom,
        mr_modality,
        cr_modality,
        empty_series_folder,
        gap_in_series,
        series_without_label_row,
        missing_label_table,
        lesion_label_outside_0_1,
        identified_dicom,
        birth_date_only,
        mixed_series,
        duplicated_slice,
        non_square_dicom_pixels,
        zero_spacing_dicom,
        mask_shape_mismatch,
        missing_mask,
        mask_label_map,
        nan_nifti,
        zero_spacing_nifti,
        non_square_nifti,
        constant_nifti,
        four_d_nifti,
        truncated_nifti,
        missing_source_folder,
        zero_byte_jpeg,
        truncated_jpeg,
        truncated_jpeg_tail,
        rgb_jpeg,
        png_16bit,
        unknown_subsource,
    )
}
"""Every kind of bad raw input refused at ingest: the data it builds, the file the error names, the problem."""


@pytest.mark.parametrize("name", list(BUILDERS))
def test_bad_input_is_refused_by_stage_and_cli(name: str, tmp_path: Path) -> None:
    assert_refused(BUILDERS[name], tmp_path)


def test_real_pseudonymous_headers_are_accepted(tmp_path: Path) -> None:
    """COVID-CT-MD: a pseudonym in PatientID, no name, no birth date, no PatientIdentityRemoved: accepted."""
    folder = _p001(tmp_path)
    tags = dicom_tags(folder / "0025.dcm")
    assert tags.get(TAG_PATIENT_ID) and not tags.get(TAG_PATIENT_NAME) and not tags.get(TAG_BIRTH_DATE)
    assert TAG_IDENTITY_REMOVED not in tags
    assert read_dicom_series(folder).image.GetSize() == (512, 512, 3)


def test_identified_headers_pass_only_when_declared_deidentified_or_allowed(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "covid-ct-md" / "P001"
    for src in series_files("P001", 25, 3):
        rewrite_dicom(src, folder / src.name, {TAG_PATIENT_NAME: "Doe^Jane", TAG_BIRTH_DATE: "19800101"})
    write_slice_labels(folder.parent, ["P001"])
    with pytest.raises(InputError, match="PatientName, PatientBirthDate"):
        read_dicom_series(folder)
    assert read_dicom_series(folder, allow_identified=True).image.GetSize() == (512, 512, 3)
    params = tiny_params(sources=_src("covid-ct-md"), phi={"allow_identified": True})
    assert len(stages.ingest(tmp_path / "data", tmp_path / "out", params)) == 3

    declared = tmp_path / "declared"
    for src in series_files("P001", 25, 3):
        rewrite_dicom(src, declared / src.name, {TAG_PATIENT_NAME: "Doe^Jane", TAG_IDENTITY_REMOVED: "YES"})
    assert read_dicom_series(declared).image.GetSize() == (512, 512, 3)


def test_gap_in_a_three_slice_series_is_refused(tmp_path: Path) -> None:
    folder = _p001(tmp_path, n=4)
    (folder / "0029.dcm").unlink()  # 25, 27, 31: steps 4 and 8 mm
    with pytest.raises(InputError, match="gap in slice positions"):
        read_dicom_series(folder)


def test_partly_nan_nifti_is_refused(tmp_path: Path) -> None:
    folder = _p001(tmp_path / "dicom")
    volume = sitk.GetArrayFromImage(read_dicom_series(folder).image).astype(np.float32)
    volume[1, 200:260, 200:260] = np.nan
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.75, 0.75, 4.0))
    path = tmp_path / "data" / "ct-nifti" / "vol01.nii.gz"
    path.parent.mkdir(parents=True)
    sitk.WriteImage(image, str(path))
    params = tiny_params(sources={"ct-nifti": {"kind": "nifti", "role": "train"}})
    # SimpleITK 2.5 reads these voxels as 0; covseg.io counts them in the raw float data
    with pytest.raises(InputError, match=r"NaN or infinite values \(3600 voxels\)"):
        stages.ingest(tmp_path / "data", tmp_path / "out", params)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["nifti-labels-missing", "dicom-lesion-not-a-number"])
def test_broken_label_tables_are_input_errors(case: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    if case == "nifti-labels-missing":
        folder = data / "ct-nifti"
        folder.mkdir(parents=True)
        volume = sitk.GetArrayFromImage(read_dicom_series(_p001(tmp_path / "dicom")).image)
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(folder / "vol01.nii.gz"))
        sources = {"ct-nifti": {"kind": "nifti", "labels": "labels.csv", "role": "train"}}
        table = folder / "labels.csv"
    else:
        _p001(data)
        table = data / "covid-ct-md" / "slice_labels.csv"
        table.write_text(
            table.read_text().replace(
                "P001,COVID-19,P001/0027.dcm,27,-104.1,1,", "P001,COVID-19,P001/0027.dcm,27,-104.1,yes,"
            )
        )
        assert ",yes," in table.read_text()
        sources = _src("covid-ct-md")
    with pytest.raises(InputError) as info:
        stages.ingest(data, tmp_path / "out", tiny_params(sources=sources))
    assert Path(info.value.path) == table


def test_pixel_damage_inside_a_dicom_is_refused(tmp_path: Path) -> None:
    """Garbage in the JPEG-Lossless stream (header intact): refused as an InputError about this series."""
    folder = _p001(tmp_path)
    bad = folder / "0027.dcm"
    size = bad.stat().st_size
    with open(bad, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as info:
        read_dicom_series(folder)
    assert Path(info.value.path) in (folder, bad) and "\n" not in str(info.value)


def test_failed_ingest_leaves_previous_output_untouched(tmp_path: Path) -> None:
    """A good artifacts/ingest survives a later failing ingest byte for byte (atomic replace)."""
    project = make_project(tmp_path / "project")
    build_tiny_data(project / "data")
    first = invoke_cli(project, "ingest", "--profile", "tiny")
    assert first.exit_code == 0, first.stderr
    ingest_dir = project / "artifacts" / "ingest"
    before = tree_state(ingest_dir)
    assert "manifest.parquet" in before

    # Damage the last source read (medseg-100), so most of the new output was already written.
    truncate(project / "data" / "medseg-100" / "images" / "medseg_001.jpg", 0.0)
    failed = invoke_cli(project, "ingest", "--profile", "tiny")
    assert failed.exit_code == 2
    assert error_lines(failed.stderr) == [
        f"error: {project / 'data' / 'medseg-100' / 'images' / 'medseg_001.jpg'}: empty file (0 bytes)"
    ]
    assert tree_state(ingest_dir) == before
    assert leftovers(project / "artifacts") == ["ingest"]

    # And a later good run still replaces it (no stale backup in the way).
    copy_file(
        MEDSEG / "images" / "medseg_001.jpg", project / "data" / "medseg-100" / "images" / "medseg_001.jpg"
    )
    again = invoke_cli(project, "ingest", "--profile", "tiny")
    assert again.exit_code == 0, again.stderr
    assert leftovers(project / "artifacts") == ["ingest"]
    assert tree_state(ingest_dir)["manifest.parquet"][0] == before["manifest.parquet"][0]


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
        f"error: {manifest}: file {name!r} points outside {ingest_dir} (path traversal)"
    ], result.stderr
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
                alt in self.error.problem for alt in self.expected_problem.split(" | ")
            )
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
        for name, builder in {
            **BUILDERS,
            "duplicate_slice_across_splits": duplicate_slice_across_splits,
        }.items()
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
# covseg predict: a bad study or model folder is refused before anything is written
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(trained_tiny: Any) -> Path:
    """The session's tiny trained segmenter (a real model folder)."""
    return trained_tiny.stage("segment")


@pytest.fixture(scope="module")
def predict_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 consecutive kept files of the real COVID-CT-MD series P001 (instances 25..35)."""
    folder = tmp_path_factory.mktemp("series") / "P001"
    for src in series_files("P001", 25, 6):
        copy_file(src, folder / src.name)
    return folder


def _bad_studies(root: Path, series: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    gap = root / "gap"
    gap.mkdir()
    for name in ("0025.dcm", "0027.dcm", "0031.dcm"):  # 0029 missing
        shutil.copyfile(series / name, gap / name)
    text = root / "notes.txt"
    text.write_text("not an image")
    rgb = root / "rgb.png"
    grey = sitk.GetImageFromArray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    sitk.WriteImage(sitk.Compose([grey] * 3), str(rgb))
    eight_bit = root / "eight-bit.nii.gz"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.arange(4 * 32 * 32, dtype=np.uint8).reshape(4, 32, 32)), str(eight_bit)
    )
    return {
        "missing": (root / "nope", {}),
        "text file": (text, {}),
        "one dicom file": (series / "0025.dcm", {}),
        "series with a gap": (gap, {}),
        "rgb slice": (rgb, {}),
        "volume not in HU": (eight_bit, {}),
        "rotate on a volume": (series, {"rotate": 1}),
    }


def test_bad_study_is_refused_by_predict_before_anything_is_written(
    predict_series: Path, model_dir: Path, tmp_path: Path
) -> None:
    from covseg.predict import predict_study

    series = predict_series
    for label, (path, kwargs) in _bad_studies(tmp_path, series).items():
        out = tmp_path / f"out-{label.replace(' ', '-')}"
        with pytest.raises(InputError) as info:
            predict_study(path, model_dir, out, **kwargs)
        assert str(path) in str(info.value), label
        assert not out.exists(), label
    with pytest.raises(InputError, match="model folder not found"):
        predict_study(series, tmp_path / "no-model", tmp_path / "out-model")
    assert not (tmp_path / "out-model").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "scratch folders left behind"
