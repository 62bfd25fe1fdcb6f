"""The one metrics vocabulary and implementation: training's per-epoch metrics (train and val), the test
after fitting and ``eval.py`` all count the same confusion matrix and name the results the same way.

* :func:`metric_name` is the key vocabulary (``<split>/<name>``: ``val/acc``, ``test/f1_macro``) of the
  logs, of a run's ``metrics.json`` and of eval's;
* :func:`reports_top_k` is the one rule for top-5 accuracy (only with at least 5 classes: with fewer it is 1);
* :class:`RunningMetrics` streams batches into a confusion matrix, top-5 hits and (for eval) a summed
  cross-entropy: a few counters per class pair, never the logits, so memory stays flat in the number of
  images. Its counters live on the module's device during training and are summed across processes
  under DDP (``distributed=True``);
* :func:`classification_metrics` turns a confusion matrix into accuracy and per-class, macro and
  support-weighted precision/recall/F1 (float64).

Macro averages run over every class of the model: a class absent from the split and never predicted counts
0, as in ``per_class.csv`` and the bootstrap intervals (:mod:`foodvision.evaluation.statistics`).
torchmetrics' macro average leaves such a class out; with every class in the split the numbers are the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

TOP_K = 5
# What the training module logs each epoch (its loss it logs itself, batch by batch): eval adds the rest.
EPOCH_METRICS = ("acc", "acc_top5", "precision_macro", "recall_macro", "f1_macro")


def metric_name(split: str, name: str) -> str:
    """The one vocabulary of metric keys: ``<split>/<name>`` as training logs them (``val/acc``,
    ``test/f1_macro``), in the ``metrics.json`` of a training run and of ``eval.py`` alike."""
    return f"{split}/{name}"


def reports_top_k(num_classes: int) -> bool:
    """Whether top-5 accuracy is measured: with fewer than 5 classes every answer is in the top 5."""
    return num_classes >= TOP_K


def confusion_matrix(true: Sequence[int], predicted: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs of label arrays; rows: true class, columns: predicted."""
    index = np.asarray(true, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(confusion: Any) -> dict[str, Any]:
    """Accuracy and per-class, macro and support-weighted precision/recall/F1 of a confusion matrix
    (rows: true class, columns: predicted). Undefined ratios are 0: a class never predicted has precision 0,
    a class absent from the split recall 0 (as torchmetrics' per-class metrics)."""
    matrix = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    total = matrix.sum()

    def ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
        return np.divide(top, bottom, out=np.zeros_like(tp), where=bottom > 0)

    precision, recall = ratio(tp, predicted), ratio(tp, support)
    f1 = ratio(2 * tp, support + predicted)  # 2 tp / (2 tp + fp + fn), as statistics' bootstrap counts it
    weights = support / total if total > 0 else np.zeros_like(support)
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_weighted": float((precision * weights).sum()),
        "recall_weighted": float((recall * weights).sum()),
        "f1_weighted": float((f1 * weights).sum()),
        "per_class": {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)},
    }


def per_class_table(confusion: Any, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{class: {precision, recall, f1, support}}`` of a confusion matrix (TensorBoard's per-class table)."""
    rows = classification_metrics(confusion)["per_class"]
    return {
        name: {
            "precision": float(rows["precision"][i]),
            "recall": float(rows["recall"][i]),
            "f1": float(rows["f1"][i]),
            "support": int(rows["support"][i]),
        }
        for i, name in enumerate(class_names)
    }


def top_prediction(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(confidence, predicted class)`` per row: the class :class:`RunningMetrics` counts (the first
    largest logit) and its softmax probability."""
    logits = logits.float()
    predicted = logits.argmax(dim=1)
    confidence = logits.softmax(dim=1).gather(1, predicted[:, None]).squeeze(1)
    return confidence, predicted


class RunningMetrics:
    """Confusion matrix, top-5 hits and (``track_loss``) summed float64 cross-entropy, updated batch by batch:
    the same metrics as computing them over all logits at once, without keeping the logits. The counters
    are tensors on the device of the logits (no host synchronisation per batch). They are no module buffers:
    DDP would overwrite every process's counts with rank 0's at each forward pass (``broadcast_buffers``).

    ``distributed=True`` (the training module) sums the counters of every process of an initialised
    ``torch.distributed`` group (DDP) in :meth:`scores`, which every process must then call; without it
    (eval) only this process's pass counts: eval may run on rank 0 of a DDP run alone, where a sum would hang.
    """

    def __init__(self, num_classes: int, track_loss: bool = True, distributed: bool = False):
        self.num_classes = int(num_classes)
        self.track_loss = track_loss  # float64 is not on every accelerator: only where asked for (eval)
        self.distributed = distributed
        self.reset()

    def reset(self, device: torch.device | str | None = None) -> None:
        """Zero counters for the next pass (epoch), on ``device`` (default: where they are, first the CPU)."""
        k = self.num_classes
        device = device or (self.confusion.device if hasattr(self, "confusion") else "cpu")
        self.confusion = torch.zeros(k * k, dtype=torch.long, device=device)
        self.top_k_correct = torch.zeros((), dtype=torch.long, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device) if self.track_loss else None

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds a batch of logits and hard target classes."""
        logits = logits.detach().float()
        if self.confusion.device != logits.device:
            if int(self.count):
                raise ValueError(
                    f"RunningMetrics counted on {self.confusion.device}, got logits on {logits.device}"
                )
            self.reset(logits.device)
        targets = targets.to(logits.device)
        predicted = logits.argmax(dim=1)
        self.confusion += torch.bincount(
            targets * self.num_classes + predicted, minlength=self.confusion.numel()
        )
        if reports_top_k(self.num_classes):
            top = logits.topk(TOP_K, dim=1).indices
            self.top_k_correct += (top == targets[:, None]).any(dim=1).sum()
        if self.loss_sum is not None:
            self.loss_sum += F.cross_entropy(logits.double(), targets, reduction="sum")
        self.count += targets.numel()

    def scores(self) -> Scores:
        """This pass's metrics on the host (with ``distributed``: summed over the processes first)."""
        counts = torch.cat([self.confusion, self.top_k_correct[None], self.count[None]])
        loss = self.loss_sum
        if self.distributed and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            if loss is not None:
                loss = loss.clone()
                dist.all_reduce(loss)
        counts = counts.cpu()
        k = self.num_classes
        return Scores(
            confusion=counts[: k * k].reshape(k, k).numpy(),
            top_k_correct=int(counts[k * k]),
            count=int(counts[k * k + 1]),
            loss_sum=float(loss) if loss is not None else None,
        )


class Scores:
    """What one pass measured: the confusion matrix and the metrics of :func:`classification_metrics`."""

    def __init__(self, confusion: np.ndarray, top_k_correct: int, count: int, loss_sum: float | None):
        self.confusion = confusion
        self.num_classes = len(confusion)
        self.count = count
        self.top_k_correct = top_k_correct
        self.loss_sum = loss_sum
        self.classification = classification_metrics(confusion)

    @property
    def per_class(self) -> Mapping[str, np.ndarray]:
        return self.classification["per_class"]

    def values(self) -> dict[str, float]:
        """``acc``, ``acc_top5`` (5+ classes), ``loss`` (when tracked) and the precision/recall/F1 averages."""
        values = {"acc": self.classification["accuracy"]}
        if reports_top_k(self.num_classes):
            values["acc_top5"] = self.top_k_correct / self.count if self.count else 0.0
        if self.loss_sum is not None:
            values["loss"] = self.loss_sum / self.count if self.count else float("nan")
        values.update({k: v for k, v in self.classification.items() if k not in ("accuracy", "per_class")})
        return {k: float(v) for k, v in values.items()}

    def named(self, split: str, names: Sequence[str] | None = None) -> dict[str, float]:
        """:meth:`values` as ``<split>/<name>`` keys; ``names``: only those (what a caller logs)."""
        return {metric_name(split, k): v for k, v in self.values().items() if names is None or k in names}
