"""Markdown tables from a device run's results, to paste into bench/README.md (run HERE).

.venv/bin/python tools/device/to_markdown.py RESULTS_DIR      # the folder the run reply names (files_at)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    folder = Path(sys.argv[1])
    times, metrics, bench, job = (
        load(folder, n) for n in ("stage_times.json", "metrics.json", "infer_bench.json", "job.json")
    )
    if times:
        print(
            f"Training chain, profile `{times['profile']}` (overrides: {times['overrides']}), "
            f"{times['gpu'] or times['device']}, torch {times['torch']}, Python {times['python']}; "
            f"epochs {times['epochs']}, probe {times['probe_epochs']}; status: {times['status']}\n"
        )
        print("| stage | s | training loops (epochs, s) | rest of the stage, s | GPU peak MiB |")
        print("|---|---:|---|---:|---:|")
        for name, entry in times["stages"].items():
            if entry.get("status") != "ok":
                print(f"| {name} | | {entry.get('status')} | | |")
                continue
            loops = ", ".join(
                f"{lp['loop']} {lp['epochs']} ep {lp['seconds']:.0f} s"
                for lp in entry.get("training_loops", [])
            )
            print(
                f"| {name} | {entry['seconds']:.1f} | {loops} | {entry.get('outside_loops_s', '')} | "
                f"{entry.get('gpu_peak_mib', '')} |"
            )
        if "total" in times["seconds"]:
            print(f"| **total** | **{times['seconds']['total']:.0f}** | | | |")
        print()
    if metrics:
        print("| row | Dice | IoU | PPV | sensitivity | specificity |")
        print("|---|---|---|---|---|---|")
        for name in ("coarse", "fine", "prior", "final"):
            if name not in metrics:
                continue
            for label, row in ((name, metrics[name]), (f"{name}, adaptive", metrics[name]["adaptive"])):
                print(
                    f"| {label} | "
                    + " | ".join(
                        f"{row[k]:.3f}" for k in ("dice", "iou", "ppv", "sensitivity", "specificity")
                    )
                    + " |"
                )
        cam = metrics.get("cam_inside_vs_outside")
        if cam:
            print(f"\nGrad-CAM inside vs outside the lesions: {cam['inside']:.2f} vs {cam['outside']:.2f}")
        print()
    if bench:
        print(
            f"Inference, {bench['gpu']}, torch {bench['torch']}, CUDA {bench['cuda']}, {bench['autocast']}, "
            f"{bench['size']}x{bench['size']} input, {bench['model']['weights']} weights "
            f"{bench['model'].get('features')}; {bench['gflops_per_slice']} GFLOP/slice; "
            f"matmul {bench['matmul']['n']}^3 {bench['matmul']['dtype']}: {bench['matmul']['tflops']} TFLOP/s\n"
        )
        print("| cuDNN benchmark | batch | slices/s | ms/call (median) | model TFLOP/s | of matmul peak |")
        print("|---|---:|---:|---:|---:|---:|")
        for key in ("sweep", "sweep_cudnn_benchmark"):
            for row in bench.get(key, []):
                if "slices_per_s" not in row:
                    print(
                        f"| {row.get('cudnn_benchmark', key)} | {row['batch']} | {row.get('error')} | | | |"
                    )
                    continue
                print(
                    f"| {'on' if row['cudnn_benchmark'] else 'off'} | {row['batch']} | {row['slices_per_s']:.0f} | "
                    f"{row['median_ms']:.2f} | {row['model_tflops']:.1f} | "
                    f"{100 * row.get('fraction_of_matmul_peak', 0):.1f} % |"
                )
        print()
    if job:
        print(
            f"Job: {job['total_s']} s in all, return codes {job['rc']}, SimpleITK: {job['simpleitk']}; carry "
            f"{job['carry']['lungs_key']} ({job['carry']['lungs']['bits']}-bit image values, max error "
            f"{job['carry']['lungs']['max_abs_error']:.1e})."
        )


if __name__ == "__main__":
    main()
