"""The one stage table (`covseg.layout.STAGES`) against its bindings: `dvc.yaml`, the compiled KFP graph and
the CLI's `covseg run` order. A stage added, renamed or rewired in one place and not the others fails here."""

from __future__ import annotations

from pathlib import Path

import yaml

from covseg.cli import STAGE_COMMANDS, main
from covseg.layout import DATA, STAGES, stage

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_dvc_stages_follow_the_table() -> None:
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    written = [s for s in STAGES if s.output is not None]
    assert list(dvc) == [s.name for s in written], (
        "dvc.yaml stages, in order, are the table's stages with output"
    )
    for item in written:
        deps = set(dvc[item.name]["deps"])
        for name in item.inputs:
            assert (DATA if name == DATA else f"artifacts/{name}") in deps, (item.name, name)
        outs = list(dvc[item.name].get("outs", [])) + [
            next(iter(m)) for m in dvc[item.name].get("metrics", [])
        ]
        assert any(
            o == f"artifacts/{item.output}" or o.startswith(f"artifacts/{item.output}/") for o in outs
        ), item


def test_pipeline_tasks_are_wired_as_the_table() -> None:
    """Read from the golden compiled pipeline (tests/test_pipeline.py keeps it equal to a fresh compile)."""
    spec = next(yaml.safe_load_all((REPO_ROOT / "pipelines" / "train_pipeline.yaml").read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {s.name.replace("_", "-") for s in STAGES}
    for item in STAGES:
        artifacts = tasks[item.name.replace("_", "-")].get("inputs", {}).get("artifacts", {})
        producers = {
            a["taskOutputArtifact"]["producerTask"] for a in artifacts.values() if "taskOutputArtifact" in a
        }
        expected = {i.replace("_", "-") for i in item.inputs if i != DATA}
        assert producers == expected, (item.name, producers, expected)


def test_cli_run_follows_the_table() -> None:
    for item in STAGES:
        assert STAGE_COMMANDS.get(item.name, item.name.replace("_", "-")) in main.commands, item.name
    assert stage("refine").inputs == ("lungs", "coarse", "mil", "segment")
