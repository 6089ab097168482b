"""Compare tools/device/shim/SimpleITK.py with the real SimpleITK, on the project's own data (run HERE).

    .venv/bin/python tools/device/shim_check.py [--lungs DIR] [--coarse DIR] [--ingest DIR] [--json PATH]

Checks, exactly as the stages call them:
  otsu      cam.otsu_in_lung's filter (64 bins, mask value 1) on Grad-CAM maps (coarse.npz) in their lungs,
            plus random maps; compares the thresholds and the resulting coarse masks
  opening   mil.lesion_prior's GrayscaleMorphologicalOpening (ball, radius [r, r, 0]) on canonical slices,
            r = 1 and 2 (what open_radius_frac gives at 128 and 256 px)
  read      evaluate._read_mask's ReadImage + GetArrayFromImage on every evaluation mask
Exit status 1 when any array or threshold differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def load_shim():
    spec = importlib.util.spec_from_file_location(
        "sitk_shim", Path(__file__).parent / "shim" / "SimpleITK.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def otsu(sitk, cam: np.ndarray, lung: np.ndarray) -> float:
    f = sitk.OtsuThresholdImageFilter()
    f.SetNumberOfHistogramBins(64)
    f.SetMaskValue(1)
    f.Execute(sitk.GetImageFromArray(cam.astype(np.float32)), sitk.GetImageFromArray(lung.astype(np.uint8)))
    return float(f.GetThreshold())


def opening(sitk, images: np.ndarray, radius: int) -> np.ndarray:
    volume = sitk.GetImageFromArray(images.astype(np.float32))
    return sitk.GetArrayFromImage(
        sitk.GrayscaleMorphologicalOpening(volume, kernelRadius=[radius, radius, 0], kernelType=sitk.sitkBall)
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lungs", default=str(ROOT / "artifacts" / "lungs"))
    parser.add_argument("--coarse", default=str(ROOT / "artifacts" / "coarse"))
    parser.add_argument("--ingest", default=str(ROOT / "artifacts" / "ingest"))
    parser.add_argument("--max-slices", type=int, default=400)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import pandas as pd
    import SimpleITK as real

    shim = load_shim()
    assert not hasattr(real, "IS_COVSEG_SHIM") or not real.IS_COVSEG_SHIM, "the real SimpleITK is shadowed"
    report: dict[str, object] = {"simpleitk": real.Version_VersionString()}
    ok = True

    slices = np.load(Path(args.lungs) / "slices.npz")
    lungs = slices["lung"]
    rng = np.random.default_rng(0)

    # Otsu on real Grad-CAM maps (as cam.threshold_maps passes them: float16 -> float32) and random maps
    cams = np.load(Path(args.coarse) / "coarse.npz")["cam"]
    rows = np.nonzero(lungs.reshape(len(lungs), -1).sum(1) >= 16)[0]
    rows = rows[np.linspace(0, len(rows) - 1, min(args.max_slices, len(rows))).round().astype(int)]
    diffs, mask_diff_px = [], 0
    for r in rows:
        cam = cams[r].astype(np.float32)
        if np.ptp(cam[lungs[r]]) < 1e-6:
            continue
        a, b = otsu(real, cam, lungs[r]), otsu(shim, cam, lungs[r])
        diffs.append(abs(a - b))
        mask_diff_px += int((((cam >= a) & lungs[r]) != ((cam >= b) & lungs[r])).sum())
    for _ in range(200):
        size = int(rng.integers(16, 96))
        cam = rng.random((size, size)).astype(np.float32) ** float(rng.uniform(0.3, 3))
        lung = rng.random((size, size)) < 0.5
        a, b = otsu(real, cam, lung), otsu(shim, cam, lung)
        diffs.append(abs(a - b))
    report["otsu"] = {
        "maps": len(diffs),
        "max_abs_threshold_diff": float(max(diffs)),
        "n_threshold_diff": int(sum(d > 0 for d in diffs)),
        "coarse_mask_pixels_differing": mask_diff_px,
    }
    ok &= mask_diff_px == 0 and max(diffs) == 0.0

    # Grey opening on canonical slices (float16 -> float32 as lesion_prior does), r = 1 and 2
    images = slices["image"][rows[:64]].astype(np.float32)
    noise = rng.random((8, 40, 56)).astype(np.float32)
    report["opening"] = {}
    for radius in (1, 2, 3):
        for name, data in (("slices", images), ("random", noise)):
            a, b = opening(real, data, radius), opening(shim, data, radius)
            n = int((a != b).sum())
            report["opening"][f"{name}_r{radius}"] = {
                "pixels_differing": n,
                "max_abs_diff": float(np.abs(a - b).max()),
            }
            ok &= n == 0

    # Evaluation masks
    manifest = pd.read_parquet(Path(args.ingest) / "manifest.parquet")
    masks = [m for m in manifest.loc[manifest["role"] == "eval", "mask_file"].dropna() if m]
    bad = 0
    for name in masks:
        path = str(Path(args.ingest) / name)
        a = real.GetArrayFromImage(real.ReadImage(path))
        b = shim.GetArrayFromImage(shim.ReadImage(path))
        bad += int(a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b))
    report["read"] = {"masks": len(masks), "differing": bad}
    ok &= bad == 0

    report["identical"] = bool(ok)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
