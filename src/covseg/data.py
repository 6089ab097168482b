"""Import raw CT sources into the project's DVC-tracked `data/` folder (copy, verify, `dvc add`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tqdm import tqdm

from covseg.io import InputError, atomic_dir, sha256_file


def import_sources(source: str | Path, data_dir: str | Path, track: bool = True) -> int:
    """Copy every file under `source` into `data_dir` (all or nothing), verify hashes, and `dvc add` it.

    The source is only read. Returns the number of files copied.
    """
    source, data_dir = Path(source).resolve(), Path(data_dir)
    if not source.is_dir():
        raise InputError(source, "source folder not found")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise InputError(source, "source folder is empty")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise InputError(data_dir, "already holds data; remove it first or import into another folder")
    with atomic_dir(data_dir) as scratch:
        for path in tqdm(files, desc="import", unit="file", disable=None):
            target = scratch / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            if sha256_file(target) != sha256_file(path):
                raise InputError(path, "copy does not match its source (disk error?)")
    if track:
        dvc_add(data_dir)
    return len(files)


def dvc_add(data_dir: Path) -> None:
    """Track `data_dir` with DVC (writes `<data_dir>.dvc`); a no-op outside a DVC repository."""
    root = data_dir.resolve().parent
    if not (root / ".dvc").is_dir():
        return
    subprocess.run(["dvc", "add", "--quiet", data_dir.name], cwd=root, check=True)
