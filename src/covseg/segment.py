"""The segmenter: MONAI BasicUNet trained on the fine labels (pseudo masks) of the training split.

Targets are the MIL-refined fine labels of positive slices and empty masks for lesion-free slices. Input is
the lung-masked harmonised slice; the loss (BCE + soft Dice) and the prediction are confined to the lungs.
CUDA with bf16 autocast when present, CPU otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from covseg.mil import LABELS as FINE
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

MODEL = "segmenter.pt"


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the batch, counted inside `region` only."""
    prob = torch.sigmoid(logits) * region
    inter = (prob * target).sum()
    return 1.0 - (2 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)


def train_segmenter(lungs_dir: str | Path, mil_dir: str | Path, out_dir: str | Path,
                    params: dict[str, Any], checkpoint_dir: str | Path,
                    lineage: dict[str, str] | None = None) -> dict[str, Any]:
    """Train the U-Net on fine labels; save `segmenter.pt` (+ JSON metadata, with `lineage` when given:
    git commit, data version, params hash, pipeline run, so a model folder says what it was trained on)."""
    cfg = params["segment"]
    seed_everything(params["seed"])
    dev = device()
    slices = SliceSet.load(lungs_dir).to(dev)
    labels_file = np.load(Path(mil_dir) / FINE)
    fine_labels, labelled_rows = labels_file["fine"], labels_file["rows"]  # each member decompresses per read
    fine = torch.from_numpy(fine_labels).to(dev)
    train = slices.rows("train", params["classify"]["min_lung_fraction"])
    rows, labels = train["row"].to_numpy(), train["label"].to_numpy()
    weights = np.where(labels == 1, 1.0 / max(labels.sum(), 1), cfg["negative_share"] / max((1 - labels).sum(), 1))
    model = build_segmenter(tuple(cfg["features"])).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    rng = np.random.default_rng(params["seed"])
    generator = torch.Generator(device=dev).manual_seed(params["seed"])

    def run_epoch(epoch: int) -> dict[str, float]:
        losses = []
        for chosen in batches(len(rows), cfg["batch_size"], weights, rng, cfg["draws_per_epoch"]):
            picked = rows[chosen]  # gathered and augmented on `dev` (see SliceSet.to)
            x = slices.tensor(picked).to(dev)
            y = fine[device_index(picked, dev)].float()[:, None]
            region = slices.lung_tensor(picked).float().to(dev)
            flip = torch.rand(len(picked), generator=generator, device=dev) < 0.5
            x, y, region = (torch.where(flip[:, None, None, None], t.flip(-1), t) for t in (x, y, region))
            gain = 1.0 + 0.1 * (torch.rand(len(picked), 1, 1, 1, generator=generator, device=dev) * 2 - 1)
            x = (x * gain).clamp(0, 1) * region
            with autocast(dev):
                logits = model(x).float()
            bce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * region).sum() / region.sum()
            loss = bce + soft_dice_loss(logits, y, region)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return {"loss": epoch_mean(losses)}

    checkpoint = checkpoint_path(checkpoint_dir, "segmenter", params, [lungs_dir, mil_dir])
    history = fit(model, cfg["epochs"], run_epoch, optimizer, checkpoint, "segment", rngs=(rng, generator))
    save_model(model.cpu(), Path(out_dir) / MODEL, {"features": list(cfg["features"]),
                                                   "image_size": params["image_size"],
                                                   "seed": params["seed"], "profile": params["profile"],
                                                   **(lineage or {})})
    val = slices.rows("val", params["classify"]["min_lung_fraction"])
    labelled = np.intersect1d(val[val["label"] == 1]["row"].to_numpy(), labelled_rows)
    agreement = fine_label_dice(model.to(dev), slices, fine_labels, labelled)
    return {"history": history, "n_train": len(rows), "val_fine_dice": agreement, "n_val_fine": len(labelled)}


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
def segment_canonical(model: torch.nn.Module, images: np.ndarray, lungs: np.ndarray,
                      batch_size: int = 32) -> np.ndarray:
    """Lesion probability (N,S,S) for canonical lung-masked slices; zero outside the lungs."""
    dev = next(model.parameters()).device
    model.eval()
    out = np.zeros(images.shape, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], np.float32))[:, None]
        with autocast(dev):
            prob = torch.sigmoid(model(x.to(dev)).float())[:, 0].cpu().numpy()
        out[start:start + batch_size] = prob * lungs[start:start + batch_size]
    return out
