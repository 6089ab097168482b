"""The lesion prior of the fine labels: what density says, and which lungs the weak labels allow.

Fine labels are `lesion_prior` (pixels dense like ground glass or consolidation, vessels removed) inside
the `allowed_lungs` of a positive slice (a lung whose lobe labels say it is clean is never labelled).
The prior's lower density floor is chosen without masks (`bench/prior_floor.py`): the floor at which the
prior's area best separates lesion lungs from clean lungs of the same positive slices (lobe labels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def lesion_prior(images: np.ndarray, fine: dict[str, Any]) -> np.ndarray:
    """Pixels whose local density looks like lesion, on the harmonised scale (lung 0.1, body 0.6).

    A grey opening (SimpleITK, disk of `open_radius_frac` of the slice side: 1 px at 128, 2 px at 256, about
    2-3 mm) erases structures thinner than the disk, i.e. vessels, which are as dense as consolidation; what
    survives must lie in [min_intensity, max_intensity): from ground glass (~ -670 HU) to just under the body
    reference level, which drops mediastinum and chest wall that the generous lung mask takes in.
    """
    import SimpleITK as sitk

    images = np.asarray(images, dtype=np.float32)
    if images.size == 0:
        return np.zeros(images.shape, dtype=bool)
    radius = max(0, round(fine["open_radius_frac"] * images.shape[-1]))
    opened = images
    if radius:
        volume = sitk.GetImageFromArray(images.reshape(-1, *images.shape[-2:]))
        opened = sitk.GetArrayFromImage(
            sitk.GrayscaleMorphologicalOpening(
                volume, kernelRadius=[radius, radius, 0], kernelType=sitk.sitkBall
            )
        ).reshape(images.shape)
    return (opened >= fine["min_intensity"]) & (opened < fine["max_intensity"])


def allowed_lungs(lungs: np.ndarray, sides: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
    """(N,S,S) bool: the lung pixels of `rows` that may hold lesion labels. A lung whose lobe labels say
    it is clean (0) is excluded; where a source has no lobe labels (-1) both lungs are allowed."""
    from covseg.lungs import SIDE_LEFT, SIDE_RIGHT

    allowed = np.array(lungs, dtype=bool, copy=True)
    for side, column in ((SIDE_RIGHT, "lesion_right"), (SIDE_LEFT, "lesion_left")):
        if column not in rows:
            continue
        clean = (rows[column].to_numpy() == 0)[:, None, None]
        allowed &= ~(clean & (sides == side))
    return allowed


def side_area_auc(
    images: np.ndarray, lungs: np.ndarray, sides: np.ndarray, rows: pd.DataFrame, fine: dict[str, Any]
) -> float:
    """Mask-free score of a prior setting: ROC AUC of the prior's share of each lung, lesion lungs against
    clean lungs, over the one-clean-lung positive slices of `rows` (lobe labels only)."""
    from covseg.classify import roc_auc
    from covseg.lungs import SIDE_LEFT, SIDE_RIGHT

    mixed = rows[
        (rows["label"] == 1)
        & (rows["lesion_left"] >= 0)
        & (rows["lesion_right"] >= 0)
        & (rows["lesion_left"] != rows["lesion_right"])
    ]
    if mixed.empty:
        return float("nan")
    positions = mixed["row"].to_numpy()
    prior = lesion_prior(images[positions], fine) & lungs[positions]
    scores, labels = [], []
    for side, column in ((SIDE_RIGHT, "lesion_right"), (SIDE_LEFT, "lesion_left")):
        lung = sides[positions] == side
        scores.append((prior & lung).sum(axis=(1, 2)) / np.maximum(lung.sum(axis=(1, 2)), 1))
        labels.append(mixed[column].to_numpy())
    return roc_auc(np.concatenate(scores), np.concatenate(labels))
