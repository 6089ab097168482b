"""The segmenter: MONAI BasicUNet trained on the fine labels (pseudo masks) of the training split.

Targets are the fine labels of positive slices (empty in a lung the lobe labels call clean) and empty masks
for lesion-free slices. Input is the lung-masked harmonised slice; the loss (BCE + soft Dice) and the
prediction are confined to the lungs. Draws: positives evenly per source, lesion-free slices
`negative_share` of them (`sampling_weights`); `segment.exclude_sources` leaves sources out (ablations).
Mask-free proof that it reads lesions: `in_domain_ranking`, its predicted lesion area ranking the
validation slices of the two-label sources, beside the HU-band baseline on the same slices.
CUDA with bf16 autocast when present, CPU otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from covseg.layout import FINE_LABELS as FINE
from covseg.layout import SEGMENTER as MODEL
from covseg.nets import build_segmenter
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


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the batch, counted inside `region` only."""
    prob = torch.sigmoid(logits) * region
    inter = (prob * target).sum()
    return 1.0 - (2 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)


def training_rows(slices: SliceSet, params: dict[str, Any], split: str = "train") -> pd.DataFrame:
    """The segmenter's slices of a split: enough lung, not in `segment.exclude_sources`."""
    excluded = set(params["segment"].get("exclude_sources") or [])
    unknown = excluded - set(slices.index["source"])
    if unknown:
        raise ValueError(
            f"segment.exclude_sources names no source: {sorted(unknown)}; "
            f"sources: {sorted(set(slices.index['source']))}"
        )
    rows = slices.rows(split, params["views"]["min_lung_fraction"])
    return rows[~rows["source"].isin(excluded)]


def sampling_weights(rows: pd.DataFrame, negative_share: float) -> np.ndarray:
    """Draw weights: the positives split evenly among their sources (a 1,600-slice JPEG set does not drown
    the in-domain positives), the lesion-free slices together `negative_share` of the positives' mass."""
    positive = (rows["label"] == 1).to_numpy()
    per_source = rows[positive].groupby("source")["row"].transform("size").to_numpy(float)
    n_sources = max(rows[positive]["source"].nunique(), 1)
    weights = np.zeros(len(rows))
    weights[positive] = 1.0 / (per_source * n_sources)
    weights[~positive] = negative_share / max((~positive).sum(), 1)
    return weights


def fit_segmenter(
    slices: SliceSet,
    rows: pd.DataFrame,
    labels: np.ndarray,
    params: dict[str, Any],
    checkpoint: Path,
    desc: str = "segment",
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train the U-Net on `labels` (N,S,S bool, indexed by row; lesion-free slices get none) over `rows`;
    `init` starts from given weights (a refinement round continues the previous round's model)."""
    cfg = params["segment"]
    seed_everything(params["seed"])
    dev = device()
    target = torch.from_numpy(np.asarray(labels, dtype=bool)).to(dev)
    positions = rows["row"].to_numpy()
    weights = sampling_weights(rows, cfg["negative_share"])
    model = build_segmenter(tuple(cfg["features"]))
    if init is not None:
        model.load_state_dict(init)
    model = model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    rng = np.random.default_rng(params["seed"])
    generator = torch.Generator(device=dev).manual_seed(params["seed"])

    def run_epoch(epoch: int) -> dict[str, float]:
        losses = []
        for chosen in batches(len(positions), cfg["batch_size"], weights, rng, cfg["draws_per_epoch"]):
            picked = positions[chosen]  # gathered and augmented on `dev` (see SliceSet.to)
            x = slices.tensor(picked).to(dev)
            y = target[device_index(picked, dev)].float()[:, None]
            region = slices.lung_tensor(picked).float().to(dev)
            flip = torch.rand(len(picked), generator=generator, device=dev) < 0.5
            x, y, region = (torch.where(flip[:, None, None, None], t.flip(-1), t) for t in (x, y, region))
            gain = 1.0 + 0.1 * (torch.rand(len(picked), 1, 1, 1, generator=generator, device=dev) * 2 - 1)
            x = (x * gain).clamp(0, 1) * region
            with autocast(dev):
                logits = model(x).float()
            bce = (
                F.binary_cross_entropy_with_logits(logits, y, reduction="none") * region
            ).sum() / region.sum()
            loss = bce + soft_dice_loss(logits, y, region)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return {"loss": epoch_mean(losses)}

    history = fit(model, cfg["epochs"], run_epoch, optimizer, checkpoint, desc, rngs=(rng, generator))
    return model.eval(), history


def save_segmenter(
    model: torch.nn.Module, out_dir: str | Path, params: dict[str, Any], lineage: dict[str, str] | None = None
) -> None:
    """`segmenter.pt` + its JSON metadata (architecture, image size, seed, profile, lineage)."""
    cfg = params["segment"]
    save_model(
        model.cpu(),
        Path(out_dir) / MODEL,
        {
            "features": list(cfg["features"]),
            "image_size": params["image_size"],
            "seed": params["seed"],
            "profile": params["profile"],
            **(lineage or {}),
        },
    )


def train_segmenter(
    lungs_dir: str | Path,
    mil_dir: str | Path,
    out_dir: str | Path,
    params: dict[str, Any],
    checkpoint_dir: str | Path,
    lineage: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train the U-Net on fine labels; save `segmenter.pt` (+ JSON metadata, with `lineage` when given:
    git commit, data version, params hash, pipeline run, so a model folder says what it was trained on)."""
    dev = device()
    slices = SliceSet.load(lungs_dir).to(dev)
    labels_file = np.load(Path(mil_dir) / FINE)
    fine_labels, labelled_rows = labels_file["fine"], labels_file["rows"]  # each member decompresses per read
    rows = training_rows(slices, params)
    checkpoint = checkpoint_path(checkpoint_dir, "segmenter", params, [lungs_dir, mil_dir])
    model, history = fit_segmenter(slices, rows, fine_labels, params, checkpoint)
    save_segmenter(model, out_dir, params, lineage)
    model.to(dev)
    return {
        "history": history,
        "n_train": len(rows),
        **validation_checks(model, slices, fine_labels, labelled_rows, params),
    }


def validation_checks(
    model: torch.nn.Module,
    slices: SliceSet,
    fine: np.ndarray,
    labelled_rows: np.ndarray,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Mask-free checks on the validation split: Dice against the fine labels of validation positives, and
    the in-domain slice ranking (`in_domain_ranking`)."""
    val = training_rows(slices, params, "val")
    labelled = np.intersect1d(val[val["label"] == 1]["row"].to_numpy(), labelled_rows)
    return {
        "val_fine_dice": fine_label_dice(model, slices, fine, labelled),
        "n_val_fine": len(labelled),
        "in_domain": in_domain_ranking(model, slices, params),
    }


def predicted_areas(
    model: torch.nn.Module, slices: SliceSet, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted lesion pixels (probability >= 0.5) of each slice, and of its (right, left) lungs (N, 2)."""
    from covseg.lungs import SIDE_LEFT, SIDE_RIGHT

    probs = segment_canonical(model, slices.images[rows], slices.lungs[rows]) >= 0.5
    sides = slices.sides[rows] if slices.sides is not None else slices.lungs[rows].astype(np.uint8)
    per_lung = np.stack([(probs & (sides == s)).sum(axis=(1, 2)) for s in (SIDE_RIGHT, SIDE_LEFT)], axis=1)
    return probs.sum(axis=(1, 2)).astype(float), per_lung.astype(float)


def in_domain_ranking(
    model: torch.nn.Module, slices: SliceSet, params: dict[str, Any], split: str = "val"
) -> dict[str, Any]:
    """Does the segmenter find lesions where label and source are independent? On the validation slices of
    the two-label sources: ROC AUC of its predicted lesion area (`slice_auc`) against the slice labels,
    beside the HU-band baseline on the same slices (`hu_band_auc`: lung pixels in -750..-300 HU, no
    learning), lung area alone (`lung_area_auc`), and per lung against the lobe labels (`lung_auc`)."""
    from covseg.classify import roc_auc, two_label_sources

    rows = slices.rows(split, params["views"]["min_lung_fraction"])
    rows = rows[rows["source"].isin(two_label_sources(slices.index))]
    if rows.empty:
        return {"n_slices": 0}
    area, per_lung = predicted_areas(model, slices, rows["row"].to_numpy())
    labels = rows["label"].to_numpy()
    result: dict[str, Any] = {
        "n_slices": len(rows),
        "n_positive": int(labels.sum()),
        "slice_auc": roc_auc(area, labels),
        "hu_band_auc": roc_auc(rows["hu_band_pixels"].to_numpy(float), labels)
        if "hu_band_pixels" in rows
        else float("nan"),
        "lung_area_auc": roc_auc(rows["lung_pixels"].to_numpy(float), labels)
        if "lung_pixels" in rows
        else float("nan"),
    }
    lung_labels = np.stack(
        [rows.get(c, pd.Series(-1, index=rows.index)).to_numpy() for c in ("lesion_right", "lesion_left")],
        axis=1,
    )
    lung_labels = np.where(labels[:, None] == 0, 0, lung_labels)
    known = lung_labels >= 0
    result["lung_auc"] = roc_auc(per_lung[known], lung_labels[known]) if known.any() else float("nan")
    result["beats_hu_band"] = bool(result["slice_auc"] > result["hu_band_auc"])
    return result


def fine_label_dice(model: torch.nn.Module, slices: SliceSet, fine: np.ndarray, rows: np.ndarray) -> float:
    """Mean per-slice Dice (threshold 0.5) of the segmenter against the fine labels of `rows` (validation
    positives): a mask-free check that it learned its targets on volumes it did not train on."""
    from covseg.metrics import summarise

    if len(rows) == 0:
        return float("nan")
    probs = segment_canonical(model, slices.images[rows], slices.lungs[rows])
    return float(summarise(list(probs), list(fine[rows]))["dice"])


def load_segmenter(model_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained U-Net and its metadata (image size, features)."""
    path = Path(model_dir) / MODEL
    meta = json.loads(path.with_suffix(".json").read_text())
    return load_state(build_segmenter(tuple(meta["features"])), path), meta


@torch.no_grad()
def segment_canonical(
    model: torch.nn.Module, images: np.ndarray, lungs: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """Lesion probability (N,S,S) for canonical lung-masked slices; zero outside the lungs."""
    dev = next(model.parameters()).device
    model.eval()
    out = np.zeros(images.shape, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size], np.float32))[:, None]
        with autocast(dev):
            prob = torch.sigmoid(model(x.to(dev)).float())[:, 0].cpu().numpy()
        out[start : start + batch_size] = prob * lungs[start : start + batch_size]
    return out
