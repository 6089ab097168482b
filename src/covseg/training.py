"""What every training stage shares: seeding, device and autocast, augmentation, the epoch loop with
per-epoch checkpoints (a killed run resumes where it stopped), and the canonical slice arrays."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from covseg import distributed
from covseg.harmonise import INDEX, SLICES
from covseg.progress import progress


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on the CPU."""
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class SliceSet:
    """The canonical slices of the lungs stage: images (N,S,S) float32, lungs (N,S,S) bool, the index, and
    the lung sides (N,S,S) uint8 (`lungs.split_sides`: 1 = patient's right lung, 2 = left, 0 = no lung).

    A *view* of a slice is (row, side): side 0 is the whole slice, side 1 or 2 one lung alone (the other
    shown as outside the lungs). One-lung views carry lobe-level weak labels (`lung_views`)."""

    images: np.ndarray
    lungs: np.ndarray
    index: pd.DataFrame
    tissue_ceiling: float | None = None
    """When set, `tensor` replaces pixels at or above it (soft tissue the generous lung mask takes in) and
    every pixel outside the lung mask by `fill`, so the weak localisers (classifier, Grad-CAM, MIL) see
    parenchyma, not mediastinum; `images` stay as they are."""
    fill: float = 0.0
    """With a tissue ceiling: what `tensor` shows outside the lungs and on hidden soft tissue. At the healthy
    lung level (`views.outside_fill: 0.1`) the lung border is no edge and the lung's outline no shape:
    Grad-CAM on zero-filled inputs followed the border (correlation of CAM with depth into the lung -0.51 on
    medseg-100, -0.27 with the fill), and MIL patches on the border were mostly edge."""
    sides: np.ndarray | None = None
    _resident: tuple[torch.Tensor, ...] | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, lungs_dir: str | Path, tissue_ceiling: float | None = None, fill: float = 0.0) -> SliceSet:
        lungs_dir = Path(lungs_dir)
        arrays = np.load(lungs_dir / SLICES)
        lungs = arrays["lung"]
        sides = arrays["side"] if "side" in arrays.files else np.where(lungs, 1, 0).astype(np.uint8)
        return cls(
            arrays["image"].astype(np.float32),
            lungs,
            pd.read_parquet(lungs_dir / INDEX),
            tissue_ceiling,
            fill,
            sides,
        )

    @classmethod
    def for_localisers(cls, lungs_dir: str | Path, params: dict[str, Any]) -> SliceSet:
        """The slices as the weak localisers (classifier, Grad-CAM, MIL) see them (`views.tissue_ceiling`,
        `views.outside_fill`)."""
        cfg = params["views"]
        return cls.load(lungs_dir, cfg.get("tissue_ceiling"), float(cfg.get("outside_fill", 0.0)))

    def to(self, dev: torch.device) -> SliceSet:
        """Keep the model inputs (tissue ceiling applied) and the lung masks as tensors on `dev`, so that
        `tensor` and `lung_tensor` gather batches there: no per-batch numpy work or host-to-GPU copy (the
        training loops on the H100 were bound by that, bench/README.md; only the batch's row indices travel,
        see `device_index`). Returns self."""
        self._resident = (
            torch.from_numpy(self._masked(self.images, self.lungs)).to(dev),
            torch.from_numpy(self.lungs).to(dev),
            torch.from_numpy(self._sides()).to(dev),
        )
        return self

    def _sides(self) -> np.ndarray:
        return self.sides if self.sides is not None else self.lungs.astype(np.uint8)

    def side_masks(self, rows: np.ndarray, sides: np.ndarray) -> np.ndarray:
        """(B,S,S) bool: the lung pixels each view shows (side 0: both lungs)."""
        lungs, side_map = self.lungs[rows], self._sides()[rows]
        sides = np.asarray(sides)[:, None, None]
        return lungs & ((sides == 0) | (side_map == sides))

    def rows(self, split: str, min_lung_fraction: float = 0.0) -> pd.DataFrame:
        """Index rows of one split whose lung mask covers at least `min_lung_fraction` of the slice."""
        sel = (self.index["split"] == split) & (self.index["lung_fraction"] >= min_lung_fraction)
        return self.index[sel]

    def tensor(self, rows: np.ndarray, sides: np.ndarray | None = None) -> torch.Tensor:
        """(B,1,S,S) float tensor of the lung-masked images of `rows` (soft tissue hidden, see tissue_ceiling),
        on the device given to `to` (else the CPU). With `sides`, the views: a one-lung view shows the other
        lung as outside the lungs."""
        if self._resident is not None:
            images, _, side_map = self._resident
            index = device_index(rows, images.device)
            x = images[index][:, None]
            if sides is None:
                return x
            chosen = torch.as_tensor(np.asarray(sides), device=images.device)[:, None, None, None]
            hide = (chosen > 0) & (side_map[index][:, None] != chosen)
            return torch.where(hide, torch.full_like(x, self._hidden_value()), x)
        x = self._masked(self.images[rows], self.lungs[rows])
        if sides is not None:
            x = np.where(
                self.side_masks(rows, sides) | (np.asarray(sides)[:, None, None] == 0),
                x,
                self._hidden_value(),
            ).astype(np.float32)
        return torch.from_numpy(x)[:, None]

    def lung_tensor(self, rows: np.ndarray, sides: np.ndarray | None = None) -> torch.Tensor:
        """(B,1,S,S) bool lung masks of `rows` (of the views, with `sides`), on the device given to `to`."""
        if self._resident is not None:
            _, lungs, side_map = self._resident
            index = device_index(rows, lungs.device)
            mask = lungs[index][:, None]
            if sides is None:
                return mask
            chosen = torch.as_tensor(np.asarray(sides), device=lungs.device)[:, None, None, None]
            return mask & ((chosen == 0) | (side_map[index][:, None] == chosen))
        if sides is None:
            return torch.from_numpy(self.lungs[rows])[:, None]
        return torch.from_numpy(self.side_masks(rows, sides))[:, None]

    def _hidden_value(self) -> float:
        return self.fill if self.tissue_ceiling is not None else 0.0

    def _masked(self, images: np.ndarray, lungs: np.ndarray) -> np.ndarray:
        if self.tissue_ceiling is None:
            return images
        return np.where(lungs & (images < self.tissue_ceiling), images, self.fill).astype(np.float32)


def device_index(index: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A numpy index array as a long tensor on `dev`. On CUDA through pinned memory, non-blocking: a plain
    copy from pageable memory synchronises the stream, which would stall every training step."""
    tensor = torch.as_tensor(np.asarray(index), dtype=torch.long)
    return tensor.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else tensor


def epoch_mean(losses: list[torch.Tensor]) -> float:
    """Mean of an epoch's detached step losses, read from the device once (a `.item()` per step would
    synchronise every step); float64 over the float32 values, as `np.mean` of Python floats gives."""
    return float(np.mean(torch.stack(losses).float().cpu().numpy().astype(np.float64)))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Left-right flips, contrast/brightness jitter and noise (pixels that are exactly zero stay zero).

    Draws come from `generator` on its own device (make it on x's device: noise drawn on the CPU and copied
    is most of a GPU step's cost) and are applied where x lives."""
    batch, dev, gen_dev = x.shape[0], x.device, generator.device
    inside = (x > 0).float()
    flip = (torch.rand(batch, generator=generator, device=gen_dev) < 0.5).to(dev)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    inside = torch.where(flip[:, None, None, None], inside.flip(-1), inside)
    gain = (1.0 + 0.15 * (torch.rand(batch, 1, 1, 1, generator=generator, device=gen_dev) * 2 - 1)).to(dev)
    bias = (0.04 * (torch.rand(batch, 1, 1, 1, generator=generator, device=gen_dev) * 2 - 1)).to(dev)
    noise = (0.02 * torch.randn(x.shape, generator=generator, device=gen_dev)).to(dev)
    return ((x * gain + bias + noise).clamp(0, 1)) * inside


def balanced_weights(rows: pd.DataFrame) -> np.ndarray:
    """Sampling weights: half the draws per label, split evenly among the sources holding that label."""
    cells = rows.groupby(["label", "source"])["row"].transform("size").to_numpy(float)
    sources_per_label = rows.groupby("label")["source"].transform("nunique").to_numpy(float)
    n_labels = rows["label"].nunique()
    return 1.0 / (cells * sources_per_label * n_labels)


def batches(
    n_items: int,
    batch_size: int,
    weights: np.ndarray | None,
    rng: np.random.Generator,
    n_draws: int | None = None,
) -> Iterator[np.ndarray]:
    """Index batches: weighted draws with replacement when `weights` is given, else a shuffled pass.

    Under torch.distributed every rank draws the same global batches (same seed) and yields its own disjoint
    part of each (`distributed.shard`)."""
    if weights is None:
        order = rng.permutation(n_items)
    else:
        order = rng.choice(n_items, size=n_draws or n_items, replace=True, p=weights / weights.sum())
    for start in range(0, len(order), batch_size):
        yield distributed.shard(order[start : start + batch_size])


def fit(
    model: nn.Module,
    epochs: int,
    run_epoch: Callable[[int], dict[str, float]],
    optimizer: torch.optim.Optimizer,
    checkpoint: Path,
    desc: str,
    rngs: Sequence[np.random.Generator | torch.Generator] = (),
) -> list[dict[str, Any]]:
    """Run `run_epoch(epoch)` for each epoch, checkpointing model + optimizer + history after each one.

    If `checkpoint` exists (a killed run), training resumes after its last finished epoch; it is removed
    once training completes. Name it with `checkpoint_path` so a changed configuration never resumes.
    The states of `rngs` (the generators `run_epoch` draws from) and of torch's global generators (dropout)
    are checkpointed too, so a resumed run ends with the weights an uninterrupted one would have.

    Under torch.distributed (`covseg.distributed`) gradients are all-reduced before each step, the epoch
    records are averaged over the ranks, and rank 0 alone writes (and removes) the checkpoint; a resumed
    run reads rank 0's checkpoint and broadcasts it, and every rank ends with rank 0's weights.
    """
    history: list[dict[str, Any]] = []
    start = 0
    parallel = distributed.is_distributed()
    main = distributed.is_main()
    state = None
    if main and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if parallel:
        state = distributed.broadcast_object(state)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = json.loads(state["history"])
        start = len(history)
        _set_random_state(state["random"], rngs)
    hook = distributed.sync_gradients(model, optimizer) if parallel else None
    bar = progress(
        range(start, epochs), desc=desc, unit="epoch", initial=start, total=epochs, disable=not main
    )
    for epoch in bar:
        model.train()
        record = {"epoch": epoch, **run_epoch(epoch)}
        if parallel:
            record = distributed.mean_record(record)
        history.append(record)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if isinstance(v, float)})
        if main:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": json.dumps(history),
                    "random": _random_state(rngs),
                },
                tmp,
            )
            tmp.replace(checkpoint)
    if hook is not None:
        hook.remove()
        distributed.broadcast_module(model)
        distributed.barrier()
    if main:
        checkpoint.unlink(missing_ok=True)
    return history


def _random_state(rngs: Sequence[np.random.Generator | torch.Generator]) -> dict[str, Any]:
    """The generators' states as tensors and JSON (what `torch.load(weights_only=True)` reads back)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rngs": [
            g.get_state() if isinstance(g, torch.Generator) else json.dumps(g.bit_generator.state)
            for g in rngs
        ],
    }


def _set_random_state(state: dict[str, Any], rngs: Sequence[np.random.Generator | torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(rngs, state["rngs"], strict=True):
        if isinstance(generator, torch.Generator):
            generator.set_state(saved)
        else:
            generator.bit_generator.state = json.loads(saved)


def checkpoint_path(
    folder: str | Path, name: str, params: dict[str, Any], inputs: Sequence[str | Path]
) -> Path:
    """`folder/<name>-<hash>.ckpt`, the hash over all of `params` and the top-level files of the `inputs`
    folders (name, size, SHA-256): a killed run resumes only when nothing changed, upstream included (an
    upstream parameter, a retrained classifier, new data). Deliberately conservative: any parameter change
    starts training afresh. Content, not modification time: a pipeline task rerun on another pod gets its
    inputs downloaded anew (new mtimes, same bytes) and must still find its checkpoint."""
    import hashlib

    from covseg.config import params_hash

    def sha256(path: Path) -> str:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    files = sorted(f for d in inputs for f in Path(d).iterdir() if f.is_file())
    fingerprint = [[f.parent.name, f.name, f.stat().st_size, sha256(f)] for f in files]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{params_hash({'params': params, 'inputs': fingerprint})}.ckpt"


def save_model(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """State dict + JSON metadata (architecture arguments, seed, profile) side by side."""
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))


def load_state(model: nn.Module, path: Path) -> nn.Module:
    """Load weights saved by `save_model` (weights_only: no pickled code is executed)."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
