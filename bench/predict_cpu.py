"""Seconds per study and slices/s of `covseg predict` on one real CT study, on this machine's CPU.

Profiled into the parts predict_study times itself (report.json `timing_s`): read + validate the DICOM
series, lung segmentation + harmonisation, the network, mapping back to the input grid, analysis (left/right
split), the report (burden), writing the masks, the DICOM SEG, drawing the overlay. For studies of 50-600
slices, cold and warm, see bench/predict_study.py. The model is loaded once, before the timed runs
(cold start, imports included, is reported apart). The load average is read before and after: on a shared
machine, numbers taken under load are slower than the machine.

    .venv/bin/python bench/predict_cpu.py                       # artifacts/segment, COVID-CT-MD P001
    .venv/bin/python bench/predict_cpu.py --model DIR --repeats 3 --json bench/predict_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = REPO.parent / "shared" / "datasets" / "covid-ct-md" / "P001"
PARTS = (
    "read",
    "lungs_harmonise",
    "model",
    "map_back",
    "analyse",
    "report",
    "write_masks",
    "write_seg",
    "write_overlay",
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_architecture(profile: str, n_slices: int, batch_size: int) -> dict:
    """ms/slice of segment_canonical for a profile's U-Net at its image size (random weights and input)."""
    import numpy as np
    import torch

    from covseg.config import load_params
    from covseg.nets import build_segmenter
    from covseg.segment import segment_canonical

    params = load_params(profile, path=REPO / "params.yaml")
    features, size = tuple(params["segment"]["features"]), int(params["image_size"])
    torch.manual_seed(0)
    model = build_segmenter(features).eval()
    rng = np.random.default_rng(0)
    images = rng.random((n_slices, size, size), dtype=np.float32)
    lungs = np.ones(images.shape, dtype=bool)
    segment_canonical(model, images[:2], lungs[:2], batch_size)  # warm-up
    start = time.perf_counter()
    segment_canonical(model, images, lungs, batch_size)
    seconds = time.perf_counter() - start
    return {
        "profile": profile,
        "image_size": size,
        "features": list(features),
        "n_slices": n_slices,
        "ms_per_slice": 1000 * seconds / n_slices,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=str(REPO / "artifacts" / "segment"), help="model folder or MLflow URI"
    )
    parser.add_argument("--study", default=str(DEFAULT_STUDY), help="DICOM series folder, NIfTI or slice")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (median reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--arch-profile",
        default="full",
        help="also time the network alone with this params.yaml profile's U-Net and image size "
        "(random weights: the cost does not depend on them); '' to skip",
    )
    parser.add_argument("--arch-slices", type=int, default=16, help="slices for the --arch-profile timing")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    start = time.perf_counter()
    import torch

    from covseg.predict import LesionSegmenter, predict_study

    if args.threads:
        torch.set_num_threads(args.threads)
    segmenter = LesionSegmenter.load(args.model)
    cold_load_s = time.perf_counter() - start

    runs = []
    with tempfile.TemporaryDirectory(prefix="covseg-bench-") as tmp:
        for i in range(args.repeats):
            load = os.getloadavg()[0]
            report = predict_study(args.study, segmenter, Path(tmp) / f"run{i}", batch_size=args.batch_size)
            runs.append(
                {
                    "load_1min_before": load,
                    "load_1min_after": os.getloadavg()[0],
                    "seconds": report["seconds"],
                    **report["timing_s"],
                }
            )
            print(
                f"run {i + 1}/{args.repeats}: {report['seconds']:.2f} s, {report['n_slices']} slices",
                file=sys.stderr,
            )
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak of the predict runs
    arch = (
        time_architecture(args.arch_profile, args.arch_slices, args.batch_size) if args.arch_profile else None
    )
    load_after = os.getloadavg()

    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    n = report["n_slices"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in load_after],
        },
        "study": {"path": args.study, "n_slices": n, "size": report["input"]["size"]},
        "model": {"uri": str(args.model), "meta": report["model"]["meta"]},
        "cold_start_s": cold_load_s,
        "max_rss_mb": max_rss_mb,
        "repeats": args.repeats,
        "seconds_per_study": median["seconds"],
        "slices_per_s": n / median["seconds"],
        "parts_s": {key: median.get(key, 0.0) for key in PARTS},
        "parts_ms_per_slice": {key: 1000 * median.get(key, 0.0) / n for key in PARTS},
        "runs": runs,
        "network_only": arch,
        "lesion_ml": report.get("lesion_ml"),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| part | s / study | ms / slice | share |\n|---|---:|---:|---:|")
    for key in PARTS:
        print(
            f"| {key} | {median[key]:.2f} | {1000 * median[key] / n:.1f} | {median[key] / median['seconds']:.0%} |"
        )
    print(
        f"| **total** | **{median['seconds']:.2f}** | {1000 * median['seconds'] / n:.1f} | "
        f"{n / median['seconds']:.2f} slices/s |"
    )
    if arch:
        print(
            f"\nnetwork alone, {arch['profile']} profile ({arch['image_size']} px, features {arch['features']}): "
            f"{arch['ms_per_slice']:.0f} ms/slice"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
