"""MIL refinement of the coarse labels: 5x5 patch instances per slice, bags = slices, easy -> hard.

Each bag is a lung view (`classify.training_views`: one lung of a slice from a source holding both labels,
labelled by the lobe columns) cut into a `grid` x `grid` lattice of patches (the instances). The MIL network shares its encoder with the classifier
(it starts from the classifier's weights: "dual-task mutual"), scores each instance, and pools them with
attention + max. Curriculum: bags are ranked by the classifier's confidence (easy = confidently right);
epoch e trains on the easiest share `start + (1 - start) * e / (epochs - 1)` of each class. The schedule
is logged. Fine labels = the lesion-intensity prior (`prior.lesion_prior`) in the lungs the weak labels
allow (`prior.allowed_lungs`), optionally gated by the localisers (`mil.fusion`: 'soft' sqrt(Grad-CAM x
patch score) >= threshold, 'hard' Otsu coarse AND patch score, 'none' no gate). The patch scores are kept
(`instance`) as evidence for the refinement rounds (`refine`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from covseg.cam import label_stats, load_classifier
from covseg.classify import predict_logits, training_views
from covseg.layout import CAM_MAPS, CAM_STATS
from covseg.layout import FINE_LABELS as LABELS
from covseg.layout import FINE_STATS as STATS
from covseg.layout import MIL_MODEL as MODEL
from covseg.nets import MILNet
from covseg.prior import allowed_lungs, lesion_prior
from covseg.training import (
    SliceSet,
    autocast,
    batches,
    checkpoint_path,
    device,
    device_index,
    epoch_mean,
    fit,
    load_state,
    save_model,
    seed_everything,
)


def to_patches(
    x: torch.Tensor, lung: torch.Tensor, grid: int, patch: int, min_lung: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,1,S,S) slices -> (B, grid*grid, 1, patch, patch) instances and (B, grid*grid) validity.

    An instance is valid when at least `min_lung` of it is lung.
    """
    side = grid * patch
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    lung = F.interpolate(lung.float(), size=(side, side), mode="area")
    unfold = lambda t: F.unfold(t, patch, stride=patch).transpose(1, 2)  # noqa: E731
    patches = unfold(x).reshape(x.shape[0], grid * grid, 1, patch, patch)
    valid = unfold(lung).mean(dim=2) >= min_lung
    return patches, valid


def instance_map(instance_prob: np.ndarray, grid: int, size: int) -> np.ndarray:
    """(N, grid*grid) patch probabilities -> (N, size, size) piecewise-constant maps."""
    maps = torch.from_numpy(instance_prob.reshape(-1, 1, grid, grid).astype(np.float32))
    return F.interpolate(maps, size=(size, size), mode="nearest")[:, 0].numpy()


def curriculum(
    difficulty: np.ndarray, labels: np.ndarray, epoch: int, epochs: int, start: float
) -> np.ndarray:
    """Indices of the bags used in `epoch`: the easiest share of each class, growing to all of them."""
    share = 1.0 if epochs <= 1 else start + (1.0 - start) * epoch / (epochs - 1)
    chosen = []
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        ordered = members[np.argsort(difficulty[members], kind="stable")]
        chosen.append(ordered[: max(1, int(round(share * len(ordered))))])
    return np.concatenate(chosen)


def bag_difficulty(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How hard a bag is for the classifier: minus its logit margin toward the bag's label. Logits, not
    probabilities: on the H100 run 641 of 1,141 training positives had probability exactly 1.0 in float32,
    which tied them and left the curriculum's order to the row order (volume by volume)."""
    return np.where(labels == 1, -logits, logits).astype(np.float64)


@torch.no_grad()
def score_instances(
    model: MILNet, slices: SliceSet, rows: np.ndarray, cfg: dict[str, Any], sides: np.ndarray | None = None
) -> np.ndarray:
    """(N, grid*grid) instance probabilities of views (whole slices without `sides`; invalid get 0)."""
    dev = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        part = None if sides is None else sides[start : start + 32]
        patches, valid = to_patches(
            slices.tensor(chunk, part).to(dev),
            slices.lung_tensor(chunk, part).to(dev),
            cfg["grid"],
            cfg["patch"],
        )
        with autocast(dev):
            _, instance = model(patches.to(dev), valid.to(dev))
        out.append((torch.sigmoid(instance.float()) * valid).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, cfg["grid"] ** 2))


def train_mil(
    lungs_dir: str | Path,
    classify_dir: str | Path,
    coarse_dir: str | Path,
    out_dir: str | Path,
    params: dict[str, Any],
    checkpoint_dir: str | Path,
) -> dict[str, Any]:
    """Train the MIL network with the curriculum; write fine labels (`fine.npz`) and their stats."""
    cfg = params["mil"]
    seed_everything(params["seed"])
    dev = device()
    slices = SliceSet.for_localisers(lungs_dir, params).to(dev)
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    classifier = load_classifier(classify_dir).to(dev)
    min_lung = params["views"]["min_lung_fraction"]
    bags = training_views(slices, "train", min_lung)
    bag_rows, bag_sides, bag_labels = (
        bags["row"].to_numpy(),
        bags["side"].to_numpy(),
        bags["label"].to_numpy(),
    )
    difficulty = bag_difficulty(predict_logits(classifier, slices, bag_rows, bag_sides), bag_labels)

    model = MILNet(width=params["classify"]["width"]).to(dev)
    if cfg["init"] == "classifier":  # the shared encoder: what the classifier learned seeds the MIL
        model.encoder.load_state_dict(classifier.encoder.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    rng = np.random.default_rng(params["seed"])
    schedule: list[dict[str, Any]] = []

    def run_epoch(epoch: int) -> dict[str, float]:
        active = curriculum(difficulty, bag_labels, epoch, cfg["epochs"], cfg["curriculum_start"])
        schedule.append(
            {
                "epoch": epoch,
                "bags": int(len(active)),
                "positives": int(bag_labels[active].sum()),
                "max_difficulty": float(difficulty[active].max()),
            }
        )
        labels = bag_labels[active]
        labels_on_dev = torch.as_tensor(labels, dtype=torch.float32).to(dev)
        weights = np.where(labels == 1, 1.0 / max(labels.sum(), 1), 1.0 / max((1 - labels).sum(), 1))
        losses = []
        for chosen in batches(len(active), cfg["batch_size"], weights, rng, cfg["draws_per_epoch"]):
            picked, picked_sides = bag_rows[active[chosen]], bag_sides[active[chosen]]
            x = slices.tensor(picked, picked_sides).to(dev)  # resident: no copy
            flip = rng.random() < 0.5
            lung = slices.lung_tensor(picked, picked_sides).to(dev)
            if flip:
                x, lung = x.flip(-1), lung.flip(-1)
            patches, valid = to_patches(x, lung, cfg["grid"], cfg["patch"])
            y = labels_on_dev[device_index(chosen, dev)]
            with autocast(dev):
                bag, _ = model(patches.to(dev), valid.to(dev))
                loss = F.binary_cross_entropy_with_logits(bag.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return {"loss": epoch_mean(losses), "active_bags": float(len(active))}

    checkpoint = checkpoint_path(checkpoint_dir, "mil", params, [lungs_dir, classify_dir, coarse_dir])
    history = fit(model, cfg["epochs"], run_epoch, optimizer, checkpoint, "mil", rngs=(rng,))
    model.eval()
    save_model(
        model.cpu(),
        out_dir / MODEL,
        {
            "width": params["classify"]["width"],
            "grid": cfg["grid"],
            "patch": cfg["patch"],
            "init": cfg["init"],
        },
    )
    model.to(dev)  # save_model took it to the CPU: score where it trained
    (out_dir / "schedule.json").write_text(json.dumps(schedule, indent=2))
    quality = mil_quality(model, slices, params)
    stats, quality["val_cam_mil_agreement"] = fine_labels(model, slices, coarse_dir, out_dir, params)
    return {"history": history, "schedule": schedule, "quality": quality, "n_fine": len(stats)}


def mil_quality(model: MILNet, slices: SliceSet, params: dict[str, Any]) -> dict[str, float]:
    """Mask-free quality on the validation views: bag AUC and accuracy, and instance accuracy on negative
    views (every instance of a clean lung is negative, so that one is known without pixel labels)."""
    from covseg.classify import roc_auc

    cfg = params["mil"]
    val = training_views(slices, "val", params["views"]["min_lung_fraction"])
    rows, sides, labels = val["row"].to_numpy(), val["side"].to_numpy(), val["label"].to_numpy()
    probs = score_instances(model, slices, rows, cfg, sides)
    bag_score = probs.max(axis=1) if len(probs) else np.zeros(0)
    negative = labels == 0
    _, valid = to_patches(
        slices.tensor(rows[negative], sides[negative]),
        slices.lung_tensor(rows[negative], sides[negative]),
        cfg["grid"],
        cfg["patch"],
    )
    valid = valid.cpu().numpy()
    return {
        "val_bag_auc": roc_auc(bag_score, labels),
        "val_bag_accuracy": float(((bag_score >= 0.5) == labels).mean()) if len(labels) else float("nan"),
        "val_negative_instance_accuracy": float((probs[negative][valid] < 0.5).mean())
        if valid.any()
        else float("nan"),
    }


def fuse(cam: np.ndarray, coarse: np.ndarray, instance: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """The localisers' gate on the fine labels: 'soft' = sqrt(Grad-CAM x instance score) >= threshold (the
    DESIGN's "instance scores x coarse map"), 'hard' = Otsu coarse label AND instance score >= threshold,
    'none' = no gate (the prior in the allowed lungs alone; the localisers act in the refinement rounds)."""
    if cfg["fusion"] == "soft":
        return np.sqrt(cam * instance) >= cfg["threshold"]
    if cfg["fusion"] == "hard":
        return coarse & (instance >= cfg["threshold"])
    if cfg["fusion"] == "none":
        return np.ones(cam.shape, dtype=bool)
    raise ValueError(f"mil.fusion must be 'soft', 'hard' or 'none', got {cfg['fusion']!r}")


def fine_labels(
    model: MILNet, slices: SliceSet, coarse_dir: str | Path, out_dir: Path, params: dict[str, Any]
) -> tuple[pd.DataFrame, float]:
    """Fine labels for every slice that has a coarse label: the lesion prior in the allowed lungs, gated by
    the localisers as `mil.fusion` says; the patch-score maps are stored too (`instance`, float16).

    Also returns the two localisers' agreement on the validation positives (`localiser_agreement`)."""
    cfg, size = params["mil"], slices.images.shape[-1]
    maps = np.load(Path(coarse_dir) / CAM_MAPS)
    rows = pd.read_parquet(Path(coarse_dir) / CAM_STATS)["row"].to_numpy()
    probs = score_instances(model, slices, rows, cfg)
    cam, instance = maps["cam"][rows].astype(np.float32), instance_map(probs, cfg["grid"], size)
    info = slices.index.set_index("row").loc[rows].reset_index()
    allowed = allowed_lungs(slices.lungs[rows], slices.sides[rows], info)
    prior = lesion_prior(slices.images[rows], params["fine"]) & allowed
    fine = np.zeros_like(maps["coarse"])
    fine[rows] = fuse(cam, maps["coarse"][rows], instance, cfg) & prior
    instance_full = np.zeros(fine.shape, dtype=np.float16)
    instance_full[rows] = instance * slices.lungs[rows]
    np.savez_compressed(out_dir / LABELS, fine=fine, instance=instance_full, instance_prob=probs, rows=rows)
    stats = label_stats(slices, fine, info)
    stats.to_parquet(out_dir / STATS, index=False)
    val = ((info["split"] == "val") & (info["label"] == 1)).to_numpy()
    return stats, localiser_agreement(cam[val], instance[val], prior[val])


def localiser_agreement(cam: np.ndarray, instance: np.ndarray, region: np.ndarray) -> float:
    """Spearman correlation of Grad-CAM and the MIL instance map over the pixels of `region` (the lesion
    prior of the validation positives): do the two weak localisers rank the same candidates high? Mask-free;
    it flags a Grad-CAM that points away from the lesions (README, *The Grad-CAM layer*). NaN when fewer
    than two pixels or a flat map leave nothing to rank."""
    if region.sum() < 2:
        return float("nan")
    ranks = [pd.Series(m[region].astype(np.float64)).rank().to_numpy() for m in (cam, instance)]
    if min(r.std() for r in ranks) == 0:
        return float("nan")
    return float(np.corrcoef(*ranks)[0, 1])


def load_mil(mil_dir: str | Path) -> MILNet:
    """The trained MIL network."""
    path = Path(mil_dir) / MODEL
    meta = json.loads(path.with_suffix(".json").read_text())
    return load_state(MILNet(width=meta["width"]), path)
