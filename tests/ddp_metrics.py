"""A process of the two-process metrics test (tests/test_epoch_metrics.py): small imports, so spawning is quick."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from foodvision.evaluation.metrics import RunningMetrics


def count_half(rank: int, port: int, logits: torch.Tensor, targets: torch.Tensor, out: str) -> None:
    """Rank ``rank`` of 2 counts every other photo; saves the confusion matrix it computes with
    ``distributed=True`` (``rank<N>.npy``) and as eval counts, alone (``alone<N>.npy``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        totals = RunningMetrics(logits.shape[1], track_loss=False, distributed=True)
        totals.update(logits[rank::2], targets[rank::2])
        np.save(f"{out}/rank{rank}.npy", totals.scores().confusion)
        alone = RunningMetrics(logits.shape[1])  # no collective call: eval may run on rank 0 only
        alone.update(logits[rank::2], targets[rank::2])
        np.save(f"{out}/alone{rank}.npy", alone.scores().confusion)
    finally:
        dist.destroy_process_group()
