"""Evaluation on slices with radiologist masks (never used for anything but these numbers).

Two entry points sharing the metrics: `evaluate_pipeline` (the pipeline stage: Table-1 rows for coarse
labels, fine labels and the final segmenter, plus Grad-CAM inside vs outside the lesions) and
`evaluate_folder` (`covseg evaluate`: any folder laid out like medseg-100, with any trained model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from covseg.harmonise import from_canonical, geometry_of
from covseg.ingest import read_manifest
from covseg.io import SLICE_SUFFIXES, InputError, read_mask, read_slice
from covseg.layout import CAM_MAPS
from covseg.layout import FINE_LABELS as FINE
from covseg.metrics import slice_metrics, summarise
from covseg.prior import lesion_prior
from covseg.segment import load_segmenter, segment_canonical
from covseg.training import SliceSet, device


def _read_mask(ingest_dir: Path, row: pd.Series) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(ingest_dir / row["mask_file"]))) > 127


def evaluate_pipeline(
    ingest_dir: str | Path,
    lungs_dir: str | Path,
    coarse_dir: str | Path,
    mil_dir: str | Path,
    segment_dir: str | Path,
    refine_dir: str | Path | None = None,
    figure: str | Path | None = None,
    prior: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Table-1 rows on the evaluation split, in each slice's own geometry: coarse, fine, `round0` (the
    segmenter stage), each refinement round and `final` (the model the refine stage kept; the segmenter
    stage's model when there is no `refine_dir`).

    With `figure`, also draws the method panel (CT, Grad-CAM, coarse, fine, final, ground truth) there.
    With `prior` (the `fine` parameters), adds the row "prior": the fine labels' intensity prior alone in
    the lung, without Grad-CAM or MIL, which shows what those two weak localisers add.
    """
    ingest_dir = Path(ingest_dir)
    slices = SliceSet.load(lungs_dir)
    rows = slices.rows("eval")
    if rows.empty:
        raise InputError(lungs_dir, "no evaluation slices (a source with role: eval is needed)")
    positions = rows["row"].to_numpy()
    truths = [_read_mask(ingest_dir, row) for _, row in rows.iterrows()]
    coarse_npz = np.load(Path(coarse_dir) / CAM_MAPS)
    cam = coarse_npz["cam"][positions].astype(np.float32)
    # coarse and fine rows score the labels themselves (binary), so both thresholds give the same row
    coarse = coarse_npz["coarse"][positions].astype(np.float32)
    fine = np.load(Path(mil_dir) / FINE)["fine"][positions].astype(np.float32)

    def predict(model_dir: str | Path) -> np.ndarray:
        model = load_segmenter(model_dir)[0].to(device())
        return segment_canonical(model, slices.images[positions], slices.lungs[positions])

    rounds = [("round0", predict(segment_dir))]
    kept = 0
    if refine_dir is not None:
        from covseg.refine import kept_round, round_models

        rounds += [(name, predict(folder)) for name, folder in round_models(refine_dir)]
        kept = kept_round(refine_dir)
    final = dict(rounds)[f"round{kept}"]  # the kept round's model, already predicted
    geos = [geometry_of(row) for _, row in rows.iterrows()]
    table = {}
    rows_to_score = [("coarse", coarse), ("fine", fine), *rounds, ("final", final)]
    if prior is not None:
        rows_to_score.append(
            (
                "prior",
                (lesion_prior(slices.images[positions], prior) & slices.lungs[positions]).astype(np.float32),
            )
        )
    for name, maps in rows_to_score:
        table[name] = summarise([from_canonical(m, g) for m, g in zip(maps, geos, strict=True)], truths)
    table["cam_inside_vs_outside"] = cam_contrast(cam, slices.lungs[positions], truths, geos)
    if figure:
        _panel(
            figure, slices.images[positions], cam, coarse, fine, final, truths, geos, rows["case_id"].tolist()
        )
    return table


def _panel(
    path: str | Path,
    images: np.ndarray,
    cam: np.ndarray,
    coarse: np.ndarray,
    fine: np.ndarray,
    final: np.ndarray,
    truths: list[np.ndarray],
    geos: list,
    names: list[str],
    n: int = 4,
) -> None:
    from covseg import report
    from covseg.harmonise import to_canonical

    pick = np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int)
    truth_c = np.stack([to_canonical(truths[i].astype(np.float32), geos[i], mode="nearest") for i in pick])
    figure = report.method_panel(
        images[pick],
        {
            "Grad-CAM": cam[pick],
            "coarse": coarse[pick],
            "fine": fine[pick],
            "final": (final[pick] >= 0.5).astype(float),
            "ground truth": truth_c,
        },
        [names[i][-14:] for i in pick],
    )
    report.save(figure, path)


def cam_contrast(
    cam: np.ndarray, lungs: np.ndarray, truths: list[np.ndarray], geos: list
) -> dict[str, float]:
    """Mean Grad-CAM inside the radiologist's lesions vs inside the lungs outside them (a shortcut check:
    a classifier that learned the source, not the lesion, shows no contrast)."""
    inside, outside = [], []
    for m, lung, truth, geo in zip(cam, lungs, truths, geos, strict=True):
        full, lung_full = from_canonical(m, geo), from_canonical(lung.astype(np.float32), geo) >= 0.5
        if truth.any():
            inside.append(full[truth].mean())
        if (lung_full & ~truth).any():
            outside.append(full[lung_full & ~truth].mean())
    return {"inside": float(np.mean(inside)), "outside": float(np.mean(outside))}


def evaluate_folder(
    model: str | Path, data: str | Path, rotate: int = 0, domain: str = "8bit"
) -> dict[str, Any]:
    """Metrics of a model on `data/images/*` vs `data/masks/<stem>.png` (masks binarised at >127)."""
    from covseg.predict import LesionSegmenter

    data = Path(data)
    images = sorted(p for p in (data / "images").glob("*") if p.suffix.lower() in SLICE_SUFFIXES)
    if not images:
        raise InputError(data / "images", "no PNG/JPEG slices")
    segmenter = LesionSegmenter.load(model)
    slices, truths = [], []
    for path in images:
        image = read_slice(path)
        mask_path = data / "masks" / f"{path.stem}.png"
        if not mask_path.is_file():
            raise InputError(mask_path, f"mask for {path.name} not found")
        truths.append(np.rot90(read_mask(mask_path, image.shape), rotate))
        slices.append(np.ascontiguousarray(np.rot90(image, rotate)))
    preds = segmenter.predict_slices(slices, domain)
    return summarise([p.prob for p in preds], truths)


def evaluate_ingested(segmenter: Any, ingest_dir: str | Path, max_slices: int = 0) -> dict[str, Any]:
    """Metrics of a LesionSegmenter on the evaluation rows of an ingested dataset (raw slice -> mask).

    The promotion step scores the candidate and the current champion with this same function, so the
    comparison is like for like whatever image size each model was trained at; `per_slice_dice` (threshold
    0.5, in a fixed slice order) pairs the two models slice by slice.
    """
    ingest_dir = Path(ingest_dir)
    manifest = read_manifest(ingest_dir)
    rows = manifest[manifest["role"] == "eval"]
    if max_slices > 0:
        rows = rows.head(max_slices)
    if rows.empty:
        raise InputError(ingest_dir, "no evaluation slices in the manifest")
    probs, truths = [], []
    for domain, group in rows.groupby("domain"):
        images = [sitk.GetArrayFromImage(sitk.ReadImage(str(ingest_dir / f))) for f in group["file"]]
        images = [img[z] if img.ndim == 3 else img for img, z in zip(images, group["z"], strict=True)]
        truths += [_read_mask(ingest_dir, row) for _, row in group.iterrows()]
        probs += [p.prob for p in segmenter.predict_slices(images, domain)]
    per_slice = [slice_metrics(p >= 0.5, t)["dice"] for p, t in zip(probs, truths, strict=True)]
    return {**summarise(probs, truths), "per_slice_dice": per_slice}
