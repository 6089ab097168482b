"""Do two versions of the predict path give the same masks? (Dice of their lesion and lung masks.)

Run once per code version (e.g. with PYTHONPATH pointing at a checkout of the older commit's src/), then
compare the two files:

    PYTHONPATH=/tmp/old/src .venv/bin/python bench/predict_agreement.py save old.npz --model M --study DIR
    .venv/bin/python bench/predict_agreement.py save new.npz --model M --study DIR
    .venv/bin/python bench/predict_agreement.py compare old.npz new.npz

`save` runs `predict_study` on the study (a DICOM series) and `LesionSegmenter.predict_slices` on the
`medseg-100` slices (radiological view, threshold 0.5), as `covseg predict` and `covseg evaluate` do.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MEDSEG = REPO.parent / "shared" / "datasets" / "medseg-100" / "images"
MEDSEG_ROTATE = -1


def save(out: Path, model: str, study: str, medseg: Path, n_medseg: int) -> None:
    import SimpleITK as sitk

    import covseg
    from covseg.io import read_slice
    from covseg.predict import LesionSegmenter, predict_study

    segmenter = LesionSegmenter.load(model)
    with tempfile.TemporaryDirectory() as tmp:
        predict_study(study, segmenter, Path(tmp) / "out")
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(tmp) / "out" / "lesion_mask.nii.gz"))) > 0
        lung = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(tmp) / "out" / "lung_mask.nii.gz")))
    images = [
        np.ascontiguousarray(np.rot90(read_slice(p), MEDSEG_ROTATE)) for p in sorted(medseg.glob("*.jpg"))
    ]
    preds = segmenter.predict_slices(images[:n_medseg], "8bit")
    medseg_masks = {f"medseg_{i}": p.prob >= 0.5 for i, p in enumerate(preds)}
    np.savez_compressed(out, study_lesion=lesion, study_lung=lung, **medseg_masks)
    print(f"{out}: covseg from {covseg.__file__}", file=sys.stderr)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def compare(first: Path, second: Path) -> None:
    a, b = np.load(first), np.load(second)
    print(
        f"study lesion Dice {dice(a['study_lesion'], b['study_lesion']):.6f} "
        f"({int(a['study_lesion'].sum())} vs {int(b['study_lesion'].sum())} voxels), "
        f"lung labels identical: {np.array_equal(a['study_lung'], b['study_lung'])}"
    )
    keys = sorted(k for k in a.files if k.startswith("medseg_"))
    per_slice = [dice(a[k], b[k]) for k in keys]
    pooled = dice(np.concatenate([a[k].ravel() for k in keys]), np.concatenate([b[k].ravel() for k in keys]))
    print(
        f"medseg-100 ({len(keys)} slices): pooled Dice {pooled:.6f}, lowest per-slice {min(per_slice):.6f}, "
        f"identical slices {sum(np.array_equal(a[k], b[k]) for k in keys)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("save")
    one.add_argument("out")
    one.add_argument("--model", required=True)
    one.add_argument("--study", required=True)
    one.add_argument("--medseg", default=str(MEDSEG))
    one.add_argument("--medseg-slices", type=int, default=50)
    two = sub.add_parser("compare")
    two.add_argument("first")
    two.add_argument("second")
    args = parser.parse_args(argv)
    if args.command == "save":
        save(Path(args.out), args.model, args.study, Path(args.medseg), args.medseg_slices)
    else:
        compare(Path(args.first), Path(args.second))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
