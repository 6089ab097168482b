"""The ceiling the canonical resolution puts on every row: what a perfect segmenter could score at 128 vs 256 px.

Two ceilings on the evaluation slices (`medseg-100`), each slice scored in its own geometry as
`covseg.evaluate` does:

- `truth round trip`: the radiologist mask itself taken to the canonical square and back (crop, resize,
  bilinear back, >= 0.5). A segmenter that matched the truth perfectly at that size scores this.
- `fine rule`: the current fine labels' rule computed at that size (`mil.fusion: none`: the lesion prior
  inside the lung mask; medseg slices have no lobe labels, so both lungs are allowed) — a segmenter that
  matched its own training labels perfectly scores this.

Masks are read to score only. Needs `artifacts/ingest` (any profile):

    .venv/bin/python bench/resolution_ceiling.py --sizes 128,256 --out bench/results/resolution_ceiling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from covseg.config import load_params
from covseg.harmonise import from_canonical, harmonise_slice, to_canonical
from covseg.ingest import read_manifest
from covseg.metrics import summarise
from covseg.prior import lesion_prior

KEYS = ("dice", "iou", "ppv", "sensitivity", "specificity")


def ceilings(ingest: Path, size: int, fine: dict) -> dict[str, dict]:
    """Both ceilings at one canonical size, over every evaluation slice of the manifest."""
    rows = read_manifest(ingest)
    rows = rows[rows["role"] == "eval"]
    truths, round_trip, rule = [], [], []
    for row in rows.itertuples():
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(ingest / row.file)))
        raw = raw[row.z] if raw.ndim == 3 else raw
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(ingest / row.mask_file))) > 127
        out = harmonise_slice(raw, row.domain, size)
        truths.append(truth)
        round_trip.append(from_canonical(to_canonical(truth.astype(np.float32), out.geometry), out.geometry))
        labels = lesion_prior(out.image[None], fine)[0] & out.lung
        rule.append(from_canonical(labels.astype(np.float32), out.geometry))
    return {
        name: {k: round(float(v), 4) for k, v in summarise(maps, truths).items() if k in KEYS}
        for name, maps in (("truth round trip", round_trip), ("fine rule", rule))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest", type=Path, default=Path("artifacts/ingest"))
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--profile", default="quick", help="params profile whose `fine` rule is scored")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    params = load_params(args.profile)
    if params["mil"]["fusion"] != "none":
        raise SystemExit("this ceiling scores the prior-only fine rule (mil.fusion: none)")
    result = {"fine": params["fine"]}
    for size in (int(s) for s in args.sizes.split(",")):
        result[str(size)] = ceilings(args.ingest, size, params["fine"])
        for name, row in result[str(size)].items():
            print(f"{size:4d} px  {name:17s} " + "  ".join(f"{k} {row[k]:.3f}" for k in KEYS), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
