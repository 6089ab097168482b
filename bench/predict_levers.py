"""What bounds `covseg predict` on this CPU, and what each candidate lever would change (issue #18).

On one real study (default: the 300-slice series of `bench/predict_study.py`), each measured in this one
process so that ratios hold on a shared machine (the 1-minute load is printed with each line):

- the network on canonical slices of the study: torch eager fp32 (the current path), channels-last,
  bf16 autocast, ONNX Runtime fp32, ONNX Runtime int8 (dynamic quantisation), torch's dynamic int8
  quantisation, optionally torch.compile; ms/slice and the masks' Dice against the current path;
- slices whose canonical lung mask is empty (the network's output there is zero whatever it computes);
- lung segmentation (`covseg.lungs.segment_lungs`) on the slice as given vs on a slice downsampled 2x or
  4x with the mask upsampled back: ms/slice, lung-mask Dice, and the end-to-end lesion-mask Dice;
- lung segmentation + harmonisation in 1 vs 2 worker processes;
- the 3-D analysis (`split_sides`: connected components of the lung mask) and reading the series.

    .venv/bin/python bench/predict_levers.py --model full=/tmp/covseg-reference/segment --study DIR
    .venv/bin/python bench/predict_levers.py --random-weights full --study DIR --slices 48
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Pooled Dice of two boolean stacks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def timed(fn: Any, *args: Any, repeats: int = 1) -> tuple[Any, float]:
    """(result, best seconds of `repeats` calls)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return result, best


def network_levers(
    model: Any, canon: np.ndarray, lungs: np.ndarray, batch: int, compile_too: bool
) -> list[dict]:
    """ms/slice and mask Dice vs eager fp32 for each way of running the U-Net on the same inputs."""
    import torch

    from covseg.segment import segment_canonical

    n = len(canon)
    x_all = torch.from_numpy(np.ascontiguousarray(canon, np.float32))[:, None]

    def run_torch(net: Any, channels_last: bool = False, bf16: bool = False) -> np.ndarray:
        out = np.zeros(canon.shape, np.float32)
        with torch.inference_mode():
            for s in range(0, n, batch):
                x = x_all[s : s + batch]
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out[s : s + batch] = torch.sigmoid(net(x).float())[:, 0].numpy()
        return out * lungs

    rows = []
    reference, seconds = timed(segment_canonical, model, canon, lungs, batch)
    ref_mask = reference >= 0.5

    def add(name: str, probs: np.ndarray | None, secs: float, note: str = "") -> None:
        row = {
            "lever": name,
            "ms_per_slice": 1000 * secs / n,
            "speedup": seconds / secs,
            "load": load1(),
            "note": note,
        }
        if probs is not None:
            row["dice_vs_current"] = dice(probs >= 0.5, ref_mask)
            row["max_abs_prob_diff"] = float(np.abs(probs - reference).max())
        rows.append(row)
        print(
            f"  {name}: {row['ms_per_slice']:.0f} ms/slice, x{row['speedup']:.2f}, Dice "
            f"{row.get('dice_vs_current', float('nan')):.4f} (load {row['load']}) {note}",
            file=sys.stderr,
        )

    add("torch eager fp32 (current)", reference, seconds)
    model.eval()
    add("torch eager fp32, inference_mode", *timed(run_torch, model))
    cl = model.to(memory_format=torch.channels_last)
    add("channels-last", *timed(run_torch, cl, True))
    model.to(memory_format=torch.contiguous_format)
    add("bf16 autocast (CPU)", *timed(run_torch, model, False, True))
    quantised = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    n_quantised = sum(1 for m in quantised.modules() if "quantized" in type(m).__module__)
    add(
        "torch dynamic int8 (nn.Linear only)",
        *timed(run_torch, quantised),
        note=f"{n_quantised} modules quantised: the U-Net has no Linear layer",
    )
    rows += onnx_levers(model, canon, lungs, batch, reference, seconds, add)
    if compile_too:
        compiled = torch.compile(model)
        _, first = timed(run_torch, compiled)
        add(
            "torch.compile (inductor), after warm-up",
            *timed(run_torch, compiled),
            note=f"first call incl. compilation {first:.0f} s",
        )
    return rows


def onnx_levers(
    model: Any,
    canon: np.ndarray,
    lungs: np.ndarray,
    batch: int,
    reference: np.ndarray,
    seconds: float,
    add: Any,
) -> list[dict]:
    """ONNX Runtime fp32 and int8 (dynamic quantisation of the exported graph)."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        print("  onnxruntime not installed: ONNX levers skipped", file=sys.stderr)
        return []
    import torch

    folder = Path(tempfile.mkdtemp(prefix="covseg-onnx-"))
    fp32, int8 = folder / "unet.onnx", folder / "unet-int8.onnx"
    size = canon.shape[-1]
    start = time.perf_counter()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, size, size),),
        str(fp32),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        dynamo=False,
        opset_version=17,
    )
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    quantise_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    n = len(canon)

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out = np.zeros(canon.shape, np.float32)
        for s in range(0, n, batch):
            x = np.ascontiguousarray(canon[s : s + batch, None], np.float32)
            out[s : s + batch] = 1.0 / (1.0 + np.exp(-session.run(None, {"x": x})[0][:, 0]))
        return out * lungs

    run(fp32)  # session creation + first run apart (graph optimisation)
    add("ONNX Runtime fp32", *timed(run, fp32), note=f"export {export_s:.1f} s")
    run(int8)
    add("ONNX Runtime int8 dynamic", *timed(run, int8), note=f"quantisation {quantise_s:.1f} s")
    return []


def lung_levers(slices: np.ndarray, domain: str, segmenter: Any) -> list[dict]:
    """Lung segmentation on the slice vs downsampled 2x / 4x (mask upsampled), and the end-to-end lesion Dice."""
    import torch
    import torch.nn.functional as F

    from covseg.harmonise import crop_geometry, normalise, to_8bit_look, to_canonical
    from covseg.lungs import segment_lungs
    from covseg.segment import segment_canonical

    def reduced(image: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
        if factor == 1:
            return segment_lungs(image, domain)
        small = F.avg_pool2d(torch.from_numpy(image.astype(np.float32))[None, None], factor)[0, 0].numpy()
        body, lung = segment_lungs(small.astype(image.dtype), domain)
        up = [
            F.interpolate(
                torch.from_numpy(m.astype(np.float32))[None, None],
                size=image.shape,
                mode="bilinear",
                align_corners=False,
            )[0, 0].numpy()
            >= 0.5
            for m in (body, lung)
        ]
        return up[0], up[1]

    def lesion(masks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        canon, lung_c, geos = [], [], []
        for image, (body, lung) in zip(slices, masks, strict=True):
            geo = crop_geometry(body, lung, segmenter.size)
            lc = to_canonical(lung.astype(np.float32), geo) > 0.5
            canon.append(to_canonical(normalise(to_8bit_look(image, domain), body, lung), geo) * lc)
            lung_c.append(lc)
            geos.append(geo)
        probs = segment_canonical(segmenter.model, np.stack(canon), np.stack(lung_c))
        from covseg.harmonise import from_canonical

        return np.stack([from_canonical(p, g) >= 0.5 for p, g in zip(probs, geos, strict=True)])

    rows, base = [], None
    for factor in (1, 2, 4):
        masks, secs = timed(lambda f=factor: [reduced(s, f) for s in slices])
        row = {
            "lever": f"lungs at 1/{factor} resolution" if factor > 1 else "lungs as given (current)",
            "ms_per_slice": 1000 * secs / len(slices),
            "load": load1(),
        }
        if base is None:
            base, base_s, base_lesion = masks, secs, lesion(masks)
            row["lesion_dice_vs_current"] = 1.0
        else:
            row["lung_dice_vs_current"] = dice(
                np.stack([m[1] for m in masks]), np.stack([m[1] for m in base])
            )
            row["lesion_dice_vs_current"] = dice(lesion(masks), base_lesion)
        row["speedup"] = base_s / secs
        rows.append(row)
        print(
            f"  {row['lever']}: {row['ms_per_slice']:.0f} ms/slice, x{row['speedup']:.2f}, lung Dice "
            f"{row.get('lung_dice_vs_current', 1.0):.4f}, lesion Dice {row['lesion_dice_vs_current']:.4f} "
            f"(load {row['load']})",
            file=sys.stderr,
        )
    return rows


def _prepare_chunk(args: tuple[np.ndarray, str, int]) -> list:
    from covseg.harmonise import canonical_slice

    images, domain, size = args
    return [canonical_slice(image, domain, size) for image in images]


def pool_lever(slices: np.ndarray, domain: str, size: int) -> dict:
    """Lung segmentation + harmonisation in this process vs split over 2 worker processes.

    The workers are spawned, not forked: forked after torch has run its OpenMP threads here, both workers
    hung at 0 % CPU in the first run of this script (2026-12-02), a trap for adopting this lever.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _, one = timed(_prepare_chunk, (slices, domain, size))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_prepare_chunk, [(slices[:2], domain, size)] * 2))  # start the workers, import
        start = time.perf_counter()
        list(pool.map(_prepare_chunk, [(slices[0::2], domain, size), (slices[1::2], domain, size)]))
        two = time.perf_counter() - start
    row = {
        "lever": "lungs + harmonise in 2 processes",
        "ms_per_slice": 1000 * two / len(slices),
        "ms_per_slice_one_process": 1000 * one / len(slices),
        "speedup": one / two,
        "load": load1(),
    }
    print(
        f"  {row['lever']}: {row['ms_per_slice']:.0f} vs {row['ms_per_slice_one_process']:.0f} ms/slice, "
        f"x{row['speedup']:.2f} (load {row['load']})",
        file=sys.stderr,
    )
    return row


def read_parts(folder: str) -> dict:
    """Reading a series, apart: per-file header checks (SimpleITK), decoding the series (GDCM), pydicom headers."""
    import SimpleITK as sitk

    from covseg.io import _dicom_header, read_dicom_headers

    files = sorted(str(p) for p in Path(folder).iterdir())
    _, headers_s = timed(lambda: [_dicom_header(Path(f)) for f in files])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    _, decode_s = timed(reader.Execute)
    _, pydicom_s = timed(read_dicom_headers, files)
    row = {
        f"{k}_ms_per_slice": 1000 * v / len(files)
        for k, v in (("sitk_headers", headers_s), ("gdcm_decode", decode_s), ("pydicom_headers", pydicom_s))
    }
    print(
        "  read: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()) + f" (load {load1()})", file=sys.stderr
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="DICOM series folder (e.g. bench/predict_study.py's)")
    parser.add_argument("--model", action="append", default=[], help="NAME=model folder (repeatable)")
    parser.add_argument(
        "--random-weights",
        default="",
        metavar="PROFILES",
        help="add these profiles' U-Nets with random weights, e.g. quick,full",
    )
    parser.add_argument(
        "--slices", type=int, default=48, help="slices (evenly spread) for the per-slice levers"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from covseg.io import read_study
    from covseg.predict import LesionSegmenter, split_sides

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch_threads": torch.get_num_threads(),
        "load_start": list(os.getloadavg()),
    }
    study, read_s = timed(read_study, args.study)
    n = len(study.slices)
    result["read"] = {"slices": n, "ms_per_slice": 1000 * read_s / n, "load": load1()}
    print(f"read: {1000 * read_s / n:.0f} ms/slice for {n} slices (load {load1()})", file=sys.stderr)
    result["read"].update(read_parts(args.study))
    pick = np.linspace(0, n - 1, min(args.slices, n)).round().astype(int)
    subset = study.slices[pick]

    models = dict(item.split("=", 1) for item in args.model)
    if args.random_weights:
        sys.path.insert(0, str(Path(__file__).parent))
        from predict_study import random_models

        models.update(
            {
                f"{k} (random weights)": str(v)
                for k, v in random_models(Path(tempfile.mkdtemp(prefix="covseg-models-"))).items()
                if k in args.random_weights.split(",")
            }
        )
    result["models"] = {}
    for name, folder in models.items():
        segmenter = LesionSegmenter.load(folder)
        print(f"{name} ({segmenter.size} px, features {segmenter.meta['features']}):", file=sys.stderr)
        prepared, prep_s = timed(segmenter.prepare, list(subset), study.domain)
        canon = np.stack([p[0] for p in prepared])
        lungs = np.stack([p[1] for p in prepared])
        entry = {
            "prepare_ms_per_slice": 1000 * prep_s / len(subset),
            "network": network_levers(segmenter.model, canon, lungs, args.batch_size, args.compile),
        }
        result["models"][name] = entry

    first = LesionSegmenter.load(next(iter(models.values())))
    prepared = first.prepare(list(study.slices), study.domain)  # every slice: which have no lung at all
    empty = [int(not p[1].any()) for p in prepared]
    result["slices_without_lung"] = {"count": sum(empty), "of": n, "share": sum(empty) / n}
    print(f"slices whose canonical lung mask is empty: {sum(empty)} of {n}", file=sys.stderr)
    result["lungs"] = lung_levers(subset, study.domain, first)
    result["pool"] = pool_lever(subset, study.domain, first.size)
    lung = np.stack(
        [first.restore(np.zeros((1, first.size, first.size), np.float32), [p])[0].lung for p in prepared]
    )
    _, split_s = timed(split_sides, lung, (lung.shape[-1] - 1) / 2.0)
    result["analyse"] = {"split_sides_s": split_s, "ms_per_slice": 1000 * split_s / n, "load": load1()}
    print(f"split_sides (3-D components): {split_s:.2f} s for {n} slices (load {load1()})", file=sys.stderr)
    result["load_end"] = list(os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
