"""Bring every source to one look before a network sees it (and map predictions back).

The sources differ in orientation (fixed at ingest), field of view, and windowing: COVID-CT-MD is in
Hounsfield units, the JPEG sources were windowed differently before export. Steps, per slice:

1. HU slices are windowed to the 8-bit look of a lung window (level -600, width 1500 HU).
2. Two-point intensity normalisation: healthy lung parenchyma (25th percentile inside the lung mask)
   maps to 0.1 and the body outside the lungs (median) maps to 0.6. Any linear window becomes the same
   scale, so the network cannot read the source from the grey levels. Lesions (ground glass,
   consolidation) fall between the two.
3. Crop to the body's bounding box, pad to a square, resize to `size` x `size`.

:class:`Geometry` records the crop so that a canonical mask maps back onto the input slice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from covseg.progress import progress

LUNG_LEVEL, BODY_LEVEL = 0.1, 0.6
HU_WINDOW = (-1350.0, 150.0)


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
    lung_ref = float(np.percentile(image8[lung], 25))
    body_ref = float(np.median(image8[outside]))
    scale = max(body_ref - lung_ref, 1.0)
    return np.clip(LUNG_LEVEL + (BODY_LEVEL - LUNG_LEVEL) * (image8 - lung_ref) / scale, 0.0, 1.0)


def body_geometry(body: np.ndarray, size: int) -> Geometry:
    """The square crop around the body (the whole slice when no body was found)."""
    height, width = body.shape
    rows, cols = np.nonzero(body.any(axis=1))[0], np.nonzero(body.any(axis=0))[0]
    if rows.size == 0:
        r0, r1, c0, c1 = 0, height, 0, width
    else:
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return Geometry(height, width, r0, r1, c0, c1, max(r1 - r0, c1 - c0), size)


def _pad_offsets(geo: Geometry) -> tuple[int, int]:
    return (geo.side - (geo.r1 - geo.r0)) // 2, (geo.side - (geo.c1 - geo.c0)) // 2


def to_canonical(array: np.ndarray, geo: Geometry, mode: str = "bilinear") -> np.ndarray:
    """Crop, pad to a square and resize a slice (or a mask with mode='nearest') to size x size."""
    square = np.zeros((geo.side, geo.side), dtype=np.float32)
    pr, pc = _pad_offsets(geo)
    crop = array[geo.r0:geo.r1, geo.c0:geo.c1].astype(np.float32)
    square[pr:pr + crop.shape[0], pc:pc + crop.shape[1]] = crop
    tensor = torch.from_numpy(square)[None, None]
    if mode == "nearest":
        out = F.interpolate(tensor, size=(geo.size, geo.size), mode="nearest")
    else:
        out = F.interpolate(tensor, size=(geo.size, geo.size), mode="bilinear", align_corners=False,
                            antialias=geo.side > geo.size)
    return out[0, 0].numpy()


def from_canonical(canonical: np.ndarray, geo: Geometry) -> np.ndarray:
    """Map a canonical map (probabilities) back onto the input slice's pixel grid (zeros outside)."""
    tensor = torch.from_numpy(np.ascontiguousarray(canonical, dtype=np.float32))[None, None]
    square = F.interpolate(tensor, size=(geo.side, geo.side), mode="bilinear", align_corners=False)[0, 0]
    pr, pc = _pad_offsets(geo)
    out = np.zeros((geo.height, geo.width), dtype=np.float32)
    out[geo.r0:geo.r1, geo.c0:geo.c1] = square[pr:pr + geo.r1 - geo.r0, pc:pc + geo.c1 - geo.c0].numpy()
    return out


def canonical_slice(image: np.ndarray, domain: str, size: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One raw slice -> (normalised lung-masked image, lung mask, geometry), canonical size x size."""
    from covseg.lungs import segment_lungs

    body, lung = segment_lungs(image, domain)
    image8 = to_8bit_look(image, domain)
    normed = normalise(image8, body, lung)
    geo = body_geometry(body, size)
    lung_c = to_canonical(lung.astype(np.float32), geo) > 0.5
    image_c = to_canonical(normed, geo) * lung_c
    return image_c.astype(np.float32), lung_c, geo


SLICES, INDEX = "slices.npz", "index.parquet"


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
    geos, volumes = [], {}
    for i, row in enumerate(progress(manifest.itertuples(), total=len(manifest), desc="lungs", unit="slice")):
        if row.file not in volumes:
            volumes.clear()  # rows come grouped by case file: keep one volume in memory
            volumes[row.file] = sitk.GetArrayFromImage(sitk.ReadImage(str(ingest_dir / row.file)))
        array = volumes[row.file]
        raw = array[row.z] if array.ndim == 3 else array
        image_c, lung_c, geo = canonical_slice(raw, row.domain, size)
        images[i], lungs[i] = image_c, lung_c
        geos.append(geo.as_dict())
    index = pd.concat([manifest, pd.DataFrame(geos).add_prefix("geo_")], axis=1)
    index["lung_fraction"] = lungs.reshape(len(index), -1).mean(axis=1)
    index["row"] = np.arange(len(index))
    np.savez(out_dir / SLICES, image=images, lung=lungs)
    index.to_parquet(out_dir / INDEX, index=False)
    return index


def geometry_of(row: pd.Series | object) -> Geometry:
    """The Geometry stored in an index row (columns geo_*)."""
    get = row.__getitem__ if isinstance(row, pd.Series) else lambda k: getattr(row, k)
    return Geometry(*(int(get(f"geo_{f}")) for f in Geometry.__dataclass_fields__))
