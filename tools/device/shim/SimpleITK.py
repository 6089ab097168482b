"""A stand-in for the few SimpleITK calls that the training / evaluation stages make (device job only).

The device image has no SimpleITK and its wheel (~50 MiB) does not fit the 64 MiB that travels beside the
data. The stages classify -> coarse -> mil -> segment -> evaluate need only:

  GetImageFromArray / GetArrayFromImage / GetArrayViewFromImage   numpy <-> image (z, y, x order)
  ReadImage(path)                       2-D PNG/JPEG (the evaluation masks), through Pillow
  OtsuThresholdImageFilter              masked Otsu threshold (cam.otsu_in_lung), ITK's histogram rules
  GrayscaleMorphologicalOpening         flat ball kernel (mil.lesion_prior), ITK's ball and border rules
  sitkBall                              the kernel type constant

Everything else raises AttributeError naming this file, so a code path that needs more fails loudly instead
of silently diverging. `tools/device/shim_check.py` compares each function with the real SimpleITK on the
project's own data (run it here, where SimpleITK is installed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__version__ = "shim-for-covseg-device-job"
IS_COVSEG_SHIM = True

sitkBall = 1  # noqa: N816  (SimpleITK's spelling)
sitkBox = 0  # noqa: N816


class Image:
    """An array in SimpleITK's index order (z, y, x), no geometry."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)

    def GetSize(self) -> tuple[int, ...]:  # noqa: N802
        return tuple(int(s) for s in self.array.shape[::-1])

    def GetDimension(self) -> int:  # noqa: N802
        return self.array.ndim


def GetImageFromArray(array: np.ndarray, isVector: bool = False) -> Image:  # noqa: N802, N803
    if isVector:
        raise NotImplementedError("SimpleITK shim: vector images are not supported")
    return Image(np.array(array, copy=True))


def GetArrayFromImage(image: Image) -> np.ndarray:  # noqa: N802
    return np.array(image.array, copy=True)


def GetArrayViewFromImage(image: Image) -> np.ndarray:  # noqa: N802
    view = image.array.view()
    view.flags.writeable = False
    return view


def ReadImage(path: str | Path, *args: object, **kwargs: object) -> Image:  # noqa: N802
    """2-D grayscale PNG / JPEG / BMP through Pillow (what SimpleITK returns for 8-bit grayscale files)."""
    from PIL import Image as PILImage

    path = Path(path)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
        raise NotImplementedError(f"SimpleITK shim: cannot read {path.suffix} files ({path})")
    with PILImage.open(path) as img:
        if img.mode not in ("L", "1"):
            raise NotImplementedError(f"SimpleITK shim: {path}: mode {img.mode} (only 8-bit grayscale)")
        return Image(np.asarray(img.convert("L"), dtype=np.uint8))


class OtsuThresholdImageFilter:
    """Masked Otsu threshold with ITK's rules (OtsuThresholdImageFilter + OtsuThresholdCalculator):

    histogram of the masked pixels between their min and max, the max raised by a margin of
    (max - min) / bins / 100 (ImageToHistogramFilter's marginal scale for real-valued pixels), the threshold
    maximising the between-class variance over bin centres, returned as the upper edge of its bin.
    """

    def __init__(self) -> None:
        self._bins = 128
        self._mask_value = 255
        self._threshold = float("nan")

    def SetNumberOfHistogramBins(self, bins: int) -> None:  # noqa: N802
        self._bins = int(bins)

    def SetMaskValue(self, value: int) -> None:  # noqa: N802
        self._mask_value = value

    def GetThreshold(self) -> float:  # noqa: N802
        return self._threshold

    def Execute(self, image: Image, mask: Image | None = None) -> Image:  # noqa: N802
        values = image.array
        if mask is not None:
            values = values[mask.array == self._mask_value]
        self._threshold = _otsu_itk(values.astype(np.float32).ravel(), self._bins)
        level = self._threshold
        # ITK's output: inside value 1 at or below the threshold (its default InsideValue), outside 0
        return Image((image.array <= level).astype(np.uint8))


def _otsu_itk(values: np.ndarray, bins: int) -> float:
    """ITK's arithmetic: bounds and bin edges in float32 (the histogram's measurement type for float
    pixels), bin j holding min_j <= v < max_j, class statistics over the bin centres."""
    f32 = np.float32
    if values.size == 0:
        return 0.0
    low, high = f32(values.min()), f32(values.max())
    high = f32(high + f32(f32(f32(high - low) / f32(bins)) / f32(100.0)))
    interval = f32(f32(high - low) / f32(bins))
    edges_min = np.array([f32(low + f32(f32(j) * interval)) for j in range(bins)], dtype=np.float32)
    edges_max = np.append(edges_min[1:], high).astype(np.float32)
    index = np.clip(np.searchsorted(edges_min, values, side="right") - 1, 0, bins - 1)
    freq = np.bincount(index, minlength=bins).astype(np.float64)
    centres = ((edges_min + edges_max) / f32(2.0)).astype(np.float64)
    total = freq.sum()
    mean_total = (freq * centres).sum() / total
    best, best_k = -1.0, 0
    w0, sum0 = 0.0, 0.0
    for k in range(bins - 1):
        w0 += freq[k]
        sum0 += freq[k] * centres[k]
        w1 = total - w0
        if w0 == 0 or w1 == 0:
            continue
        mu0, mu1 = sum0 / w0, (mean_total * total - sum0) / w1
        variance = (w0 / total) * (mu0 - mean_total) ** 2 + (w1 / total) * (mu1 - mean_total) ** 2
        if variance > best:
            best, best_k = variance, k
    return float(edges_max[best_k])


def _ball(radius: tuple[int, ...]) -> np.ndarray:
    """ITK's FlatStructuringElement::Ball (radius not parametric): inside the ellipsoid of semi-axes r + 1/2."""
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij")
    return sum((g / (r + 0.5)) ** 2 for g, r in zip(grids, radius, strict=True)) <= 1.0


def GrayscaleMorphologicalOpening(
    image: Image,
    kernelRadius=(1, 1, 1),
    kernelType: int = sitkBall,  # noqa: N802, N803
    safeBorder: bool = True,
) -> Image:  # noqa: N803
    """Grey erosion then dilation with a flat kernel; `kernelRadius` in SimpleITK's (x, y, z) order."""
    from scipy import ndimage

    array = image.array
    radius = tuple(int(r) for r in kernelRadius)[: array.ndim][::-1]  # -> (z, y, x)
    if kernelType == sitkBall:
        footprint = _ball(radius)
    elif kernelType == sitkBox:
        footprint = np.ones([2 * r + 1 for r in radius], dtype=bool)
    else:
        raise NotImplementedError(f"SimpleITK shim: kernel type {kernelType}")
    work = array.astype(np.float64) if array.dtype.kind == "f" else array
    if safeBorder:  # ITK pads by the radius with the type's maximum, opens, and crops back
        pad = [(r, r) for r in radius]
        top = np.finfo(work.dtype).max if work.dtype.kind == "f" else np.iinfo(work.dtype).max
        work = np.pad(work, pad, constant_values=top)
    eroded = ndimage.grey_erosion(work, footprint=footprint, mode="nearest")
    opened = ndimage.grey_dilation(eroded, footprint=footprint, mode="nearest")
    if safeBorder:
        opened = opened[tuple(slice(r, opened.shape[i] - r) for i, r in enumerate(radius))]
    return Image(opened.astype(array.dtype))


def __getattr__(name: str) -> object:
    raise AttributeError(
        f"SimpleITK shim ({__file__}) has no {name!r}: this code path needs the real "
        "SimpleITK (see tools/device/README.md)"
    )
