"""The one stage table: each stage's name, the artifacts it reads, what it writes, whether it trains.

The CLI's `covseg run`, the test fixtures and the bench scripts run stages through `run_stage` /
`run_all`; `dvc.yaml` and the KFP graph (`pipelines/train_pipeline.py`) are checked against `STAGES` by
tests/test_layout.py. Functions live in `covseg.stages` under the stage's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = "data"
"""The input name that means the raw data folder (not an artifact)."""


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: `covseg.stages.<name>(*inputs, output, params[, checkpoints])`."""

    name: str
    inputs: tuple[str, ...]
    output: str | None
    """Artifact path under the artifacts folder (a folder, or a gate's JSON report); None: writes none."""
    trains: bool = False
    """Takes the checkpoint folder (epoch checkpoints; a killed run resumes)."""


STAGES: tuple[Stage, ...] = (
    Stage("ingest", (DATA,), "ingest"),
    Stage("gate0", ("ingest",), "gates/gate0.json"),
    Stage("lungs", ("ingest",), "lungs"),
    Stage("classify", ("lungs",), "classify", trains=True),
    Stage("coarse", ("lungs", "classify"), "coarse"),
    Stage("gate_a", ("classify", "coarse"), "gates/gate_a.json"),
    Stage("mil", ("lungs", "classify", "coarse"), "mil", trains=True),
    Stage("gate_b", ("mil",), "gates/gate_b.json"),
    Stage("segment", ("lungs", "mil"), "segment", trains=True),
    Stage("refine", ("lungs", "coarse", "mil", "segment"), "refine", trains=True),
    Stage("evaluate", ("ingest", "lungs", "coarse", "mil", "segment", "refine"), "evaluate"),
    Stage("register", ("ingest", "refine"), None),
)
CHECKPOINTS = "checkpoints"


def stage(name: str) -> Stage:
    """The stage called `name` (KeyError naming the known stages otherwise)."""
    for item in STAGES:
        if item.name == name:
            return item
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def run_stage(name: str, artifacts: str | Path, data: str | Path, params: dict[str, Any]) -> Any:
    """Run one stage on the artifacts folder (inputs read from it, output written into it)."""
    from covseg import stages

    item, artifacts = stage(name), Path(artifacts)
    args: list[Any] = [Path(data) if i == DATA else artifacts / i for i in item.inputs]
    if item.output is not None:
        args.append(artifacts / item.output)
    args.append(params)
    if item.trains:
        args.append(artifacts / CHECKPOINTS)
    return getattr(stages, name)(*args)


def run_all(
    artifacts: str | Path,
    data: str | Path,
    params: dict[str, Any],
    until: str = "evaluate",
    start: str = "ingest",
) -> dict[str, Any]:
    """Run the stages from `start` to `until` (inclusive) in order; returns each stage's result."""
    names = [s.name for s in STAGES]
    return {
        name: run_stage(name, artifacts, data, params)
        for name in names[names.index(start) : names.index(until) + 1]
    }
