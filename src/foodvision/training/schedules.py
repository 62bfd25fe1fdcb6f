"""foodvision's learning-rate schedules (the ``_target_`` of conf/scheduler/cosine.yaml and stage2.yaml): the
fine-tuning recipes' stage-2 schedule, as a real scheduler (stepped per batch by Lightning, saved and restored
with the checkpoint, logged by ``LearningRateMonitor``), and cosine annealing in foodvision's key names."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

DECAYS = ("cosine", "constant")


def cosine_annealing(optimizer: torch.optim.Optimizer, epochs: int, min_lr: float = 0.0) -> CosineAnnealingLR:
    """Every group from its base rate down to ``min_lr`` over the run's ``epochs`` (stepped per epoch): torch's
    ``CosineAnnealingLR`` under the keys users have always typed (``scheduler.min_lr``; ``epochs`` is
    ``trainer.max_epochs``) rather than torch's ``eta_min``/``T_max``."""
    return CosineAnnealingLR(optimizer, T_max=max(1, int(epochs)), eta_min=float(min_lr))


class Stage2Schedule(LRScheduler):
    """Stage 1: every parameter group at its base rate. From the step stage 2 starts (the fine-tuning
    callback calls :meth:`start_stage2`, since with ``patience`` the switch is only known at run time):
    a linear warm-up over ``warmup_epochs`` (fresh Adam moments of newly unfrozen weights would otherwise
    take full-size steps), then ``decay``: ``cosine`` to 0 at the last step, or ``constant``.

    The groups keep their ratio (the backbone at ``lr * backbone_lr_factor``): this scheduler is the one
    owner of the rates while training. Its state (the switch step and the stage-2 length) is part of
    ``state_dict``, so a resumed run continues the schedule exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_epochs: float = 0.0, decay: str = "cosine"):
        if decay not in DECAYS:
            raise ValueError(f"scheduler.decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        if warmup_epochs < 0:
            raise ValueError(f"scheduler.warmup_epochs must be >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = float(warmup_epochs)
        self.decay = decay
        self.switch_step: int | None = None
        self.steps_per_epoch = 1.0
        self.total_steps = 1
        super().__init__(optimizer)

    def start_stage2(self, steps_per_epoch: float, total_steps: int) -> None:
        """Stage 2 runs from the next step on (called at every stage-2 epoch start: the switch step is kept,
        restored ones too; the length follows the trainer, so a run resumed with more epochs decays over
        them)."""
        if self.switch_step is None:
            self.switch_step = self.last_epoch
        self.steps_per_epoch = max(1.0, float(steps_per_epoch))
        self.total_steps = max(self.switch_step + 1, int(total_steps))
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def scale(self, step: int) -> float:
        """The multiplier of every group's base rate at optimizer step ``step``."""
        if self.switch_step is None or step < self.switch_step:
            return 1.0
        done = step - self.switch_step
        value = 1.0
        if self.warmup_epochs > 0:
            value = min(1.0, (done + 1) / (self.warmup_epochs * self.steps_per_epoch))
        if self.decay == "cosine":
            length = max(1, self.total_steps - self.switch_step)
            value *= 0.5 * (1 + math.cos(math.pi * min(1.0, done / length)))
        return value

    def get_lr(self) -> list[float]:
        factor = self.scale(self.last_epoch)
        return [base * factor for base in self.base_lrs]
