"""Segmenter inference throughput on the GPU, and how far it is from the chip's measured matmul peak.

    python3 tools/device/infer_bench.py --out OUT/infer_bench.json [--model WORK/artifacts/segment]
        [--size 352] [--batches 1,8,32,128,256,512] [--min-seconds 1.0] [--matmul 8192]

* model: the trained segmenter (MONAI BasicUNet, `covseg.segment.load_segmenter`) when --model holds one,
  else the same architecture with random weights (`--features`, default the full profile's): the cost
  does not depend on the weights; `weights` in the JSON says which.
* timed call: what `covseg.segment.segment_canonical` does per batch on the GPU, input already on the
  device: bf16 autocast forward, `.float()`, sigmoid. No host transfer, no lung masking (both outside the
  model). Per batch size: 3 warm-up calls, then calls until --min-seconds, CUDA-synchronised, median and
  best of the per-call times; slices/s from the median.
* twice: cuDNN as the project leaves it (torch.backends.cudnn.benchmark False) and with benchmark on.
* FLOPs per slice: torch.utils.flop_counter.FlopCounterMode on one forward (convolutions and matmuls,
  2 per multiply-add; norms, activations and upsampling copies are not counted).
* matmul peak: bf16 --matmul^3 products on random data, 3 warm-ups + 30 timed (mean).
* MFU-like ratio: flops_per_slice x slices/s / matmul TFLOP/s.
On the CPU (rehearsal) it runs the same code in float32 with what --size / --batches say.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from covseg.training import autocast


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def load_model(model_dir: str | None, features: tuple[int, ...]) -> tuple[torch.nn.Module, dict]:
    from covseg.nets import build_segmenter
    from covseg.segment import MODEL, load_segmenter

    if model_dir and (Path(model_dir) / MODEL).is_file():
        model, meta = load_segmenter(model_dir)
        return model, {"weights": "trained", "model_dir": str(model_dir), **meta}
    return build_segmenter(features).eval(), {"weights": "random", "features": list(features)}


def flops_per_slice(model: torch.nn.Module, size: int, dev: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, size, size, device=dev)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter, autocast(dev):
        model(x)
    return int(counter.get_total_flops())


def time_batch(
    model: torch.nn.Module, batch: int, size: int, dev: torch.device, min_seconds: float, max_calls: int = 200
) -> dict:
    x = torch.rand(batch, 1, size, size, device=dev)

    def call() -> torch.Tensor:
        with autocast(dev):
            return torch.sigmoid(model(x).float())

    with torch.inference_mode():
        for _ in range(3):
            call()
        sync(dev)
        times: list[float] = []
        start = time.perf_counter()
        while (time.perf_counter() - start < min_seconds or len(times) < 3) and len(times) < max_calls:
            t0 = time.perf_counter()
            call()
            sync(dev)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "batch": batch,
        "calls": len(times),
        "median_ms": round(median * 1e3, 3),
        "best_ms": round(min(times) * 1e3, 3),
        "slices_per_s": round(batch / median, 1),
    }


def sweep(
    model: torch.nn.Module,
    batches: list[int],
    size: int,
    dev: torch.device,
    min_seconds: float,
    flops: int,
    peak_tflops: float | None,
) -> list[dict]:
    rows = []
    for batch in batches:
        try:
            row = time_batch(model, batch, size, dev, min_seconds)
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch": batch, "error": "out of memory"})
            torch.cuda.empty_cache()
            break
        row["model_tflops"] = round(flops * row["slices_per_s"] / 1e12, 4)
        if peak_tflops:
            row["fraction_of_matmul_peak"] = round(flops * row["slices_per_s"] / 1e12 / peak_tflops, 5)
        if dev.type == "cuda":
            row["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        row["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        rows.append(row)
        print(
            f"  batch {batch:4d}: {row['slices_per_s']:10.1f} slices/s  {row['median_ms']:9.2f} ms/call  "
            f"{row['model_tflops']:7.2f} TFLOP/s",
            flush=True,
        )
    return rows


def matmul_tflops(n: int, dev: torch.device, repeats: int = 30) -> dict:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(dev)
    seconds = (time.perf_counter() - t0) / repeats
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "ms_per_product": round(seconds * 1e3, 4),
        "tflops": round(2 * n**3 / seconds / 1e12, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="folder with segmenter.pt (else random weights)")
    parser.add_argument("--features", default="32,32,64,128,256,32", help="architecture for random weights")
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--batches", default="1,8,32,128,256,512")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--matmul", type=int, default=8192)
    parser.add_argument("--no-cudnn-benchmark-sweep", action="store_true")
    args = parser.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    model, meta = load_model(args.model, tuple(int(f) for f in args.features.split(",")))
    model = model.to(dev).eval()
    report: dict = {
        "device": str(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor(),
        "autocast": "bf16" if dev.type == "cuda" else "none (float32)",
        "size": args.size,
        "model": meta,
        "params": sum(p.numel() for p in model.parameters()),
    }

    print(f"matmul {args.matmul}^3 ...", flush=True)
    report["matmul"] = matmul_tflops(args.matmul, dev)
    print(f"  {report['matmul']['tflops']} TFLOP/s", flush=True)
    peak = report["matmul"]["tflops"]

    report["flops_per_slice"] = flops_per_slice(model, args.size, dev)
    report["gflops_per_slice"] = round(report["flops_per_slice"] / 1e9, 3)
    print(f"model: {report['gflops_per_slice']} GFLOP per {args.size}x{args.size} slice", flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    torch.backends.cudnn.benchmark = False
    print("sweep, cudnn.benchmark=False (as the project runs)", flush=True)
    report["sweep"] = sweep(model, batches, args.size, dev, args.min_seconds, report["flops_per_slice"], peak)
    if dev.type == "cuda" and not args.no_cudnn_benchmark_sweep:
        torch.backends.cudnn.benchmark = True
        print("sweep, cudnn.benchmark=True", flush=True)
        report["sweep_cudnn_benchmark"] = sweep(
            model, batches, args.size, dev, args.min_seconds, report["flops_per_slice"], peak
        )
        torch.backends.cudnn.benchmark = False
    ok = [r for key in ("sweep", "sweep_cudnn_benchmark") for r in report.get(key, []) if "slices_per_s" in r]
    if ok:
        best = max(ok, key=lambda r: r["slices_per_s"])
        report["best"] = best
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report.get("best", {})), flush=True)


if __name__ == "__main__":
    main()
