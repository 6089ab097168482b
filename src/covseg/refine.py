"""Refinement rounds: the segmenter's own predictions, with the localisers and the prior, make the next
round's labels; a mask-free criterion stops the rounds and picks the model.

Round r's labels on the positive training/validation slices are

    mean(segmenter probability of round r-1, sqrt(Grad-CAM x MIL patch score)) >= `threshold`
    AND the lesion prior AND the lungs the weak labels allow

(`refine.evidence: segmenter` drops the localisers' term). The round's segmenter starts from the previous
round's weights and trains `refine.epochs`. The rounds stop when a round's labels agree with the previous
labels (Dice >= `stop_agreement`: nothing left to learn from itself) or after `refine.rounds`; the final
model is the round with the best in-domain validation slice AUC (`segment.in_domain_ranking`), round 0
(the segmenter stage's model) included. No mask is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from covseg.layout import CAM_MAPS, ROUNDS
from covseg.layout import FINE_LABELS as FINE
from covseg.layout import REFINED_LABELS as LABELS
from covseg.prior import allowed_lungs, lesion_prior
from covseg.segment import (
    MODEL,
    fit_segmenter,
    in_domain_ranking,
    load_segmenter,
    save_segmenter,
    segment_canonical,
    training_rows,
)
from covseg.training import SliceSet, checkpoint_path, device


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two label sets over all their pixels (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def round_labels(
    prob: np.ndarray, localisers: np.ndarray | None, region: np.ndarray, threshold: float
) -> np.ndarray:
    """Next labels: the mean of the segmenter's probability and the localisers' evidence (when given)
    at or above `threshold`, inside `region` (prior AND allowed lungs)."""
    evidence = prob if localisers is None else 0.5 * (prob + localisers)
    return (evidence >= threshold) & region


def refine(
    lungs_dir: str | Path,
    coarse_dir: str | Path,
    mil_dir: str | Path,
    segment_dir: str | Path,
    out_dir: str | Path,
    params: dict[str, Any],
    checkpoint_dir: str | Path,
    lineage: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the refinement rounds; write `round<r>/segmenter.pt`, the final `segmenter.pt`, the last
    labels (`labels.npz`) and the per-round record (`rounds.json`)."""
    cfg = params["refine"]
    out_dir, dev = Path(out_dir), device()
    slices = SliceSet.load(lungs_dir).to(dev)
    fine_file = np.load(Path(mil_dir) / FINE)
    labelled = fine_file["rows"]
    info = slices.index.set_index("row").loc[labelled].reset_index()
    positive = labelled[((info["label"] == 1) & info["split"].isin(["train", "val"])).to_numpy()]
    pinfo = slices.index.set_index("row").loc[positive].reset_index()
    region = lesion_prior(slices.images[positive], params["fine"]) & allowed_lungs(
        slices.lungs[positive], slices.sides[positive], pinfo
    )
    localisers = None
    if cfg["evidence"] == "localisers":
        cam = np.load(Path(coarse_dir) / CAM_MAPS)["cam"][positive].astype(np.float32)
        localisers = np.sqrt(cam * fine_file["instance"][positive].astype(np.float32))
    elif cfg["evidence"] != "segmenter":
        raise ValueError(f"refine.evidence must be 'localisers' or 'segmenter', got {cfg['evidence']!r}")

    model = load_segmenter(segment_dir)[0].to(dev)
    labels = np.asarray(fine_file["fine"], dtype=bool)
    rows = training_rows(slices, params)
    record = [{"round": 0, "agreement": None, "in_domain": in_domain_ranking(model, slices, params)}]
    best = (record[0]["in_domain"].get("slice_auc", float("nan")), 0)
    round_params = {**params, "segment": {**params["segment"], "epochs": cfg["epochs"]}}
    stop = "rounds"
    for r in range(1, cfg["rounds"] + 1):
        prob = segment_canonical(model, slices.images[positive], slices.lungs[positive])
        new = np.zeros_like(labels)
        new[positive] = round_labels(prob, localisers, region, cfg["threshold"])
        agreement = label_agreement(new[positive], labels[positive])
        if agreement >= cfg["stop_agreement"]:
            record.append({"round": r, "agreement": agreement, "stopped": True})
            stop = "agreement"
            break
        checkpoint = checkpoint_path(checkpoint_dir, f"refine{r}", params, [lungs_dir, mil_dir, segment_dir])
        model, history = fit_segmenter(
            slices,
            rows,
            new,
            round_params,
            checkpoint,
            f"refine {r}",
            init={k: v.detach().cpu() for k, v in model.state_dict().items()},
        )
        (out_dir / f"round{r}").mkdir()
        save_segmenter(model, out_dir / f"round{r}", params, lineage)
        model.to(dev)
        in_domain = in_domain_ranking(model, slices, params)
        record.append(
            {
                "round": r,
                "agreement": agreement,
                "history": history,
                "in_domain": in_domain,
                "label_area": float(new[positive].sum() / max(slices.lungs[positive].sum(), 1)),
            }
        )
        if in_domain.get("slice_auc", float("nan")) > best[0] or np.isnan(best[0]):
            best = (in_domain.get("slice_auc", float("nan")), r)
        labels = new
    source = Path(segment_dir) if best[1] == 0 else out_dir / f"round{best[1]}"
    for name in (MODEL, Path(MODEL).with_suffix(".json").name):
        shutil.copyfile(source / name, out_dir / name)
    np.savez_compressed(out_dir / LABELS, labels=labels, rows=positive)
    result = {
        "rounds": record,
        "final_round": best[1],
        "stopped_by": stop,
        "in_domain": next(x["in_domain"] for x in record if x["round"] == best[1]),
    }
    (out_dir / ROUNDS).write_text(json.dumps(result, indent=2, default=float))
    return result


def kept_round(refine_dir: str | Path) -> int:
    """The round whose model a refine output kept as its `segmenter.pt` (0: the segment stage's)."""
    return int(json.loads((Path(refine_dir) / ROUNDS).read_text())["final_round"])


def round_models(refine_dir: str | Path) -> list[tuple[str, Path]]:
    """(row name, model folder) of every trained round of a refine output, in order."""
    folders = [p for p in Path(refine_dir).glob("round*") if p.name[5:].isdigit() and (p / MODEL).is_file()]
    return [(p.name, p) for p in sorted(folders, key=lambda p: int(p.name[5:]))]
