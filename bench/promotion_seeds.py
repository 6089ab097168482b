"""Would retraining with another seed promote? The register stage's decision for every pair of segmenters.

Give it segment folders trained with the same configuration and different seeds (e.g. the `segment`
folders that `bench/seed_spread.py` writes under OUT/<seed>/). Each one is scored as the register stage
scores a candidate and the champion (`covseg.evaluate.evaluate_ingested`, per-slice Dice on the same
evaluation slices), and each ordered pair goes through `covseg.promotion.decide` with the margin and the
confidence of `params.yaml` (`register`; the floors are left out: the question is noise, not quality).
Nothing is registered. Prints one line per pair and writes the
per-slice Dice and the decisions to --out as JSON.

    .venv/bin/python bench/promotion_seeds.py --ingest artifacts/ingest \\
        --segments /tmp/spread/20261126/segment,/tmp/spread/7/segment,/tmp/spread/11/segment --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--segments", required=True, help="comma-separated segment folders (segmenter.pt inside)"
    )
    parser.add_argument("--ingest", type=Path, default=Path("artifacts/ingest"))
    parser.add_argument("--profile", default="quick", help="params profile whose `register` settings apply")
    parser.add_argument("--out", type=Path, required=True, help="JSON with per-slice Dice and the decisions")
    args = parser.parse_args()
    os.environ.setdefault("COVSEG_TRACKING", "0")

    from covseg.config import load_params
    from covseg.evaluate import evaluate_ingested
    from covseg.predict import LesionSegmenter
    from covseg.promotion import Candidate, Champion, decide

    params = load_params(args.profile)
    cfg = params["register"]
    folders = [Path(s) for s in args.segments.split(",")]
    scores = {}
    for folder in folders:
        result = evaluate_ingested(
            LesionSegmenter.load(folder), args.ingest, params.get("max_eval_slices", 0)
        )
        scores[str(folder)] = {"dice": result["dice"], "per_slice_dice": result["per_slice_dice"]}
        print(f"{folder}: Dice {result['dice']:.4f} over {len(result['per_slice_dice'])} slices")
    decisions = []
    for champ, cand in itertools.permutations(scores, 2):  # versions named by folder
        decision = decide(
            Candidate(cand, scores[cand]["dice"], tuple(scores[cand]["per_slice_dice"])),
            Champion(champ, scores[champ]["dice"], tuple(scores[champ]["per_slice_dice"])),
            cfg["margin"],
            {},
            cfg["confidence"],
        )
        decisions.append({"candidate": cand, "champion": champ, **decision.as_dict()})
        print(f"{cand} over {champ}: {decision.alias} ({decision.reason})")
    promoted = sum(d["decision"] == "champion" for d in decisions)
    print(
        f"{promoted} of {len(decisions)} seed-to-seed comparisons would promote "
        f"(margin {cfg['margin']}, confidence {cfg['confidence']})"
    )
    args.out.write_text(
        json.dumps(
            {"profile": args.profile, "register": cfg, "scores": scores, "decisions": decisions}, indent=2
        )
    )


if __name__ == "__main__":
    main()
