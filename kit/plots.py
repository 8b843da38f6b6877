"""The pictures people look at instead of tables: training curves, the confusion matrix, photo galleries."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.files import atomic_path

os.environ.setdefault("MPLBACKEND", "Agg")  # no display on Colab's runtime or in CI


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_lr_sweep(rates: Sequence[float], losses: Sequence[float], suggestion: float, path: Path, title: str) -> None:
    """The LR finder's smoothed loss against the rate (log scale), its suggestion marked."""
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rates, losses)
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggestion: {suggestion:.1e}")
    ax.set_xscale("log")
    shown = losses[:-5] if len(losses) > 10 else losses  # the last points diverge and would flatten the rest
    ax.set_ylim(min(losses) * 0.95, max(shown) * 1.05)
    ax.set_xlabel("learning rate (the head's; lower blocks follow --layer-decay)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Accuracy and loss, train and validation, one column per stage, side by side."""
    import matplotlib.pyplot as plt

    stages = [(name, h) for name, h in histories.items() if h]
    if not stages:
        return
    figure, axes = plt.subplots(2, len(stages), figsize=(3.2 * len(stages) + 1, 6), squeeze=False, sharey="row")
    for column, (name, history) in enumerate(stages):
        epochs = [row["epoch"] for row in history]
        for row_index, metric in enumerate(("accuracy", "loss")):
            ax = axes[row_index][column]
            ax.plot(epochs, [r[metric] for r in history], "o-", label="train")
            ax.plot(epochs, [r[f"val_{metric}"] for r in history], "o-", label="validation")
            ax.set_title(f"{name}: {metric}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0][column].legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    """Counts with row-normalised colours, so a weak small class stands out as much as a big one."""
    import matplotlib.pyplot as plt

    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = max(8.0, 0.22 * len(names) + 3)  # 196 classes still get a readable row each
    font = 9 if len(names) <= 30 else 6
    figure, ax = plt.subplots(figsize=(side + 1, side))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) <= 30 else 90, ha="right", fontsize=font)
    ax.set_yticks(range(len(names)), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(names) if len(names) <= 30 else 0):  # counts only where they fit in a cell
        for j in range(len(names)):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black", fontsize=9)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_gallery(photos: Sequence[np.ndarray], captions: Sequence[str], path: Path, title: str,
                 columns: int = 4) -> None:
    """Photos in a grid, each with its caption (the report's top losses)."""
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(photos) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, photo, caption in zip(axes.flat, photos, captions):
        ax.imshow(photo)
        ax.set_title(caption, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
