"""Ingest: every raw source under data/ -> one canonical dataset (per-case NIfTI + a Parquet manifest).

Rows are slices. Each row says where the slice came from (source, volume, index), its weak label
(1, 0, or -1 = unknown), its intensity domain (`hu` or `8bit`), its geometry and hash, and its split. Splits
are drawn per volume (never per slice), deterministically from a salted hash, and stratified so that the
validation volumes of a source hold both labels when the source has both. Evaluation sources (slices with
pixel masks) get split `eval` and label -1: their masks never reach training.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from covseg.io import (
    SLICE_SUFFIXES,
    VOLUME_SUFFIXES,
    InputError,
    read_dicom_series,
    read_mask,
    read_slice,
    read_volume,
    sha256_file,
)
from covseg.layout import MANIFEST

UNKNOWN = -1


@dataclass
class SliceRow:
    """One manifest row (see the module docstring)."""

    case_id: str
    dataset: str
    source: str
    volume_id: str
    slice_index: int
    label: int
    domain: str
    spacing_x: float
    spacing_y: float
    spacing_z: float
    height: int
    width: int
    file: str
    z: int
    sha256: str
    raw_path: str
    pix_min: float
    pix_max: float
    pix_mean: float
    nan_count: int
    mask_file: str = ""
    role: str = "train"
    split: str = field(default="")
    lesion_left: int = UNKNOWN
    """Lesion in the patient's left lung (lobe labels LUL/LLL): 1, 0, or -1 = not labelled per lobe."""
    lesion_right: int = UNKNOWN
    """Lesion in the patient's right lung (RUL/RML/RLL): 1, 0, or -1."""


def _slice_stats(array: np.ndarray) -> dict[str, float]:
    finite = np.isfinite(array)
    values = array[finite] if not finite.all() else array
    return {
        "pix_min": float(values.min()),
        "pix_max": float(values.max()),
        "pix_mean": float(values.mean()),
        "nan_count": int((~finite).sum()),
    }


LOBES = {"left": ("lesion_LUL", "lesion_LLL"), "right": ("lesion_RUL", "lesion_RML", "lesion_RLL")}
"""Lobe label columns of a slice label table, by the patient's lung they belong to."""


@dataclass(frozen=True)
class SliceLabel:
    """A slice's weak labels: the slice label, and per lung when the table has lobe columns (else -1)."""

    lesion: int
    left: int = UNKNOWN
    right: int = UNKNOWN


def _lung_labels(row: dict[str, str], lesion: int, where: str) -> tuple[int, int]:
    """(left, right) lung labels from the lobe columns of one row; refuses a row that contradicts itself."""
    sides = []
    for lobes in LOBES.values():
        values = [int(row[c]) for c in lobes]
        if any(v not in (0, 1) for v in values):
            raise ValueError(f"{where}: lobe labels must be 0 or 1, got {values}")
        sides.append(max(values))
    if max(sides) != lesion:
        raise ValueError(
            f"{where}: lesion={lesion} but the lobe columns say {max(sides)} "
            "(a slice with a lesion needs a lobe with one, and a clean slice clean lobes)"
        )
    return sides[0], sides[1]


def _read_labels(path: Path, index_column: str) -> dict[tuple[str, int], SliceLabel]:
    """A slice label table: columns case, <index_column>, lesion, optionally all five lobe columns
    (`lesion_LUL` ... `lesion_RLL`) -> {(case, index): SliceLabel}."""
    if not path.is_file():
        raise InputError(path, "slice label table not found")
    labels: dict[tuple[str, int], SliceLabel] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        lobe_columns = [c for lobes in LOBES.values() for c in lobes]
        present = [c for c in lobe_columns if c in (reader.fieldnames or [])]
        if present and len(present) != len(lobe_columns):
            missing = sorted(set(lobe_columns) - set(present))
            raise InputError(path, f"lobe label columns are all or none; missing {missing}")
        for number, row in enumerate(reader, start=2):
            try:
                lesion = int(row["lesion"])
                key = (row["case"], int(row[index_column]))
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(
                    path,
                    f"line {number}: needs columns case, {index_column}, lesion with integer values ({exc})",
                ) from exc
            if lesion not in (0, 1):
                raise InputError(path, f"line {number}: lesion must be 0 or 1, got {lesion}")
            if not present:
                labels[key] = SliceLabel(lesion)
                continue
            try:
                labels[key] = SliceLabel(lesion, *_lung_labels(row, lesion, f"line {number}"))
            except (TypeError, ValueError) as exc:
                raise InputError(path, str(exc)) from exc
    return labels


def _dicom_rows(
    dataset: str, folder: Path, cfg: dict[str, Any], out: Path, allow_identified: bool
) -> Iterator[SliceRow]:
    labels_path = folder / cfg["labels"]
    labels = _read_labels(labels_path, "instance_number")
    cases = sorted(p for p in folder.iterdir() if p.is_dir())
    if not cases:
        raise InputError(folder, "no DICOM series folders")
    for case in cases:
        series = read_dicom_series(case, allow_identified=allow_identified)
        rel = f"cases/{dataset}__{case.name}.nii.gz"
        sitk.WriteImage(series.image, str(out / rel), useCompression=True)
        array = sitk.GetArrayViewFromImage(series.image)
        sx, sy, sz = series.image.GetSpacing()
        for z, (instance, dcm) in enumerate(zip(series.instance_numbers, series.files, strict=True)):
            label = labels.get((case.name, instance))
            if label is None:
                raise InputError(
                    dcm, f"no label for case {case.name} instance {instance} in {labels_path.name}"
                )
            yield SliceRow(
                case_id=f"{dataset}__{case.name}__{z:04d}",
                dataset=dataset,
                source=dataset,
                volume_id=f"{dataset}__{case.name}",
                slice_index=z,
                label=label.lesion,
                lesion_left=label.left,
                lesion_right=label.right,
                domain="hu",
                spacing_x=sx,
                spacing_y=sy,
                spacing_z=sz,
                height=array.shape[1],
                width=array.shape[2],
                file=rel,
                z=z,
                sha256=sha256_file(dcm),
                raw_path=str(dcm),
                role=cfg["role"],
                **_slice_stats(array[z]),
            )


def _nifti_rows(dataset: str, folder: Path, cfg: dict[str, Any], out: Path) -> Iterator[SliceRow]:
    """NIfTI volumes (`<case>.nii.gz`) with an optional `labels` CSV: case, slice_index, lesion."""
    labels = _read_labels(folder / cfg["labels"], "slice_index") if cfg.get("labels") else {}
    files = sorted(p for p in folder.iterdir() if p.name.endswith(VOLUME_SUFFIXES))
    if not files:
        raise InputError(folder, "no NIfTI volumes")
    for path in files:
        image = read_volume(path)
        name = path.name.split(".nii")[0]
        rel = f"cases/{dataset}__{name}.nii.gz"
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(out / rel), useCompression=True)
        array = sitk.GetArrayViewFromImage(image)
        sx, sy, sz = image.GetSpacing()
        digest = sha256_file(path)
        for z in range(array.shape[0]):
            label = labels.get((name, z), SliceLabel(UNKNOWN))
            yield SliceRow(
                case_id=f"{dataset}__{name}__{z:04d}",
                dataset=dataset,
                source=dataset,
                volume_id=f"{dataset}__{name}",
                slice_index=z,
                label=label.lesion,
                lesion_left=label.left,
                lesion_right=label.right,
                domain="hu",
                spacing_x=sx,
                spacing_y=sy,
                spacing_z=sz,
                height=array.shape[1],
                width=array.shape[2],
                file=rel,
                z=z,
                sha256=f"{digest}:{z}",
                raw_path=str(path),
                role=cfg["role"],
                **_slice_stats(array[z]),
            )


def _subsource(stem: str, cfg: dict[str, Any], path: Path) -> tuple[str, int]:
    for prefix, sub in cfg.get("subsources", {}).items():
        if stem.startswith(prefix):
            return prefix, int(sub.get("rotate", 0))
    raise InputError(path, f"file name matches no sub-source of {sorted(cfg.get('subsources', {}))}")


def _slice_rows(dataset: str, folder: Path, cfg: dict[str, Any], out: Path) -> Iterator[SliceRow]:
    images = folder / cfg.get("images", "images")
    files = (
        sorted(p for p in images.iterdir() if p.suffix.lower() in SLICE_SUFFIXES) if images.is_dir() else []
    )
    if not files:
        raise InputError(images, "no PNG/JPEG slices")
    pattern = re.compile(cfg["volume_pattern"])
    label = UNKNOWN if cfg.get("label", "unknown") == "unknown" else int(cfg["label"])
    for path in tqdm(files, desc=f"ingest {dataset}", unit="slice", leave=False, disable=None):
        match = pattern.match(path.stem)
        if not match:
            raise InputError(path, f"file name does not match volume_pattern {cfg['volume_pattern']!r}")
        source, rotate = _subsource(path.stem, cfg, path)
        array = read_slice(path)
        mask_rel = ""
        if cfg.get("masks"):
            mask_path = folder / cfg["masks"] / f"{path.stem}.png"
            mask = np.rot90(read_mask(mask_path, array.shape), rotate)
            mask_rel = f"masks/{dataset}__{path.stem}.png"
            sitk.WriteImage(
                sitk.GetImageFromArray(np.ascontiguousarray(mask).astype(np.uint8) * 255), str(out / mask_rel)
            )
        array = np.ascontiguousarray(np.rot90(array, rotate))
        rel = f"cases/{dataset}__{path.stem}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(out / rel), useCompression=True)
        yield SliceRow(
            case_id=f"{dataset}__{path.stem}",
            dataset=dataset,
            source=source,
            volume_id=f"{dataset}__{match['volume']}",
            slice_index=int(match["index"]),
            label=label,
            domain="8bit",
            spacing_x=math.nan,
            spacing_y=math.nan,
            spacing_z=math.nan,
            height=array.shape[0],
            width=array.shape[1],
            file=rel,
            z=0,
            sha256=sha256_file(path),
            raw_path=str(path),
            mask_file=mask_rel,
            role=cfg["role"],
            **_slice_stats(array),
        )


def assign_splits(frame: pd.DataFrame, val_fraction: float, salt: str) -> pd.Series:
    """Split by volume: per source, volumes ordered by a salted hash, stratified by 'has a positive slice'.

    Evaluation-role rows get `eval`. Deterministic: the same volumes always land in the same split.
    """
    split = pd.Series("train", index=frame.index)
    split[frame["role"] == "eval"] = "eval"
    train = frame[frame["role"] == "train"]
    volumes = train.groupby(["source", "volume_id"])["label"].max().reset_index()
    volumes["key"] = [hashlib.sha256(f"{salt}:{v}".encode()).hexdigest() for v in volumes["volume_id"]]
    val_volumes: set[str] = set()
    for _, group in volumes.groupby(["source", "label"]):
        n_val = math.ceil(val_fraction * len(group)) if len(group) > 1 else 0
        val_volumes.update(group.sort_values("key")["volume_id"].head(n_val))
    split[frame["volume_id"].isin(val_volumes) & (frame["role"] == "train")] = "val"
    return split


def ingest(data_dir: str | Path, out_dir: str | Path, params: dict[str, Any]) -> pd.DataFrame:
    """Read every configured source under `data_dir`; write cases/, masks/ and the manifest into `out_dir`.

    `out_dir` must be an empty scratch folder (the stage wrapper renames it into place on success).
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    allow_identified = bool(params.get("phi", {}).get("allow_identified", False))
    rows: list[SliceRow] = []
    for dataset, cfg in params["sources"].items():
        folder = data_dir / dataset
        if not folder.is_dir():
            raise InputError(folder, f"source {dataset!r} from params.yaml not found")
        if cfg["kind"] == "dicom":
            rows.extend(_dicom_rows(dataset, folder, cfg, out, allow_identified))
        elif cfg["kind"] == "nifti":
            rows.extend(_nifti_rows(dataset, folder, cfg, out))
        elif cfg["kind"] == "slices":
            rows.extend(_slice_rows(dataset, folder, cfg, out))
        else:
            raise InputError(folder, f"unknown source kind {cfg['kind']!r}")
    frame = pd.DataFrame([asdict(r) for r in rows])
    frame["split"] = assign_splits(frame, params["split"]["val_fraction"], params["split"]["salt"])
    frame.to_parquet(out / MANIFEST, index=False)
    return frame


def read_manifest(ingest_dir: str | Path) -> pd.DataFrame:
    """The manifest of an ingest folder; refuses file names that leave the folder (absolute or `..`)."""
    path = Path(ingest_dir) / MANIFEST
    frame = pd.read_parquet(path)
    for column in ("file", "mask_file"):
        for name in frame[column].dropna().unique():
            pure = PurePosixPath(name)
            if pure.is_absolute() or ".." in pure.parts or "\\" in name:
                raise InputError(path, f"{column} {name!r} points outside {path.parent} (path traversal)")
    return frame


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Counts of slices and volumes per source, split and label (what `make run` prints)."""
    table = frame.groupby(["source", "split", "label"]).agg(
        slices=("case_id", "size"), volumes=("volume_id", "nunique")
    )
    return table.reset_index()
