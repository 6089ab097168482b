"""The method chain on real slices (tiny profile): every stage's output is sane, and weak supervision holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covseg.harmonise import INDEX, SLICES


def test_chain_produces_table1_rows(trained_tiny) -> None:
    table = json.loads((trained_tiny.stage("evaluate") / "metrics.json").read_text())
    rounds = json.loads((trained_tiny.stage("refine") / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]][0] == 0
    for row in ("coarse", "fine", "round0", "final", "prior"):
        for key in ("dice", "iou", "ppv", "sensitivity", "specificity"):
            assert 0.0 <= table[row][key] <= 1.0, (row, key)
            assert 0.0 <= table[row]["adaptive"][key] <= 1.0
        assert table[row]["n_slices"] == 2
    assert (trained_tiny.stage("evaluate") / "panel.png").stat().st_size > 10_000
    segment = json.loads((trained_tiny.stage("segment") / "metrics.json").read_text())
    # the tiny split has no validation positives (its two JPEG volumes train), so the mask-free check is NaN
    assert segment["n_val_fine"] == 0 and np.isnan(segment["val_fine_dice"])


def test_labels_stay_inside_lungs_and_on_positive_slices(trained_tiny) -> None:
    lungs = np.load(trained_tiny.stage("lungs") / SLICES)["lung"]
    index = pd.read_parquet(trained_tiny.stage("lungs") / INDEX)
    fine = np.load(trained_tiny.stage("mil") / "fine.npz")
    coarse = np.load(trained_tiny.stage("coarse") / "coarse.npz")["coarse"]
    assert not (coarse & ~lungs).any() and not (fine["fine"] & ~lungs).any()
    negatives = index[index["label"] == 0]["row"].to_numpy()
    assert len(negatives) > 0
    assert not coarse[negatives].any() and not fine["fine"][negatives].any()


def test_masks_never_reach_training(trained_tiny, monkeypatch) -> None:
    """Weak supervision: the training stages must run with every evaluation mask unreadable."""
    from covseg.stages import run_all

    ingest = trained_tiny.stage("ingest")
    manifest = pd.read_parquet(ingest / "manifest.parquet")
    masks = [ingest / f for f in manifest["mask_file"] if f]
    assert masks
    for mask in masks:  # poison every mask: any read of one now fails loudly
        mask.rename(mask.with_suffix(".hidden"))
    try:
        out, params = trained_tiny.artifacts / "no-masks", trained_tiny.params
        monkeypatch.setenv("COVSEG_TRACKING", "0")
        (out / "ingest").parent.mkdir(parents=True)
        (out / "ingest").symlink_to(ingest)
        run_all(out, trained_tiny.data, params, start="lungs", until="refine")
        # same seed, same data, no masks -> the very same pseudo labels as the run that had masks on disk
        for stage, labels in (("mil", "fine.npz"), ("refine", "labels.npz")):
            same = np.load(out / stage / labels)
            first = np.load(trained_tiny.stage(stage) / labels)
            assert np.array_equal(same[same.files[0]], first[first.files[0]]), stage
    finally:
        for mask in masks:
            mask.with_suffix(".hidden").rename(mask)


def test_splits_are_by_volume_and_eval_is_never_trained_on(trained_tiny) -> None:
    index = pd.read_parquet(trained_tiny.stage("lungs") / INDEX)
    assert index.groupby("volume_id")["split"].nunique().max() == 1
    assert (index[index["split"] == "eval"]["label"] == -1).all()
    assert set(index[index["role"] == "eval"]["split"]) == {"eval"}


@pytest.mark.parametrize("epochs", [1, 3])
def test_curriculum_grows_from_easy_to_all(epochs: int) -> None:
    from covseg.mil import curriculum

    difficulty = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    labels = np.array([1, 1, 1, 0, 0, 0])
    first = curriculum(difficulty, labels, 0, epochs, start=0.4)
    last = curriculum(difficulty, labels, epochs - 1, epochs, start=0.4)
    assert len(last) == 6
    if epochs > 1:
        assert set(first) == {1, 5}  # the easiest positive and the easiest negative


def test_bag_difficulty_ranks_bags_whose_probability_saturated() -> None:
    """Confident positives (sigmoid = 1.0 in float32 beyond logit ~17) must still be ordered by margin."""
    import torch

    from covseg.mil import bag_difficulty

    logits = np.array([30.0, 18.0, 25.0, -40.0, -20.0], dtype=np.float32)
    labels = np.array([1, 1, 1, 0, 0])
    assert torch.sigmoid(torch.from_numpy(logits[:3])).eq(1.0).all()  # all three tie as probabilities
    difficulty = bag_difficulty(logits, labels)
    assert list(np.argsort(difficulty[:3])) == [0, 2, 1]  # the largest margin is the easiest
    assert difficulty[3] < difficulty[4]  # the most confident negative is the easiest


def test_otsu_threshold_splits_the_lung_and_ignores_flat_maps() -> None:
    from covseg.cam import otsu_in_lung, threshold_maps

    lung = np.zeros((32, 32), bool)
    lung[4:28, 4:28] = True
    cam = np.full((32, 32), 0.2, np.float32)
    cam[6:14, 6:14] = 0.9  # one hot spot
    level = otsu_in_lung(cam, lung)
    assert 0.2 <= level < 0.9
    masks = threshold_maps(
        np.stack([cam, np.full_like(cam, 0.7)]), np.stack([lung, lung]), np.array([0, 1]), "otsu"
    )
    assert masks[0].sum() == 64 and not masks[1].any()


def test_lesion_prior_keeps_opacities_and_drops_vessels_and_soft_tissue() -> None:
    """Geometry of the fine-label prior (synthetic, 128 px): a ground-glass patch survives, a 1-px vessel of
    the same density, soft tissue at the body level and healthy parenchyma do not."""
    from covseg.mil import lesion_prior

    fine = {"min_intensity": 0.2, "max_intensity": 0.55, "open_radius_frac": 0.008}
    image = np.full((1, 128, 128), 0.1, dtype=np.float32)  # healthy lung
    image[0, 20:32, 20:32] = 0.35  # ground-glass opacity, 12 px wide
    image[0, 60, 10:120] = 0.35  # a vessel, 1 px wide, as dense as the opacity
    image[0, 90:110, 60:90] = 0.62  # mediastinum inside a generous lung mask
    prior = lesion_prior(image, fine)[0]
    assert prior[20:32, 20:32].mean() > 0.9
    assert not prior[59:62].any()
    assert not prior[90:110, 60:90].any()
    assert not prior[40:50, 40:50].any()
    no_open = lesion_prior(image, {**fine, "open_radius_frac": 0.0})[0]
    assert no_open[60, 10:120].all()  # without the opening the vessel is kept: the opening does the work


def test_fusion_keeps_only_where_cam_and_mil_agree() -> None:
    from covseg.mil import fuse

    cam = np.array([[0.9, 0.9, 0.2, 0.0]], dtype=np.float32)
    instance = np.array([[0.9, 0.2, 0.9, 1.0]], dtype=np.float32)
    coarse = cam >= 0.5
    soft = fuse(cam, coarse, instance, {"fusion": "soft", "threshold": 0.5})
    hard = fuse(cam, coarse, instance, {"fusion": "hard", "threshold": 0.5})
    assert soft.tolist() == [[True, False, False, False]]  # sqrt(0.9 * 0.2) = 0.42 < 0.5
    assert hard.tolist() == [[True, False, False, False]]
    assert fuse(cam, coarse, np.full_like(cam, 0.3), {"fusion": "soft", "threshold": 0.5})[0, 0]  # 0.52
    with pytest.raises(ValueError, match="fusion"):
        fuse(cam, coarse, instance, {"fusion": "max", "threshold": 0.5})


def test_fine_label_dice_scores_the_segmenter_against_the_fine_labels() -> None:
    """The segment stage's mask-free check: per-slice Dice at 0.5 against the given rows' fine labels."""
    import torch

    from covseg.segment import fine_label_dice
    from covseg.training import SliceSet

    class Bright(torch.nn.Module):  # "lesion" wherever the input is brighter than 0.5
        def __init__(self) -> None:
            super().__init__()
            self.offset = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - 0.5) * 100 + self.offset

    images = np.zeros((3, 8, 8), dtype=np.float32)
    images[:, 2:4, 2:4] = 0.9
    fine = np.zeros((3, 8, 8), dtype=bool)
    fine[0, 2:4, 2:4] = True  # slice 0: labels where it predicts -> Dice 1
    fine[1, 5:7, 5:7] = True  # slice 1: disjoint -> Dice 0
    slices = SliceSet(images, np.ones_like(fine), pd.DataFrame({"row": range(3)}))
    assert fine_label_dice(Bright(), slices, fine, np.array([0, 1])) == pytest.approx(0.5)
    assert fine_label_dice(Bright(), slices, fine, np.array([0])) == pytest.approx(1.0)
    assert np.isnan(fine_label_dice(Bright(), slices, fine, np.array([], dtype=int)))


def test_tissue_ceiling_hides_soft_tissue_from_the_weak_localisers_only() -> None:
    from covseg.training import SliceSet

    images = np.array([[[0.1, 0.3], [0.55, 0.7]]], dtype=np.float32)
    index = pd.DataFrame({"row": [0]})
    lungs = np.ones_like(images, dtype=bool)
    seen = SliceSet(images, lungs, index, tissue_ceiling=0.55).tensor(np.array([0]))
    assert seen[0, 0].tolist() == [[pytest.approx(0.1), pytest.approx(0.3)], [0.0, 0.0]]
    assert SliceSet(images, lungs, index).tensor(np.array([0]))[0, 0, 1, 1] == pytest.approx(0.7)
    assert images[0, 1, 1] == pytest.approx(0.7)  # the stored images (segmenter input, prior) are untouched


def test_outside_fill_hides_the_lung_border_from_the_weak_localisers(tmp_path: Path) -> None:
    """With views.outside_fill the localisers see lung-level grey, not an edge, outside the lung mask and
    on hidden soft tissue; parenchyma inside the lungs is unchanged, and so are the stored images."""
    import torch

    from covseg.config import load_params
    from covseg.harmonise import LUNG_LEVEL
    from covseg.training import SliceSet

    images = np.array([[[0.1, 0.3], [0.7, 0.0]]], dtype=np.float32)
    lungs = np.array([[[True, True], [True, False]]])
    index = pd.DataFrame({"row": [0]})
    seen = SliceSet(images, lungs, index, tissue_ceiling=0.55, fill=0.1).tensor(np.array([0]))
    assert seen[0, 0].tolist() == [
        [pytest.approx(0.1), pytest.approx(0.3)],
        [pytest.approx(0.1), pytest.approx(0.1)],
    ]
    assert images[0, 1].tolist() == [pytest.approx(0.7), 0.0]
    params = load_params("quick")
    assert params["views"]["outside_fill"] == pytest.approx(LUNG_LEVEL)  # the harmonised healthy-lung level
    np.savez(tmp_path / SLICES, image=images.astype(np.float16), lung=lungs)
    index.to_parquet(tmp_path / INDEX)
    localisers = SliceSet.for_localisers(tmp_path, params)  # what classify, coarse and mil load
    assert torch.allclose(localisers.tensor(np.array([0])), seen, atol=1e-3)


def test_resident_slices_give_the_same_batches_as_the_host_path() -> None:
    """SliceSet.to(dev) (the GPU loops gather batches on the device) must not change what a batch holds."""
    import torch

    from covseg.training import SliceSet

    rng = np.random.default_rng(0)
    images = rng.random((6, 8, 8), dtype=np.float32)
    lungs = rng.random((6, 8, 8)) > 0.3
    index = pd.DataFrame({"row": range(6)})
    rows = np.array([4, 1, 1, 5])
    host = SliceSet(images, lungs, index, tissue_ceiling=0.55)
    resident = SliceSet(images.copy(), lungs.copy(), index, tissue_ceiling=0.55).to(torch.device("cpu"))
    assert torch.equal(host.tensor(rows), resident.tensor(rows))
    assert torch.equal(host.lung_tensor(rows), resident.lung_tensor(rows))
    assert resident.tensor(rows).shape == (4, 1, 8, 8) and resident.lung_tensor(rows).dtype == torch.bool
    assert float(resident.tensor(rows).max()) < 0.55  # the ceiling applies to the resident copy too
    np.testing.assert_array_equal(resident.images, images)  # ... and not to the stored images


def test_localiser_agreement_is_the_rank_correlation_inside_the_region() -> None:
    """The MIL stage's mask-free check of Grad-CAM against the instance map."""
    from covseg.mil import localiser_agreement

    cam = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    region = np.ones_like(cam, dtype=bool)
    region[0, 0, 0] = False
    assert localiser_agreement(cam, cam**2, region) == pytest.approx(1.0)  # same order, other scale
    assert localiser_agreement(cam, 1 - cam, region) == pytest.approx(-1.0)
    outside = cam.copy()
    outside[~region] = -5.0  # only the region counts
    assert localiser_agreement(outside, cam, region) == pytest.approx(1.0)
    assert np.isnan(localiser_agreement(cam, np.ones_like(cam), region))  # a flat map ranks nothing
    assert np.isnan(localiser_agreement(cam, cam, np.zeros_like(region)))
