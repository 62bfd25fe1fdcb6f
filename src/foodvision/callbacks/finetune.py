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
* optionally (``schedule=cosine``) stage 2 has its own learning-rate schedule: a linear warm-up over
  ``warmup_epochs`` (fresh Adam moments of newly unfrozen weights otherwise take full-size steps: the
  accuracy dip after the switch) and a cosine decay to zero at the last epoch, as a function of the
  epoch and batch, so a resumed run continues it exactly;
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

from foodvision.models.classifier import BlockGroup

log = logging.getLogger(__name__)

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def norm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, NORM_TYPES)]


def select_groups(groups: list[BlockGroup], unfreeze: str | int | None) -> list[BlockGroup]:
    """The block groups that stage 2 trains: ``none``, ``all``, the top ``N`` groups, or from a named block up."""
    if unfreeze in (None, "none", 0, "0"):
        return []
    if unfreeze == "all":
        return list(groups)
    if isinstance(unfreeze, int) or str(unfreeze).isdigit():
        count = int(unfreeze)
        if count > len(groups):
            raise ValueError(f"finetune.unfreeze={count} but the backbone has only {len(groups)} blocks")
        return groups[len(groups) - count :]
    names = [g.name for g in groups]
    if unfreeze not in names:
        raise ValueError(
            f"finetune.unfreeze={unfreeze!r} is not a block of this backbone; blocks are {names}"
        )
    return groups[names.index(str(unfreeze)) :]


class TwoStageFinetuning(Callback):
    """Stage 1 trains the head on a frozen backbone; stage 2 also trains the selected top blocks.

    Stage 1 ends after ``stage1_epochs`` epochs, or, with ``patience`` set, earlier when ``monitor``
    has not improved for ``patience`` epochs. ``unfreeze='none'`` keeps the backbone frozen throughout.
    The learning rate of the backbone is ``lr * lr_factor`` (set on the module's backbone group).
    """

    def __init__(
        self,
        stage1_epochs: int | None = 5,
        unfreeze: str | int | None = "none",
        train_bn: bool = False,
        patience: int | None = None,
        monitor: str = "val/loss",
        lr_factor: float = 0.1,
        schedule: str = "constant",
        warmup_epochs: float = 0.0,
    ):
        super().__init__()
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"finetune.schedule must be constant or cosine, got {schedule!r}")
        if stage1_epochs is None and patience is None and unfreeze not in (None, "none"):
            raise ValueError("set finetune.stage1_epochs or finetune.patience to say when stage 2 starts")
        self.stage1_epochs = stage1_epochs
        self.unfreeze = unfreeze
        self.train_bn = train_bn
        self.patience = patience
        self.monitor = monitor
        self.lr_factor = lr_factor
        self.schedule = schedule
        self.warmup_epochs = float(warmup_epochs)
        self.switch_epoch: int | None = None if unfreeze in (None, "none", 0, "0") else stage1_epochs
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
        return bool(self._stage2_params) or self.unfreeze not in (None, "none", 0, "0")

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
        self.apply(pl_module, self.stage_at(trainer.current_epoch))

    def apply(self, pl_module: L.LightningModule, stage: int) -> None:
        """Set ``requires_grad`` and norm-layer modes of the backbone for ``stage``."""
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
            self._report(pl_module, stage)

    def _trains(self, name: str, stage: int) -> bool:
        if stage == 1 or name not in self._stage2_params:
            return False
        return self.train_bn or name not in self._norm_params

    def _report(self, pl_module: L.LightningModule, stage: int) -> None:
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
        if pl_module._trainer is not None and pl_module.trainer.logger is not None:
            pl_module.trainer.logger.log_metrics(
                {
                    "finetune/stage": stage,
                    "finetune/trainable_params": backbone_trainable + head_total,
                    "finetune/frozen_params": backbone_total - backbone_trainable,
                },
                step=pl_module.trainer.global_step,
            )

    # ---- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (self.schedule != "constant" or self.warmup_epochs > 0) and trainer.lr_scheduler_configs:
            raise ValueError(
                "finetune.schedule/warmup_epochs set stage 2's learning rate themselves; "
                "use scheduler=none with them (two schedules would overwrite each other)"
            )
        self.apply(pl_module, self.stage_at(self.first_epoch(trainer)))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stage = self.stage_at(trainer.current_epoch)
        switching = stage != self._applied_stage
        self.apply(pl_module, stage)
        if switching and trainer.world_size > 1:
            rewrap_ddp(trainer)

    def stage2_lr_scale(self, epoch: int, batch: int, batches: int, max_epochs: int) -> float:
        """Multiplier of every group's learning rate at ``batch`` of ``epoch`` (1.0 in stage 1)."""
        if self.switch_epoch is None or epoch < self.switch_epoch:
            return 1.0
        progress = epoch - self.switch_epoch + batch / max(1, batches)  # epochs into stage 2
        total = max(1, max_epochs - self.switch_epoch)
        scale = 1.0
        if self.warmup_epochs > 0:
            scale = min(1.0, (progress + 1 / max(1, batches)) / self.warmup_epochs)
        if self.schedule == "cosine":
            scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, progress / total)))
        return scale

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.schedule == "constant" and self.warmup_epochs <= 0:
            return
        batches = int(trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else 1
        scale = self.stage2_lr_scale(trainer.current_epoch, batch_idx, batches, int(trainer.max_epochs or 1))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("base_lr", group["lr"])  # saved with the optimizer: resumes keep it
                group["lr"] = group["base_lr"] * scale

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``patience``, end stage 1 once ``monitor`` stops improving."""
        if trainer.sanity_checking or self.patience is None or self.stage_at(trainer.current_epoch) == 2:
            return
        if self.unfreeze in (None, "none", 0, "0"):
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


def rewrap_ddp(trainer: L.Trainer) -> None:
    """Wrap the module in a new DistributedDataParallel so it registers the newly trainable parameters."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel) and hasattr(strategy, "_setup_model"):
        strategy.model = strategy._setup_model(strategy.model.module)
        log.info("re-wrapped the model in DDP after unfreezing")
