"""Source separability of a trained classifier's features (diagnostic; no mask involved).

A logistic regression (L2, LBFGS, classes balanced) is fitted on the pooled encoder features of the train
positives to tell HU slices from JPEG slices, and scored (ROC AUC) on the validation positives. Unlike the
pipeline's source probe (a fresh network on the inputs), this asks what the lesion classifier itself carries.

    .venv/bin/python bench/feature_probe.py artifacts/lungs artifacts/classify
    .venv/bin/python bench/feature_probe.py .devcarry-build/lungs-full-<key> <untarred device run>/classify
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from covseg.cam import load_classifier
from covseg.classify import roc_auc
from covseg.config import load_params
from covseg.training import SliceSet


def pooled_features(model: torch.nn.Module, slices: SliceSet, split: str, min_lung: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2C) pooled features of a split's positives and their is-HU flags."""
    rows = slices.rows(split, min_lung)
    rows = rows[rows["label"] == 1]
    positions = rows["row"].to_numpy()
    with torch.no_grad():
        chunks = [model.pooled(slices.tensor(positions[s:s + 64])).numpy() for s in range(0, len(positions), 64)]
    return np.concatenate(chunks), (rows["domain"] == "hu").to_numpy().astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lungs_dir")
    parser.add_argument("classify_dir")
    parser.add_argument("--profile", default="quick", help="for tissue_ceiling and min_lung_fraction")
    parser.add_argument("--overrides", default="{}", help='params overrides as JSON, e.g. \'{"classify": {"outside_fill": 0.1}}\'')
    args = parser.parse_args()
    params = load_params(args.profile, overrides=json.loads(args.overrides))
    cfg = params["classify"]
    slices = SliceSet.for_localisers(args.lungs_dir, params)
    model = load_classifier(args.classify_dir).eval()
    x_train, y_train = pooled_features(model, slices, "train", cfg["min_lung_fraction"])
    x_val, y_val = pooled_features(model, slices, "val", cfg["min_lung_fraction"])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x, y = torch.from_numpy((x_train - mean) / std), torch.from_numpy(y_train)
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200)
    balance = torch.tensor((1 - y_train).sum() / max(y_train.sum(), 1))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=balance)
        loss = loss + 1e-2 * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    scores = (torch.from_numpy((x_val - mean) / std) @ w + b).detach().numpy()
    print(f"feature probe AUC (val positives, {int(y_val.sum())} HU vs {int((1 - y_val).sum())} JPEG): "
          f"{roc_auc(scores, y_val):.3f}")


if __name__ == "__main__":
    main()
