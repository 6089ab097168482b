"""Lesion / no-lesion classifier of one-lung views, trained where label and source are independent.

Every JPEG slice shows a lesion and, until the lobe labels were read, every negative was a HU slice: a
classifier trained on that learned the source (source probe 0.9999). Here the classifier trains only on
sources that hold both labels (COVID-CT-MD: positives and negatives from one scanner), on *lung views*
(`lung_views`: one lung shown, the other hidden) labelled by the lobe columns, so a positive slice with one
clean lung gives a positive and a negative view of the same patient, scanner and slice height. The JPEG
positives never reach its loss. What it still carries about the source is measured on its own features
(`feature_probe`: HU vs JPEG positives, where the label is the same and cannot help).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from covseg.layout import CLASSIFIER as MODEL
from covseg.nets import SliceClassifier
from covseg.training import (
    SliceSet,
    augment,
    autocast,
    batches,
    checkpoint_path,
    device,
    device_index,
    epoch_mean,
    fit,
    save_model,
    seed_everything,
)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (MONAI's implementation); NaN when only one class is present."""
    from monai.metrics import compute_roc_auc

    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(
        compute_roc_auc(
            torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.float32)
        )
    )


MIN_SIDE_FRACTION = 0.01
"""A lung view needs at least this share of the slice as lung on its side (else the view is skipped)."""


def two_label_sources(index: pd.DataFrame) -> list[str]:
    """Training sources that hold both slice labels: the only ones where label and source are independent."""
    train = index[index["split"].isin(["train", "val"])]
    labels = train.groupby("source")["label"].agg(lambda s: set(s.unique()))
    return sorted(src for src, have in labels.items() if {0, 1} <= have)


def lung_views(slices: SliceSet, rows: pd.DataFrame) -> pd.DataFrame:
    """One-lung views of `rows` with their weak labels: side 1 (patient's right lung) labelled
    `lesion_right`, side 2 `lesion_left`; a clean slice's lungs are both negative. Rows whose lungs carry no
    label (-1, no lobe columns) are dropped, and so is a side with less than `MIN_SIDE_FRACTION` lung."""
    from covseg.lungs import SIDE_LEFT, SIDE_RIGHT

    views = []
    for side, column in ((SIDE_RIGHT, "lesion_right"), (SIDE_LEFT, "lesion_left")):
        known = rows[column] >= 0 if column in rows else pd.Series(False, index=rows.index)
        labelled = rows[known | (rows["label"] == 0)]
        label = np.where(labelled["label"] == 0, 0, labelled.get(column, 0)).astype(int)
        views.append(labelled.assign(side=side, label=label))
    frame = pd.concat(views, ignore_index=True) if views else rows.iloc[:0].assign(side=0)
    if frame.empty:
        return frame
    area = slices.side_masks(frame["row"].to_numpy(), frame["side"].to_numpy()).mean(axis=(1, 2))
    return frame[area >= MIN_SIDE_FRACTION].reset_index(drop=True)


def training_views(slices: SliceSet, split: str, min_lung_fraction: float) -> pd.DataFrame:
    """The localisers' training (or validation) views of a split: sources with both labels only; lung views
    where the lobe labels say which lung is clean, whole slices (side 0) where a source has none."""
    sources = two_label_sources(slices.index)
    rows = slices.rows(split, min_lung_fraction)
    rows = rows[rows["source"].isin(sources)]
    has_lobes = (rows.get("lesion_left", -1) >= 0) | (rows["label"] == 0)
    lobed_sources = set(rows[(rows["label"] == 1) & has_lobes]["source"])
    with_lobes = rows[rows["source"].isin(lobed_sources)]
    whole = rows[~rows["source"].isin(lobed_sources)].assign(side=0)
    return pd.concat([lung_views(slices, with_lobes), whole], ignore_index=True)


@torch.no_grad()
def predict_logits(
    model: SliceClassifier,
    slices: SliceSet,
    rows: np.ndarray,
    sides: np.ndarray | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Lesion logit for each view (`rows`, `sides`; whole slices without `sides`). The head runs in float32
    outside autocast, so saturated probabilities still rank (bf16 keeps ~128 values per doubling)."""
    dev = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        part = None if sides is None else sides[start : start + batch_size]
        x = slices.tensor(rows[start : start + batch_size], part).to(dev)
        with autocast(dev):
            pooled = model.pooled(x)
        out.append(model.head(pooled.float()).squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def predict_proba(
    model: SliceClassifier,
    slices: SliceSet,
    rows: np.ndarray,
    sides: np.ndarray | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Sigmoid lesion probability for each view (whole slices without `sides`)."""
    return torch.sigmoid(torch.from_numpy(predict_logits(model, slices, rows, sides, batch_size))).numpy()


def lung_probabilities(model: SliceClassifier, slices: SliceSet, rows: np.ndarray) -> np.ndarray:
    """(N, 2) lesion probability of each slice's right (column 0) and left (column 1) lung view."""
    from covseg.lungs import SIDE_LEFT, SIDE_RIGHT

    return np.stack(
        [predict_proba(model, slices, rows, np.full(len(rows), side)) for side in (SIDE_RIGHT, SIDE_LEFT)],
        axis=1,
    )


def view_auc(
    model: SliceClassifier, slices: SliceSet, split: str, min_lung_fraction: float
) -> dict[str, float]:
    """Validation AUC of the classifier: `lung` over the lung views, `slice` over the slices of the
    two-label sources (a slice scores its likelier lung), and per source: each source's slices against the
    split's negatives (for the JPEG sources: are their lesion slices ranked above clean HU slices?)."""
    views = training_views(slices, split, min_lung_fraction)
    result = {"lung": float("nan")}
    if not views.empty and (views["side"] > 0).any():
        lung = views[views["side"] > 0]
        result["lung"] = roc_auc(
            predict_proba(model, slices, lung["row"].to_numpy(), lung["side"].to_numpy()),
            lung["label"].to_numpy(),
        )
    rows = slices.rows(split, min_lung_fraction)
    score = lung_probabilities(model, slices, rows["row"].to_numpy()).max(axis=1)
    frame = rows.assign(p=score)
    in_domain = frame[frame["source"].isin(two_label_sources(slices.index))]
    result["slice"] = roc_auc(in_domain["p"].to_numpy(), in_domain["label"].to_numpy())
    negatives = frame[frame["label"] == 0]
    for source, group in frame.groupby("source"):
        pool = pd.concat([group, negatives]).drop_duplicates("row")
        result[source] = roc_auc(pool["p"].to_numpy(), pool["label"].to_numpy())
    return result


def _train(
    slices: SliceSet, views: pd.DataFrame, cfg: dict[str, Any], seed: int, checkpoint: Path, desc: str
) -> tuple[SliceClassifier, list]:
    """Train the classifier on views, half the draws per label."""
    seed_everything(seed)
    dev = device()
    model = SliceClassifier(width=cfg["width"]).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=dev).manual_seed(seed)
    positions, sides = views["row"].to_numpy(), views["side"].to_numpy()
    labels = views["label"].to_numpy()
    weights = np.where(labels == 1, 1.0 / max(labels.sum(), 1), 1.0 / max((1 - labels).sum(), 1))
    targets_on_dev = torch.as_tensor(labels, dtype=torch.float32).to(dev)

    def run_epoch(epoch: int) -> dict[str, float]:
        losses = []
        for chosen in batches(len(positions), cfg["batch_size"], weights, rng, cfg["draws_per_epoch"]):
            x = augment(slices.tensor(positions[chosen], sides[chosen]).to(dev), generator)
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


def train_classifier(
    lungs_dir: str | Path, out_dir: str | Path, params: dict[str, Any], checkpoint_dir: str | Path
) -> dict[str, Any]:
    """Train the view classifier on the train split; report validation AUC (lung, slice, per source) and
    the feature probe."""
    cfg = params["classify"]
    slices = SliceSet.for_localisers(lungs_dir, params).to(device())
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    train = training_views(slices, "train", params["views"]["min_lung_fraction"])
    if train.empty or train["label"].nunique() < 2:
        from covseg.errors import InputError

        raise InputError(
            lungs_dir,
            "no training source holds both lesion and lesion-free slices: the "
            "classifier would learn the source, not the lesion",
        )
    model, history = _train(
        slices,
        train,
        cfg,
        params["seed"],
        checkpoint_path(checkpoint_dir, "classifier", params, [lungs_dir]),
        "classify",
    )
    val_auc = view_auc(model, slices, "val", params["views"]["min_lung_fraction"])
    probe = (
        feature_probe(model, slices, params["views"]["min_lung_fraction"]) if cfg["probe_epochs"] > 0 else {}
    )
    save_model(
        model.cpu(),
        out_dir / MODEL,
        {"width": cfg["width"], "seed": params["seed"], "profile": params["profile"]},
    )
    return {
        "history": history,
        "val_auc": val_auc,
        "probe": probe,
        "n_train": len(train),
        "n_train_positive": int(train["label"].sum()),
        "n_val": len(training_views(slices, "val", params["views"]["min_lung_fraction"])),
    }


@torch.no_grad()
def pooled_features(model: SliceClassifier, slices: SliceSet, rows: np.ndarray) -> np.ndarray:
    """(N, 2C) pooled encoder features (what the head reads) of whole slices."""
    dev = next(model.parameters()).device
    model.eval()
    chunks = [
        model.pooled(slices.tensor(rows[s : s + 64]).to(dev)).float().cpu().numpy()
        for s in range(0, len(rows), 64)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)


def feature_probe(model: SliceClassifier, slices: SliceSet, min_lung_fraction: float) -> dict[str, float]:
    """Can the classifier's own features tell HU from JPEG where the label is the same (positives)?

    A logistic regression (L2, classes balanced) on the pooled features of the train positives, scored
    (ROC AUC) on the validation positives: 0.5 = the features carry no source, 1.0 = they name it."""

    def positives(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = slices.rows(split, min_lung_fraction)
        rows = rows[rows["label"] == 1]
        return pooled_features(model, slices, rows["row"].to_numpy()), (rows["domain"] == "hu").to_numpy(
            float
        )

    (x_train, y_train), (x_val, y_val) = positives("train"), positives("val")
    result = {
        "n_val_hu": int(y_val.sum()),
        "n_val_8bit": int((1 - y_val).sum()),
        "source_auc_val": float("nan"),
    }
    if len(np.unique(y_train)) < 2 or len(np.unique(y_val)) < 2:
        return result
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))
    probe.fit(x_train, y_train)
    result["source_auc_val"] = roc_auc(probe.decision_function(x_val), y_val)
    return result
