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
