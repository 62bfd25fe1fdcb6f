"""Pictures and tables a person reads: confusion matrices, per-class tables, learning curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from foodvision.atomic import write_with  # noqa: E402


def confusion_figure(
    confusion: Any, class_names: Sequence[str], title: str = "Confusion matrix (row-normalised)"
):
    """Row-normalised matrix with class names on both axes; size and fonts scale so 101 classes stay readable."""
    matrix = np.asarray(confusion, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(class_names)
    side = max(6.0, min(40.0, 0.28 * n + 3))
    font = max(4.0, min(10.0, 260.0 / max(n, 1)))
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=100 if n <= 30 else 150)
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels=class_names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    colour = "white" if normalised[i, j] > 0.5 else "black"
                    ax.text(
                        j,
                        i,
                        f"{normalised[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=font * 0.8,
                        color=colour,
                    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # atomically; the format from the final name (the temporary one ends in .tmp)
        write_with(path, lambda temporary: fig.savefig(temporary, format=path.suffix.lstrip(".") or None))
    finally:
        plt.close(fig)
    return path


def per_class_markdown(per_class: Mapping[str, Mapping[str, float]]) -> str:
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, row in per_class.items():
        lines.append(
            f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |"
        )
    return "\n".join(lines)


TENSORBOARD_FIGURE_PIXELS = 2000


def log_confusion_to_loggers(
    module: Any, stage: str, confusion: torch.Tensor, per_class: Mapping[str, Any]
) -> None:
    """Confusion matrix as an image and the per-class table as text, in every TensorBoard logger."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            fig = confusion_figure(
                confusion.numpy(), module.class_names, f"{stage} confusion (row-normalised)"
            )
            # Every epoch's picture at most TENSORBOARD_FIGURE_PIXELS on its longer side: at 101 classes the
            # report's resolution (4,700 px) took ~700 MB while TensorBoard rendered and encoded it.
            fig.set_dpi(min(fig.get_dpi(), TENSORBOARD_FIGURE_PIXELS / max(fig.get_size_inches())))
            logger.experiment.add_figure(f"{stage}/confusion_matrix", fig, global_step=module.current_epoch)
            plt.close(fig)
            logger.experiment.add_text(
                f"{stage}/per_class", per_class_markdown(per_class), global_step=module.current_epoch
            )
