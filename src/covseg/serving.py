"""The registered model: CT slices in, lesion masks out, through the same path as `covseg predict`.

It is logged as an MLflow *model from code*: :data:`MODEL_CODE` (``serving_code.py``) is the model's code
file, and its artifacts are the segmenter's weights as a safetensors file plus its ``segmenter.json``. So
neither loading it with ``mlflow.pyfunc.load_model`` / ``mlflow models serve`` nor covseg's own loader
(:func:`load_registered_segmenter`) unpickles anything.

Versions registered before this format hold a CloudPickle of :class:`CovsegModel` (``python_model.pkl``) and
the weights as a torch state dict (``segmenter_pt``). covseg never loads that pickle: it builds their
segmenter from the weight files alone (torch ``weights_only``), so they can still be scored and compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np

from covseg.model_files import (  # noqa: F401  (SEGMENTER_META, SEGMENTER_PT: the artifact keys, re-exported)
    SEGMENTER_META,
    SEGMENTER_PT,
    load_registered_weights,
    segmenter_from_artifacts,
)

if TYPE_CHECKING:
    from covseg.predict import LesionSegmenter

MODEL_CODE = Path(__file__).with_name("serving_code.py")
"""The models-from-code file logged with every version: it builds :class:`CovsegModel`."""


def storage_format(flavor_conf: Mapping[str, Any]) -> str:
    """``code`` for a model from code, ``pickle`` for a CloudPickled PythonModel, else ``other``."""
    if flavor_conf.get("model_code_path"):
        return "code"
    return "pickle" if flavor_conf.get("python_model") else "other"


def load_registered_segmenter(uri: str) -> LesionSegmenter:
    """The predict path's segmenter of a logged or registered model (``models:/covseg@champion``).

    It is built from the model's weight files (`covseg.model_files`): no pickle, no model code is run.
    """
    from covseg.predict import LesionSegmenter

    return LesionSegmenter(*load_registered_weights(uri))


class CovsegModel(mlflow.pyfunc.PythonModel):
    """The registered pyfunc model: CT slices in, lesion masks out.

    Input: (N, H, W) slices in the radiological view, 8-bit look (params `domain`='hu' for Hounsfield
    units). Output: (N, H, W) uint8 lesion masks (probability >= `threshold`, default 0.5).
    """

    def load_context(self, context: Any) -> None:
        """Build the segmenter from the model's artifacts (weights and `segmenter.json`)."""
        from covseg.predict import LesionSegmenter

        self.segmenter = LesionSegmenter(*segmenter_from_artifacts(context.artifacts))

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow reads hints as a schema)
        """Lesion masks of `model_input` (params: `domain`, `threshold`)."""
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
        params=ParamSchema([ParamSpec("domain", "string", "8bit"), ParamSpec("threshold", "double", 0.5)]),
    )
