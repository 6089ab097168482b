"""Table-1 metrics on hand-countable masks."""

from __future__ import annotations

import numpy as np
import pytest

from covseg.metrics import adaptive_threshold, slice_metrics, summarise


def test_slice_metrics_match_hand_counts() -> None:
    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:6] = True  # 16 px
    pred = np.zeros((10, 10), bool)
    pred[4:8, 4:8] = True  # 16 px, 4 overlap
    m = slice_metrics(pred, truth)
    assert m["dice"] == pytest.approx(2 * 4 / 32)
    assert m["iou"] == pytest.approx(4 / 28)
    assert m["ppv"] == pytest.approx(4 / 16)
    assert m["sensitivity"] == pytest.approx(4 / 16)
    assert m["specificity"] == pytest.approx((100 - 28) / (100 - 16))


def test_empty_cases() -> None:
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert slice_metrics(empty, empty)["dice"] == 1.0
    missed = slice_metrics(empty, full)
    assert missed["ppv"] == 0.0 and missed["dice"] == 0.0 and missed["sensitivity"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        slice_metrics(empty, np.zeros((5, 4), bool))


def test_summary_and_adaptive_threshold() -> None:
    prob = np.zeros((10, 10), np.float32)
    prob[:5] = 0.3  # mean 0.15 -> adaptive threshold 0.3 keeps the top half, 0.5 keeps nothing
    truth = np.zeros((10, 10), bool)
    truth[:5] = True
    assert adaptive_threshold(prob) == pytest.approx(0.3)
    result = summarise([prob], [truth])
    assert result["dice"] == 0.0 and result["adaptive"]["dice"] == pytest.approx(1.0)
    assert result["n_slices"] == 1 and result["adaptive"]["n_slices"] == 1
    assert adaptive_threshold(np.ones((3, 3))) == 1.0
