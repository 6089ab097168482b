"""`covseg predict` wall time on real DICOM studies of 50-600 slices: cold and warm, per part, per model.

The studies are real COVID-CT-MD slices at full resolution (512 x 512, JPEG-Lossless as stored), written as
one series: the four series P001, normal001, cap001, normal002 one after the other (148 + 154 + 168 + 167 =
637 slices, each in its own InstanceNumber order, cranial first), the first N kept. Pixel data are copied
byte for byte; only the headers are rewritten so that the files form one series: P001's study, series,
frame of reference, patient ID, pixel spacing and orientation, new SOP instance UIDs, InstanceNumber 1..N,
ImagePositionPatient continuing P001's 2 mm steps. (The other series' pixels are 0.59-0.75 mm; taking P001's
spacing scales them by up to 21 % in the plane: real CT content, not a real patient geometry.)

Per model and size: a **cold** run (a fresh `covseg predict` process: imports, model load, everything;
wall time measured outside) and **warm** runs (`predict_study` in this process with the model already
loaded), each with the parts `predict_study` times (report.json `timing_s`) and the 1-minute load
average before and after (the machine may be shared: compare ratios measured in one run).

    .venv/bin/python bench/predict_study.py --model quick=artifacts/segment --sizes 50,150,300,600
    .venv/bin/python bench/predict_study.py --random-weights quick,full --sizes 300 --repeats 1

`--random-weights` times the `quick` and/or `full` profiles' U-Nets with random weights (the cost of the
network does not depend on them; the masks, and so the analysis and writing, do a little).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from covseg.telemetry import TELEMETRY_OFF

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets" / "covid-ct-md"
SERIES = ("P001", "normal001", "cap001", "normal002")
SLICE_STEP_MM = 2.0
PARTS = (
    "read",
    "load_model",
    "lungs_harmonise",
    "model",
    "map_back",
    "analyse",
    "report",
    "write_masks",
    "write_seg",
    "write_overlay",
)


def build_study(n: int, folder: Path, shared: Path = SHARED) -> Path:
    """Write the first `n` slices of the concatenated COVID-CT-MD series into `folder` as one DICOM series."""
    import pydicom
    from pydicom.uid import generate_uid

    files = []
    for case in SERIES:
        headers = [
            (int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber), p)
            for p in sorted((shared / case).glob("*.dcm"))
        ]
        files += [p for _, p in sorted(headers)]
    if n > len(files):
        raise SystemExit(f"only {len(files)} slices in {shared}")
    folder.mkdir(parents=True, exist_ok=True)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    x0, y0, z0 = (float(v) for v in first.ImagePositionPatient)
    for k, path in enumerate(files[:n]):
        dataset = pydicom.dcmread(path)  # pixel data stay as stored (compressed)
        for keyword in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "FrameOfReferenceUID",
            "PatientID",
            "PixelSpacing",
            "ImageOrientationPatient",
            "SeriesNumber",
            "StudyID",
        ):
            setattr(dataset, keyword, first.get(keyword))
        uid = generate_uid(entropy_srcs=[str(path), str(k)])
        dataset.SOPInstanceUID = uid
        dataset.file_meta.MediaStorageSOPInstanceUID = uid
        dataset.InstanceNumber = k + 1
        dataset.ImagePositionPatient = [x0, y0, round(z0 - SLICE_STEP_MM * k, 3)]
        dataset.SliceLocation = round(z0 - SLICE_STEP_MM * k, 3)
        dataset.save_as(folder / f"{k + 1:04d}.dcm")
    return folder


def random_models(folder: Path) -> dict[str, Path]:
    """Model folders with the `quick` and `full` profiles' U-Nets and image sizes, random weights (seed 0)."""
    import torch

    from covseg.config import load_params
    from covseg.nets import build_segmenter
    from covseg.training import save_model

    out = {}
    for profile in ("quick", "full"):
        params = load_params(profile, path=REPO / "params.yaml")
        features = list(params["segment"]["features"])
        torch.manual_seed(0)
        target = folder / f"random-{profile}"
        target.mkdir(parents=True, exist_ok=True)
        save_model(
            build_segmenter(tuple(features)),
            target / "segmenter.pt",
            {
                "features": features,
                "image_size": int(params["image_size"]),
                "seed": 0,
                "profile": profile,
                "weights": "random (timing only)",
            },
        )
        out[profile] = target
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def cold_run(study: Path, model: Path, out: Path) -> dict[str, Any]:
    """A fresh `covseg predict` process; wall time measured here, parts from its report.json."""
    env = {**os.environ, **TELEMETRY_OFF}
    before = load1()
    start = time.perf_counter()
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "covseg"),
            "predict",
            str(study),
            "--model",
            str(model),
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr)
    report = json.loads((out / "report.json").read_text())
    return {
        "kind": "cold",
        "wall_s": wall,
        "seconds": report["seconds"],
        "parts": report["timing_s"],
        "load_before": before,
        "load_after": load1(),
        "stderr": done.stderr.strip(),
    }


def warm_run(study: Path, segmenter: Any, out: Path) -> dict[str, Any]:
    """predict_study in this process with the model loaded."""
    from covseg.predict import predict_study

    before = load1()
    start = time.perf_counter()
    report = predict_study(study, segmenter, out)
    wall = time.perf_counter() - start
    return {
        "kind": "warm",
        "wall_s": wall,
        "seconds": report["seconds"],
        "parts": report["timing_s"],
        "load_before": before,
        "load_after": load1(),
        "lesion_voxels": report["voxels"]["both"]["lesion"],
    }


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(intercept)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Warm seconds per study against slices, one line per model, with the fitted slope."""
    from covseg import report

    plt = report._pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in sorted({r["model"] for r in results}):
        rows = sorted((r for r in results if r["model"] == name), key=lambda r: r["slices"])
        xs = [r["slices"] for r in rows]
        ys = [r["warm_s"] for r in rows]
        axis.plot(xs, ys, "o", label=f"{name} (warm)")
        if len(xs) > 1:
            slope, intercept = fit_line(xs, ys)
            axis.plot(
                xs,
                [intercept + slope * x for x in xs],
                "-",
                alpha=0.6,
                label=f"{name}: {intercept:.1f} s + {1000 * slope:.0f} ms/slice",
            )
        cold = [(r["slices"], r["cold_s"]) for r in rows if r.get("cold_s")]
        if cold:
            axis.plot(*zip(*cold, strict=True), "x", label=f"{name} (cold process)")
    axis.set_xlabel("slices per study (512 x 512)")
    axis.set_ylabel("seconds per study")
    axis.set_title("covseg predict on this CPU", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    report.save(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=model folder (repeatable)")
    parser.add_argument(
        "--random-weights",
        default="",
        metavar="PROFILES",
        help="add these profiles' U-Nets with random weights, e.g. quick,full",
    )
    parser.add_argument("--sizes", default="50,150,300,600", help="slices per study")
    parser.add_argument("--cold-sizes", default="300", help="sizes that also get a cold (fresh process) run")
    parser.add_argument("--repeats", type=int, default=1, help="warm runs per size (median reported)")
    parser.add_argument(
        "--work", default=None, help="folder for the studies and outputs (default: a temp dir)"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write the size plot here (PNG)")
    args = parser.parse_args(argv)

    uptime_before = uptime()
    work = Path(args.work or tempfile.mkdtemp(prefix="covseg-predict-study-"))
    models = dict(item.split("=", 1) for item in args.model)
    if args.random_weights:
        models.update(
            {
                f"{k} (random weights)": str(v)
                for k, v in random_models(work / "models").items()
                if k in args.random_weights.split(",")
            }
        )
    sizes = [int(s) for s in args.sizes.split(",") if s]
    cold_sizes = {int(s) for s in args.cold_sizes.split(",") if s}
    studies = {}
    for n in sizes:
        folder = work / f"study-{n}"
        studies[n] = folder if (folder / f"{n:04d}.dcm").is_file() else build_study(n, folder)

    import torch

    from covseg.predict import LesionSegmenter

    results, runs = [], []
    for name, model in models.items():
        segmenter = LesionSegmenter.load(model)
        for n in sizes:
            row: dict[str, Any] = {"model": name, "slices": n}
            if n in cold_sizes:
                cold = cold_run(studies[n], Path(model), work / "out-cold")
                runs.append({"model": name, "slices": n, **cold})
                row["cold_s"] = cold["wall_s"]
                print(
                    f"{name}, {n} slices, cold: {cold['wall_s']:.1f} s (load {cold['load_before']} -> "
                    f"{cold['load_after']})",
                    file=sys.stderr,
                )
            warm = [warm_run(studies[n], segmenter, work / "out-warm") for _ in range(args.repeats)]
            runs += [{"model": name, "slices": n, **w} for w in warm]
            row["warm_s"] = statistics.median(w["seconds"] for w in warm)
            row["warm_parts"] = {k: statistics.median(w["parts"].get(k, 0.0) for w in warm) for k in PARTS}
            row["load"] = [warm[0]["load_before"], warm[-1]["load_after"]]
            results.append(row)
            print(f"{name}, {n} slices, warm: {row['warm_s']:.1f} s (load {row['load']})", file=sys.stderr)

    fits = {}
    for name in models:
        rows = [r for r in results if r["model"] == name]
        if len(rows) > 1:
            slope, intercept = fit_line([r["slices"] for r in rows], [r["warm_s"] for r in rows])
            fits[name] = {"ms_per_slice": 1000 * slope, "intercept_s": intercept}
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "uptime_before_after": [uptime_before, uptime()],
        "models": models,
        "results": results,
        "fits": fits,
        "runs": runs,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot(results, Path(args.plot))
    print("\n| model | slices | cold s | warm s | " + " | ".join(PARTS) + " | load |")
    print("|---|---:|---:|---:|" + "---:|" * len(PARTS) + "---|")
    for r in results:
        parts = " | ".join(f"{r['warm_parts'][k]:.1f}" for k in PARTS)
        cold = f"{r['cold_s']:.1f}" if r.get("cold_s") else ""
        print(
            f"| {r['model']} | {r['slices']} | {cold} | {r['warm_s']:.1f} | {parts} | {r['load'][0]} -> {r['load'][1]} |"
        )
    for name, fit in fits.items():
        print(f"{name}: {fit['intercept_s']:.1f} s + {fit['ms_per_slice']:.0f} ms per slice (warm)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
