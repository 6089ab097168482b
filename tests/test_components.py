"""Each KFP component's own function (`component.python_func`), called here as the KFP executor calls it:
artifacts as `dsl.Dataset` / `dsl.Model` / `dsl.Metrics` objects on real folders, the other inputs as the
strings the pipeline passes. Inputs are the real tiny-profile outputs of the session's `trained_tiny` chain.
(No ``from __future__ import annotations``: kfp reads the component's annotations as real types.)
"""

import json
import math
from pathlib import Path
from typing import Any

import pytest
from kfp import dsl

from components.classify import classify
from components.gate0 import gate0
from components.gate_a import gate_a
from components.gate_b import gate_b
from covseg.errors import GateFailed

# Tiny labels come from one epoch of training: their areas may be anything, which is not what these
# tests are about (as in test_pipeline.TINY_OVERRIDES).
LENIENT = {
    "gate_a": {"area_min": 0.0, "area_max": 1.0, "max_empty_share": 1.0},
    "gate_b": {"area_min": 0.0, "area_max": 1.0, "max_empty_share": 1.0},
}


def _params(trained_tiny: Any, **sections: dict[str, Any]) -> str:
    params = json.loads(json.dumps(trained_tiny.params))
    for name, values in {**LENIENT, **sections}.items():
        params[name] = {**params[name], **values}
    return json.dumps(params)


def _report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_gate0_component_passes_real_manifest_and_logs_its_checks(trained_tiny: Any, tmp_path: Path) -> None:
    report, metrics = dsl.Artifact(uri=str(tmp_path / "report")), dsl.Metrics(uri=str(tmp_path / "metrics"))
    gate0.python_func(
        ingested=dsl.Dataset(uri=str(trained_tiny.stage("ingest"))),
        params_json=json.dumps(trained_tiny.params),
        report=report,
        metrics=metrics,
    )
    body = _report(tmp_path / "report")
    assert body["success"] is True and body["failures"] == []
    assert metrics.metadata == {"expectations": float(len(body["checks"])), "passed": 1.0}
    assert len(body["checks"]) >= 5


def test_gate0_component_fails_the_task_on_an_out_of_range_manifest(
    trained_tiny: Any, tmp_path: Path
) -> None:
    """Spacing bounds that the real CT slices cannot meet: the task raises, and says why in its report."""
    params = _params(trained_tiny, gate0={"spacing_min_mm": 50.0, "spacing_max_mm": 60.0})
    report, metrics = dsl.Artifact(uri=str(tmp_path / "report")), dsl.Metrics(uri=str(tmp_path / "metrics"))
    with pytest.raises(GateFailed, match="gate gate0 failed"):
        gate0.python_func(
            ingested=dsl.Dataset(uri=str(trained_tiny.stage("ingest"))),
            params_json=params,
            report=report,
            metrics=metrics,
        )
    body = _report(tmp_path / "report")
    assert body["success"] is False and any("spacing" in failure for failure in body["failures"])
    assert metrics.metadata == {}, "a failed gate logs no pass"


# The tiny chain has no validation slices, so its quality numbers (validation AUC, MIL instance accuracy)
# are NaN; the label-area ceiling is what these tests move (tiny coarse labels cover ~0.6 of the lung,
# fine labels ~0.04).


@pytest.mark.parametrize("area_max, passes", [(1.0, True), (0.1, False)])
def test_gate_a_component_applies_the_coarse_label_area_ceiling(
    trained_tiny: Any, tmp_path: Path, area_max: float, passes: bool
) -> None:
    params = _params(trained_tiny, gate_a={"area_max": area_max})
    report, metrics = dsl.Artifact(uri=str(tmp_path / "report")), dsl.Metrics(uri=str(tmp_path / "metrics"))
    kwargs = {
        "classifier": dsl.Model(uri=str(trained_tiny.stage("classify"))),
        "coarse_labels": dsl.Dataset(uri=str(trained_tiny.stage("coarse"))),
        "params_json": params,
        "report": report,
        "metrics": metrics,
    }
    if passes:
        gate_a.python_func(**kwargs)
        assert metrics.metadata["passed"] == 1.0
    else:
        with pytest.raises(GateFailed, match="gate gate_a failed"):
            gate_a.python_func(**kwargs)
    body = _report(tmp_path / "report")
    assert body["success"] is passes
    assert [f.split(": observed")[0] for f in body["failures"]] == (
        []
        if passes
        else [
            f"labels: ExpectColumnMeanToBeBetween(column=area_fraction_of_lung, min_value=0.0, max_value={area_max})"
        ]
    )


@pytest.mark.parametrize("area_max, passes", [(1.0, True), (0.01, False)])
def test_gate_b_component_applies_the_fine_label_area_ceiling(
    trained_tiny: Any, tmp_path: Path, area_max: float, passes: bool
) -> None:
    params = _params(trained_tiny, gate_b={"area_max": area_max})
    report, metrics = dsl.Artifact(uri=str(tmp_path / "report")), dsl.Metrics(uri=str(tmp_path / "metrics"))
    kwargs = {
        "fine_labels": dsl.Dataset(uri=str(trained_tiny.stage("mil"))),
        "params_json": params,
        "report": report,
        "metrics": metrics,
    }
    if passes:
        gate_b.python_func(**kwargs)
        assert metrics.metadata["passed"] == 1.0
    else:
        with pytest.raises(GateFailed, match="gate gate_b failed"):
            gate_b.python_func(**kwargs)
    body = _report(tmp_path / "report")
    assert body["success"] is passes
    assert [f.split(": observed")[0] for f in body["failures"]] == (
        []
        if passes
        else [
            f"labels: ExpectColumnMeanToBeBetween(column=area_fraction_of_lung, min_value=0.0, max_value={area_max})"
        ]
    )


def test_classify_component_trains_and_logs_what_the_stage_reports(
    trained_tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny profile through the training component: its output folder, its KFP metrics, its checkpoints."""
    monkeypatch.setenv("COVSEG_TRACKING", "0")  # the component sets it (empty URI); the monkeypatch restores
    classifier, metrics = (
        dsl.Model(uri=str(tmp_path / "classifier")),
        dsl.Metrics(uri=str(tmp_path / "metrics")),
    )
    checkpoint_root = tmp_path / "pipeline-root" / "checkpoints"
    classify.python_func(
        slices=dsl.Dataset(uri=str(trained_tiny.stage("lungs"))),
        params_json=json.dumps(trained_tiny.params),
        mlflow_tracking_uri="",
        data_version="",
        checkpoint_root=str(checkpoint_root),
        s3_endpoint_url="",
        classifier=classifier,
        metrics=metrics,
    )
    result = json.loads((tmp_path / "classifier" / "metrics.json").read_text())
    assert (tmp_path / "classifier" / "classifier.pt").is_file()
    assert len(result["history"]) == trained_tiny.params["classify"]["epochs"]
    assert (
        metrics.metadata["n_train"] == result["n_train"] > 0 and metrics.metadata["n_val"] == result["n_val"]
    )
    assert all(math.isfinite(value) for value in metrics.metadata.values()), (
        "NaN (no validation slice) is left out"
    )
    assert [p for p in checkpoint_root.rglob("*") if p.is_file()] == [], "finished: no checkpoint left"
    # The same training as the stage function the CLI binds: the component adds no logic of its own.
    expected = json.loads((trained_tiny.stage("classify") / "metrics.json").read_text())
    assert result["history"] == expected["history"] and result["val_auc"] == expected["val_auc"]
