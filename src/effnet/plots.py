"""Figures as PNG files (matplotlib, headless): accuracy against resolution, the confusion matrix, the training
curves."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    """matplotlib's pyplot on the Agg backend: no display on servers or in DVC/Prefect runs. Imported on first
    use: matplotlib costs a second or two that stages without figures should not pay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def resolution_png(rows: list[dict], labels: list[str], title: str, path: Path) -> None:
    """Top-1 against resolution, one line per label: ROWS are `{"resolution": px, label: top1, ...}`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in labels:
        ax.plot([r["resolution"] for r in rows], [r[label] for r in rows], marker="o", label=label)
    ax.set(xlabel="test resolution (px)", ylabel="top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_png(matrix: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    """The confusion matrix as an image, normalised per actual class (row); counts written in small matrices."""
    import numpy as np
    plt = _pyplot()
    cm = np.asarray(matrix, dtype=float)
    rate = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(4 + 0.4 * n, 16)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class")
    if n <= 50:  # beyond that, names are unreadable: the axes show indices
        ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 45, ha="center" if n > 10 else "right")
        ax.set_yticks(range(n), classes)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rate[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_png(rows: list[dict], title: str, path: Path) -> None:
    """The training curves side by side: ROWS are `{"epoch": n, "train_loss": mean, "val_top1": %}` (the train
    stage's curves file)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (loss, top1) = plt.subplots(1, 2, figsize=(9, 3.6))
    loss.plot(epochs, [r["train_loss"] for r in rows], marker=".", color="tab:red")
    loss.set(xlabel="epoch", ylabel="mean training loss")
    top1.plot(epochs, [r["val_top1"] for r in rows], marker=".")
    top1.set(xlabel="epoch", ylabel="val top-1 (%)")
    _side_by_side(plt, fig, (loss, top1), title, path)


def _side_by_side(plt, fig, axes, title: str, path: Path) -> None:
    """Panels gridded under one title, saved to PATH and closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pseudolabel_png(classes: list[str], before: list[int], after: list[int], confidences: list[float],
                    threshold: float, title: str, path: Path) -> None:
    """A teacher's pseudo-labels: images per class (its top class) past the threshold, before and after balancing,
    beside the distribution of its confidence (top class probability) over every unlabeled image."""
    import numpy as np
    plt = _pyplot()
    fig, (hist, conf) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(classes))
    hist.bar(x - 0.2, before, width=0.4, label="past the threshold")
    hist.bar(x + 0.2, after, width=0.4, label="balanced (with copies)")
    hist.set_xticks(x, classes, rotation=90 if len(classes) > 10 else 0)
    hist.set(xlabel="teacher's class", ylabel="images")
    hist.legend()
    conf.hist(confidences, bins=20, range=(0, 1), color="tab:gray")
    conf.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    conf.set(xlabel="teacher's confidence (top class probability)", ylabel="unlabeled images")
    conf.legend()
    _side_by_side(plt, fig, (hist, conf), title, path)
