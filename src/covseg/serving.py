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

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow reads hints as a schema)
        params = params or {}
        slices = [np.asarray(s, dtype=np.float32) for s in np.asarray(model_input)]
        preds = self.segmenter.predict_slices(slices, params.get("domain", "8bit"))
        threshold = float(params.get("threshold", 0.5))
        return np.stack([(p.prob >= threshold).astype(np.uint8) for p in preds])


def signature() -> Any:
    """Variable-size (N, H, W) float32 slices in, uint8 masks out; params `domain` and `threshold`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        params=ParamSchema([ParamSpec("domain", "string", "8bit"), ParamSpec("threshold", "double", 0.5)]))
