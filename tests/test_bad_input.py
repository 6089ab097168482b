"""Bad input: each a clear InputError naming the file, one `error:` line from the CLI, nothing half-written.

Every broken file is a real file copied into tmp_path and then damaged there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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
    rewrite_dicom,
    series_files,
    tiny_params,
    tree_state,
    truncate,
    write_slice_labels,
)

from covseg import stages
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
    table.write_text("".join(line for line in table.read_text().splitlines(keepends=True)
                             if "P001/0029.dcm" not in line))
    return _src("covid-ct-md"), folder / "0029.dcm", "no label for case P001 instance 29 in slice_labels.csv"


def missing_label_table(data: Path) -> tuple[dict[str, Any], Path, str]:
    _p001(data)
    table = data / "covid-ct-md" / "slice_labels.csv"
    table.unlink()
    return _src("covid-ct-md"), table, "slice label table not found"


def identified_dicom(data: Path) -> tuple[dict[str, Any], Path, str]:
    folder = _p001(data)
    bad = rewrite_dicom(folder / "0029.dcm", folder / "0029.dcm",
                        {TAG_PATIENT_NAME: "Doe^Jane", TAG_BIRTH_DATE: "19800101"})
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
    return _src("medseg-100"), mask, f"mask shape {(array.shape[0] - 10, array.shape[1])} differs from its image"


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
    return ({"ct-nifti": {"kind": "nifti", "role": "train"}}, bad, "volume contains NaN or infinite values (4096 voxels)")


def missing_source_folder(data: Path) -> tuple[dict[str, Any], Path, str]:
    build_seg_slices(data)  # medseg-100 is configured but absent
    return _src("covid19-ct-seg-slices", "medseg-100"), data / "medseg-100", "source 'medseg-100' from params.yaml not found"


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
    bad = copy_file(SEG_SLICES / f"{CORONA}_3.jpg", data / "covid19-ct-seg-slices" / "images" / "mystery_1.jpg")
    return _src("covid19-ct-seg-slices"), bad, "file name matches no sub-source"


BUILDERS: dict[str, Builder] = {b.__name__: b for b in (
    corrupt_dicom, zero_byte_dicom, mr_modality, empty_series_folder, gap_in_series, series_without_label_row,
    missing_label_table, identified_dicom, birth_date_only, mask_shape_mismatch, missing_mask, nan_nifti,
    missing_source_folder, zero_byte_jpeg, truncated_jpeg, rgb_jpeg, png_16bit, unknown_subsource,
)}


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
        table.write_text(table.read_text().replace("P001,COVID-19,P001/0027.dcm,27,-104.1,1,",
                                                   "P001,COVID-19,P001/0027.dcm,27,-104.1,yes,"))
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
        f"error: {project / 'data' / 'medseg-100' / 'images' / 'medseg_001.jpg'}: empty file (0 bytes)"]
    assert tree_state(ingest_dir) == before
    assert leftovers(project / "artifacts") == ["ingest"]

    # And a later good run still replaces it (no stale backup in the way).
    copy_file(MEDSEG / "images" / "medseg_001.jpg", project / "data" / "medseg-100" / "images" / "medseg_001.jpg")
    again = invoke_cli(project, "ingest", "--profile", "tiny")
    assert again.exit_code == 0, again.stderr
    assert leftovers(project / "artifacts") == ["ingest"]
    assert tree_state(ingest_dir)["manifest.parquet"][0] == before["manifest.parquet"][0]
