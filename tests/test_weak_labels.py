"""Lobe-level weak labels: read strictly, turned into per-lung labels, and honoured by the fine labels.

A clean lung on a positive slice is a negative from the same patient, scanner and slice height; these tests
check the chain of that claim on the real COVID-CT-MD table and the real tiny run's arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import require_shared

from covseg.errors import InputError
from covseg.harmonise import INDEX, SLICES
from covseg.ingest import UNKNOWN, _read_labels
from covseg.lungs import SIDE_LEFT, SIDE_RIGHT, split_sides
from covseg.prior import allowed_lungs

HEADER = "case,instance_number,lesion,lesion_LLL,lesion_LUL,lesion_RLL,lesion_RML,lesion_RUL\n"


def _table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slice_labels.csv"
    path.write_text(text)
    return path


def test_real_table_gives_one_clean_lung_on_most_p001_positives() -> None:
    labels = _read_labels(require_shared() / "covid-ct-md" / "slice_labels.csv", "instance_number")
    p001 = [v for (case, _), v in labels.items() if case == "P001" and v.lesion == 1]
    assert len(p001) == 80  # the dataset README's count
    assert sum(v.left != v.right for v in p001) == 67
    assert all(v.left == v.right == 0 for v in labels.values() if v.lesion == 0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("P,1,1,0,0,0,0,0\n", "lobe columns say 0"),  # a lesion slice with every lobe clean
        ("P,1,0,1,0,0,0,0\n", "lobe columns say 1"),  # a clean slice with a lesion lobe
        ("P,1,1,2,0,0,0,0\n", "must be 0 or 1"),
    ],
)
def test_contradicting_lobe_labels_are_refused(tmp_path: Path, row: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        _read_labels(_table(tmp_path, HEADER + row), "instance_number")


def test_lobe_columns_are_all_or_none(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="all or none"):
        _read_labels(_table(tmp_path, "case,instance_number,lesion,lesion_LLL\nP,1,1,1\n"), "instance_number")
    plain = _read_labels(_table(tmp_path, "case,instance_number,lesion\nP,1,1\n"), "instance_number")
    assert plain[("P", 1)].left == plain[("P", 1)].right == UNKNOWN


def test_split_sides_cuts_at_the_mediastinum_of_real_ct(trained_tiny) -> None:
    lungs = trained_tiny.stage("lungs")
    arrays, index = np.load(lungs / SLICES), pd.read_parquet(lungs / INDEX)
    hu = index[(index["domain"] == "hu") & (index["lung_fraction"] > 0.05)]["row"].to_numpy()
    assert len(hu) > 0
    for row in hu:
        sides = arrays["side"][row]
        assert np.array_equal(sides, split_sides(arrays["lung"][row]))  # what the lungs stage stored
        right, left = (sides == SIDE_RIGHT).sum(), (sides == SIDE_LEFT).sum()
        assert 0.33 < right / max(left, 1) < 3.0, (row, right, left)  # two lungs, not one and a sliver
        columns = np.nonzero(sides == SIDE_RIGHT)[1].max(), np.nonzero(sides == SIDE_LEFT)[1].min()
        assert columns[0] < columns[1]  # the patient's right lung on the image's left


def test_allowed_lungs_drop_the_clean_lung_only() -> None:
    lung = np.zeros((3, 8, 8), dtype=bool)
    lung[:, 2:6, 1:3] = lung[:, 2:6, 5:7] = True
    sides = np.stack([split_sides(m) for m in lung])
    rows = pd.DataFrame({"lesion_left": [0, 1, UNKNOWN], "lesion_right": [1, 0, UNKNOWN]})
    allowed = allowed_lungs(lung, sides, rows)
    assert np.array_equal(allowed[0], lung[0] & (sides[0] == SIDE_RIGHT))
    assert np.array_equal(allowed[1], lung[1] & (sides[1] == SIDE_LEFT))
    assert np.array_equal(allowed[2], lung[2])  # no lobe labels: both lungs may hold lesions


def test_fine_labels_leave_clean_lungs_empty(trained_tiny) -> None:
    lungs, mil = trained_tiny.stage("lungs"), trained_tiny.stage("mil")
    sides, index = np.load(lungs / SLICES)["side"], pd.read_parquet(lungs / INDEX)
    fine = np.load(mil / "fine.npz")["fine"]
    checked = 0
    for side, column in ((SIDE_RIGHT, "lesion_right"), (SIDE_LEFT, "lesion_left")):
        for row in index[(index["label"] == 1) & (index[column] == 0)]["row"]:
            assert not (fine[row] & (sides[row] == side)).any(), row
            checked += 1
    assert checked > 0, "the tiny tree has positives with a clean lung"
