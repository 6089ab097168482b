"""Gate 0 (Great Expectations) on a real tiny ingest: passes as is, stops each kind of unfit raw data."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from helpers import build_tiny_data, error_lines, invoke_cli, make_project, tiny_params

from covseg import stages
from covseg.gates import GateFailed
from covseg.ingest import MANIFEST

Mutation = Callable[[pd.DataFrame], pd.DataFrame]


@pytest.fixture(scope="module")
def ingest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny ingest (never modified: each test copies its manifest)."""
    root = tmp_path_factory.mktemp("gate0")
    out = root / "ingest"
    stages.ingest(build_tiny_data(root / "data"), out, tiny_params())
    return out


def _copy_with(ingest_dir: Path, target: Path, mutate: Mutation) -> Path:
    target.mkdir(parents=True)
    manifest = pd.read_parquet(ingest_dir / MANIFEST)
    mutate(manifest.copy()).to_parquet(target / MANIFEST, index=False)
    (target / "cases").symlink_to(ingest_dir / "cases")
    return target


def _first(frame: pd.DataFrame, column: str, value: str) -> int:
    return int(frame.index[frame[column] == value][0])


def _hu_outlier(m: pd.DataFrame) -> pd.DataFrame:
    m.loc[_first(m, "domain", "hu"), "pix_max"] = 40000.0
    return m


def _label_two(m: pd.DataFrame) -> pd.DataFrame:
    m.loc[_first(m, "role", "train"), "label"] = 2
    return m


def _volume_in_two_splits(m: pd.DataFrame) -> pd.DataFrame:
    m.loc[_first(m, "volume_id", "covid-ct-md__P001"), "split"] = "val"
    return m


def _duplicate_across_splits(m: pd.DataFrame) -> pd.DataFrame:
    # normal001 goes to val as a whole volume (no per-volume leak); one of its files has a P001 twin.
    normal = m["volume_id"] == "covid-ct-md__normal001"
    m.loc[normal, "split"] = "val"
    m.loc[m.index[normal][0], "sha256"] = m.loc[_first(m, "volume_id", "covid-ct-md__P001"), "sha256"]
    return m


def _nan_pixels(m: pd.DataFrame) -> pd.DataFrame:
    m.loc[_first(m, "domain", "8bit"), "nan_count"] = 7
    return m


def _eval_label_leak(m: pd.DataFrame) -> pd.DataFrame:
    m.loc[_first(m, "role", "eval"), "label"] = 1
    return m


def _slice_spacing(m: pd.DataFrame) -> pd.DataFrame:
    m.loc[m["volume_id"] == "covid-ct-md__P001", "spacing_z"] = 25.0
    return m


def _duplicate_case(m: pd.DataFrame) -> pd.DataFrame:
    m.loc[1, "case_id"] = m.loc[0, "case_id"]
    return m


CASES = {
    "hu-pix-max-40000": (_hu_outlier, "hu: ExpectColumnValuesToBeBetween(column=pix_max, max_value=4000)"),
    "label-2": (_label_two, "labelled: ExpectColumnValuesToBeInSet(column=label, value_set=[0, 1])"),
    "volume-in-two-splits": (
        _volume_in_two_splits,
        "volumes: ExpectColumnMaxToBeBetween(column=n_splits, max_value=1)",
    ),
    "duplicate-hash-across-splits": (
        _duplicate_across_splits,
        "hashes: ExpectColumnMaxToBeBetween(column=n_splits, max_value=1)",
    ),
    "nan-count": (
        _nan_pixels,
        "slices: ExpectColumnValuesToBeBetween(column=nan_count, min_value=0, max_value=0)",
    ),
}
# Three more faults at once (one gate run): each must be named, and nothing else.
MORE = {
    "eval: ExpectColumnValuesToBeInSet(column=label, value_set=[-1])": _eval_label_leak,
    "hu: ExpectColumnValuesToBeBetween(column=spacing_z, min_value=0.2, max_value=10.0)": _slice_spacing,
    "slices: ExpectColumnValuesToBeUnique(column=case_id)": _duplicate_case,
}


def test_gate0_passes_on_real_tiny_ingest(ingest_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "gates" / "gate0.json"
    result = stages.gate0(ingest_dir, report, tiny_params())
    body = json.loads(report.read_text())
    assert result["success"] is body["success"] is True and body["failures"] == []
    assert body["gate"] == "gate0" and len(body["checks"]) == 15
    assert all(check["success"] for check in body["checks"])
    assert {check["check"].split(":")[0] for check in body["checks"]} == {
        "slices",
        "hu",
        "8bit",
        "labelled",
        "eval",
        "hashes",
        "volumes",
    }


@pytest.mark.parametrize("case", list(CASES))
def test_gate0_stops_unfit_data(case: str, ingest_dir: Path, tmp_path: Path) -> None:
    mutate, expectation = CASES[case]
    bad = _copy_with(ingest_dir, tmp_path / "ingest", mutate)
    report = tmp_path / "gates" / "gate0.json"
    with pytest.raises(GateFailed) as info:
        stages.gate0(bad, report, tiny_params())
    assert len(info.value.failures) == 1, info.value.failures  # exactly the intended expectation
    assert info.value.failures[0].startswith(f"{expectation}: "), info.value.failures
    assert expectation in str(info.value) and str(report) in str(info.value)
    body = json.loads(report.read_text())
    assert body["success"] is False
    assert body["failures"] == info.value.failures
    assert [c["check"] for c in body["checks"] if not c["success"]] == [expectation]
    assert not list(report.parent.glob(".gate0.json.*")), "temporary report file left behind"


def test_gate0_names_every_failed_expectation(ingest_dir: Path, tmp_path: Path) -> None:
    def mutate(m: pd.DataFrame) -> pd.DataFrame:
        for fault in MORE.values():
            m = fault(m)
        return m

    bad = _copy_with(ingest_dir, tmp_path / "ingest", mutate)
    report = tmp_path / "gate0.json"
    with pytest.raises(GateFailed) as info:
        stages.gate0(bad, report, tiny_params())
    assert sorted(f.split(": ", 2)[0] + ": " + f.split(": ", 2)[1] for f in info.value.failures) == sorted(
        MORE
    )
    body = json.loads(report.read_text())
    assert body["success"] is False and sorted(
        c["check"] for c in body["checks"] if not c["success"]
    ) == sorted(MORE)


def test_gate0_cli_pass_then_fail(ingest_dir: Path, tmp_path: Path) -> None:
    """`covseg gate0` in a tmp project: exit 0 and a report; then exit 2, one error line, report success false."""
    project = make_project(tmp_path / "project")
    shutil.copytree(ingest_dir, project / "artifacts" / "ingest", symlinks=True)
    report = project / "artifacts" / "gates" / "gate0.json"
    ok = invoke_cli(project, "gate0", "--profile", "tiny")
    assert ok.exit_code == 0, ok.stderr
    assert "gate0 passed" in ok.stdout and json.loads(report.read_text())["success"] is True

    manifest_path = project / "artifacts" / "ingest" / MANIFEST
    _hu_outlier(pd.read_parquet(manifest_path)).to_parquet(manifest_path, index=False)
    bad = invoke_cli(project, "gate0", "--profile", "tiny")
    assert bad.exit_code == 2
    lines = error_lines(bad.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: gate gate0 failed (1 expectation(s))")
    assert "pix_max" in bad.stderr and str(report) in lines[0]
    assert json.loads(report.read_text())["success"] is False
