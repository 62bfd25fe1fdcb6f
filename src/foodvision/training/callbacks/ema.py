"""An exponential moving average of the weights (Lightning's ``EMAWeightAveraging``), fit for two-stage
fine-tuning.

Lightning's callback keeps an ``AveragedModel`` copy, updates it after every optimizer step, validates
with it (swapped in for the validation epoch) and writes it as the checkpoint's ``state_dict`` (the
training weights go to ``current_model_state``, from which a resumed run continues). So ``best-*.ckpt``
and ``last.ckpt`` hold the averaged weights, and eval, export and predict, which read ``state_dict``, use
them. What this subclass adds:

* **what does not train is copied, never averaged**: frozen parameters (``requires_grad=False``: the
  backbone in stage 1, the frozen lower blocks in stage 2) and the buffers of modules in eval mode (frozen
  BatchNorm's running mean/variance) are copied from the model after each update, bit for bit; the EMA
  formula ``d*ema + (1-d)*w`` would otherwise let a constant drift by rounding, and averaged BatchNorm
  statistics of a trained copy would never mix into frozen ones. Trained parameters, and the running
  statistics of BatchNorm layers that train (scratch CNNs, ``train_bn=true``), are averaged;
* **a warm-up of the decay** (timm's ``ModelEmaV3``: ``min(decay, (1 + n) / (10 + n))`` after ``n``
  updates): the average does not stay near the random head of step 0 for hundreds of steps, which
  short runs (food101-mini: 53 steps per epoch) would otherwise validate, and pick as best, for epochs;
* **a stop between epoch ends** (``trainer.max_time``) saves the training weights as
  ``current_model_state`` (Lightning copies the average over them at ``on_train_end``, before the last
  checkpoint is written), so such a ``last.ckpt`` resumes from what was training.

Checkpoints saved with ``weights_only=True`` skip callbacks and would hold the training weights:
foodvision's checkpoint callbacks save full checkpoints.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

log = logging.getLogger(__name__)


def warmup_ema_fn(decay: float, warmup: bool = True) -> Any:
    """``avg_fn`` of ``AveragedModel``: ``ema + (1 - d) * (w - ema)`` (``torch.lerp``: exact for a constant
    ``w``) with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates when ``warmup``."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay!r}")

    @torch.no_grad()
    def update(ema: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        value = decay
        if warmup:
            n = float(num_averaged)
            value = min(decay, (1.0 + n) / (10.0 + n))
        if not ema.is_floating_point():  # num_batches_tracked: a count, not a weight
            return current.clone()
        return torch.lerp(ema, current.to(ema.dtype), 1.0 - value)

    return update


def copy_untrained(average: nn.Module, model: nn.Module) -> None:
    """Copy into ``average`` every parameter of ``model`` that does not train and every buffer of a module
    in eval mode (frozen normalisation layers); ``average`` is a deep copy of ``model`` (same structure)."""
    with torch.no_grad():
        for kept, source in zip(average.parameters(), model.parameters(), strict=True):
            if not source.requires_grad:
                kept.copy_(source)
        for kept_module, module in zip(average.modules(), model.modules(), strict=True):
            if module.training:
                continue
            for kept, source in zip(
                kept_module.buffers(recurse=False), module.buffers(recurse=False), strict=True
            ):
                kept.copy_(source)


class EMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` (buffers averaged too, ``use_buffers=True``: with ``False`` Lightning would swap
    the stale buffers of its copy into the model for validation) with the additions of the module docstring.
    ``decay``: the per-step decay after warm-up (0.995: a half-life of ~140 steps, ~2.6 food101-mini epochs).
    """

    def __init__(
        self,
        decay: float = 0.995,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: str | None = None,
    ):
        super().__init__(
            device=device,
            use_buffers=True,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self.decay = decay
        # AveragedModel's averaging function (WeightAveraging passes these keywords to it at setup)
        self._kwargs["avg_fn"] = warmup_ema_fn(decay, warmup)
        self._raw_state: dict[str, torch.Tensor] | None = None

    @property
    def average_module(self) -> nn.Module | None:
        """The averaged copy of the LightningModule (``None`` outside fitting)."""
        return None if self._average_model is None else self._average_model.module

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        updated_before = self._latest_update_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._latest_update_step != updated_before and self.average_module is not None:
            copy_untrained(self.average_module, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        updated_before = self._latest_update_epoch
        super().on_train_epoch_end(trainer, pl_module)
        if self._latest_update_epoch != updated_before and self.average_module is not None:
            copy_untrained(self.average_module, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raw_state = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The averaged weights become the module's (Lightning); the training weights are kept for a last
        checkpoint written after this."""
        self._raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._raw_state

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("decay")
        if saved is not None and saved != self.decay:
            log.warning("resuming an EMA of decay %s with decay %s", saved, self.decay)


def ema_or_none(enabled: bool = True, **options: Any) -> EMA | None:
    """``callbacks.ema``: the callback, or ``None`` (no callback) with ``enabled=false``."""
    return EMA(**options) if enabled else None
