"""Coarse labels: Grad-CAM (MONAI) of the lung-view classifier, one lung at a time, thresholded.

Each lung of a slice is explained on its own view (`classify.lung_views`), normalised inside that lung and
weighted by how likely that lung holds a lesion (`side_weights`: the lobe label where the source has one,
else the classifier's view probability relative to the likelier lung). Otsu's threshold inside the lungs
of weight >= 0.5 gives the coarse label. Computed for positive training/validation slices (the pseudo-label
set) and for evaluation slices (only for the "coarse labels alone" row; their masks are never read here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covseg.classify import lung_probabilities
from covseg.layout import CAM_MAPS as MAPS
from covseg.layout import CAM_STATS as STATS
from covseg.layout import CLASSIFIER
from covseg.nets import SliceClassifier
from covseg.progress import progress
from covseg.training import SliceSet, device, load_state


def load_classifier(classify_dir: str | Path) -> SliceClassifier:
    """The trained classifier (architecture from its JSON metadata)."""
    import json

    path = Path(classify_dir) / CLASSIFIER
    meta = json.loads(path.with_suffix(".json").read_text())
    return load_state(SliceClassifier(width=meta["width"]), path)


def grad_cam(
    model: SliceClassifier, x: torch.Tensor, layer: str = "encoder.block4", batch_size: int = 32
) -> np.ndarray:
    """Grad-CAM maps (N,S,S) in [0,1] of the lesion logit for a batch of canonical slices."""
    from monai.visualize import GradCAM

    cam = GradCAM(nn_module=model, target_layers=layer)
    dev = next(model.parameters()).device
    maps = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size].clone().requires_grad_(False).to(dev)
        maps.append(cam(chunk, class_idx=0).detach()[:, 0].float().cpu().numpy())
    return np.concatenate(maps) if maps else np.zeros((0, *x.shape[-2:]), np.float32)


def normalise_in_lung(maps: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Min-max normalise each map over its own lung pixels (zero outside the lungs).

    MONAI normalises over the whole slice, where everything outside the lungs is low, so inside the lungs
    nearly everything clears a 0.5 threshold; "thresholded inside the lungs" needs the lung's own range.
    """
    out = np.zeros_like(maps, dtype=np.float32)
    for i, (cam, lung) in enumerate(zip(maps, lungs, strict=True)):
        if lung.any():
            low, high = cam[lung].min(), cam[lung].max()
            out[i] = np.where(lung, (cam - low) / max(high - low, 1e-6), 0.0)
    return out


def otsu_in_lung(cam: np.ndarray, lung: np.ndarray) -> float:
    """Otsu's threshold of a map over its lung pixels (SimpleITK); 0.5 when the lung is too small, and
    infinity (an empty label) when the map is flat inside the lung."""
    import SimpleITK as sitk

    if lung.sum() < 16:
        return 0.5
    values = cam[lung.astype(bool)]
    if values.max() - values.min() < 1e-6:  # a flat map carries no localisation: label nothing
        return float("inf")
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(64)
    otsu.SetMaskValue(1)
    otsu.Execute(
        sitk.GetImageFromArray(cam.astype(np.float32)), sitk.GetImageFromArray(lung.astype(np.uint8))
    )
    return float(otsu.GetThreshold())


def threshold_maps(
    soft: np.ndarray, lungs: np.ndarray, rows: np.ndarray, threshold: float | str
) -> np.ndarray:
    """Coarse masks: each map above `threshold` (a number, or 'otsu' per slice inside its lung), in the lung."""
    coarse = np.zeros(soft.shape, dtype=bool)
    for row in rows:
        level = otsu_in_lung(soft[row], lungs[row]) if threshold == "otsu" else float(threshold)
        coarse[row] = (soft[row] >= level) & lungs[row]
    return coarse


def cam_rows(index: pd.DataFrame) -> pd.DataFrame:
    """Slices that get a CAM: positive train/val slices and every evaluation slice."""
    positive = index["split"].isin(["train", "val"]) & (index["label"] == 1)
    return index[positive | (index["split"] == "eval")]


def side_weights(rows: pd.DataFrame, lung_proba: np.ndarray) -> np.ndarray:
    """(N, 2) weight of the right and left lung of each slice: its lobe label where known (1 or 0), else
    the classifier's view probability over that of the slice's likelier lung (the likelier lung gets 1)."""
    relative = lung_proba / np.maximum(lung_proba.max(axis=1, keepdims=True), 1e-6)
    known = [
        rows[c].to_numpy() if c in rows else np.full(len(rows), -1) for c in ("lesion_right", "lesion_left")
    ]
    known = np.stack(known, axis=1)
    return np.where(known >= 0, known, relative).astype(np.float32)


def coarse_labels(
    lungs_dir: str | Path, classify_dir: str | Path, out_dir: str | Path, params: dict[str, Any]
) -> pd.DataFrame:
    """Write soft CAM maps + thresholded coarse masks (`coarse.npz`) and per-slice stats (`coarse.parquet`)."""
    from covseg.lungs import SIDE_LEFT, SIDE_RIGHT

    cfg = params["coarse"]
    dev = device()
    slices = SliceSet.for_localisers(lungs_dir, params).to(dev)
    model = load_classifier(classify_dir).to(dev)
    rows = cam_rows(slices.index)
    positions = rows["row"].to_numpy()
    lung_proba = lung_probabilities(model, slices, positions)
    weights = side_weights(rows, lung_proba)
    size = slices.images.shape[-1]
    soft = np.zeros((len(slices.index), size, size), dtype=np.float16)
    region = np.zeros((len(slices.index), size, size), dtype=bool)
    for start in progress(range(0, len(positions), 64), desc="grad-cam", unit="batch"):
        chunk = positions[start : start + 64]
        combined = np.zeros((len(chunk), size, size), np.float32)
        for column, side in enumerate((SIDE_RIGHT, SIDE_LEFT)):
            sides = np.full(len(chunk), side)
            lung = slices.side_masks(chunk, sides)
            maps = normalise_in_lung(grad_cam(model, slices.tensor(chunk, sides), cfg["layer"]), lung)
            weight = weights[start : start + 64, column]
            combined += maps * weight[:, None, None]
            region[chunk] |= lung & (weight[:, None, None] >= 0.5)
        soft[chunk] = combined
    coarse = threshold_maps(soft.astype(np.float32), region, positions, cfg["threshold"])
    np.savez_compressed(Path(out_dir) / MAPS, cam=soft, coarse=coarse)
    stats = label_stats(slices, coarse, rows)
    stats["classifier_p"] = lung_proba.max(axis=1)
    stats["p_right"], stats["p_left"] = lung_proba[:, 0], lung_proba[:, 1]
    stats.to_parquet(Path(out_dir) / STATS, index=False)
    return stats


def label_stats(slices: SliceSet, masks: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
    """Per-slice statistics of a label map: area as a fraction of lung, share of pixels inside the lung."""
    positions = rows["row"].to_numpy()
    label = masks[positions].reshape(len(positions), -1)
    lung = slices.lungs[positions].reshape(len(positions), -1)
    area = label.sum(axis=1)
    inside = (label & lung).sum(axis=1)
    return pd.DataFrame(
        {
            "row": positions,
            "case_id": rows["case_id"].to_numpy(),
            "split": rows["split"].to_numpy(),
            "source": rows["source"].to_numpy(),
            "label": rows["label"].to_numpy(),
            "area_fraction_of_lung": area / np.maximum(lung.sum(axis=1), 1),
            "inside_lung_fraction": np.where(area > 0, inside / np.maximum(area, 1), 1.0),
            "empty": area == 0,
        }
    )
