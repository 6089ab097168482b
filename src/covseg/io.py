"""CT input/output with SimpleITK: DICOM series, NIfTI volumes, 2-D slices, masks, and atomic writes.

Every reader validates what it reads and raises :class:`InputError` naming the file and the problem, so a
command can print one clear line and exit non-zero before anything is written. :func:`read_study` is the
one entry for "any input a user may give" (`covseg predict`): it decides the kind once and calls the reader.

SimpleITK is imported inside the functions that use it: many modules import this one for
:class:`InputError` or :func:`atomic_dir` alone and should not pay for it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

from covseg.errors import InputError

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
VOLUME_SUFFIXES = (".nii", ".nii.gz")

# DICOM tags (group|element, as SimpleITK spells them).
TAG_MODALITY = "0008|0060"
TAG_PATIENT_NAME = "0010|0010"
TAG_PATIENT_ID = "0010|0020"
TAG_BIRTH_DATE = "0010|0030"
TAG_IDENTITY_REMOVED = "0012|0062"
TAG_INSTANCE_NUMBER = "0020|0013"
TAG_PIXEL_SPACING = "0028|0030"
TAG_SERIES_UID = "0020|000e"
# Identity that a de-identified header must not carry. PatientID is not here: de-identified studies keep a
# pseudonym in it (COVID-CT-MD does), and a pseudonym cannot be told from an identifier by looking at it.
IDENTIFYING_TAGS = {TAG_PATIENT_NAME: "PatientName", TAG_BIRTH_DATE: "PatientBirthDate"}
HU_AIR_MAX = -500.0
"""A chest CT in Hounsfield units holds air (about -1000 HU) in the lungs; a volume whose minimum is
above this is not in HU (e.g. an 8-bit export) and is refused rather than segmented wrongly."""


@dataclass(frozen=True)
class DicomSeries:
    """A validated CT series: the volume in HU plus the per-slice instance numbers and files (z order)."""

    image: sitk.Image
    instance_numbers: list[int]
    files: list[str]
    file_orientation: str = "LPS"
    """Orientation code of the series as stored (before the volume was reoriented to LPS)."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")


def _dicom_header(path: Path) -> sitk.ImageFileReader:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, "not a readable DICOM file (corrupt or truncated)") from exc
    return reader


def _tag(reader: sitk.ImageFileReader, tag: str) -> str:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def check_dicom_header(path: Path, reader: sitk.ImageFileReader, allow_identified: bool = False) -> None:
    """Refuse non-CT modalities and headers that still carry patient identity."""
    modality = _tag(reader, TAG_MODALITY)
    if modality != "CT":
        raise InputError(path, f"modality is {modality or 'missing'!r}, expected 'CT'")
    if allow_identified or _tag(reader, TAG_IDENTITY_REMOVED).upper() == "YES":
        return
    present = [name for tag, name in IDENTIFYING_TAGS.items() if _tag(reader, tag)]
    if present:
        raise InputError(
            path,
            f"DICOM header carries patient identity ({', '.join(present)}) and "
            "PatientIdentityRemoved is not YES; de-identify it first",
        )


def check_spacing(path: Path, spacing: list[float]) -> None:
    """Refuse missing, zero or negative spacing and non-square in-plane pixels (the networks see pixels)."""
    if len(spacing) < 2 or min(spacing) <= 0:
        raise InputError(path, f"missing or non-positive pixel spacing {tuple(spacing)}")
    if abs(spacing[0] - spacing[1]) > 0.01 * max(spacing[0], spacing[1]):
        raise InputError(path, f"non-square pixels ({spacing[0]:g} x {spacing[1]:g} mm); resample first")


def read_dicom_series(folder: str | Path, allow_identified: bool = False) -> DicomSeries:
    """Read one CT series from a folder, sorted by slice position, in HU (int16), oriented LPS."""
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "DICOM folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise InputError(folder, "empty folder: no DICOM files")
    headers = {}
    for path in files:
        _require_file(path)
        reader = _dicom_header(path)
        check_dicom_header(path, reader, allow_identified)
        spacing = _tag(reader, TAG_PIXEL_SPACING)
        try:
            values = [float(v) for v in spacing.split("\\")]
        except ValueError as exc:
            raise InputError(path, f"missing or unreadable PixelSpacing {spacing!r}") from exc
        check_spacing(path, values)  # the header's own value: GDCM reads a zero PixelSpacing as 1 mm
        headers[str(path)] = reader
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series_ids) != 1:
        raise InputError(folder, f"expected one DICOM series, found {len(series_ids)}")
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    if len(names) != len(files):
        raise InputError(folder, f"{len(files) - len(names)} file(s) do not belong to the series")
    _check_positions(folder, names, [_position(headers[n]) for n in names])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(folder, f"cannot decode the series: {str(exc).splitlines()[0][:200]}") from exc
    file_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    image = sitk.DICOMOrient(image, "LPS")
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise InputError(folder, "series contains NaN or infinite values")
    # Reorientation may flip the slice axis: order the files as the oriented volume's z index runs.
    names.sort(key=lambda n: image.TransformPhysicalPointToContinuousIndex(_position(headers[n]))[2])
    instances = [int(_tag(headers[n], TAG_INSTANCE_NUMBER) or -1) for n in names]
    return DicomSeries(
        image=sitk.Cast(image, sitk.sitkInt16),
        instance_numbers=instances,
        files=names,
        file_orientation=file_orientation,
    )


def _position(reader: sitk.ImageFileReader) -> list[float]:
    value = _tag(reader, "0020|0032")
    return [float(v) for v in value.split("\\")] if value else [0.0, 0.0, 0.0]


def _check_positions(folder: Path, names: list[str], positions: list[list[float]]) -> None:
    """Refuse series with uneven slice gaps (missing slices) or duplicated positions."""
    if len(names) < 2:
        return
    steps = np.linalg.norm(np.diff(np.asarray(positions), axis=0), axis=1)
    if steps.min() <= 1e-3:
        raise InputError(folder, "two slices share one position (duplicated slice)")
    if steps.max() > 1.5 * steps.min():
        gap = int(np.argmax(steps))
        raise InputError(
            folder,
            f"gap in slice positions after {Path(names[gap]).name} "
            f"({steps[gap]:.1f} mm vs {steps.min():.1f} mm): missing slices",
        )


def _nifti_bytes(path: Path) -> int:
    """Size of a NIfTI file after decompression; a truncated gzip stream raises EOFError."""
    if not path.name.endswith(".gz"):
        return path.stat().st_size
    size = 0
    with gzip.open(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            size += len(block)
    return size


def _open_nifti(path: Path) -> BinaryIO:
    """A NIfTI file opened for reading bytes, decompressed on the fly when it is .gz."""
    return (gzip.open if path.name.endswith(".gz") else open)(path, "rb")


def _nifti1_order(header: bytes) -> str | None:
    """The byte order ('<' or '>') of a NIfTI-1 header (sizeof_hdr = 348); None for other headers."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack_from(f"{order}i", header, 0)[0] == 348:
            return order
    return None


def _nifti_pixdim(path: Path) -> list[float] | None:
    """pixdim[1..3] as stored in a NIfTI-1 header (ITK reads a zero as 1 mm); None for other headers."""
    with _open_nifti(path) as handle:
        header = handle.read(348)
    order = _nifti1_order(header)
    return None if order is None else [abs(v) for v in struct.unpack_from(f"{order}3f", header, 80)]


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
"""NIfTI-1 datatype codes of the float voxel types (the only ones that can hold NaN or Inf)."""


def _nifti_nonfinite(path: Path) -> int:
    """Count NaN/Inf voxels in a float NIfTI-1 file, read raw: ITK's reader turns them into 0.

    Integer files (which cannot hold them) cost only their header.
    """
    with _open_nifti(path) as handle:
        header = handle.read(348)
        order = _nifti1_order(header)
        kind = (
            None if order is None else _NIFTI_FLOAT_TYPES.get(struct.unpack_from(f"{order}h", header, 70)[0])
        )
        if kind is None:
            return 0
        offset = int(struct.unpack_from(f"{order}f", header, 108)[0])
        handle.seek(offset)
        raw = handle.read()
    data = np.frombuffer(raw, dtype=f"{order}{kind}", count=len(raw) // int(kind[1]))
    return int((~np.isfinite(data)).sum())


def read_volume(path: str | Path) -> sitk.Image:
    """Read a 3-D NIfTI CT volume (HU expected), oriented LPS, refusing NaN, constant or 4-D data."""
    import SimpleITK as sitk

    path = Path(path)
    _require_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(path, "not a readable NIfTI volume") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            path,
            f"expected a 3-D scalar volume, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)",
        )
    # ITK zero-fills the voxels missing from a truncated file: compare the bytes with the header's needs.
    header = {k: float(reader.GetMetaData(k)) for k in ("vox_offset", "bitpix") if reader.HasMetaDataKey(k)}
    need = int(header.get("vox_offset", 0) + image.GetNumberOfPixels() * header.get("bitpix", 0) // 8)
    try:
        have = _nifti_bytes(path)
    except (OSError, EOFError) as exc:
        raise InputError(path, f"truncated or corrupt NIfTI ({exc})") from exc
    if have < need:
        raise InputError(path, f"truncated NIfTI: {have} bytes, the header needs {need}")
    check_spacing(path, _nifti_pixdim(path) or list(image.GetSpacing()))
    array = sitk.GetArrayViewFromImage(image)
    bad = int((~np.isfinite(array)).sum()) or _nifti_nonfinite(path)
    if bad:
        raise InputError(path, f"volume contains NaN or infinite values ({bad} voxels)")
    if array.min() == array.max():
        raise InputError(path, "volume is constant (no image content)")
    return sitk.DICOMOrient(image, "LPS")


def read_slice(path: str | Path) -> np.ndarray:
    """Read a 2-D 8-bit greyscale slice (PNG/JPEG) as a uint8 array; refuse RGB, 16-bit, blank images."""
    import SimpleITK as sitk

    path = Path(path)
    _require_file(path)
    if path.suffix.lower() not in SLICE_SUFFIXES:
        raise InputError(path, f"unsupported slice format {path.suffix!r} (use PNG or JPEG)")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, "not a readable image (corrupt or truncated)") from exc
    if path.suffix.lower() != ".png":  # libjpeg fills a cut-off JPEG with grey and only warns
        with open(path, "rb") as handle:
            handle.seek(max(path.stat().st_size - 2, 0))
            if handle.read() != b"\xff\xd9":
                raise InputError(path, "truncated JPEG (no end-of-image marker)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            path, f"expected a greyscale slice, got {image.GetNumberOfComponentsPerPixel()} channels (RGB?)"
        )
    if image.GetPixelID() != sitk.sitkUInt8:
        raise InputError(path, f"expected 8-bit pixels, got {image.GetPixelIDTypeAsString()}")
    array = sitk.GetArrayFromImage(image)
    if array.ndim != 2:
        raise InputError(path, f"expected a 2-D slice, got shape {array.shape}")
    if array.min() == array.max():
        raise InputError(path, "slice is constant (no image content)")
    return array


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a binary mask PNG ({0,255}, binarised at >127) and check it matches its image's shape."""
    import SimpleITK as sitk

    path = Path(path)
    _require_file(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, "not a readable mask image") from exc
    array = sitk.GetArrayFromImage(image)
    if array.ndim == 3:  # palette/RGB masks: any non-zero channel marks the lesion
        array = array.max(axis=-1)
    if 0 < array.max() <= 127:  # a label map ({0,1}, {0,1,2}): binarising at >127 would empty it
        values = np.unique(array).tolist()[:6]
        raise InputError(path, f"mask values {values} are a label map, expected {{0,255}}")
    if tuple(array.shape) != tuple(shape):
        raise InputError(path, f"mask shape {tuple(array.shape)} differs from its image {tuple(shape)}")
    return array > 127


INPUT_KINDS = ("dicom", "nifti", "slice")


@dataclass
class Study:
    """A validated input, as axial slices in the radiological view (anterior up, patient's right on the left).

    Attributes:
        kind: one of INPUT_KINDS.
        slices: (Z, H, W) array; HU (int16) for volumes, uint8 for a slice (after `rotate`).
        domain: 'hu' or '8bit'.
        image: the LPS-oriented volume whose voxel grid `slices` is (volumes only).
        header: the NIfTI file's own geometry (size, spacing, origin, direction, orientation code).
        series: the DICOM series (files in z order, instance numbers, stored orientation; DICOM only).
        headers: the series' headers as pydicom datasets, no pixel data, in z order (DICOM only).
        rotate: np.rot90 k that was applied to a 2-D slice.
    """

    path: Path
    kind: str
    slices: np.ndarray
    domain: str
    image: Any = None
    header: dict[str, Any] | None = None
    series: DicomSeries | None = None
    headers: list[Any] | None = None
    rotate: int = 0

    @property
    def instance_numbers(self) -> list[int] | None:
        """DICOM InstanceNumber of each z index (DICOM only)."""
        return None if self.series is None else self.series.instance_numbers

    @property
    def voxel_ml(self) -> float | None:
        """Volume of one voxel in mL (None for a 2-D slice: JPEG/PNG carry no pixel spacing)."""
        return None if self.image is None else float(np.prod(self.image.GetSpacing())) / 1000.0


def read_dicom_headers(files: list[str]) -> list[Any]:
    """Pydicom headers (no pixel data) of validated DICOM files, for writers that reference them (DICOM SEG).

    pydicom's own value checks are off while reading (an invalid UID is a reason not to reference the file,
    found by the writer, not a warning for the user) and restored afterwards. pydicom checks a value when
    it first converts it, so every element is converted here, inside.
    """
    import pydicom

    settings = pydicom.config.settings
    before = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
        for header in headers:
            header.walk(lambda dataset, element: None)  # converts (and so checks) every element now
        return headers
    finally:
        settings.reading_validation_mode = before


def input_kind(path: Path) -> str:
    """What a user's input is: 'dicom' (a series folder), 'nifti' (.nii/.nii.gz) or 'slice' (PNG/JPEG)."""
    name = path.name.lower()
    if not path.exists():
        raise InputError(
            path, "input not found (expected a DICOM series folder, a NIfTI volume or a PNG/JPEG slice)"
        )
    if path.is_dir():
        return "dicom"
    if name.endswith(VOLUME_SUFFIXES):
        return "nifti"
    if name.endswith(SLICE_SUFFIXES):
        return "slice"
    if name.endswith(".dcm"):
        raise InputError(path, "give the folder of the DICOM series, not one of its files")
    raise InputError(
        path,
        f"unsupported input {path.suffix!r}: expected a DICOM series folder, .nii/.nii.gz, "
        f"or {'/'.join(SLICE_SUFFIXES)}",
    )


def nifti_geometry(path: Path) -> dict[str, Any]:
    """A NIfTI file's own geometry as stored (size, spacing, origin, direction, orientation code)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    direction = reader.GetDirection()
    return {
        "size": list(reader.GetSize()),
        "spacing": list(reader.GetSpacing()),
        "origin": list(reader.GetOrigin()),
        "direction": list(direction),
        "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction),
    }


def read_study(input_path: str | Path, rotate: int = 0, allow_identified: bool = False) -> Study:
    """Read and validate a DICOM series folder, a NIfTI volume (.nii/.nii.gz) or a PNG/JPEG slice.

    Raises:
        InputError: missing or unreadable input, an unsupported format, a series that fails validation
            (modality, patient identity, missing slices ...), or a volume not in Hounsfield units.
    """
    import SimpleITK as sitk

    path = Path(input_path)
    kind = input_kind(path)
    if kind == "slice":
        image = np.ascontiguousarray(np.rot90(read_slice(path), rotate))
        return Study(path, kind, image[None], "8bit", rotate=rotate)
    if rotate % 4:
        raise InputError(path, "--rotate applies to 2-D slices only (volumes are oriented from their header)")
    if kind == "dicom":
        series = read_dicom_series(path, allow_identified=allow_identified)
        study = Study(
            path,
            kind,
            sitk.GetArrayFromImage(series.image),
            "hu",
            image=series.image,
            series=series,
            headers=read_dicom_headers(series.files),
        )
    else:
        volume = read_volume(path)
        study = Study(
            path, kind, sitk.GetArrayFromImage(volume), "hu", image=volume, header=nifti_geometry(path)
        )
    lowest = float(study.slices.min())
    if lowest > HU_AIR_MAX:
        raise InputError(
            path,
            f"does not look like Hounsfield units (minimum {lowest:.0f}, "
            f"expected air below {HU_AIR_MAX:.0f} HU)",
        )
    return study


def write_mask_png(mask: np.ndarray, path: str | Path) -> None:
    """Write a boolean mask as a {0,255} PNG."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8) * 255), str(path))


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a scratch folder next to `target`; on success it replaces `target`, on error it vanishes.

    Readers of `target` never see a half-written output: the old folder stays until the rename. Scratch
    and backup folders left by a killed process (its pid is in their name and no longer runs here) are
    removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(target)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(backup)
    scratch.rename(target)
    shutil.rmtree(backup, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_scratch(target: Path) -> None:
    """Delete `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>` siblings of `target` whose process is gone."""
    for kind in ("tmp", "old"):
        for leftover in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = leftover.name[len(f".{target.name}.{kind}-") :].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary name and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)
