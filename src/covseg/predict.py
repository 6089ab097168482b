"""The inference path: raw slice or volume in -> lesion probability in the input's own geometry.

The pipeline's evaluation, `covseg evaluate`, `covseg predict` and the MLflow pyfunc model all call
:class:`LesionSegmenter`, so they give the same masks. :func:`predict_study` is `covseg predict`: one
DICOM series, NIfTI volume or 2-D slice in; lesion and lung masks in the input's geometry, a lesion-burden
report and an overlay montage out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covseg.harmonise import Geometry, canonical_slice, from_canonical, to_8bit_look
from covseg.segment import load_segmenter, segment_canonical


@dataclass
class SlicePrediction:
    """Lesion probability and lung mask on the input slice's pixel grid."""

    prob: np.ndarray
    lung: np.ndarray
    geometry: Geometry | None = None
    """The body crop the slice was harmonised with (its centre column is the body midline)."""


class LesionSegmenter:
    """A trained segmenter plus the harmonisation it was trained with."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any]):
        self.model, self.meta = model, meta
        self.size = int(meta["image_size"])

    @classmethod
    def load(cls, model: str | Path) -> LesionSegmenter:
        """From a folder holding segmenter.pt (+ .json), or an MLflow URI such as models:/covseg@champion."""
        text = str(model)
        if text.startswith(("models:/", "runs:/")) or "://" in text:
            from covseg.serving import load_registered_segmenter
            from covseg.tracking import configure

            configure()
            return load_registered_segmenter(text)  # from the weight files: no pickle, no model code run
        if not Path(text).is_dir():
            from covseg.io import InputError

            raise InputError(text, "model folder not found (expected segmenter.pt inside)")
        return cls(*load_segmenter(text))

    @classmethod
    def from_files(cls, weights: str | Path, meta: str | Path) -> LesionSegmenter:
        """From a state-dict file and its JSON metadata (as stored in the MLflow model)."""
        import json

        from covseg.nets import build_segmenter
        from covseg.training import load_state

        info = json.loads(Path(meta).read_text())
        return cls(load_state(build_segmenter(tuple(info["features"])), Path(weights)), info)

    def predict_slices(self, images: list[np.ndarray], domain: str, batch_size: int = 32) -> list[SlicePrediction]:
        """Batched prediction for 2-D slices in the radiological view (anterior up)."""
        prepared = self.prepare(images, domain)
        if not prepared:
            return []
        return self.restore(self.infer(prepared, batch_size), prepared)

    # The three steps of predict_slices, apart so that a caller can time them or stream a long study.
    def prepare(self, images: list[np.ndarray], domain: str) -> list[tuple[np.ndarray, np.ndarray, Geometry]]:
        """Lung segmentation + harmonisation: (canonical image, canonical lung mask, geometry) per slice."""
        return [canonical_slice(image, domain, self.size) for image in images]

    def infer(self, prepared: list[tuple[np.ndarray, np.ndarray, Geometry]], batch_size: int = 32) -> np.ndarray:
        """The network: canonical lesion probabilities (N, S, S), zero outside the lungs."""
        canon = np.stack([p[0] for p in prepared])
        lungs = np.stack([p[1] for p in prepared])
        return segment_canonical(self.model, canon, lungs, batch_size)

    @staticmethod
    def restore(probs: np.ndarray, prepared: list[tuple[np.ndarray, np.ndarray, Geometry]]) -> list[SlicePrediction]:
        """Map canonical probabilities and lung masks back onto each input slice's pixel grid."""
        out = []
        for prob, (_, lung_c, geo) in zip(probs, prepared, strict=True):
            out.append(SlicePrediction(prob=from_canonical(prob, geo),
                                       lung=from_canonical(lung_c.astype(np.float32), geo) >= 0.5, geometry=geo))
        return out


# --------------------------------------------------------------------------------------------------
# covseg predict: one study in, masks + lesion-burden report + overlay out
# --------------------------------------------------------------------------------------------------

LESION_NII, LUNG_NII = "lesion_mask.nii.gz", "lung_mask.nii.gz"
LESION_PNG, LUNG_PNG = "lesion_mask.png", "lung_mask.png"
REPORT, OVERLAY = "report.json", "overlay.png"
RIGHT, LEFT = 1, 2
"""Labels of the volume lung mask (the lesion mask is binary). Patient sides, not image sides."""
SIDES = {RIGHT: "right", LEFT: "left"}
HU_AIR_MAX = -500.0
"""A chest CT in Hounsfield units holds air (about -1000 HU) in the lungs; a volume whose minimum is
above this is not in HU (e.g. an 8-bit export) and is refused rather than segmented wrongly."""
OVERLAY_SLICES = 6
COMPONENT_MIN_SHARE = 0.2
COMPONENT_CLEAN_SIDE = 0.9
"""The two largest lung components are the two lungs when the smaller has at least COMPONENT_MIN_SHARE
of the larger's voxels and each lies at least COMPONENT_CLEAN_SIDE on its own side of the body midline."""


@dataclass
class Study:
    """A validated input, as axial slices in the radiological view (anterior up, patient's right on the left).

    Attributes:
        kind: 'dicom', 'nifti' or 'slice'.
        slices: (Z, H, W) array; HU (int16) for volumes, uint8 for a slice (after `rotate`).
        domain: 'hu' or '8bit'.
        image: the LPS-oriented volume whose voxel grid `slices` is (volumes only).
        header: the NIfTI file's own geometry (size, spacing, origin, direction, orientation code).
        instance_numbers: DICOM InstanceNumber of each z index (DICOM only).
        rotate: np.rot90 k that was applied to a 2-D slice.
    """

    path: Path
    kind: str
    slices: np.ndarray
    domain: str
    image: Any = None
    header: dict[str, Any] | None = None
    instance_numbers: list[int] | None = None
    rotate: int = 0

    @property
    def voxel_ml(self) -> float | None:
        """Volume of one voxel in mL (None for a 2-D slice: JPEG/PNG carry no pixel spacing)."""
        return None if self.image is None else float(np.prod(self.image.GetSpacing())) / 1000.0


def _nifti_header(path: Path) -> dict[str, Any]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    direction = reader.GetDirection()
    return {"size": list(reader.GetSize()), "spacing": list(reader.GetSpacing()), "origin": list(reader.GetOrigin()),
            "direction": list(direction),
            "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction)}


def read_study(input_path: str | Path, rotate: int = 0, allow_identified: bool = False) -> Study:
    """Read and validate a DICOM series folder, a NIfTI volume (.nii/.nii.gz) or a PNG/JPEG slice.

    Raises:
        InputError: missing or unreadable input, an unsupported format, a series that fails validation
            (modality, patient identity, missing slices ...), or a volume not in Hounsfield units.
    """
    import SimpleITK as sitk

    from covseg.io import (
        SLICE_SUFFIXES,
        VOLUME_SUFFIXES,
        InputError,
        read_dicom_series,
        read_slice,
        read_volume,
    )

    path = Path(input_path)
    name = path.name.lower()
    if not path.exists():
        raise InputError(path, "input not found (expected a DICOM series folder, a NIfTI volume or a PNG/JPEG slice)")
    if path.is_dir() or name.endswith(VOLUME_SUFFIXES):
        if rotate % 4:
            raise InputError(path, "--rotate applies to 2-D slices only (volumes are oriented from their header)")
        if path.is_dir():
            series = read_dicom_series(path, allow_identified=allow_identified)
            study = Study(path, "dicom", sitk.GetArrayFromImage(series.image), "hu", image=series.image,
                          instance_numbers=series.instance_numbers)
        else:
            image = read_volume(path)
            study = Study(path, "nifti", sitk.GetArrayFromImage(image), "hu", image=image, header=_nifti_header(path))
        if float(study.slices.min()) > HU_AIR_MAX:
            raise InputError(path, f"does not look like Hounsfield units (minimum {float(study.slices.min()):.0f}, "
                                   f"expected air below {HU_AIR_MAX:.0f} HU)")
        return study
    if name.endswith(SLICE_SUFFIXES):
        image = np.ascontiguousarray(np.rot90(read_slice(path), rotate))
        return Study(path, "slice", image[None], "8bit", rotate=rotate)
    if name.endswith(".dcm"):
        raise InputError(path, "give the folder of the DICOM series, not one of its files")
    raise InputError(path, f"unsupported input {path.suffix!r}: expected a DICOM series folder, .nii/.nii.gz, "
                           f"or {'/'.join(SLICE_SUFFIXES)}")


def _check_out_dir(out_dir: Path, input_path: Path) -> None:
    """Refuse an output folder that would replace the input or a folder that is not an earlier output."""
    from covseg.io import InputError

    out, source = out_dir.resolve(), input_path.resolve()
    if out == source or out in source.parents:
        raise InputError(out_dir, "output folder holds the input; choose another --out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).is_file())):
        raise InputError(out_dir, "output exists and is not an earlier covseg prediction; it would be replaced")


def model_provenance(model: str | Path | LesionSegmenter, segmenter: LesionSegmenter) -> dict[str, Any]:
    """Where the model came from: URI, registry version and its lineage tags, or the folder's metadata.

    For `models:/NAME/VERSION` and `models:/NAME@ALIAS` the version's tags (data_md5, git_commit, ...) are
    read from the registry; for `runs:/RUN/...` the run's tags; for a folder the segmenter.json metadata
    and the SHA-256 of segmenter.pt (the folder's model version).
    """
    from covseg.registry import LINEAGE_KEYS

    info: dict[str, Any] = {"meta": dict(segmenter.meta)}
    if isinstance(model, LesionSegmenter):
        return {**info, "source": "in-memory", "uri": None}
    text = str(model)
    if text.startswith(("models:/", "runs:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        info.update(source="mlflow", uri=text)
        client = mlflow.MlflowClient()
        try:
            if text.startswith("runs:/"):
                run_id = text[len("runs:/"):].split("/", 1)[0]
                tags = client.get_run(run_id).data.tags
                info.update(run_id=run_id)
            else:
                ref = text[len("models:/"):].strip("/")
                if "@" in ref:
                    name, alias = ref.split("@", 1)
                    mv = client.get_model_version_by_alias(name, alias)
                else:
                    name, _, number = ref.partition("/")
                    if not number.isdigit():
                        return {**info, "lookup": f"no registry version in {text!r}"}
                    mv = client.get_model_version(name, number)
                tags = mv.tags
                info.update(name=mv.name, version=str(mv.version), run_id=mv.run_id, aliases=list(mv.aliases))
        except MlflowException as exc:
            return {**info, "lookup": f"failed: {exc}"}
        info.update({key: tags.get(key, "unknown") for key in LINEAGE_KEYS})
        info["tags"] = dict(tags)
        return info
    from covseg.io import sha256_file
    from covseg.segment import MODEL

    weights = Path(text) / MODEL
    info.update(source="folder", uri=str(Path(text).resolve()), version=f"sha256:{sha256_file(weights)[:16]}")
    info.update({key: str(segmenter.meta.get(key, "unknown")) for key in LINEAGE_KEYS})
    return info


def split_sides(lung: np.ndarray, midline: float) -> tuple[np.ndarray, str]:
    """Label lung voxels RIGHT (1) or LEFT (2); `lung` is (Z, H, W) in the radiological view.

    The two largest connected components are the two lungs when they separate cleanly (see
    COMPONENT_MIN_SHARE); otherwise, and for any smaller component, the side of the body midline column
    decides (columns right of it are the patient's left). Returns (labels uint8, 'components'|'midline').
    """
    import SimpleITK as sitk

    left_cols = np.arange(lung.shape[-1]) > midline
    sides = np.where(lung, np.where(left_cols, LEFT, RIGHT).astype(np.uint8), np.uint8(0)).astype(np.uint8)
    if not lung.any():
        return sides, "midline"
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(lung.astype(np.uint8))))
    comps = sitk.GetArrayFromImage(sitk.Clamp(labels, sitk.sitkUInt8, 0, 3))  # 1, 2 = largest two; 3 = rest
    sizes = np.bincount(comps.ravel())
    if sizes.size < 3:
        return sides, "midline"
    on_left = np.bincount(comps[..., left_cols].ravel(), minlength=sizes.size)
    share_left = on_left[1:3] / sizes[1:3]
    clean = (sizes[2] >= COMPONENT_MIN_SHARE * sizes[1] and share_left.max() >= COMPONENT_CLEAN_SIDE
             and share_left.min() <= 1 - COMPONENT_CLEAN_SIDE)
    if not clean:
        return sides, "midline"
    for label, share in zip((1, 2), share_left, strict=True):
        sides[comps == label] = LEFT if share > 0.5 else RIGHT
    return sides, "components"


def _burden(lesion: np.ndarray, sides: np.ndarray, unit: float) -> dict[str, Any]:
    """Lesion and lung amounts per side and for both lungs (amount = voxel count x unit)."""
    lesion_by = np.bincount(sides[lesion], minlength=3)
    lung_by = np.bincount(sides.ravel(), minlength=3)
    out: dict[str, Any] = {}
    for key, label in (("right", RIGHT), ("left", LEFT), ("both", None)):
        les = int(lesion.sum()) if label is None else int(lesion_by[label])
        lung = int(lung_by[1:].sum()) if label is None else int(lung_by[label])
        out[key] = {"lesion_voxels": les, "lung_voxels": lung, "lesion": les * unit, "lung": lung * unit,
                    "percent": 100.0 * les / lung if lung else 0.0}
    return out


def _pick_overlay(lesion_per_slice: np.ndarray, lung_per_slice: np.ndarray, n: int) -> list[int]:
    """The `n` most affected slices (by lesion voxels), in z order; the largest lung slices if none is."""
    score = lesion_per_slice if lesion_per_slice.any() else lung_per_slice
    order = np.argsort(-score, kind="stable")
    chosen = [int(z) for z in order[:n] if score[z] > 0] or [int(order[0])]
    return sorted(chosen)


def write_overlay(path: str | Path, study: Study, lesion: np.ndarray, lung: np.ndarray, chosen: list[int],
                  titles: list[str]) -> None:
    """A montage of the chosen slices: CT (lung window), lesion in red, lung contour in cyan."""
    from matplotlib.colors import ListedColormap

    from covseg import report

    plt = report._pyplot()
    n_cols = min(3, len(chosen))
    n_rows = -(-len(chosen) // n_cols)
    aspect = 1.0
    if study.image is not None:
        sx, sy = study.image.GetSpacing()[:2]
        aspect = sy / sx
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3.5 * n_rows + 0.3), squeeze=False,
                                layout="constrained")
    red = ListedColormap(["red"])
    for axis in axes.ravel():
        axis.axis("off")
    for axis, z, title in zip(axes.ravel(), chosen, titles, strict=False):
        axis.imshow(to_8bit_look(study.slices[z], study.domain), cmap="gray", vmin=0, vmax=255, aspect=aspect,
                    interpolation="nearest")
        if lesion[z].any():
            axis.imshow(np.ma.masked_where(~lesion[z], lesion[z]), cmap=red, alpha=0.45, aspect=aspect,
                        interpolation="nearest")
        if lung[z].any():
            axis.contour(lung[z].astype(np.uint8), levels=[0.5], colors="cyan", linewidths=0.6)
        axis.text(0.02, 0.5, "R", color="yellow", fontsize=8, transform=axis.transAxes, va="center")
        axis.text(0.98, 0.5, "L", color="yellow", fontsize=8, transform=axis.transAxes, va="center", ha="right")
        axis.set_title(title, fontsize=8)
    figure.suptitle("lesion (red), lung contour (cyan); radiological view", fontsize=9)
    report.save(figure, path)


def _mask_image(array: np.ndarray, study: Study) -> Any:
    """A uint8 mask on the input's voxel grid: the LPS series grid (DICOM) or the NIfTI file's own grid."""
    import SimpleITK as sitk

    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(study.image)
    if study.kind == "nifti" and study.header is not None:
        header = study.header
        mask = sitk.DICOMOrient(mask, header["orientation"])  # undo read_volume's re-orientation to LPS
        if list(mask.GetSize()) != header["size"] or not np.allclose(mask.GetDirection(), header["direction"],
                                                                      atol=1e-4):
            raise RuntimeError(f"cannot map the mask back onto {study.path}'s grid")
        mask.SetOrigin(header["origin"])
        mask.SetSpacing(header["spacing"])
        mask.SetDirection(header["direction"])
    return mask


def predict_study(input_path: str | Path, model: str | Path | LesionSegmenter, out_dir: str | Path,
                  batch_size: int = 32, rotate: int = 0, threshold: float = 0.5,
                  allow_identified: bool = False, n_overlay: int = OVERLAY_SLICES) -> dict[str, Any]:
    """Segment one study and write its outputs to `out_dir` (atomically: all files appear, or none).

    Args:
        input_path: a DICOM series folder, a NIfTI volume (HU) or a 2-D PNG/JPEG slice (8-bit).
        model: a model folder (segmenter.pt + .json), an MLflow URI (models:/covseg@champion) or a
            loaded :class:`LesionSegmenter`.
        out_dir: output folder; replaced if it holds an earlier prediction, refused if it holds other files.
        batch_size: slices per batch (lung segmentation, network).
        rotate: 2-D slices only: np.rot90 k that brings the slice to the radiological view.
        threshold: lesion probability threshold.
        allow_identified: accept DICOM headers that still carry patient identity.
        n_overlay: slices in the overlay montage.

    Writes:
        Volumes: lesion_mask.nii.gz (0/1) and lung_mask.nii.gz (0, 1 = right, 2 = left lung) on the
        input's grid (the LPS-oriented series for DICOM, the file's own geometry for NIfTI); slices:
        lesion_mask.png and lung_mask.png ({0,255}, the input's size and orientation). Both: report.json,
        overlay.png.

    Returns:
        The report (as written to report.json).

    Raises:
        InputError: bad input (nothing is written).
    """
    import datetime
    import json
    import time

    import SimpleITK as sitk
    from tqdm import tqdm

    from covseg import __version__
    from covseg.io import atomic_dir, write_mask_png
    from covseg.training import device

    start = time.perf_counter()
    timing: dict[str, float] = {}
    input_path, out_dir = Path(input_path), Path(out_dir)
    _check_out_dir(out_dir, input_path)  # before reading: a refused --out costs nothing
    study = read_study(input_path, rotate=rotate, allow_identified=allow_identified)
    timing["read"] = time.perf_counter() - start

    mark = time.perf_counter()
    segmenter = model if isinstance(model, LesionSegmenter) else LesionSegmenter.load(model)
    segmenter.model.to(device())  # bf16 autocast on CUDA (segment_canonical); the CPU otherwise
    provenance = model_provenance(model, segmenter)
    timing["load_model"] = time.perf_counter() - mark

    n = len(study.slices)
    lesion = np.zeros(study.slices.shape, dtype=bool)
    lung = np.zeros(study.slices.shape, dtype=bool)
    midlines = np.full(n, np.nan)
    for key in ("lungs_harmonise", "model", "map_back"):
        timing[key] = 0.0
    with tqdm(total=n, desc="predict", unit="slice", disable=None) as bar:
        for first in range(0, n, batch_size):
            batch = list(study.slices[first:first + batch_size])
            mark = time.perf_counter()
            prepared = segmenter.prepare(batch, study.domain)
            timing["lungs_harmonise"] += time.perf_counter() - mark
            mark = time.perf_counter()
            probs = segmenter.infer(prepared, batch_size)
            timing["model"] += time.perf_counter() - mark
            mark = time.perf_counter()
            for i, pred in enumerate(segmenter.restore(probs, prepared), start=first):
                lesion[i], lung[i] = pred.prob >= threshold, pred.lung
                geo = pred.geometry
                if pred.lung.any():
                    midlines[i] = (geo.c0 + geo.c1 - 1) / 2.0
            timing["map_back"] += time.perf_counter() - mark
            bar.update(len(batch))

    mark = time.perf_counter()
    midline = float(np.nanmedian(midlines)) if np.isfinite(midlines).any() else (study.slices.shape[-1] - 1) / 2.0
    sides, split = split_sides(lung, midline)
    unit = study.voxel_ml
    burden = _burden(lesion, sides, unit if unit is not None else 1.0)
    lesion_z = lesion.reshape(n, -1).sum(axis=1)
    lung_z = lung.reshape(n, -1).sum(axis=1)
    chosen = _pick_overlay(lesion_z, lung_z, n_overlay)
    timing["analyse"] = time.perf_counter() - mark

    report: dict[str, Any] = {
        "covseg_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "input": {"path": str(input_path.resolve()), "kind": study.kind, "domain": study.domain},
        "model": provenance,
        "threshold": threshold,
        "n_slices": n,
        "lr_split": {"method": split, "midline_column": midline},
    }
    if unit is not None:
        image = study.image
        report["input"].update(size=list(image.GetSize()), spacing=list(image.GetSpacing()),
                               origin=list(image.GetOrigin()), direction=list(image.GetDirection()),
                               orientation="LPS")
        if study.header is not None:
            report["input"]["file_geometry"] = study.header
        if study.instance_numbers is not None:
            report["input"]["instance_numbers"] = study.instance_numbers
        report["units"] = "mL"
        report["voxel_ml"] = unit
        report["lesion_ml"] = {k: v["lesion"] for k, v in burden.items()}
        report["lung_ml"] = {k: v["lung"] for k, v in burden.items()}
        report["outputs"] = {"lesion_mask": LESION_NII, "lung_mask": LUNG_NII, "overlay": OVERLAY,
                             "lung_labels": {str(k): v for k, v in SIDES.items()}}
    else:
        report["input"].update(size=list(np.rot90(study.slices[0], -rotate).shape[::-1]), rotate=rotate)
        report["units"] = "pixels"
        report["lesion_px"] = {k: v["lesion_voxels"] for k, v in burden.items()}
        report["lung_px"] = {k: v["lung_voxels"] for k, v in burden.items()}
        report["outputs"] = {"lesion_mask": LESION_PNG, "lung_mask": LUNG_PNG, "overlay": OVERLAY}
    report["lesion_percent_of_lung"] = {k: v["percent"] for k, v in burden.items()}
    report["voxels"] = {k: {"lesion": v["lesion_voxels"], "lung": v["lung_voxels"]} for k, v in burden.items()}
    report["per_slice"] = [
        {"z": z, **({"instance_number": study.instance_numbers[z]} if study.instance_numbers else {}),
         "lesion_voxels": int(lesion_z[z]), "lung_voxels": int(lung_z[z]),
         "percent": 100.0 * float(lesion_z[z]) / float(lung_z[z]) if lung_z[z] else 0.0}
        for z in range(n)]
    report["overlay_slices"] = chosen

    with atomic_dir(out_dir) as scratch:
        mark = time.perf_counter()
        if unit is not None:
            sitk.WriteImage(_mask_image(lesion, study), str(scratch / LESION_NII), True)
            sitk.WriteImage(_mask_image(sides, study), str(scratch / LUNG_NII), True)
        else:
            write_mask_png(np.rot90(lesion[0], -rotate), scratch / LESION_PNG)
            write_mask_png(np.rot90(lung[0], -rotate), scratch / LUNG_PNG)
        timing["write_masks"] = time.perf_counter() - mark
        mark = time.perf_counter()
        titles = []
        for z in chosen:
            where = f"z={z}" + (f" (inst. {study.instance_numbers[z]})" if study.instance_numbers else "")
            amount = f"{lesion_z[z] * unit:.1f} mL" if unit is not None else f"{lesion_z[z]} px"
            pct = report["per_slice"][z]["percent"]
            titles.append(f"{where}: {amount}, {pct:.1f}% of lung" if study.kind != "slice" else
                          f"{amount}, {pct:.1f}% of lung")
        write_overlay(scratch / OVERLAY, study, lesion, lung, chosen, titles)
        timing["write_overlay"] = time.perf_counter() - mark
        report["timing_s"] = timing
        report["seconds"] = time.perf_counter() - start
        report["slices_per_s"] = n / report["seconds"]
        (scratch / REPORT).write_text(json.dumps(report, indent=2))
    return report


def format_summary(report: dict[str, Any]) -> str:
    """One line for the console: lesion burden per lung and where the outputs are."""
    pct = report["lesion_percent_of_lung"]
    if report["units"] == "mL":
        les = report["lesion_ml"]
        amount = (f"lesion {les['both']:.1f} mL ({pct['both']:.1f}% of lungs; right {les['right']:.1f} mL "
                  f"{pct['right']:.1f}%, left {les['left']:.1f} mL {pct['left']:.1f}%)")
    else:
        amount = f"lesion {report['lesion_px']['both']} px ({pct['both']:.1f}% of lung area)"
    return f"{report['n_slices']} slice(s) in {report['seconds']:.1f} s: {amount}"
