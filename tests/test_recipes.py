"""The README's "How to change" recipes, each followed once as a contributor would.

Each test edits `params.yaml` of a tmp project (a copy of the repository's) the way the recipe says, then
runs what the recipe runs: `covseg ingest` and `covseg gate0` on a tiny real data tree with a new source;
the Grad-CAM layer check and the coarse stage's Grad-CAM at a new layer; the promotion rule on the recorded
per-slice Dice of the quick segmenter retrained with three seeds.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from helpers import (
    SEG_SLICES,
    build_tiny_data,
    copy_file,
    invoke_cli,
    make_project,
    require_shared,
    series_files,
    write_slice_labels,
)

from covseg.config import load_params
from covseg.ingest import MANIFEST

SEEDS_FIXTURE = Path(__file__).parent / "fixtures" / "promotion" / "quick_segment_seeds.json"


def _edit_params(project: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the project's params.yaml (the recipe's one-file change): load, change, write back."""
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Recipe 1: add a data source (a folder under data/, an entry in params.yaml: common.sources)
# ------------------------------------------------------------------------------------------------

CAP_SOURCE = "ct-md-cap"  # a DICOM source: community-acquired pneumonia series, slice + lobe labels
CAP_FIRST, CAP_FILES = 89, 6  # instances 89..99 (every second): lesion and lesion-free slices
JPEG_SOURCE = "radiopaedia-4"  # a slices source: 8-bit JPEGs of another radiopaedia volume
JPEG_STEMS = tuple(f"radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm_{k}" for k in (1, 2, 3))
NEW_SOURCES: dict[str, Any] = {
    CAP_SOURCE: {"kind": "dicom", "labels": "slice_labels.csv", "role": "train"},
    JPEG_SOURCE: {
        "kind": "slices",
        "images": "images",
        "label": 1,
        "role": "train",
        "volume_pattern": r"^(?P<volume>.+)_(?P<index>\d+)$",
        "subsources": {"radiopaedia": {"rotate": -1}},
    },
}


def _add_source_folders(data: Path) -> None:
    """Step 1 of the recipe: the new sources' files under data/<name>/ (real files, copied)."""
    cap = data / CAP_SOURCE
    for src in series_files("cap001", CAP_FIRST, CAP_FILES):
        copy_file(src, cap / "cap001" / src.name)
    write_slice_labels(cap, ["cap001"])
    for stem in JPEG_STEMS:
        copy_file(SEG_SLICES / f"{stem}.jpg", data / JPEG_SOURCE / "images" / f"{stem}.jpg")


@pytest.fixture(scope="module")
def project_with_new_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_shared()
    project = make_project(tmp_path_factory.mktemp("recipe-source") / "project")
    build_tiny_data(project / "data")
    _add_source_folders(project / "data")
    _edit_params(project, lambda raw: raw["common"]["sources"].update(NEW_SOURCES))  # step 2
    return project


def test_recipe_add_a_data_source(project_with_new_sources: Path) -> None:
    from covseg.io import read_slice

    project = project_with_new_sources
    result = invoke_cli(project, "ingest", "--profile", "tiny")
    assert result.exit_code == 0, result.stderr
    manifest = pd.read_parquet(project / "artifacts" / "ingest" / MANIFEST)

    cap = manifest[manifest["dataset"] == CAP_SOURCE]
    assert len(cap) == CAP_FILES and set(cap["source"]) == {CAP_SOURCE} and set(cap["domain"]) == {"hu"}
    assert set(cap["label"]) == {0, 1}, "cap001 89..99 holds both labels"
    assert set(cap["lesion_left"]) | set(cap["lesion_right"]) <= {0, 1}, "lobe columns read"
    jpeg = manifest[manifest["dataset"] == JPEG_SOURCE]
    assert len(jpeg) == len(JPEG_STEMS) and set(jpeg["source"]) == {"radiopaedia"}  # the sub-source
    assert set(jpeg["label"]) == {1} and jpeg["volume_id"].nunique() == 1 and set(jpeg["domain"]) == {"8bit"}
    for row in jpeg.itertuples():  # the sub-source's rotate brought the slice to the radiological view
        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(project / "artifacts" / "ingest" / row.file)))
        np.testing.assert_array_equal(stored, np.rot90(read_slice(Path(row.raw_path)), -1))
    assert {"covid-ct-md", "covid19-ct-seg-slices", "medseg-100"} <= set(manifest["dataset"])  # kept

    gate = invoke_cli(project, "gate0", "--profile", "tiny")
    assert gate.exit_code == 0, gate.stderr
    assert (
        json.loads((project / "artifacts" / "gates" / "gate0.json").read_text(encoding="utf-8"))["success"]
        is True
    )


def test_recipe_slices_source_needs_subsources(tmp_path: Path) -> None:
    """The README's correction: `rotate` belongs to a sub-source, and a slices source without `subsources`
    refuses every file (here its first), naming the file."""
    require_shared()
    project = make_project(tmp_path / "project")
    build_tiny_data(project / "data")
    _add_source_folders(project / "data")
    flat = {**NEW_SOURCES[JPEG_SOURCE], "rotate": -1}
    del flat["subsources"]
    _edit_params(project, lambda raw: raw["common"]["sources"].update({JPEG_SOURCE: flat}))
    result = invoke_cli(project, "ingest", "--profile", "tiny")
    assert result.exit_code == 2
    first = project / "data" / JPEG_SOURCE / "images" / f"{JPEG_STEMS[0]}.jpg"
    assert f"error: {first}: file name matches no sub-source of []" in result.stderr


# ------------------------------------------------------------------------------------------------
# Recipe 2: change the Grad-CAM layer (params.yaml: coarse.layer, checked by covseg.camlayer)
# ------------------------------------------------------------------------------------------------


def test_recipe_change_the_gradcam_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from covseg.cam import grad_cam
    from covseg.camlayer import check_cam_layer, classifier_for, main
    from covseg.errors import InputError
    from covseg.io import read_slice

    require_shared()
    project = make_project(tmp_path / "project")
    monkeypatch.setenv("COVSEG_ROOT", str(project))
    monkeypatch.delenv("COVSEG_PROFILE", raising=False)
    assert main(["tiny"]) == 0  # step 1: list the usable layers and their map sizes
    listing = dict(line.split("\t")[:2] for line in capsys.readouterr().out.splitlines())
    assert listing["encoder.block3"] == "16x16"

    _edit_params(project, lambda raw: raw["common"]["coarse"].update(layer="encoder.block3"))  # step 2
    params = load_params("tiny")
    assert params["coarse"]["layer"] == "encoder.block3"
    assert check_cam_layer(params) == (16, 16)  # 64 px / 4
    size = params["image_size"]
    image = sitk.GetImageFromArray(read_slice(SEG_SLICES / f"{JPEG_STEMS[0]}.jpg").astype(np.float32))
    image = sitk.Resample(
        image,
        [size, size],
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        [n / size for n in image.GetSize()],
    )
    x = torch.as_tensor(sitk.GetArrayFromImage(image)[None, None] / 255.0)
    maps = grad_cam(classifier_for(params), x, params["coarse"]["layer"])  # the coarse stage's own call
    assert maps.shape == (1, size, size) and np.isfinite(maps).all()

    _edit_params(project, lambda raw: raw["common"]["coarse"].update(layer="encoder.blok3"))  # a typo
    with pytest.raises(InputError, match=r"coarse\.layer: 'encoder\.blok3' is no layer .*encoder\.block3"):
        check_cam_layer(load_params("tiny"))


# ------------------------------------------------------------------------------------------------
# Recipe 3: change the promotion rule (params.yaml: register.*; the rule is covseg.promotion.decide)
# ------------------------------------------------------------------------------------------------


def _decisions(params: dict[str, Any]) -> dict[tuple[str, str], tuple[str, str]]:
    """(alias, reason) per (champion seed, candidate seed) under `params`' register settings, called as the
    register stage calls the rule (margin, confidence and floors from params). The fixture records per-slice
    Dice only, so of the floors only the Dice floor is replayed."""
    from covseg.promotion import Candidate, Champion, decide

    cfg = params["register"]
    floors = {k: v for k, v in cfg["floors"].items() if k == "dice"}
    seeds = {
        s: tuple(d)
        for s, d in json.loads(SEEDS_FIXTURE.read_text(encoding="utf-8"))["per_slice_dice"].items()
    }
    out = {}
    for champ, cand in itertools.permutations(seeds, 2):
        mean = float(np.mean(seeds[cand]))
        candidate = Candidate(cand, mean, seeds[cand], {"dice": mean})
        champion = Champion(champ, float(np.mean(seeds[champ])), seeds[champ])
        decision = decide(
            candidate, champion, margin=cfg["margin"], floors=floors, confidence=cfg["confidence"]
        )
        out[champ, cand] = (decision.alias, decision.reason)
    return out


def test_recipe_change_the_promotion_rule(tmp_path: Path) -> None:
    from covseg.registry import CHALLENGER, CHAMPION

    seeds = json.loads(SEEDS_FIXTURE.read_text(encoding="utf-8"))["per_slice_dice"]
    project = make_project(tmp_path / "project", profile="quick")
    before = _decisions(load_params(path=project / "params.yaml"))
    assert len(before) == 6 and all(
        alias == CHALLENGER and "does not clear margin 0.0230" in reason for alias, reason in before.values()
    ), "as shipped, seed noise never promotes"

    def looser(raw: dict[str, Any]) -> None:  # no margin, a 90 % interval
        raw["common"]["register"].update(margin=0.0, confidence=0.90)

    _edit_params(project, looser)
    after = _decisions(load_params(path=project / "params.yaml"))
    promoted = [pair for pair, (alias, _) in after.items() if alias == CHAMPION]
    assert promoted, "the looser rule promotes some seed over another"
    for champ, cand in promoted:  # ... only a seed whose mean Dice is higher, on a 90 % interval
        assert np.mean(seeds[cand]) > np.mean(seeds[champ]) and "90% CI" in after[champ, cand][1]

    def floor_above_every_seed(raw: dict[str, Any]) -> None:
        raw["quick"]["register"]["floors"]["dice"] = 0.9

    _edit_params(project, floor_above_every_seed)
    stricter = _decisions(load_params(path=project / "params.yaml"))
    assert all(alias == CHALLENGER and "fails floors: dice=" in reason for alias, reason in stricter.values())
