"""Table-1 metrics per slice (MONAI confusion-matrix metrics), averaged over slices.

Dice = F1, IoU = threat score, PPV = precision, sensitivity, specificity; at threshold 0.5 and with the
Inf-Net protocol's adaptive threshold (2 x the mean of the probability map, capped at 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

METRICS = {
    "dice": "f1 score",
    "iou": "threat score",
    "ppv": "precision",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}


def slice_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Metrics of one binary prediction against one binary truth.

    A ratio that is 0/0 (e.g. PPV of an empty prediction) counts 1.0 when prediction and truth are both
    empty (nothing to find, nothing found) and 0.0 otherwise, so empty predictions are penalised, not skipped.
    """
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and mask {truth.shape} differ in shape")
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(1, 1, -1)  # noqa: E731
    matrix = get_confusion_matrix(as_tensor(pred), as_tensor(truth), include_background=True)
    both_empty = not pred.any() and not truth.any()
    values = {
        key: float(compute_confusion_matrix_metric(name, matrix).item()) for key, name in METRICS.items()
    }
    return {key: (1.0 if both_empty else 0.0) if np.isnan(v) else v for key, v in values.items()}


def adaptive_threshold(prob: np.ndarray) -> float:
    """Inf-Net's adaptive threshold: 2 x mean probability, at most 1."""
    return float(min(2.0 * prob.mean(), 1.0))


def summarise(probs: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict[str, object]:
    """Mean per-slice metrics at 0.5 and at the adaptive threshold; `n_slices` counts the slices."""
    fixed = [slice_metrics(p >= 0.5, t) for p, t in zip(probs, truths, strict=True)]
    adaptive = [slice_metrics(p >= adaptive_threshold(p), t) for p, t in zip(probs, truths, strict=True)]

    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in METRICS}

    return {**mean(fixed), "n_slices": len(fixed), "adaptive": {**mean(adaptive), "n_slices": len(adaptive)}}
