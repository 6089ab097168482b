"""Lesion / no-lesion slice classifier on lung-masked, harmonised slices (slice labels only).

The JPEG sources hold positives only, so a classifier could learn "which source" instead of "which lesion".
Counter-measures: harmonisation (see `harmonise`), lung masking (no body outline or table to read),
sampling balanced by label and then by source, intensity augmentation. The risk is measured, not assumed:
a *source probe* (the same network trained to tell HU slices from JPEG slices, on positives only, so the
label cannot help) reports how separable the sources still are (AUC 0.5 = indistinguishable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from covseg.nets import SliceClassifier
from covseg.training import (
    SliceSet,
    augment,
    autocast,
    balanced_weights,
    batches,
    checkpoint_path,
    device,
    device_index,
    epoch_mean,
    fit,
    save_model,
    seed_everything,
)

MODEL = "classifier.pt"


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (MONAI's implementation); NaN when only one class is present."""
    from monai.metrics import compute_roc_auc

    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(scores, dtype=torch.float32),
                                 torch.as_tensor(labels, dtype=torch.float32)))


@torch.no_grad()
def predict_logits(model: SliceClassifier, slices: SliceSet, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Lesion logit for each index row in `rows` (rankable where the probability has saturated to 1.0: the
    head runs in float32 outside autocast, since bf16 keeps only ~128 distinct values per doubling)."""
    dev = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        x = slices.tensor(rows[start:start + batch_size]).to(dev)
        with autocast(dev):
            pooled = model.pooled(x)
        out.append(model.head(pooled.float()).squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def predict_proba(model: SliceClassifier, slices: SliceSet, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Sigmoid lesion probability for each index row in `rows`."""
    return torch.sigmoid(torch.from_numpy(predict_logits(model, slices, rows, batch_size))).numpy()


def per_source_auc(index: pd.DataFrame, proba: np.ndarray) -> dict[str, float]:
    """AUC per source on a split: each source's slices against all negatives of the split.

    Sources with positives only (the JPEG sets) are scored against the split's negatives, which is the
    question that matters for them: are their lesion slices ranked above lesion-free slices?
    """
    frame = index.assign(p=proba)
    negatives = frame[frame["label"] == 0]
    result = {"all": roc_auc(frame["p"].to_numpy(), frame["label"].to_numpy())}
    for source, group in frame.groupby("source"):
        pool = pd.concat([group, negatives]).drop_duplicates("row")
        result[source] = roc_auc(pool["p"].to_numpy(), pool["label"].to_numpy())
    return result


def _train(slices: SliceSet, train_rows: pd.DataFrame, targets: np.ndarray, weights: np.ndarray,
           cfg: dict[str, Any], seed: int, checkpoint: Path, desc: str) -> tuple[SliceClassifier, list]:
    seed_everything(seed)
    dev = device()
    model = SliceClassifier(width=cfg["width"]).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=dev).manual_seed(seed)
    positions = train_rows["row"].to_numpy()
    targets_on_dev = torch.as_tensor(targets, dtype=torch.float32).to(dev)

    def run_epoch(epoch: int) -> dict[str, float]:
        losses = []
        for chosen in batches(len(positions), cfg["batch_size"], weights, rng, cfg["draws_per_epoch"]):
            x = augment(slices.tensor(positions[chosen]).to(dev), generator)  # resident: no copy
            y = targets_on_dev[device_index(chosen, dev)]
            with autocast(dev):
                loss = F.binary_cross_entropy_with_logits(model(x).float().squeeze(1), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return {"loss": epoch_mean(losses)}

    history = fit(model, cfg["epochs"], run_epoch, optimizer, checkpoint, desc, rngs=(rng, generator))
    return model.eval(), history


def train_classifier(lungs_dir: str | Path, out_dir: str | Path, params: dict[str, Any],
                     checkpoint_dir: str | Path) -> dict[str, Any]:
    """Train the slice classifier on the train split; report per-source validation AUC and the probe."""
    cfg = params["classify"]
    slices = SliceSet.for_localisers(lungs_dir, params).to(device())
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    train = slices.rows("train", cfg["min_lung_fraction"])
    val = slices.rows("val", cfg["min_lung_fraction"])
    model, history = _train(slices, train, train["label"].to_numpy(), balanced_weights(train), cfg,
                            params["seed"],
                            checkpoint_path(checkpoint_dir, "classifier", params, [lungs_dir]), "classify")
    val_auc = per_source_auc(val, predict_proba(model, slices, val["row"].to_numpy()))
    save_model(model.cpu(), out_dir / MODEL, {"width": cfg["width"], "seed": params["seed"],
                                             "profile": params["profile"]})
    probe = {}
    if cfg["probe_epochs"] > 0:
        probe = source_probe(slices, params, checkpoint_path(checkpoint_dir, "probe", params, [lungs_dir]))
    return {"history": history, "val_auc": val_auc, "probe": probe,
            "n_train": len(train), "n_val": len(val)}


def source_probe(slices: SliceSet, params: dict[str, Any], checkpoint: Path) -> dict[str, float]:
    """How well can the classifier's architecture tell HU slices from JPEG slices? (positives only)."""
    cfg = dict(params["classify"], epochs=params["classify"]["probe_epochs"])
    train = slices.rows("train", cfg["min_lung_fraction"])
    val = slices.rows("val", cfg["min_lung_fraction"])
    train, val = train[train["label"] == 1], val[val["label"] == 1]
    is_hu = (train["domain"] == "hu").to_numpy().astype(float)
    weights = np.where(is_hu == 1, 1.0 / max(is_hu.sum(), 1), 1.0 / max((1 - is_hu).sum(), 1))
    model, _ = _train(slices, train, is_hu, weights, cfg, params["seed"] + 1,
                      checkpoint, "source probe")
    scores = predict_proba(model, slices, val["row"].to_numpy())
    return {"source_auc_val": roc_auc(scores, (val["domain"] == "hu").to_numpy().astype(float)),
            "n_val_hu": int((val["domain"] == "hu").sum()), "n_val_8bit": int((val["domain"] != "hu").sum())}
