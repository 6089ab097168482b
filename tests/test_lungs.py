"""Lung segmentation on real slices (fixtures + the shared COVID-CT-MD sample) and synthetic geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from covseg.lungs import lesion_coverage, medseg_coverage, segment_lungs

FIXTURES = Path(__file__).parent / "fixtures" / "lungs"
MEDSEG = FIXTURES / "medseg"
JPEGS = ["coronacases_org_005_119.jpg", "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm_4.jpg"]
P001 = Path(__file__).parents[2] / "shared" / "datasets" / "covid-ct-md" / "P001"
# P001 keeps every second slice: 0001.dcm is the cranial end (neck, above the lungs), 0067.dcm is mid-lung
DCM_MID_LUNG, DCM_ABOVE_LUNGS = "0067.dcm", "0001.dcm"


def _grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def _hu_slice(name: str) -> np.ndarray:
    path = P001 / name
    if not path.exists():
        pytest.skip(f"shared COVID-CT-MD sample not found at {P001}")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0]  # int16 HU (rescale applied by GDCM)


def _n_components(mask: np.ndarray, min_frac: float) -> int:
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= min_frac * mask.sum()).sum())


def _fraction(body: np.ndarray, lung: np.ndarray) -> float:
    return float(lung.sum() / body.sum())


def _check_contract(image: np.ndarray, body: np.ndarray, lung: np.ndarray) -> None:
    for mask in (body, lung):
        assert mask.dtype == bool
        assert mask.shape == image.shape
    assert not (lung & ~body).any(), "lung mask must lie inside the body mask"


@pytest.mark.parametrize("name", sorted(p.stem for p in (MEDSEG / "images").glob("*.jpg")))
def test_medseg_lesions_stay_inside_lung(name: str) -> None:
    image = _grey(MEDSEG / "images" / f"{name}.jpg")
    lesion = _grey(MEDSEG / "masks" / f"{name}.png") > 127
    body, lung = segment_lungs(image, "8bit")
    _check_contract(image, body, lung)
    assert lesion.sum() > 500
    assert lesion_coverage(lung, lesion) >= 0.95
    assert 0.3 <= _fraction(body, lung) <= 0.85  # cropped to the body: the lungs are a big share of it


def test_medseg_coverage_summary() -> None:
    result = medseg_coverage(MEDSEG)
    assert result["n_slices"] == 2
    assert result["coverage"] >= 0.95
    assert set(result["per_slice"]) == {"medseg_011", "medseg_026"}
    assert 0.3 <= result["lung_body_fraction"] <= 0.85


@pytest.mark.parametrize("name", JPEGS)
def test_covid19_ct_seg_jpeg(name: str) -> None:
    image = _grey(FIXTURES / name)
    body, lung = segment_lungs(image, "8bit")
    _check_contract(image, body, lung)
    assert body.mean() >= 0.7  # these slices are cropped to the body
    assert 0.4 <= _fraction(body, lung) <= 0.85
    assert _n_components(lung, 0.1) in (1, 2)


def test_hu_mid_lung_has_two_lungs() -> None:
    image = _hu_slice(DCM_MID_LUNG)
    body, lung = segment_lungs(image, "hu")
    _check_contract(image, body, lung)
    assert 0.25 <= _fraction(body, lung) <= 0.6
    assert _n_components(lung, 0.2) == 2
    # full field of view: the corners are outside air, not body
    assert not body[0, 0] and not body[-1, -1]


def test_hu_above_lungs_is_empty() -> None:
    image = _hu_slice(DCM_ABOVE_LUNGS)
    body, lung = segment_lungs(image, "hu")
    _check_contract(image, body, lung)
    assert body.mean() > 0.1
    assert _fraction(body, lung) < 0.01  # the trachea is gas, not lung


def _synthetic(domain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disk-like body, two elliptic lungs, a bright consolidation against the wall of the right one."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256].astype(float)
    body = ((xx - 128) / 115) ** 2 + ((yy - 128) / 85) ** 2 <= 1
    lungs = np.zeros_like(body)
    for cx in (76.0, 180.0):
        lungs |= ((xx - cx) / 40) ** 2 + ((yy - 128) / 60) ** 2 <= 1
    blob = ((xx - 220) ** 2 + (yy - 128) ** 2 <= 16**2) & lungs  # juxtapleural, inside the right lung
    hu = np.where(body, 40.0, -1000.0)
    hu[lungs] = -850.0
    hu[blob] = 30.0
    hu += rng.normal(0, 15, hu.shape)
    if domain == "8bit":  # a lung window, as the JPEG sets were exported
        return np.clip((hu + 1350) / 1500 * 255, 0, 255).astype(np.uint8), lungs, blob
    return hu, lungs, blob


@pytest.mark.parametrize("domain", ["hu", "8bit"])
def test_synthetic_juxtapleural_blob_stays_inside(domain: str) -> None:
    image, lungs, blob = _synthetic(domain)
    body, lung = segment_lungs(image, domain)
    _check_contract(image, body, lung)
    assert lesion_coverage(lung, blob) >= 0.95
    assert lesion_coverage(lung, lungs) >= 0.97
    assert not lung[128, 128], "the mediastinum between the lungs is not lung"
    assert _n_components(lung, 0.2) == 2
    assert lung.sum() <= 1.15 * lungs.sum()


def test_lesion_coverage_arithmetic() -> None:
    lung = np.zeros((4, 4), bool)
    lung[:2] = True
    lesion = np.zeros((4, 4), bool)
    lesion[1:3, 0] = True
    assert lesion_coverage(lung, lesion) == 0.5
    assert lesion_coverage(lung, np.zeros((4, 4), bool)) == 1.0


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        segment_lungs(np.zeros((64, 64)), "jpeg")
    with pytest.raises(ValueError):
        segment_lungs(np.zeros((2, 64, 64)), "hu")
    body, lung = segment_lungs(np.full((64, 64), -1000.0), "hu")  # all air
    assert not lung.any() and body.shape == (64, 64)
