"""The MLflow pyfunc model: CT slices in, lesion masks out, through the same path as `covseg predict`."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

SEGMENTER_PT, SEGMENTER_META = "segmenter_pt", "segmenter_meta"


class CovsegModel(mlflow.pyfunc.PythonModel):
    """Input: (N, H, W) slices in the radiological view, 8-bit look (params `domain`='hu' for Hounsfield
    units). Output: (N, H, W) uint8 lesion masks (probability >= `threshold`, default 0.5)."""

    def load_context(self, context: Any) -> None:
        from covseg.predict import LesionSegmenter

        self.segmenter = LesionSegmenter.from_files(context.artifacts[SEGMENTER_PT],
                                                    context.artifacts[SEGMENTER_META])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        params = params or {}
        slices = [np.asarray(s, dtype=np.float32) for s in np.asarray(model_input)]
        preds = self.segmenter.predict_slices(slices, params.get("domain", "8bit"))
        threshold = float(params.get("threshold", 0.5))
        return np.stack([(p.prob >= threshold).astype(np.uint8) for p in preds])
