"""Training from shards under torchrun: each rank streams its own shards (`covseg.shards.balanced_batches`)
through `training.fit`, whose hook averages the gradients. Launched by tests/test_scale.py.

    python tests/ddp_stream_worker.py SHARDS OUT            # train (one process or under torchrun)
    python tests/ddp_stream_worker.py SHARDS OUT REPLAY     # one process replays the ranks' batches joined

Each rank writes OUT.rank<r> (its batches' rows and its final weights). REPLAY (a list of the ranks'
files) trains one process on the union of the ranks' i-th batches at step i: with equal local batch sizes
its gradient is the mean of the ranks' gradients, so it must end with the ranks' weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covseg import distributed
from covseg.shards import LocalSource, balanced_batches, draw_counts, iter_samples
from covseg.training import epoch_mean, fit, seed_everything

EPOCHS, BATCH, BUFFER, DRAWS = 2, 4, 8, 40


def _model() -> nn.Module:
    seed_everything(0)
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.LazyLinear(1))


def _xy(images: list[np.ndarray], labels: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack(images).astype(np.float32))[:, None]
    return x, torch.tensor(labels, dtype=torch.float32)


def train(shards: str, out: str) -> None:
    distributed.init_from_env()
    rank, world = distributed.rank(), distributed.world_size()
    source = LocalSource(shards)
    manifest, index = source.manifest(), source.index(["row", "label"])
    labels = index["label"].clip(lower=0).to_numpy(float)
    weights = np.where(labels == 1, 1.0, 2.0)
    model = _model()
    model(torch.zeros(1, 1, 64, 64))  # materialise the lazy layer before the optimizer and the broadcast
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    draw_rng = np.random.default_rng(0)  # the same on every rank: the same global draw
    shuffle_rng = np.random.default_rng(100 + rank)  # this rank's buffer
    steps: list[list[int]] = []

    def run_epoch(epoch: int) -> dict[str, float]:
        counts = draw_counts(weights, DRAWS, draw_rng)
        losses = []
        for batch in balanced_batches(source, manifest, counts, BATCH, shuffle_rng, rank, world, BUFFER):
            steps.append([s.row for s in batch])
            x, y = _xy([s.image for s in batch], [max(float(s.meta["label"]), 0.0) for s in batch])
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return {"loss": epoch_mean(losses)}

    history = fit(
        model, EPOCHS, run_epoch, optimizer, Path(f"{out}.ckpt"), "stream", rngs=(draw_rng, shuffle_rng)
    )
    own = [r for s in manifest["shards"][rank::world] for r in s["rows"]]
    Path(f"{out}.rank{rank}").write_text(
        json.dumps(
            {
                "world": world,
                "steps": steps,
                "own_rows": own,
                "history": history,
                "weights": [p.detach().reshape(-1).tolist() for p in model.parameters()],
            }
        )
    )
    distributed.barrier()
    distributed.shutdown()


def replay(shards: str, out: str, ranks: list[str]) -> None:
    runs = [json.loads(Path(r).read_text()) for r in ranks]
    samples = {s.row: s for s in iter_samples(LocalSource(shards), LocalSource(shards).manifest()["shards"])}
    model = _model()
    model(torch.zeros(1, 1, 64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in zip(*(run["steps"] for run in runs), strict=True):
        rows = [r for part in step for r in part]
        x, y = _xy(
            [samples[r].image for r in rows], [max(float(samples[r].meta["label"]), 0.0) for r in rows]
        )
        loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    Path(out).write_text(
        json.dumps({"weights": [p.detach().reshape(-1).tolist() for p in model.parameters()]})
    )


if __name__ == "__main__":
    if len(sys.argv) > 3:
        replay(sys.argv[1], sys.argv[2], sys.argv[3:])
    else:
        train(sys.argv[1], sys.argv[2])
