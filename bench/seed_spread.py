"""Seed spread of the weak chain: classify -> coarse -> MIL -> segment -> refine -> evaluate, once per seed.

One `medseg-100` figure from one seed says little: the same quick configuration gave final Dice 0.375 with
one seed and 0.441 with another. This runs the pipeline's own stage table (`covseg.layout`, no tracking)
for each seed, with optional parameter overrides, on one set of harmonised slices, and prints the Table-1
Dice of every row per seed plus the mask-free signals, with mean and spread.

    .venv/bin/python bench/seed_spread.py --seeds 20261126,7,11 --lungs artifacts/lungs --out /tmp/spread
    .venv/bin/python bench/seed_spread.py --seeds 20261126,7,11 --lungs artifacts/lungs --out /tmp/spread0 \\
        --overrides '{"views": {"outside_fill": 0.0}}'

Without --lungs the lungs stage of the profile is built into OUT/lungs from artifacts/ingest first.
About 7.5 min per seed for `quick` on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROWS = ("coarse", "fine", "round0", "final", "prior")


def run_seed(params: dict, lungs: Path, ingest: Path, out: Path) -> dict:
    """The chain for one parameter set into `out`; returns the evaluation table, mask-free signals, times."""
    from covseg.stages import run_stage

    out.mkdir(parents=True, exist_ok=True)
    for name, source in (("ingest", ingest), ("lungs", lungs)):  # shared inputs, linked not rebuilt
        if not (out / name).exists():
            (out / name).symlink_to(source.resolve())
    times, results = {}, {}
    for name in ("classify", "coarse", "mil", "segment", "refine", "evaluate"):
        start = time.perf_counter()
        results[name] = run_stage(name, out, "data", params)
        times[name] = round(time.perf_counter() - start, 1)
    return {
        "table": results["evaluate"],
        "val_auc": results["classify"]["val_auc"],
        "mil": results["mil"]["quality"],
        "in_domain": results["refine"]["in_domain"],
        "seconds": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", required=True, help="comma-separated seeds")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--overrides", default="{}", help="params overrides as JSON")
    parser.add_argument("--lungs", type=Path, help="harmonised slices of the profile (default: build them)")
    parser.add_argument("--ingest", type=Path, default=Path("artifacts/ingest"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("COVSEG_TRACKING", "0")
    from covseg import stages
    from covseg.config import load_params

    overrides = json.loads(args.overrides)
    base = load_params(args.profile, overrides=overrides)
    lungs = args.lungs
    if lungs is None:
        lungs = args.out / "lungs"
        stages.lungs(args.ingest, lungs, base)
    runs = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        params = {**base, "seed": seed}
        runs[seed] = run_seed(params, lungs, args.ingest, args.out / f"seed-{seed}")
        dice = {row: round(runs[seed]["table"][row]["dice"], 3) for row in ROWS}
        in_domain = runs[seed]["in_domain"]
        print(
            f"seed {seed}: Dice {dice}, val AUC {runs[seed]['val_auc']}, in-domain slice AUC "
            f"{in_domain.get('slice_auc', float('nan')):.3f} (HU band {in_domain.get('hu_band_auc', float('nan')):.3f})"
        )
    summary = {}
    for row in ROWS:
        values = np.array([r["table"][row]["dice"] for r in runs.values()])
        summary[row] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    result = {
        "profile": args.profile,
        "overrides": overrides,
        "seeds": list(runs),
        "dice": summary,
        "runs": runs,
    }
    (args.out / "spread.json").write_text(json.dumps(result, indent=2, default=float))
    print("Dice mean [min, max] over seeds " + ", ".join(str(s) for s in runs))
    for row, s in summary.items():
        print(f"  {row:7s} {s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]")
    print(f"written {args.out / 'spread.json'}")


if __name__ == "__main__":
    main()
