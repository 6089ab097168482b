"""Choose the lesion prior's density floor (`fine.min_intensity`) without masks.

For each candidate floor, the prior's share of each lung is scored as a lesion detector on the one-clean-lung
positive slices of the training split (lobe labels: the lesion lung against the clean lung of the same
slice, same patient, scanner and height): ROC AUC (`covseg.prior.side_area_auc`). The floor with the best
AUC is the one the prior should use; no pixel mask is read.

    .venv/bin/python bench/prior_floor.py artifacts/lungs --out bench/results/prior_floor.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from covseg.config import load_params
from covseg.prior import side_area_auc
from covseg.training import SliceSet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lungs_dir")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", help="also write the scores here (JSON)")
    args = parser.parse_args()
    params = load_params(args.profile)
    slices = SliceSet.load(args.lungs_dir)
    rows = slices.rows(args.split, params["views"]["min_lung_fraction"])
    scores = {}
    for floor in np.round(np.arange(0.125, 0.301, 0.025), 3):
        fine = {**params["fine"], "min_intensity": float(floor)}
        scores[float(floor)] = side_area_auc(slices.images, slices.lungs, slices.sides, rows, fine)
        print(f"floor {floor:.3f}: lung AUC {scores[float(floor)]:.3f}", flush=True)
    best = max(scores, key=lambda k: scores[k])
    result = {"best_floor": best, "auc": scores[best], "split": args.split, "scores": scores}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
