"""The pipeline stages: pure file-in / file-out functions.

The CLI (`covseg <stage>`), `dvc.yaml` and the KFP components in `components/` are thin bindings of these
functions; tests call them directly. Each stage writes its output folder atomically (all or nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from covseg import gates
from covseg import ingest as ingest_mod
from covseg.io import atomic_dir


def ingest(data_dir: str | Path, out_dir: str | Path, params: dict[str, Any]) -> pd.DataFrame:
    """Raw sources -> canonical cases + manifest (`out_dir/manifest.parquet`)."""
    with atomic_dir(out_dir) as scratch:
        return ingest_mod.ingest(data_dir, scratch, params)


def gate0(ingest_dir: str | Path, report: str | Path, params: dict[str, Any]) -> dict:
    """Gate 0 on the manifest; raises GateFailed (and writes the report) when the raw data is unfit."""
    manifest = pd.read_parquet(Path(ingest_dir) / ingest_mod.MANIFEST)
    return gates.run_gate("gate0", gates.gate0_tables(manifest), gates.gate0_checks(params), report)


def _write_json(path: Path, body: dict) -> None:
    import json

    path.write_text(json.dumps(body, indent=2, default=float))


def lungs(ingest_dir: str | Path, out_dir: str | Path, params: dict[str, Any]) -> pd.DataFrame:
    """Lung masks + harmonised canonical slices (`slices.npz`, `index.parquet`)."""
    from covseg.harmonise import prepare_dataset

    with atomic_dir(out_dir) as scratch:
        return prepare_dataset(ingest_dir, scratch, params)


def classify(lungs_dir: str | Path, out_dir: str | Path, params: dict[str, Any],
             checkpoint_dir: str | Path) -> dict:
    """Train the slice classifier; `metrics.json` holds validation AUC per source and the source probe."""
    from covseg.classify import train_classifier

    with atomic_dir(out_dir) as scratch:
        result = train_classifier(lungs_dir, scratch, params, checkpoint_dir)
        _write_json(scratch / "metrics.json", result)
    return result


def coarse(lungs_dir: str | Path, classify_dir: str | Path, out_dir: str | Path,
           params: dict[str, Any]) -> pd.DataFrame:
    """Grad-CAM coarse labels (`coarse.npz`) and their per-slice statistics (`coarse.parquet`)."""
    from covseg.cam import coarse_labels

    with atomic_dir(out_dir) as scratch:
        return coarse_labels(lungs_dir, classify_dir, scratch, params)


def mil(lungs_dir: str | Path, classify_dir: str | Path, coarse_dir: str | Path, out_dir: str | Path,
        params: dict[str, Any], checkpoint_dir: str | Path) -> dict:
    """MIL refinement (easy -> hard) -> fine labels (`fine.npz`, `fine.parquet`, `metrics.json`)."""
    from covseg.mil import train_mil

    with atomic_dir(out_dir) as scratch:
        result = train_mil(lungs_dir, classify_dir, coarse_dir, scratch, params, checkpoint_dir)
        _write_json(scratch / "metrics.json", result)
    return result


def segment(lungs_dir: str | Path, mil_dir: str | Path, out_dir: str | Path, params: dict[str, Any],
            checkpoint_dir: str | Path) -> dict:
    """Train the U-Net on the fine labels (`segmenter.pt`)."""
    from covseg.segment import train_segmenter

    with atomic_dir(out_dir) as scratch:
        result = train_segmenter(lungs_dir, mil_dir, scratch, params, checkpoint_dir)
        _write_json(scratch / "metrics.json", result)
    return result


def evaluate(ingest_dir: str | Path, lungs_dir: str | Path, coarse_dir: str | Path, mil_dir: str | Path,
             segment_dir: str | Path, out_dir: str | Path, params: dict[str, Any]) -> dict:
    """Table-1 rows (coarse / fine / final) on the evaluation slices (`metrics.json`)."""
    from covseg.evaluate import evaluate_pipeline

    with atomic_dir(out_dir) as scratch:
        table = evaluate_pipeline(ingest_dir, lungs_dir, coarse_dir, mil_dir, segment_dir)
        _write_json(scratch / "metrics.json", table)
    return table
