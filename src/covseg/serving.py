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

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np

from covseg.io import InputError
from covseg.model_logging import WEIGHTS_ARTIFACT

if TYPE_CHECKING:
    from covseg.predict import LesionSegmenter

SEGMENTER_META = "segmenter_meta"  # segmenter.json: architecture and harmonisation
SEGMENTER_PT = "segmenter_pt"  # legacy (pickled versions): torch state dict, loaded weights-only
MODEL_CODE = Path(__file__).with_name("serving_code.py")
"""The models-from-code file logged with every version: it builds :class:`CovsegModel`."""


def segmenter_from_artifacts(artifacts: Mapping[str, str]) -> LesionSegmenter:
    """The segmenter from a logged model's artifact files (``{key: local path}``).

    Safetensors weights when present, else the legacy torch state dict (weights only: no code is run).

    Raises:
        InputError: the artifacts hold no segmenter weights or no ``segmenter.json``.
    """
    from covseg.nets import build_segmenter
    from covseg.predict import LesionSegmenter

    if SEGMENTER_META not in artifacts or not ({WEIGHTS_ARTIFACT, SEGMENTER_PT} & set(artifacts)):
        raise InputError(", ".join(sorted(artifacts)) or "(none)",
                         "not a covseg segmenter model: artifacts must hold the weights and segmenter.json")
    if WEIGHTS_ARTIFACT not in artifacts:
        return LesionSegmenter.from_files(artifacts[SEGMENTER_PT], artifacts[SEGMENTER_META])
    from safetensors.torch import load_model

    meta = json.loads(Path(artifacts[SEGMENTER_META]).read_text())
    model = build_segmenter(tuple(meta["features"]))
    load_model(model, artifacts[WEIGHTS_ARTIFACT], device="cpu")
    return LesionSegmenter(model.eval(), meta)


def load_registered_segmenter(uri: str) -> LesionSegmenter:
    """The segmenter of a logged or registered model (``models:/covseg@champion``, ``runs:/...``).

    Downloads the model and builds the segmenter from its weight files; the model's code file and any
    pickle (``python_model.pkl`` of legacy versions) are never run.

    Raises:
        InputError: the model is not a covseg segmenter.
    """
    import mlflow.artifacts
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="covseg-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        conf = Model.load(str(local)).flavors.get("python_function", {})
        paths = {key: str(local / spec["path"]) for key, spec in conf.get("artifacts", {}).items()}
        try:
            return segmenter_from_artifacts(paths)
        except InputError as exc:
            raise InputError(uri, exc.problem) from None


def storage_format(flavor_conf: Mapping[str, Any]) -> str:
    """``code`` for a model from code, ``pickle`` for a CloudPickled PythonModel, else ``other``."""
    if flavor_conf.get("model_code_path"):
        return "code"
    return "pickle" if flavor_conf.get("python_model") else "other"


class CovsegModel(mlflow.pyfunc.PythonModel):
    """Input: (N, H, W) slices in the radiological view, 8-bit look (params `domain`='hu' for Hounsfield
    units). Output: (N, H, W) uint8 lesion masks (probability >= `threshold`, default 0.5)."""

    def load_context(self, context: Any) -> None:
        self.segmenter = segmenter_from_artifacts(context.artifacts)

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
