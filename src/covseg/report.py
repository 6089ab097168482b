"""Figures people would rather look at than read: the method panel and `covseg predict`'s overlay montage.

The method panel shows CT slice, Grad-CAM, coarse label, fine label, final mask and ground truth. Loss
curves are MLflow metric histories (`tracking.log_history`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def method_panel(images: np.ndarray, columns: dict[str, np.ndarray], titles: list[str] | None = None) -> Any:
    """Rows = slices; columns = CT then each named map (maps in [0,1] are overlaid in colour)."""
    plt = _pyplot()
    n_rows, n_cols = len(images), 1 + len(columns)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(2.1 * n_cols, 2.1 * n_rows), squeeze=False)
    for r in range(n_rows):
        axes[r, 0].imshow(images[r], cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(titles[r] if titles else "", fontsize=7)
        for c, (name, maps) in enumerate(columns.items(), start=1):
            axes[r, c].imshow(images[r], cmap="gray", vmin=0, vmax=1)
            overlay = np.ma.masked_where(maps[r] <= 0.05, maps[r])
            axes[r, c].imshow(
                overlay, cmap="jet" if name == "Grad-CAM" else "autumn", alpha=0.5, vmin=0, vmax=1
            )
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
        if r == 0:
            axes[r, 0].set_title("CT (harmonised)", fontsize=9)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    return figure


def overlay_montage(
    images: np.ndarray, lesion: np.ndarray, lung: np.ndarray, titles: list[str], aspect: float = 1.0
) -> Any:
    """Slices (0..255, radiological view) in up to 3 columns: lesion in red, lung contour in cyan.

    `aspect` is the pixel height / width (row / column spacing) so that the anatomy is not stretched.
    """
    from matplotlib.colors import ListedColormap

    plt = _pyplot()
    n_cols = min(3, len(images))
    n_rows = -(-len(images) // n_cols)
    figure, axes = plt.subplots(
        n_rows, n_cols, figsize=(3.2 * n_cols, 3.5 * n_rows + 0.3), squeeze=False, layout="constrained"
    )
    red = ListedColormap(["red"])
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, les, lung_mask, title in zip(axes.ravel(), images, lesion, lung, titles, strict=False):
        axis.imshow(image, cmap="gray", vmin=0, vmax=255, aspect=aspect, interpolation="nearest")
        if les.any():
            axis.imshow(
                np.ma.masked_where(~les, les), cmap=red, alpha=0.45, aspect=aspect, interpolation="nearest"
            )
        if lung_mask.any():
            axis.contour(lung_mask.astype(np.uint8), levels=[0.5], colors="cyan", linewidths=0.6)
        axis.text(0.02, 0.5, "R", color="yellow", fontsize=8, transform=axis.transAxes, va="center")
        axis.text(
            0.98, 0.5, "L", color="yellow", fontsize=8, transform=axis.transAxes, va="center", ha="right"
        )
        axis.set_title(title, fontsize=8)
    figure.suptitle("lesion (red), lung contour (cyan); radiological view", fontsize=9)
    return figure


def save(figure: Any, path: str | Path) -> None:
    """Write `figure` to `path` (PNG, 110 dpi) and close it."""
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
