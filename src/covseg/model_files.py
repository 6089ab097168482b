"""A logged covseg model's files: the U-Net rebuilt from its weights, never from code or a pickle.

The weights are a safetensors file (or the state dict of versions logged as pickles) plus
`segmenter.json`; the model's code file and any pickle are never run. Shared by the predict path
(`covseg predict --model models:/...`) and the served pyfunc (`covseg.serving`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covseg.errors import InputError
from covseg.model_logging import WEIGHTS_ARTIFACT

if TYPE_CHECKING:
    import torch

SEGMENTER_META = "segmenter_meta"  # segmenter.json: architecture and harmonisation
SEGMENTER_PT = "segmenter_pt"  # legacy (pickled versions): torch state dict, loaded weights-only


def segmenter_from_artifacts(artifacts: Mapping[str, str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The U-Net and its metadata from a logged model's artifact files (``{key: local path}``).

    Safetensors weights when present, else the legacy torch state dict (weights only: no code is run).

    Raises:
        InputError: the artifacts hold no segmenter weights or no ``segmenter.json``.
    """
    from covseg.nets import build_segmenter

    if SEGMENTER_META not in artifacts or not ({WEIGHTS_ARTIFACT, SEGMENTER_PT} & set(artifacts)):
        raise InputError(
            ", ".join(sorted(artifacts)) or "(none)",
            "not a covseg segmenter model: artifacts must hold the weights and segmenter.json",
        )
    meta = json.loads(Path(artifacts[SEGMENTER_META]).read_text())
    model = build_segmenter(tuple(meta["features"]))
    if WEIGHTS_ARTIFACT not in artifacts:
        from covseg.training import load_state

        return load_state(model, Path(artifacts[SEGMENTER_PT])), meta
    from safetensors.torch import load_model

    load_model(model, artifacts[WEIGHTS_ARTIFACT], device="cpu")
    return model.eval(), meta


def load_registered_weights(uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The U-Net and its metadata of a logged or registered model (``models:/covseg@champion``, ``runs:/...``).

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
