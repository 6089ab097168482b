"""DICOM Segmentation (SEG) output of `covseg predict` for a DICOM series, written with highdicom.

One SEG instance per study, BINARY, three segments (lesion, right lung, left lung; the lesion overlaps
the lung), one frame per source slice and segment that is not empty. Every frame references its source
CT instance (SOP Instance UID) and lies on that instance's own pixel grid, so the result opens next to the
study in a PACS viewer, OHIF or 3D Slicer.

Identity: the SEG carries the patient and study attributes of its source, as highdicom copies them (the
Patient, General Study and Patient Study modules, PatientIdentityRemoved and the de-identification method
included, no private tags), and nothing more. Attributes that the CT module requires but that a
de-identified source left out (PatientName, PatientBirthDate, ...) are written empty, so a SEG of a
source that passed the PHI check (`covseg.io.check_dicom_header`) passes it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk

    from covseg.io import DicomSeries

SEG_FILE = "segmentation.dcm"
LESION_SEGMENT, RIGHT_LUNG_SEGMENT, LEFT_LUNG_SEGMENT = 1, 2, 3
SERIES_NUMBER_OFFSET = 1000
"""The SEG's SeriesNumber is the source's plus this (viewers list it after its CT)."""
EMPTY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Type 2 attributes of the Patient and General Study modules (present, possibly empty, in a CT image);
highdicom reads them from the source, so a source that left one out gets it empty."""


def _segment_descriptions(algorithm: Any) -> list[Any]:
    """Lesion, right lung, left lung: SNOMED CT codes, automatic segmentation by `algorithm`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    def describe(
        number: int,
        label: str,
        category: Code,
        kind: Code,
        colour: tuple[int, int, int],
        regions: Sequence[Code] = (),
    ) -> Any:
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=list(regions) or None,
            display_color=hd.color.CIELabColor.from_rgb(*colour),
        )

    return [
        describe(
            LESION_SEGMENT,
            "COVID-19 lesion",
            codes.SCT.MorphologicallyAbnormalStructure,
            codes.SCT.Lesion,
            (255, 0, 0),
            [codes.SCT.Lung],
        ),
        describe(
            RIGHT_LUNG_SEGMENT,
            "right lung",
            codes.SCT.AnatomicalStructure,
            Code("3341006", "SCT", "Right lung"),
            (0, 200, 255),
        ),
        describe(
            LEFT_LUNG_SEGMENT,
            "left lung",
            codes.SCT.AnatomicalStructure,
            Code("44029006", "SCT", "Left lung"),
            (0, 255, 160),
        ),
    ]


def seg_blocker(headers: Sequence[pydicom.Dataset]) -> str | None:
    """Why a SEG cannot reference these instances, or None when it can.

    A SEG names its study, its source series and each source instance by UID, and lies in the source's
    frame of reference: a series whose instances lack valid, distinct UIDs (real example: COVID-CT-MD
    normal002, empty SOPInstanceUID and UUID-style study/series UIDs) cannot be referenced.
    """
    from pydicom.config import IGNORE
    from pydicom.uid import UID

    def valid(value: object) -> bool:
        return bool(value) and UID(str(value), validation_mode=IGNORE).is_valid  # checked here, not warned

    first = headers[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not valid(first.get(keyword)):
            return f"the source series has no valid {keyword}"
    instances = [h.get("SOPInstanceUID") for h in headers]
    if not all(valid(uid) for uid in instances) or len(set(instances)) != len(instances):
        return "the source instances lack valid, distinct SOPInstanceUIDs"
    return None


def source_datasets(headers: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Copies of the source headers with the Type 2 identity and study attributes present (empty if absent).

    The headers themselves are left as read.
    """
    import pydicom

    out = []
    for header in headers:
        dataset = pydicom.Dataset()
        dataset.update(header)  # a new top-level element dict (the elements are shared, never changed)
        for keyword in EMPTY_TYPE2:
            if keyword not in dataset:
                setattr(dataset, keyword, "")
        out.append(dataset)
    return out


def frames_on_source_grids(
    labels: np.ndarray, image: sitk.Image, series: DicomSeries, headers: Sequence[pydicom.Dataset]
) -> np.ndarray:
    """Map a (Z, H, W) uint8 volume on the LPS grid of `image` to (instances, Rows, Columns) frames.

    One frame per header, each on its instance's own pixel grid (the series as stored: reorienting back
    undoes the flips).
    """
    import SimpleITK as sitk

    volume = sitk.GetImageFromArray(labels)
    volume.CopyInformation(image)
    stored = sitk.DICOMOrient(volume, series.file_orientation)
    array = sitk.GetArrayViewFromImage(stored)
    index = [
        stored.TransformPhysicalPointToIndex([float(v) for v in h.ImagePositionPatient])[2] for h in headers
    ]
    frames = np.ascontiguousarray(array[index])
    if frames.shape[1:] != (int(headers[0].Rows), int(headers[0].Columns)):
        raise RuntimeError(f"mask frames {frames.shape[1:]} do not match the series' Rows x Columns")
    return frames


def build_segmentation(
    series: DicomSeries,
    headers: Sequence[pydicom.Dataset],
    image: sitk.Image,
    lesion: np.ndarray,
    sides: np.ndarray,
    right: int,
    left: int,
    algorithm_version: str,
    parameters: dict[str, str] | None = None,
) -> Any:
    """A highdicom Segmentation of `series` from masks on its LPS grid `image`.

    `headers` are its instances' headers in z order; `sides` holds 0, `right` or `left` per voxel. See
    :func:`seg_blocker` for series that cannot have one.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from covseg import __version__

    headers = source_datasets(headers)
    bits = (
        lesion.astype(np.uint8)
        | (sides == right).astype(np.uint8) << 1
        | (sides == left).astype(np.uint8) << 2
    )
    frames = frames_on_source_grids(bits, image, series, headers)  # one reorientation for the three masks
    # (N, Rows, Columns, 3) as highdicom wants it, each segment contiguous in memory: highdicom sums over the
    # segment axis (overlap check): 0.28 vs 1.37 s for 148 slices than with them interleaved (one run, loaded)
    segments = np.moveaxis(np.stack([(frames & bit) > 0 for bit in (1, 2, 4)]), 0, -1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="covseg",
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version,
        parameters=parameters or None,
    )
    first = headers[0]
    series_number = int(getattr(first, "SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(algorithm),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="covseg",
        manufacturer_model_name="covseg lesion segmenter",
        software_versions=__version__,
        device_serial_number="none",
        content_label="COVSEG",
        content_description="COVID-19 lesion and lung masks (covseg, research use)",
        series_description="covseg lesion + lungs",
    )
    return seg


def write_segmentation(
    path: str | Path,
    series: DicomSeries,
    headers: Sequence[pydicom.Dataset],
    image: sitk.Image,
    lesion: np.ndarray,
    sides: np.ndarray,
    right: int,
    left: int,
    algorithm_version: str,
    parameters: dict[str, str] | None = None,
) -> None:
    """Write the SEG of :func:`build_segmentation` to `path` (DICOM Part 10 file)."""
    build_segmentation(
        series, headers, image, lesion, sides, right, left, algorithm_version, parameters
    ).save_as(path)
