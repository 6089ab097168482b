"""The one stage table: each stage's name, the artifacts it reads, what it writes, whether it trains.

The CLI's `covseg run` follows its order; the test fixtures and the bench scripts run stages through
`covseg.stages.run_stage` / `run_all`; `dvc.yaml` and the KFP graph (`pipelines/train_pipeline.py`) are
checked against `STAGES` by tests/test_layout.py. Functions live in `covseg.stages` under the stage's name.
Below the table: the file names each stage writes inside its output folder, so that no stage module imports
another for a file name. This module imports nothing of covseg.
"""

from __future__ import annotations

from dataclasses import dataclass

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

# Artifact file names, one place: what each stage writes inside its output folder.
MANIFEST = "manifest.parquet"
"""ingest: one row per slice."""
SLICES, INDEX = "slices.npz", "index.parquet"
"""lungs: the canonical slices (image, lung, side) and their index."""
CLASSIFIER = "classifier.pt"
"""classify: the view classifier's weights (+ JSON metadata beside it)."""
CAM_MAPS, CAM_STATS = "coarse.npz", "coarse.parquet"
"""coarse: Grad-CAM maps and coarse labels; per-slice statistics."""
MIL_MODEL, FINE_LABELS, FINE_STATS = "mil.pt", "fine.npz", "fine.parquet"
"""mil: the MIL network; the fine labels (+ patch-score maps); their statistics."""
SEGMENTER = "segmenter.pt"
"""segment and refine: the U-Net's weights (+ JSON metadata beside it)."""
ROUNDS, REFINED_LABELS = "rounds.json", "labels.npz"
"""refine: the per-round record; the last round's labels."""


def stage(name: str) -> Stage:
    """The stage called `name` (KeyError naming the known stages otherwise)."""
    for item in STAGES:
        if item.name == name:
            return item
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")
