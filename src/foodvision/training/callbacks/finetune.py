"""Two-stage fine-tuning: a frozen backbone, then its top blocks unfrozen with BatchNorm kept frozen.

Written instead of Lightning's ``BackboneFinetuning`` because that one leaves BatchNorm in train mode
(running statistics drift while "frozen"), re-freezes the backbone when resuming after the unfreeze
epoch (Lightning #21901) and adds optimizer groups mid-run (schedulers miss them). Here:

* the stage is a function of the epoch (``stage_at``), with the epoch of the switch saved in the
  checkpoint, so a resumed run lands in the stage it was in;
* the optimizer holds the head and backbone groups from the start (see ``LitClassifier``) and frozen
  parameters just have no gradient, so nothing about the optimizer or scheduler changes at the switch;
* frozen normalisation layers are put in eval mode at the start of every training epoch, so neither
  their affine weights nor their running mean/variance move;
* the learning rates are not this callback's: the module's optimizer sets the groups' rates and the
  configured scheduler changes them; with ``scheduler=stage2`` (:class:`foodvision.training.schedules.Stage2Schedule`)
  this callback tells the scheduler when stage 2 starts (warm-up and decay begin there);
* under DDP the wrapper is rebuilt at the switch, so the gradients of newly unfrozen parameters are
  all-reduced (DDP registers only parameters that require grad when it wraps the model; #20340).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from foodvision.config.recipe import FROZEN, normalise_unfreeze
from foodvision.models.classifier import BlockGroup
from foodvision.training.schedules import Stage2Schedule

log = logging.getLogger(__name__)

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def norm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, NORM_TYPES)]


def select_groups(groups: list[BlockGroup], unfreeze: str | int | None) -> list[BlockGroup]:
    """The block groups that stage 2 trains: ``none``, ``all``, the top ``N`` groups, or from a named block up
    (any spelling :func:`foodvision.config.recipe.normalise_unfreeze` accepts)."""
    unfreeze = normalise_unfreeze(unfreeze)
    if unfreeze == FROZEN:
        return []
    if unfreeze == "all":
        return list(groups)
    if isinstance(unfreeze, int):
        count = unfreeze
        if count > len(groups):
            raise ValueError(
                f"callbacks.finetune.unfreeze={count} but the backbone has only {len(groups)} blocks"
            )
        return groups[len(groups) - count :]
    names = [g.name for g in groups]
    if unfreeze not in names:
        raise ValueError(
            f"callbacks.finetune.unfreeze={unfreeze!r} is not a block of this backbone; blocks are {names}"
        )
    return groups[names.index(unfreeze) :]


class TwoStageFinetuning(Callback):
    """Stage 1 trains the head on a frozen backbone; stage 2 also trains the selected top blocks.

    Stage 1 ends after ``stage1_epochs`` epochs, or, with ``patience`` set, earlier when ``monitor``
    has not improved for ``patience`` epochs, or, under a time budget (``trainer.max_time``), after the
    epoch during which ``stage1_share`` of it was spent, so that stage 2 runs within the budget.
    ``unfreeze='none'`` (or null, or 0: :func:`foodvision.config.recipe.normalise_unfreeze`) keeps the backbone
    frozen throughout.
    The backbone's learning rate is the module's (``optimizer.backbone_lr_factor``), its schedule the
    scheduler's.
    """

    def __init__(
        self,
        stage1_epochs: int | None = 5,
        unfreeze: str | int | None = "none",
        train_bn: bool = False,
        patience: int | None = None,
        monitor: str = "val/loss",
        stage1_share: float | None = 0.25,
    ):
        super().__init__()
        if stage1_share is not None and not 0 < stage1_share < 1:
            raise ValueError(
                f"callbacks.finetune.stage1_share must be in (0, 1) or null, got {stage1_share!r}"
            )
        self.stage1_share = stage1_share
        self.unfreeze = normalise_unfreeze(unfreeze)
        if stage1_epochs is None and patience is None and self.unfreezes:
            raise ValueError(
                "set callbacks.finetune.stage1_epochs or callbacks.finetune.patience to say when stage 2 starts"
            )
        self.stage1_epochs = stage1_epochs
        self.train_bn = train_bn
        self.patience = patience
        self.monitor = monitor
        self.switch_epoch: int | None = stage1_epochs if self.unfreezes else None
        self._best: float | None = None
        self._bad_epochs = 0
        self._applied_stage: int | None = None
        self.resume_epoch: int | None = None
        self.unfrozen_groups: list[str] = []
        self._stage2_params: set[str] = set()
        self._norm_params: set[str] = set()

    # ---- which stage ------------------------------------------------------------------------
    def stage_at(self, epoch: int) -> int:
        return 2 if self.switch_epoch is not None and epoch >= self.switch_epoch else 1

    @property
    def unfreezes(self) -> bool:
        """Whether there is a stage 2 at all (``unfreeze`` is not none)."""
        return self.unfreeze != FROZEN

    # ---- setup ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        backbone = pl_module.net.backbone
        selected = select_groups(pl_module.net.block_groups(), self.unfreeze)
        self.unfrozen_groups = [g.name for g in selected]
        self._stage2_params = {name for g in selected for name in g.parameter_names}
        self._norm_params = {
            f"{n}.{p}" if n else p
            for n, m in norm_layers(backbone)
            for p, _ in m.named_parameters(recurse=False)
        }
        self.apply(pl_module, self.stage_at(trainer.current_epoch), trainer)

    def apply(self, pl_module: L.LightningModule, stage: int, trainer: L.Trainer | None = None) -> None:
        """Set ``requires_grad`` and norm-layer modes of the backbone for ``stage`` (reported to ``trainer``'s
        logger when it changes)."""
        backbone = pl_module.net.backbone
        for name, parameter in backbone.named_parameters():
            parameter.requires_grad_(self._trains(name, stage))
        # Looked up each time: DDP's sync_batchnorm replaces the layers after setup().
        for name, module in norm_layers(backbone):
            params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
            trains = bool(params) and all(self._trains(p, stage) for p in params)
            if not trains:
                module.eval()
            elif pl_module.training:
                module.train()
        if stage != self._applied_stage:
            self._applied_stage = stage
            self._report(pl_module, stage, trainer)

    def _trains(self, name: str, stage: int) -> bool:
        if stage == 1 or name not in self._stage2_params:
            return False
        return self.train_bn or name not in self._norm_params

    def _report(self, pl_module: L.LightningModule, stage: int, trainer: L.Trainer | None) -> None:
        net = pl_module.net
        backbone_total = sum(p.numel() for p in net.backbone.parameters())
        backbone_trainable = sum(p.numel() for p in net.backbone.parameters() if p.requires_grad)
        head_total = sum(p.numel() for p in net.head.parameters())
        norms = norm_layers(net.backbone)
        frozen_norms = sum(1 for _, m in norms if not m.training)
        what = "backbone frozen" if stage == 1 else f"unfrozen: {', '.join(self.unfrozen_groups)}"
        table = (
            f"\nfine-tuning stage {stage} ({what}; BatchNorm {'trains' if self.train_bn else 'frozen'})\n"
            f"  {'part':<10}{'trainable':>12}{'frozen':>12}\n"
            f"  {'backbone':<10}{backbone_trainable:>12,}{backbone_total - backbone_trainable:>12,}\n"
            f"  {'head':<10}{head_total:>12,}{0:>12,}\n"
            f"  frozen norm layers in eval mode: {frozen_norms}/{len(norms)}"
        )
        log.info(table)
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_metrics(
                {
                    "finetune/stage": stage,
                    "finetune/trainable_params": backbone_trainable + head_total,
                    "finetune/frozen_params": backbone_total - backbone_trainable,
                },
                step=trainer.global_step,
            )

    # ---- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, self.stage_at(self.first_epoch(trainer)), trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stage = self.stage_at(trainer.current_epoch)
        switching = stage != self._applied_stage
        self.apply(pl_module, stage, trainer)
        if stage == 2:
            start_stage2_schedules(trainer)
        if switching and trainer.world_size > 1:
            rewrap_ddp(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``patience``, end stage 1 once ``monitor`` stops improving."""
        if trainer.sanity_checking or self.patience is None or self.stage_at(trainer.current_epoch) == 2:
            return
        if not self.unfreezes:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self._best is None or value < self._best:
            self._best, self._bad_epochs = value, 0
        else:
            self._bad_epochs += 1
        limit = self.stage1_epochs if self.stage1_epochs is not None else float("inf")
        if self._bad_epochs >= self.patience or trainer.current_epoch + 1 >= limit:
            self.switch_epoch = trainer.current_epoch + 1
            log.info(
                "stage 1 ends after epoch %d (%s stopped improving)", trainer.current_epoch, self.monitor
            )
        else:
            self.switch_epoch = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under ``trainer.max_time``: stage 2 from the next epoch once ``stage1_share`` of it is spent (runs
        before the feature cache's epoch end, which serves stage 2's inputs from the next epoch)."""
        spent = budget_spent(trainer)
        if spent is None or self.stage1_share is None or not self.unfreezes:
            return
        if self.stage_at(trainer.current_epoch + 1) == 1 and spent >= self.stage1_share:
            self.switch_epoch = trainer.current_epoch + 1
            log.info(
                "stage 1 ends after epoch %d: %.0f%% of trainer.max_time spent (callbacks.finetune.stage1_share=%s)",
                trainer.current_epoch,
                100 * spent,
                self.stage1_share,
            )

    # ---- checkpoint -------------------------------------------------------------------------
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Remember which epoch the run resumes at: ``on_fit_start`` comes before Lightning restores the loops."""
        progress = (
            checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        )
        self.resume_epoch = int(progress.get("processed", checkpoint.get("epoch", 0)))

    def first_epoch(self, trainer: L.Trainer) -> int:
        """The epoch a fit starts (or resumes) at."""
        return max(trainer.current_epoch, self.resume_epoch or 0)

    def state_dict(self) -> dict[str, Any]:
        return {"switch_epoch": self.switch_epoch, "best": self._best, "bad_epochs": self._bad_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switch_epoch = state_dict.get("switch_epoch", self.switch_epoch)
        self._best = state_dict.get("best")
        self._bad_epochs = state_dict.get("bad_epochs", 0)


def budget_spent(trainer: L.Trainer) -> float | None:
    """The share of ``trainer.max_time`` that training has used (Lightning's ``Timer``), or None without one."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    if timer is None or remaining is None:
        return None
    elapsed = timer.time_elapsed("train")
    return elapsed / max(1e-9, elapsed + remaining)


def start_stage2_schedules(trainer: L.Trainer) -> None:
    """Tell every :class:`Stage2Schedule` of the trainer that stage 2 runs (a no-op once it knows)."""
    batches = trainer.num_training_batches
    per_epoch = (batches if math.isfinite(batches) else 1) / max(1, trainer.accumulate_grad_batches)
    for config in trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, Stage2Schedule):
            config.scheduler.start_stage2(per_epoch, math.ceil(per_epoch * int(trainer.max_epochs or 1)))


def rewrap_ddp(trainer: L.Trainer) -> None:
    """Wrap the module in a new DistributedDataParallel so it registers the newly trainable parameters:
    the strategy's public ``configure_ddp`` wraps ``strategy.model``, set back to the bare module first."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and strategy.model is not strategy.lightning_module:
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
        log.info("re-wrapped the model in DDP after unfreezing")
