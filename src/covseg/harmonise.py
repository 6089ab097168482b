"""Bring every source to one look before a network sees it (and map predictions back).

The sources differ in orientation (fixed at ingest), field of view, and windowing: COVID-CT-MD is in
Hounsfield units, the JPEG sources were windowed differently before export. Steps, per slice:

1. HU slices are windowed to the 8-bit look of a lung window (level -600, width 1500 HU).
2. Two-point intensity normalisation: healthy lung parenchyma (5th percentile inside the lung mask)
   maps to 0.1 and the body outside the lungs (median) maps to 0.6. Any linear window becomes the same
   scale, so the network cannot read the source from the grey levels. Lesions (ground glass,
   consolidation) fall between the two. The 5th, not the 25th percentile: on 20 of the 50 medseg-100
   slices lesions fill more than a quarter of the lung, and the 25th percentile then sat in the lesion.
3. A square crop centred on the lungs, `LUNG_SPAN` times their extent (never less than `MIN_BODY_SPAN` of
   the body's), resized to `size` x `size`: the lungs fill the same share of the frame in every source
   (cropping to the body left COVID-CT-MD lungs at 0.77 of the frame and the JPEG lungs at 0.97, a
   source cue by size alone).

:class:`Geometry` records the crop so that a canonical mask maps back onto the input slice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from covseg.layout import INDEX, SLICES
from covseg.progress import progress

LUNG_LEVEL, BODY_LEVEL = 0.1, 0.6
LUNG_PERCENTILE = 5
HU_WINDOW = (-1350.0, 150.0)
HU_BAND = (-750.0, -300.0)
"""The mask-free baseline lesion detectors are compared against: lung pixels in this HU range."""
LUNG_SPAN, MIN_BODY_SPAN = 1.05, 0.75


@dataclass(frozen=True)
class Geometry:
    """Where the canonical square sits in the input slice: rows r0:r1, cols c0:c1, padded to `side`."""

    height: int
    width: int
    r0: int
    r1: int
    c0: int
    c1: int
    side: int
    size: int
    pr: int = 0
    """Row of the square where the crop's first row lands (the square may reach beyond the image)."""
    pc: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def to_8bit_look(image: np.ndarray, domain: str) -> np.ndarray:
    """HU -> 0..255 through the lung window; 8-bit input passes through as float."""
    image = image.astype(np.float32)
    if domain == "hu":
        low, high = HU_WINDOW
        return np.clip((image - low) / (high - low), 0.0, 1.0) * 255.0
    if domain != "8bit":
        raise ValueError(f"unknown intensity domain {domain!r}")
    return image


def normalise(image8: np.ndarray, body: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Two-point normalisation (lung parenchyma -> 0.1, body -> 0.6), clipped to [0, 1]."""
    outside = body & ~lung
    if lung.sum() < 50 or outside.sum() < 50:
        return np.clip(image8 / 255.0, 0.0, 1.0)
    lung_ref = float(np.percentile(image8[lung], LUNG_PERCENTILE))
    body_ref = float(np.median(image8[outside]))
    scale = max(body_ref - lung_ref, 1.0)
    return np.clip(LUNG_LEVEL + (BODY_LEVEL - LUNG_LEVEL) * (image8 - lung_ref) / scale, 0.0, 1.0)


def _bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_geometry(body: np.ndarray, lung: np.ndarray, size: int) -> Geometry:
    """The square crop centred on the lungs (`LUNG_SPAN` x their extent, at least `MIN_BODY_SPAN` x the
    body's); centred on the body when there is no lung, the whole slice when there is no body either."""
    height, width = body.shape
    body_box = _bounds(body) or (0, height, 0, width)
    body_span = max(body_box[1] - body_box[0], body_box[3] - body_box[2])
    lung_box = _bounds(lung)
    if lung_box is None:
        r0, r1, c0, c1 = body_box
        side = body_span
        return Geometry(
            height, width, r0, r1, c0, c1, side, size, (side - (r1 - r0)) // 2, (side - (c1 - c0)) // 2
        )
    lung_span = max(lung_box[1] - lung_box[0], lung_box[3] - lung_box[2])
    side = max(int(round(LUNG_SPAN * lung_span)), int(round(MIN_BODY_SPAN * body_span)), 8)
    top = (lung_box[0] + lung_box[1]) // 2 - side // 2
    left = (lung_box[2] + lung_box[3]) // 2 - side // 2
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + side, height), min(left + side, width)
    return Geometry(height, width, r0, r1, c0, c1, side, size, r0 - top, c0 - left)


def _pad_offsets(geo: Geometry) -> tuple[int, int]:
    return geo.pr, geo.pc


def to_canonical(array: np.ndarray, geo: Geometry, mode: str = "bilinear") -> np.ndarray:
    """Crop, pad to a square and resize a slice (or a mask with mode='nearest') to size x size."""
    square = np.zeros((geo.side, geo.side), dtype=np.float32)
    pr, pc = _pad_offsets(geo)
    crop = array[geo.r0 : geo.r1, geo.c0 : geo.c1].astype(np.float32)
    square[pr : pr + crop.shape[0], pc : pc + crop.shape[1]] = crop
    tensor = torch.from_numpy(square)[None, None]
    if mode == "nearest":
        out = F.interpolate(tensor, size=(geo.size, geo.size), mode="nearest")
    else:
        out = F.interpolate(
            tensor,
            size=(geo.size, geo.size),
            mode="bilinear",
            align_corners=False,
            antialias=geo.side > geo.size,
        )
    return out[0, 0].numpy()


def from_canonical(canonical: np.ndarray, geo: Geometry) -> np.ndarray:
    """Map a canonical map (probabilities) back onto the input slice's pixel grid (zeros outside)."""
    tensor = torch.from_numpy(np.ascontiguousarray(canonical, dtype=np.float32))[None, None]
    square = F.interpolate(tensor, size=(geo.side, geo.side), mode="bilinear", align_corners=False)[0, 0]
    pr, pc = _pad_offsets(geo)
    out = np.zeros((geo.height, geo.width), dtype=np.float32)
    out[geo.r0 : geo.r1, geo.c0 : geo.c1] = square[
        pr : pr + geo.r1 - geo.r0, pc : pc + geo.c1 - geo.c0
    ].numpy()
    return out


@dataclass(frozen=True)
class HarmonisedSlice:
    """One slice brought to the canonical look, with what the index records about it."""

    image: np.ndarray
    """(size, size) float32, normalised and lung-masked."""
    lung: np.ndarray
    """(size, size) bool lung mask."""
    geometry: Geometry
    lung_pixels: int
    """Lung pixels of the input slice."""
    hu_band_pixels: float
    """Lung pixels of the input slice inside `HU_BAND` (HU slices only; NaN for 8-bit)."""


def harmonise_slice(image: np.ndarray, domain: str, size: int) -> HarmonisedSlice:
    """One raw slice -> its canonical image, lung mask, geometry and lung statistics."""
    from covseg.lungs import segment_lungs

    body, lung = segment_lungs(image, domain)
    normed = normalise(to_8bit_look(image, domain), body, lung)
    geo = crop_geometry(body, lung, size)
    lung_c = to_canonical(lung.astype(np.float32), geo) > 0.5
    image_c = (to_canonical(normed, geo) * lung_c).astype(np.float32)
    band = float("nan")
    if domain == "hu":
        values = np.asarray(image)[lung]
        band = float(((values >= HU_BAND[0]) & (values <= HU_BAND[1])).sum())
    return HarmonisedSlice(image_c, lung_c, geo, int(lung.sum()), band)


def canonical_slice(image: np.ndarray, domain: str, size: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One raw slice -> (normalised lung-masked image, lung mask, geometry), canonical size x size."""
    out = harmonise_slice(image, domain, size)
    return out.image, out.lung, out.geometry


def _subsample(manifest: pd.DataFrame, per_volume: int) -> pd.DataFrame:
    """Keep `per_volume` evenly spaced slices of each training volume (0 = all); eval rows all stay."""
    if per_volume <= 0:
        return manifest
    keep = []
    for _, group in manifest.groupby("volume_id", sort=False):
        if (group["role"] == "eval").any() or len(group) <= per_volume:
            keep.append(group)
            continue
        group = group.sort_values("slice_index")
        for label in sorted(group["label"].unique()):  # keep both labels of a mixed volume
            part = group[group["label"] == label]
            n = max(1, round(per_volume * len(part) / len(group)))
            keep.append(part.iloc[np.linspace(0, len(part) - 1, n).round().astype(int)])
    return pd.concat(keep).drop_duplicates("case_id")


def prepare_dataset(ingest_dir: str | Path, out_dir: str | Path, params: dict) -> pd.DataFrame:
    """Lung masks + canonical slices for every manifest row -> `slices.npz` and `index.parquet`."""
    import SimpleITK as sitk

    from covseg.ingest import read_manifest
    from covseg.lungs import split_sides

    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    manifest = read_manifest(ingest_dir)
    manifest = _subsample(manifest, int(params.get("max_slices_per_volume", 0)))
    if params.get("max_eval_slices", 0) > 0:  # speed profiles: the first N evaluation slices only
        is_eval = manifest["role"] == "eval"
        manifest = pd.concat([manifest[~is_eval], manifest[is_eval].head(params["max_eval_slices"])])
    manifest = manifest.reset_index(drop=True)
    size = int(params["image_size"])
    images = np.zeros((len(manifest), size, size), dtype=np.float16)
    lungs = np.zeros((len(manifest), size, size), dtype=bool)
    sides = np.zeros((len(manifest), size, size), dtype=np.uint8)
    geos, stats, volumes = [], [], {}
    for i, row in enumerate(progress(manifest.itertuples(), total=len(manifest), desc="lungs", unit="slice")):
        if row.file not in volumes:
            volumes.clear()  # rows come grouped by case file: keep one volume in memory
            volumes[row.file] = sitk.GetArrayFromImage(sitk.ReadImage(str(ingest_dir / row.file)))
        array = volumes[row.file]
        raw = array[row.z] if array.ndim == 3 else array
        out = harmonise_slice(raw, row.domain, size)
        images[i], lungs[i], sides[i] = out.image, out.lung, split_sides(out.lung)
        geos.append(out.geometry.as_dict())
        stats.append({"lung_pixels": out.lung_pixels, "hu_band_pixels": out.hu_band_pixels})
    index = pd.concat([manifest, pd.DataFrame(geos).add_prefix("geo_"), pd.DataFrame(stats)], axis=1)
    index["lung_fraction"] = lungs.reshape(len(index), -1).mean(axis=1)
    index["row"] = np.arange(len(index))
    np.savez(out_dir / SLICES, image=images, lung=lungs, side=sides)
    index.to_parquet(out_dir / INDEX, index=False)
    return index


def geometry_of(row: pd.Series | object) -> Geometry:
    """The Geometry stored in an index row (columns geo_*)."""
    get = row.__getitem__ if isinstance(row, pd.Series) else lambda k: getattr(row, k)
    return Geometry(*(int(get(f"geo_{f}")) for f in Geometry.__dataclass_fields__))
