"""Peak memory and throughput of training from streamed shards as the data grows (issue 17).

For each replication factor R (real lungs-stage slices written R times: *replicated*, not new data) the
slices are written as tar shards (`covseg.shards`), then a fresh process streams one epoch of balanced
draws (one draw per training slice) through the classifier's training step (forward, backward, AdamW step,
batch 32) and reports its peak RSS and slices/s. For contrast, the in-memory path (`SliceSet.load` + resident
tensors, as the stages train today) is measured at the smaller factors: its memory grows with the data.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/scale/run.py --lungs artifacts/lungs --replicas 1 4 16

Writes bench/scale/results.json (one record per measurement) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def _weights(index: pd.DataFrame) -> np.ndarray:
    """The classifier's balanced draw over the train slices (half per label, even among sources)."""
    from covseg.training import balanced_weights

    weights = np.zeros(len(index))
    train = (index["split"] == "train") & index["label"].isin([0, 1])
    weights[train.to_numpy()] = balanced_weights(index[train])
    return weights


def _model(width: int) -> tuple[Any, Any]:
    import torch

    from covseg.nets import SliceClassifier

    torch.manual_seed(0)
    model = SliceClassifier(width=width)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)


def _step(model: Any, optimizer: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch
    import torch.nn.functional as F

    logits = model(torch.from_numpy(x)).float().squeeze(1)
    loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def stream(shards: str, batch: int, width: int, max_steps: int | None) -> dict[str, Any]:
    """One epoch from shards (child process)."""
    from covseg.shards import balanced_batches, draw_counts, open_source, stack

    source = open_source(shards)
    manifest, index = source.manifest(), source.index(["row", "split", "label", "source"])
    weights = _weights(index)
    rng = np.random.default_rng(0)
    counts = draw_counts(weights, int((weights > 0).sum()), rng)
    model, optimizer = _model(width)
    rss_before = _rss_mb()
    n, step_s, start = 0, 0.0, time.perf_counter()
    for chosen in balanced_batches(source, manifest, counts, batch, rng, buffer_size=256):
        x, y = stack(chosen, fill=0.1, tissue_ceiling=0.55)
        tick = time.perf_counter()
        _step(model, optimizer, x, y)
        step_s += time.perf_counter() - tick
        n += len(chosen)
        if max_steps and n >= max_steps * batch:
            break
    seconds = time.perf_counter() - start
    return {
        "mode": "stream",
        "slices": n,
        "seconds": seconds,
        "slices_per_s": n / seconds,
        "data_ms_per_slice": 1000 * (seconds - step_s) / n,
        "step_ms_per_slice": 1000 * step_s / n,
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": _rss_mb(),
        "rows": int(manifest["n"]),
    }


def in_memory(lungs: str, replicate: int, batch: int, width: int, max_steps: int | None) -> dict[str, Any]:
    """One epoch as the stages train today: every slice resident (child process)."""
    from covseg.training import SliceSet, batches

    base = SliceSet.load(lungs, tissue_ceiling=0.55, fill=0.1)
    n_rows = len(base.images)
    slices = SliceSet(
        np.concatenate([base.images] * replicate),
        np.concatenate([base.lungs] * replicate),
        pd.concat([base.index] * replicate, ignore_index=True).assign(row=np.arange(n_rows * replicate)),
        0.55,
        0.1,
        np.concatenate([base.sides] * replicate),
    )
    del base
    slices.to(__import__("torch").device("cpu"))
    weights = _weights(slices.index)
    labels = slices.index["label"].to_numpy(np.float32)
    rng = np.random.default_rng(0)
    model, optimizer = _model(width)
    rss_before = _rss_mb()
    n, step_s, start = 0, 0.0, time.perf_counter()
    for chosen in batches(len(weights), batch, weights, rng, int((weights > 0).sum())):
        x = slices.tensor(chosen).numpy()
        tick = time.perf_counter()
        _step(model, optimizer, x, labels[chosen])
        step_s += time.perf_counter() - tick
        n += len(chosen)
        if max_steps and n >= max_steps * batch:
            break
    seconds = time.perf_counter() - start
    return {
        "mode": "in-memory",
        "slices": n,
        "seconds": seconds,
        "slices_per_s": n / seconds,
        "data_ms_per_slice": 1000 * (seconds - step_s) / n,
        "step_ms_per_slice": 1000 * step_s / n,
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": _rss_mb(),
        "rows": n_rows * replicate,
    }


def _child(args: list[str]) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lungs", default="artifacts/lungs")
    parser.add_argument("--work", default="/tmp/covseg-bench-scale", help="where the shards are written")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--in-memory-replicas", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=16, help="classifier width (params: classify.width)")
    parser.add_argument("--slices-per-shard", type=int, default=256)
    parser.add_argument(
        "--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, target, replicate = args.child
        run = stream if kind == "stream" else None
        result = (
            run(target, args.batch, args.width, args.max_steps or None)
            if run
            else in_memory(target, int(replicate), args.batch, args.width, args.max_steps or None)
        )
        print(json.dumps({**result, "replication": int(replicate)}))
        return

    from covseg.shards import write_shards

    records = []
    common = ["--batch", str(args.batch), "--width", str(args.width), "--max-steps", str(args.max_steps)]
    for replicate in args.replicas:
        folder = Path(args.work) / f"x{replicate}"
        start = time.perf_counter()
        manifest = write_shards(args.lungs, folder, args.slices_per_shard, replicate)
        written = time.perf_counter() - start
        size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        record = _child([*common, "--child", "stream", str(folder), str(replicate)])
        record.update(shards=len(manifest["shards"]), shard_mb=size, write_seconds=written)
        records.append(record)
        print(json.dumps(record), flush=True)
    for replicate in args.in_memory_replicas:
        record = _child([*common, "--child", "memory", args.lungs, str(replicate)])
        records.append(record)
        print(json.dumps(record), flush=True)
    meta = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "argv": sys.argv[1:],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (HERE / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    print(
        "| data | mode | rows | slices trained | slices/s | data ms/slice | step ms/slice | peak RSS (MB) | "
        "shards (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        label = f"{r['replication']}x (replicated)" if r["replication"] > 1 else "1x (real)"
        print(
            f"| {label} | {r['mode']} | {r['rows']} | {r['slices']} | {r['slices_per_s']:.1f} | "
            f"{r['data_ms_per_slice']:.1f} | {r['step_ms_per_slice']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('shard_mb', float('nan')):.0f} |"
        )


if __name__ == "__main__":
    main()
