"""Check the Grad-CAM target layer (`coarse.layer`) before the classifier trains.

The coarse stage hands `coarse.layer` to MONAI's GradCAM, which matches it against the classifier's
``named_modules()`` names; a name that matches nothing only warns there and fails later, after `classify`
has trained. :func:`check_cam_layer` builds the untrained classifier from the parameters (as `classify`
builds it, via `covseg.nets`), runs MONAI's GradCAM at that layer on one blank slice of the profile's size,
and raises :class:`~covseg.errors.InputError` naming the layers that do work. Nothing is trained; on the
CPU it takes well under a second. ``python -m covseg.camlayer [PROFILE]`` prints the usable layers.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

from covseg.errors import InputError

if TYPE_CHECKING:
    from torch import nn

PARAMS_KEY = "coarse.layer"
"""Where the layer name lives in params.yaml (the name errors point at)."""


def classifier_for(params: dict[str, Any]) -> nn.Module:
    """The untrained slice classifier the `classify` stage would train under these parameters."""
    from covseg.nets import SliceClassifier

    return SliceClassifier(width=int(params["classify"]["width"])).eval()


def cam_map_size(model: nn.Module, layer: str, image_size: int) -> tuple[int, int]:
    """The (rows, columns) of `layer`'s map for an `image_size` slice, computed by MONAI's GradCAM.

    Raises:
        ValueError: `layer` is no module of `model`, or Grad-CAM cannot be computed there (its output is
            not a 2-D feature map, or its gradient cannot be hooked).
    """
    import torch
    from monai.visualize import GradCAM

    if layer not in dict(model.named_modules()) or not layer:
        raise ValueError(f"{layer!r} is no layer of {type(model).__name__}")
    blank = torch.zeros(1, 1, image_size, image_size)
    with warnings.catch_warnings():
        # MONAI warns about hooks it could not place: the checks below catch that.
        warnings.simplefilter("ignore")
        try:
            cam = GradCAM(nn_module=model, target_layers=layer)
            cam(blank, class_idx=0)  # what covseg.cam.grad_cam does, on one blank slice
            activation = cam.nn_module.activations[layer]
        except (RuntimeError, KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"Grad-CAM fails at {layer!r}: {exc}".splitlines()[0]) from exc
    if not isinstance(activation, torch.Tensor) or activation.ndim != 4:
        shape = tuple(getattr(activation, "shape", ()))
        raise ValueError(f"{layer!r} gives no 2-D feature map (output shape {shape})")
    return int(activation.shape[-2]), int(activation.shape[-1])


def cam_layers(params: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Every layer name of the classifier that Grad-CAM works at, with its map size at `image_size`."""
    names = [name for name, _ in classifier_for(params).named_modules() if name]
    usable = {}
    for name in names:
        try:  # a fresh network per layer: MONAI's hooks stay on the module they were put on
            usable[name] = cam_map_size(classifier_for(params), name, int(params["image_size"]))
        except ValueError:
            continue
    return usable


def check_cam_layer(params: dict[str, Any]) -> tuple[int, int]:
    """Refuse a `coarse.layer` Grad-CAM cannot use, before anything trains; return its map size.

    Args:
        params: merged parameters (`covseg.config.load_params`): `coarse.layer`, `classify.width`,
            `image_size` are read.

    Returns:
        (rows, columns) of the layer's map at `image_size` (e.g. 64 x 64 for `encoder.block2` at 128 px).

    Raises:
        InputError: (a ValueError) naming `coarse.layer`, the problem and the usable layer names.
    """
    layer = str(params["coarse"]["layer"])
    try:
        return cam_map_size(classifier_for(params), layer, int(params["image_size"]))
    except ValueError as exc:
        usable = ", ".join(cam_layers(params))
        raise InputError(PARAMS_KEY, f"{exc}; Grad-CAM layers of the classifier: {usable}") from exc


def main(argv: list[str] | None = None) -> int:
    """Print the usable Grad-CAM layers and their map sizes for a profile (default: the active one)."""
    from covseg.config import load_params

    args = sys.argv[1:] if argv is None else argv
    params = load_params(args[0] if args else None)
    current = params["coarse"]["layer"]
    for name, (rows, cols) in cam_layers(params).items():
        mark = "  <- coarse.layer" if name == current else ""
        print(f"{name}\t{rows}x{cols}{mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
