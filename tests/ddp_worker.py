"""A small exact training run through `training.fit` / `training.batches`, launched by tests/test_scale.py
either as one process or under `torchrun` (gloo). No BatchNorm, no dropout and no augmentation, so one process and N
ranks with the same global batch must end with the same weights up to float rounding.

    python tests/ddp_worker.py OUT.json CHECKPOINT [CRASH_AT_EPOCH]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covseg import distributed
from covseg.training import batches, epoch_mean, fit, seed_everything

N_ITEMS, BATCH, DRAWS, EPOCHS = 40, 15, 40, 4  # 15, 15, 10 per epoch: uneven shards on 2 ranks


def main(out: str, checkpoint: str, crash_at: int = -1) -> None:
    distributed.init_from_env()
    seed_everything(0)
    data = np.random.default_rng(1)
    x = torch.from_numpy(data.normal(size=(N_ITEMS, 5)).astype(np.float32))
    y = torch.sin(x.sum(1, keepdim=True))
    weights = np.linspace(1.0, 3.0, N_ITEMS)  # weighted draws, as the balanced samplers make
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    rng = np.random.default_rng(0)
    seen: list[int] = []

    def run_epoch(epoch: int) -> dict[str, float]:
        if epoch == crash_at and distributed.is_main():
            raise SystemExit(3)  # a killed run: the checkpoint of the finished epochs stays
        losses = []
        for chosen in batches(N_ITEMS, BATCH, weights, rng, DRAWS):
            seen.extend(int(i) for i in chosen)
            loss = nn.functional.mse_loss(model(x[chosen]), y[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return {"loss": epoch_mean(losses)}

    history = fit(model, EPOCHS, run_epoch, optimizer, Path(checkpoint), "ddp-worker", rngs=(rng,))
    result = {
        "rank": distributed.rank(),
        "world": distributed.world_size(),
        "history": history,
        "weights": [p.detach().reshape(-1).tolist() for p in model.parameters()],
        "seen": seen,
    }
    Path(f"{out}.rank{distributed.rank()}").write_text(json.dumps(result))
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else -1)
