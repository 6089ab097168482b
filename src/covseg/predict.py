"""The inference path: raw slice or volume in -> lesion probability in the input's own geometry.

The pipeline's evaluation, `covseg evaluate`, `covseg predict` and the MLflow pyfunc model all call
:class:`LesionSegmenter`, so they give the same masks. :func:`predict_study` is `covseg predict`: one
DICOM series, NIfTI volume or 2-D slice in; lesion and lung masks in the input's geometry, a lesion-burden
report and an overlay montage out. It is read (`covseg.io.read_study`) -> :func:`segment_study` ->
:func:`build_report` (pure) -> :func:`write_outputs`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covseg.harmonise import Geometry, canonical_slice, from_canonical, to_8bit_look
from covseg.io import InputError, Study
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
            from covseg.model_files import load_registered_weights
            from covseg.tracking import configure

            configure()
            return cls(*load_registered_weights(text))  # from the weight files: no pickle, no code run
        if not Path(text).is_dir():
            raise InputError(text, "model folder not found (expected segmenter.pt inside)")
        return cls(*load_segmenter(text))

    @classmethod
    def from_files(cls, weights: str | Path, meta: str | Path) -> LesionSegmenter:
        """From a state-dict file and its JSON metadata (as stored in the MLflow model)."""
        from covseg.nets import build_segmenter
        from covseg.training import load_state

        info = json.loads(Path(meta).read_text())
        return cls(load_state(build_segmenter(tuple(info["features"])), Path(weights)), info)

    def predict_slices(
        self, images: list[np.ndarray], domain: str, batch_size: int = 32
    ) -> list[SlicePrediction]:
        """Batched prediction for 2-D slices in the radiological view (anterior up)."""
        prepared = self.prepare(images, domain)
        if not prepared:
            return []
        return self.restore(self.infer(prepared, batch_size), prepared)

    # The three steps of predict_slices, apart so that a caller can time them or stream a long study.
    def prepare(self, images: list[np.ndarray], domain: str) -> list[tuple[np.ndarray, np.ndarray, Geometry]]:
        """Lung segmentation + harmonisation: (canonical image, canonical lung mask, geometry) per slice."""
        return [canonical_slice(image, domain, self.size) for image in images]

    def infer(
        self, prepared: list[tuple[np.ndarray, np.ndarray, Geometry]], batch_size: int = 32
    ) -> np.ndarray:
        """The network: canonical lesion probabilities (N, S, S), zero outside the lungs.

        Slices without lung (neck, abdomen) skip the network: their probability is zero whatever it computes.
        """
        lungs = np.stack([p[1] for p in prepared])
        probs = np.zeros(lungs.shape, dtype=np.float32)
        keep = np.flatnonzero(lungs.reshape(len(lungs), -1).any(axis=1))
        if keep.size:
            canon = np.stack([prepared[i][0] for i in keep])
            probs[keep] = segment_canonical(self.model, canon, lungs[keep], batch_size)
        return probs

    @staticmethod
    def restore(
        probs: np.ndarray, prepared: list[tuple[np.ndarray, np.ndarray, Geometry]]
    ) -> list[SlicePrediction]:
        """Map canonical probabilities and lung masks back onto each input slice's pixel grid."""
        out = []
        for prob, (_, lung_c, geo) in zip(probs, prepared, strict=True):
            if lung_c.any():
                prob_in = from_canonical(prob, geo)
                lung_in = from_canonical(lung_c.astype(np.float32), geo) >= 0.5
            else:  # no lung, so zero probability: nothing to resize
                prob_in = np.zeros((geo.height, geo.width), dtype=np.float32)
                lung_in = np.zeros((geo.height, geo.width), dtype=bool)
            out.append(SlicePrediction(prob=prob_in, lung=lung_in, geometry=geo))
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
OVERLAY_SLICES = 6
COMPONENT_MIN_SHARE = 0.2
COMPONENT_CLEAN_SIDE = 0.9
"""The two largest lung components are the two lungs when the smaller has at least COMPONENT_MIN_SHARE
of the larger's voxels and each lies at least COMPONENT_CLEAN_SIDE on its own side of the body midline."""


def _check_out_dir(out_dir: Path, input_path: Path) -> None:
    """Refuse an output folder that would replace the input or a folder that is not an earlier output."""
    out, source = out_dir.resolve(), input_path.resolve()
    if out == source or out in source.parents:
        raise InputError(out_dir, "output folder holds the input; choose another --out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).is_file())):
        raise InputError(
            out_dir, "output exists and is not an earlier covseg prediction; it would be replaced"
        )


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
                run_id = text[len("runs:/") :].split("/", 1)[0]
                tags = client.get_run(run_id).data.tags
                info.update(run_id=run_id)
            else:
                ref = text[len("models:/") :].strip("/")
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
    # the components inside the lung mask's bounding box only (the same components, fewer voxels to scan)
    box = tuple(
        slice(int(i[0]), int(i[-1]) + 1)
        for i in (np.flatnonzero(lung.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    )
    labels = sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray(lung[box].astype(np.uint8)))
    )
    comps = sitk.GetArrayFromImage(sitk.Clamp(labels, sitk.sitkUInt8, 0, 3))  # 1, 2 = largest two; 3 = rest
    sizes = np.bincount(comps.ravel())
    if sizes.size < 3:
        return sides, "midline"
    on_left = np.bincount(comps[..., left_cols[box[2]]].ravel(), minlength=sizes.size)
    share_left = on_left[1:3] / sizes[1:3]
    clean = (
        sizes[2] >= COMPONENT_MIN_SHARE * sizes[1]
        and share_left.max() >= COMPONENT_CLEAN_SIDE
        and share_left.min() <= 1 - COMPONENT_CLEAN_SIDE
    )
    if not clean:
        return sides, "midline"
    inside = sides[box]  # a view: labelled in place
    for label, share in zip((1, 2), share_left, strict=True):
        inside[comps == label] = LEFT if share > 0.5 else RIGHT
    return sides, "components"


def _burden(lesion: np.ndarray, sides: np.ndarray, unit: float) -> dict[str, Any]:
    """Lesion and lung amounts per side and for both lungs (amount = voxel count x unit)."""
    lesion_by = np.bincount(sides[lesion], minlength=3)
    lung_by = np.bincount(sides.ravel(), minlength=3)
    out: dict[str, Any] = {}
    for key, label in (("right", RIGHT), ("left", LEFT), ("both", None)):
        les = int(lesion.sum()) if label is None else int(lesion_by[label])
        lung = int(lung_by[1:].sum()) if label is None else int(lung_by[label])
        out[key] = {
            "lesion_voxels": les,
            "lung_voxels": lung,
            "lesion": les * unit,
            "lung": lung * unit,
            "percent": 100.0 * les / lung if lung else 0.0,
        }
    return out


def _pick_overlay(lesion_per_slice: np.ndarray, lung_per_slice: np.ndarray, n: int) -> list[int]:
    """The `n` most affected slices (by lesion voxels), in z order; the largest lung slices if none is."""
    score = lesion_per_slice if lesion_per_slice.any() else lung_per_slice
    order = np.argsort(-score, kind="stable")
    chosen = [int(z) for z in order[:n] if score[z] > 0] or [int(order[0])]
    return sorted(chosen)


def _mask_image(array: np.ndarray, study: Study) -> Any:
    """A uint8 mask on the input's voxel grid: the LPS series grid (DICOM) or the NIfTI file's own grid."""
    import SimpleITK as sitk

    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(study.image)
    if study.kind == "nifti" and study.header is not None:
        header = study.header
        mask = sitk.DICOMOrient(mask, header["orientation"])  # undo read_volume's re-orientation to LPS
        if list(mask.GetSize()) != header["size"] or not np.allclose(
            mask.GetDirection(), header["direction"], atol=1e-4
        ):
            raise RuntimeError(f"cannot map the mask back onto {study.path}'s grid")
        mask.SetOrigin(header["origin"])
        mask.SetSpacing(header["spacing"])
        mask.SetDirection(header["direction"])
    return mask


class Timer:
    """Wall seconds per named part of a run: each `with timer("model"): ...` adds to `timer.parts["model"]`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        """Time the block and add its seconds to `parts[part]`."""
        mark = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - mark

    @property
    def elapsed(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self.start


@dataclass
class StudyMasks:
    """What the segmenter found in a study, on the grid of `Study.slices` (Z, H, W)."""

    lesion: np.ndarray
    """bool: lesion probability >= the threshold."""
    sides: np.ndarray
    """uint8: 0 outside the lungs, RIGHT or LEFT inside."""
    midline: float
    """Body midline column (median over the slices with lung)."""
    split: str
    """How the sides were told apart: 'components' or 'midline' (see split_sides)."""

    @property
    def lung(self) -> np.ndarray:
        """Bool: inside either lung."""
        return self.sides > 0


def segment_study(
    study: Study,
    segmenter: LesionSegmenter,
    batch_size: int = 32,
    threshold: float = 0.5,
    timer: Timer | None = None,
) -> StudyMasks:
    """Lesion and lung masks of every slice of `study`, `batch_size` slices at a time; lungs split by side."""
    from tqdm import tqdm

    timer = timer or Timer()
    n = len(study.slices)
    lesion = np.zeros(study.slices.shape, dtype=bool)
    lung = np.zeros(study.slices.shape, dtype=bool)
    midlines = np.full(n, np.nan)
    with tqdm(total=n, desc="predict", unit="slice", disable=None) as bar:
        for first in range(0, n, batch_size):
            batch = list(study.slices[first : first + batch_size])
            with timer("lungs_harmonise"):
                prepared = segmenter.prepare(batch, study.domain)
            with timer("model"):
                probs = segmenter.infer(prepared, batch_size)
            with timer("map_back"):
                for i, pred in enumerate(segmenter.restore(probs, prepared), start=first):
                    lesion[i], lung[i] = pred.prob >= threshold, pred.lung
                    if pred.lung.any():
                        midlines[i] = (pred.geometry.c0 + pred.geometry.c1 - 1) / 2.0
            bar.update(len(batch))
    with timer("analyse"):
        midline = float(np.nanmedian(midlines)) if np.isfinite(midlines).any() else (lung.shape[-1] - 1) / 2.0
        sides, split = split_sides(lung, midline)
    return StudyMasks(lesion=lesion, sides=sides, midline=midline, split=split)


def build_report(
    study: Study,
    masks: StudyMasks,
    model: dict[str, Any],
    threshold: float,
    created: str,
    n_overlay: int = OVERLAY_SLICES,
) -> dict[str, Any]:
    """The lesion-burden report of one study (what report.json holds, less the timings); no side effects.

    Volumes are reported in mL (voxel volume from the spacing) and 2-D slices in pixels; both in % of each
    lung, per side and per slice, with the slices chosen for the overlay.
    """
    from covseg import __version__

    n = len(study.slices)
    unit = study.voxel_ml
    burden = _burden(masks.lesion, masks.sides, unit if unit is not None else 1.0)
    lesion_z = masks.lesion.reshape(n, -1).sum(axis=1)
    lung_z = masks.lung.reshape(n, -1).sum(axis=1)
    report: dict[str, Any] = {
        "covseg_version": __version__,
        "created": created,
        "input": {"path": str(study.path.resolve()), "kind": study.kind, "domain": study.domain},
        "model": model,
        "threshold": threshold,
        "n_slices": n,
        "lr_split": {"method": masks.split, "midline_column": masks.midline},
    }
    if unit is not None:
        image = study.image
        report["input"].update(
            size=list(image.GetSize()),
            spacing=list(image.GetSpacing()),
            origin=list(image.GetOrigin()),
            direction=list(image.GetDirection()),
            orientation="LPS",
        )
        if study.header is not None:
            report["input"]["file_geometry"] = study.header
        if study.instance_numbers is not None:
            report["input"]["instance_numbers"] = study.instance_numbers
        report["units"] = "mL"
        report["voxel_ml"] = unit
        report["lesion_ml"] = {k: v["lesion"] for k, v in burden.items()}
        report["lung_ml"] = {k: v["lung"] for k, v in burden.items()}
        report["outputs"] = {
            "lesion_mask": LESION_NII,
            "lung_mask": LUNG_NII,
            "overlay": OVERLAY,
            "lung_labels": {str(k): v for k, v in SIDES.items()},
        }
        if study.headers is not None:
            from covseg.dicom_seg import SEG_FILE, seg_blocker

            blocker = seg_blocker(study.headers)
            report["outputs"]["dicom_seg"] = SEG_FILE if blocker is None else None
            if blocker is not None:
                report["outputs"]["dicom_seg_skipped"] = blocker
    else:
        report["input"].update(
            size=list(np.rot90(study.slices[0], -study.rotate).shape[::-1]), rotate=study.rotate
        )
        report["units"] = "pixels"
        report["lesion_px"] = {k: v["lesion_voxels"] for k, v in burden.items()}
        report["lung_px"] = {k: v["lung_voxels"] for k, v in burden.items()}
        report["outputs"] = {"lesion_mask": LESION_PNG, "lung_mask": LUNG_PNG, "overlay": OVERLAY}
    report["lesion_percent_of_lung"] = {k: v["percent"] for k, v in burden.items()}
    report["voxels"] = {
        k: {"lesion": v["lesion_voxels"], "lung": v["lung_voxels"]} for k, v in burden.items()
    }
    numbers = study.instance_numbers
    report["per_slice"] = [
        {
            "z": z,
            **({"instance_number": numbers[z]} if numbers else {}),
            "lesion_voxels": int(lesion_z[z]),
            "lung_voxels": int(lung_z[z]),
            "percent": 100.0 * float(lesion_z[z]) / float(lung_z[z]) if lung_z[z] else 0.0,
        }
        for z in range(n)
    ]
    report["overlay_slices"] = _pick_overlay(lesion_z, lung_z, n_overlay)
    return report


def _overlay_titles(report: dict[str, Any]) -> list[str]:
    """One title per overlay slice: where it is (volumes), its lesion amount and % of lung."""
    titles = []
    volume = report["units"] == "mL"
    for z in report["overlay_slices"]:
        row = report["per_slice"][z]
        amount = (
            f"{row['lesion_voxels'] * report['voxel_ml']:.1f} mL" if volume else f"{row['lesion_voxels']} px"
        )
        title = f"{amount}, {row['percent']:.1f}% of lung"
        if volume:
            where = f"z={z}" + (f" (inst. {row['instance_number']})" if "instance_number" in row else "")
            title = f"{where}: {title}"
        titles.append(title)
    return titles


def write_outputs(
    folder: Path, study: Study, masks: StudyMasks, report: dict[str, Any], timer: Timer | None = None
) -> None:
    """Write the masks and the overlay into `folder`.

    Masks are NIfTI on the input's grid for volumes, PNG for a slice, and for a DICOM series also a DICOM
    SEG referencing its instances (`covseg.dicom_seg`).
    """
    import SimpleITK as sitk

    from covseg import report as figures
    from covseg.io import write_mask_png

    timer = timer or Timer()
    with timer("write_masks"):
        if study.image is not None:
            sitk.WriteImage(_mask_image(masks.lesion, study), str(folder / LESION_NII), True)
            sitk.WriteImage(_mask_image(masks.sides, study), str(folder / LUNG_NII), True)
        else:
            write_mask_png(np.rot90(masks.lesion[0], -study.rotate), folder / LESION_PNG)
            write_mask_png(np.rot90(masks.lung[0], -study.rotate), folder / LUNG_PNG)
    if report["outputs"].get("dicom_seg"):
        from covseg.dicom_seg import write_segmentation

        with timer("write_seg"):
            model = report["model"]
            parameters = {
                "threshold": str(report["threshold"]),
                "model": str(model.get("uri") or "in-memory"),
                "model_version": str(model.get("version", "")),
            }
            write_segmentation(
                folder / report["outputs"]["dicom_seg"],
                study.series,
                study.headers,
                study.image,
                masks.lesion,
                masks.sides,
                RIGHT,
                LEFT,
                report["covseg_version"],
                parameters,
            )
    with timer("write_overlay"):
        chosen = report["overlay_slices"]
        aspect = 1.0 if study.image is None else study.image.GetSpacing()[1] / study.image.GetSpacing()[0]
        images = np.stack([to_8bit_look(study.slices[z], study.domain) for z in chosen])
        figure = figures.overlay_montage(
            images, masks.lesion[chosen], masks.lung[chosen], _overlay_titles(report), aspect
        )
        figures.save(figure, folder / OVERLAY)


def predict_study(
    input_path: str | Path,
    model: str | Path | LesionSegmenter,
    out_dir: str | Path,
    batch_size: int = 32,
    rotate: int = 0,
    threshold: float = 0.5,
    allow_identified: bool = False,
    n_overlay: int = OVERLAY_SLICES,
) -> dict[str, Any]:
    """Segment one study and write its outputs to `out_dir` (atomically: all files appear, or none).

    read (:func:`covseg.io.read_study`) -> segment (:func:`segment_study`) -> report (:func:`build_report`)
    -> write (:func:`write_outputs`, then report.json with the time each part took).

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

    from covseg.io import atomic_dir, read_study
    from covseg.training import device

    timer = Timer()
    input_path, out_dir = Path(input_path), Path(out_dir)
    _check_out_dir(out_dir, input_path)  # before reading: a refused --out costs nothing
    with timer("read"):
        study = read_study(input_path, rotate=rotate, allow_identified=allow_identified)
    with timer("load_model"):
        segmenter = model if isinstance(model, LesionSegmenter) else LesionSegmenter.load(model)
        segmenter.model.to(device())  # bf16 autocast on CUDA (segment_canonical); the CPU otherwise
        provenance = model_provenance(model, segmenter)
    masks = segment_study(study, segmenter, batch_size, threshold, timer)
    with timer("report"):
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        report = build_report(study, masks, provenance, threshold, created, n_overlay)
    with atomic_dir(out_dir) as scratch:
        write_outputs(scratch, study, masks, report, timer)
        report["timing_s"] = dict(timer.parts)
        report["seconds"] = timer.elapsed
        report["slices_per_s"] = report["n_slices"] / report["seconds"]
        (scratch / REPORT).write_text(json.dumps(report, indent=2))
    return report


def format_summary(report: dict[str, Any]) -> str:
    """One line for the console: lesion burden per lung and where the outputs are."""
    pct = report["lesion_percent_of_lung"]
    if report["units"] == "mL":
        les = report["lesion_ml"]
        amount = (
            f"lesion {les['both']:.1f} mL ({pct['both']:.1f}% of lungs; right {les['right']:.1f} mL "
            f"{pct['right']:.1f}%, left {les['left']:.1f} mL {pct['left']:.1f}%)"
        )
    else:
        amount = f"lesion {report['lesion_px']['both']} px ({pct['both']:.1f}% of lung area)"
    line = f"{report['n_slices']} slice(s) in {report['seconds']:.1f} s: {amount}"
    if skipped := report["outputs"].get("dicom_seg_skipped"):
        line += f"\nno DICOM SEG: {skipped}"
    return line
