"""Figures people would rather look at than read: the method panel (CT slice, Grad-CAM, coarse label,
fine label, final mask, ground truth). Loss curves are MLflow metric histories (`tracking.log_history`)."""

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
            axes[r, c].imshow(overlay, cmap="jet" if name == "Grad-CAM" else "autumn", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
        if r == 0:
            axes[r, 0].set_title("CT (harmonised)", fontsize=9)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    return figure


def save(figure: Any, path: str | Path) -> None:
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
