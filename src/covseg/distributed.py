"""Data-parallel training with torch.distributed: one process per GPU (or CPU process), launched by
`torchrun`, locally or in the pods of a Training Operator PyTorchJob (`covseg.trainjob`; the operator gives
torchrun its PET_* settings). torchrun sets each process's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT, which `init_from_env` reads.

How the existing training loops become data-parallel without being rewritten (`training.batches`,
`training.fit` call in here only when a process group with more than one rank is up; one process behaves
exactly as before):

* every rank seeds the same generators, so every rank draws the *same* global balanced batch; `shard` gives
  each rank a disjoint contiguous part of it (the `DistributedSampler` idea applied to weighted draws);
* before each optimizer step the gradients are all-reduced, each rank's weighted by its share of the global
  batch, so every rank steps with the gradient of the mean loss over the global batch (what DDP computes;
  the loops call their module directly, not a `DistributedDataParallel` wrapper, so the reduction is an
  optimizer step pre-hook, see `sync_gradients`; one flat all-reduce per step, without DDP's overlap of
  communication with the backward pass: whether that matters for these 1-2 M parameter networks is not
  measured);
* rank 0 alone writes checkpoints; a resumed run reads rank 0's checkpoint and broadcasts it;
* epoch records (losses) are averaged over the ranks, so the history is the global one.

BatchNorm statistics stay per rank (as in DDP without SyncBatchNorm, which torch runs on GPUs only): with a
local batch of B/world the normalisation differs slightly from one process with batch B; that, the per-rank
augmentation draws and dropout masks are why the stage-level equivalence tests state a tolerance rather than
equality (tests/test_scale.py; a network without them matches one process to float rounding).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

_share: float | None = None
"""This rank's share of the current global batch (set by `shard`, read by the gradient hook); None (a loop
that draws its local batches itself, e.g. from its own shards, all of one size): 1 / world size."""


def env_world_size() -> int:
    """WORLD_SIZE from the launcher's environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> bool:
    """Join the process group the launcher describes (env://): NCCL on CUDA, gloo on the CPU.

    Returns True when a group with more than one rank is up; does nothing for a single process."""
    if env_world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(
            backend or ("nccl" if cuda else "gloo"), timeout=datetime.timedelta(seconds=timeout_s)
        )
    return is_distributed()


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """A process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, metrics and MLflow runs."""
    return rank() == 0


def shard_bounds(n: int, world: int, rank_: int) -> tuple[int, int]:
    """[start, stop) of rank `rank_`'s contiguous part of n items (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def shard(batch: np.ndarray) -> np.ndarray:
    """This rank's disjoint part of a global batch (every rank holds the same `batch`).

    A rank left without items (a last batch shorter than the world) gets the batch's first item with
    weight 0: its forward/backward still runs, so the collective calls stay in step, but its gradient
    counts for nothing."""
    global _share
    if not is_distributed():
        return batch
    start, stop = shard_bounds(len(batch), world_size(), rank())
    _share = (stop - start) / max(len(batch), 1)
    return batch[start:stop] if stop > start else batch[:1]


def _flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return torch.cat([p.grad.reshape(-1) for p in params])


def sync_gradients(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Broadcast rank 0's weights and buffers, then all-reduce gradients before every optimizer step.

    One flat all-reduce per step (one bucket), each rank's gradient weighted by its share of the global
    batch: the result is the gradient of the global batch's mean loss. Returns the hook handle
    (`.remove()` it when training ends)."""
    global _share
    broadcast_module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    _share = None

    def pre_step(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        flat = _flat_grads(params) * (_share if _share is not None else 1.0 / world_size())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    return optimizer.register_step_pre_hook(pre_step)


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Every rank takes rank `src`'s parameters and buffers (BatchNorm running statistics included)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled; for checkpoints and small records)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def mean_record(record: dict[str, Any]) -> dict[str, Any]:
    """The float values of an epoch record averaged over the ranks (others kept as they are)."""
    if not is_distributed():
        return record
    keys = [k for k, v in record.items() if isinstance(v, float)]
    if not keys:
        return record
    values = torch.tensor([record[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    averaged = (values / world_size()).cpu().tolist()
    return {**record, **dict(zip(keys, averaged, strict=True))}


def barrier() -> None:
    if is_distributed():
        dist.barrier()
