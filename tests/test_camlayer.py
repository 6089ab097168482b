"""`coarse.layer` is checked before anything trains (covseg.camlayer), as MONAI's GradCAM resolves it.

The check builds the untrained classifier of the profile and runs MONAI's GradCAM once; what it accepts
must be exactly what the coarse stage's `covseg.cam.grad_cam` can use on a real slice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SEG_SLICES, SLICE_STEMS, require_shared, tiny_params

from covseg.camlayer import PARAMS_KEY, cam_layers, check_cam_layer, classifier_for
from covseg.config import load_params
from covseg.errors import InputError


def _with_layer(layer: str, profile: str = "tiny") -> dict:
    from helpers import REPO_ROOT

    return load_params(profile, path=REPO_ROOT / "params.yaml", overrides={"coarse": {"layer": layer}})


@pytest.mark.parametrize(
    ("profile", "layer", "size"),
    [
        ("quick", "encoder.block2", (64, 64)),  # the README's figures: 64 x 64 at 128 px ...
        ("quick", "encoder.block4", (16, 16)),  # ... and 16 x 16 for block4
        ("tiny", "encoder.block2", (32, 32)),
        ("full", "encoder.block3", (64, 64)),  # 256 px, width 32
    ],
)
def test_usable_layers_pass_with_their_map_size(profile: str, layer: str, size: tuple[int, int]) -> None:
    assert check_cam_layer(_with_layer(layer, profile)) == size


def test_the_layer_of_every_profile_passes() -> None:
    from helpers import REPO_ROOT

    for profile in ("tiny", "quick", "full"):
        params = load_params(profile, path=REPO_ROOT / "params.yaml")
        rows, cols = check_cam_layer(params)
        assert 1 <= rows == cols <= params["image_size"], profile


@pytest.mark.parametrize(
    ("layer", "problem"),
    [
        ("encoder.block9", "is no layer of SliceClassifier"),
        ("block2", "is no layer of SliceClassifier"),  # the name must be the full dotted path
        ("", "is no layer of SliceClassifier"),  # the whole network is not a layer
        ("head.1", "Grad-CAM fails at 'head.1'"),  # exists, but its output has no pixels
        ("encoder.block2.1", "Grad-CAM fails at 'encoder.block2.1'"),  # BatchNorm before an in-place ReLU
    ],
)
def test_a_layer_gradcam_cannot_use_is_refused_naming_the_usable_ones(layer: str, problem: str) -> None:
    with pytest.raises(InputError) as info:
        check_cam_layer(_with_layer(layer))
    error = info.value
    assert isinstance(error, ValueError) and error.path == PARAMS_KEY and problem in error.problem
    assert "\n" not in str(error)
    listed = error.problem.split("Grad-CAM layers of the classifier: ")[1].split(", ")
    assert {"encoder.block1", "encoder.block2", "encoder.block3", "encoder.block4"} <= set(listed)
    assert layer not in listed


def test_accepted_layers_are_exactly_those_the_coarse_stage_can_use() -> None:
    """Every named module of the classifier: the check's verdict agrees with `covseg.cam.grad_cam` on real
    slices (the coarse stage's own call), and the map it returns has the slice's size."""
    import SimpleITK as sitk

    from covseg.cam import grad_cam

    require_shared()
    params = tiny_params()
    size = params["image_size"]
    slices = []
    for stem in SLICE_STEMS[:2]:
        image = sitk.ReadImage(str(SEG_SLICES / f"{stem}.jpg"), sitk.sitkFloat32)
        image = sitk.Resample(
            image,
            [size, size],
            sitk.Transform(),
            sitk.sitkLinear,
            image.GetOrigin(),
            [s * n / size for s, n in zip(image.GetSpacing(), image.GetSize(), strict=True)],
        )
        slices.append(sitk.GetArrayFromImage(image) / 255.0)
    x = torch.as_tensor(np.stack(slices)[:, None], dtype=torch.float32)

    accepted = cam_layers(params)
    names = [name for name, _ in classifier_for(params).named_modules() if name]
    assert len(accepted) >= 4 and set(accepted) < set(names)
    for name in names:
        model = classifier_for(params)
        if name in accepted:
            maps = grad_cam(model, x, name)
            assert maps.shape == (2, size, size) and np.isfinite(maps).all(), name
        else:
            with pytest.raises((RuntimeError, KeyError, ValueError)):
                grad_cam(model, x, name)


def test_classify_stage_refuses_a_bad_layer_before_training(trained_tiny, tmp_path) -> None:
    """The check runs at the top of the classify stage: nothing trains, no output or checkpoint is written."""
    from covseg.stages import run_stage

    (tmp_path / "lungs").symlink_to(trained_tiny.stage("lungs"), target_is_directory=True)
    params = {**trained_tiny.params, "coarse": {**trained_tiny.params["coarse"], "layer": "encoder.block9"}}
    with pytest.raises(InputError, match="coarse.layer"):
        run_stage("classify", tmp_path, trained_tiny.data, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lungs"]
