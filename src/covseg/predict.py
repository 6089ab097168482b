"""The inference path: raw slice or volume in -> lesion probability in the input's own geometry.

The pipeline's evaluation, `covseg evaluate`, `covseg predict` and the MLflow pyfunc model all call
:class:`LesionSegmenter`, so they give the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covseg.harmonise import canonical_slice, from_canonical
from covseg.segment import load_segmenter, segment_canonical


@dataclass
class SlicePrediction:
    """Lesion probability and lung mask on the input slice's pixel grid."""

    prob: np.ndarray
    lung: np.ndarray


class LesionSegmenter:
    """A trained segmenter plus the harmonisation it was trained with."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any]):
        self.model, self.meta = model, meta
        self.size = int(meta["image_size"])

    @classmethod
    def load(cls, model: str | Path) -> LesionSegmenter:
        """From a folder holding segmenter.pt (+ .json), or an MLflow URI such as models:/covseg@champion."""
        text = str(model)
        if text.startswith(("models:/", "runs:/")) or "://" in text:
            import mlflow.pyfunc

            from covseg.tracking import configure

            configure()
            return mlflow.pyfunc.load_model(text).unwrap_python_model().segmenter
        if not Path(text).is_dir():
            from covseg.io import InputError

            raise InputError(text, "model folder not found (expected segmenter.pt inside)")
        return cls(*load_segmenter(text))

    @classmethod
    def from_files(cls, weights: str | Path, meta: str | Path) -> LesionSegmenter:
        """From a state-dict file and its JSON metadata (as stored in the MLflow model)."""
        import json

        from covseg.nets import build_segmenter
        from covseg.training import load_state

        info = json.loads(Path(meta).read_text())
        return cls(load_state(build_segmenter(tuple(info["features"])), Path(weights)), info)

    def predict_slices(self, images: list[np.ndarray], domain: str, batch_size: int = 32) -> list[SlicePrediction]:
        """Batched prediction for 2-D slices in the radiological view (anterior up)."""
        prepared = [canonical_slice(image, domain, self.size) for image in images]
        if not prepared:
            return []
        canon = np.stack([p[0] for p in prepared])
        lungs = np.stack([p[1] for p in prepared])
        probs = segment_canonical(self.model, canon, lungs, batch_size)
        out = []
        for prob, (_, lung_c, geo) in zip(probs, prepared, strict=True):
            out.append(SlicePrediction(prob=from_canonical(prob, geo),
                                       lung=from_canonical(lung_c.astype(np.float32), geo) >= 0.5))
        return out
