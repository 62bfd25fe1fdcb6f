"""The LightningModule shared by scratch CNNs and timm backbones: loss, optimizer, metrics, logging."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch import nn

from foodvision.config.check import ConfigError
from foodvision.data.balance import resolve_class_weights
from foodvision.data.mixing import BatchMixer, hard_targets, mixing_settings
from foodvision.data.transforms import Preprocessing
from foodvision.errors import ToolError
from foodvision.evaluation.figures import log_confusion_to_loggers
from foodvision.evaluation.metrics import EPOCH_METRICS, RunningMetrics, per_class_table
from foodvision.inference.checkpoints import CHECKPOINT_KEY, ModelInfo
from foodvision.models.classifier import IMAGES, architecture, build_classifier
from foodvision.training.optimization import (
    build_optimizer,
    build_scheduler,
    optimizer_settings,
    scheduler_settings,
)


class TrainingDivergedError(ToolError):
    """The loss became NaN or infinite: the weights have blown up and every later epoch would be wasted
    (and ``metrics.json`` would record NaN). Raised before that epoch's checkpoints are written."""


def plain_settings(settings: Any) -> dict[str, Any] | None:
    """A copy of a settings mapping as plain Python values (an OmegaConf node resolved), or None: what a
    checkpoint saves must load with ``weights_only=True``."""
    if settings is None:
        return None
    if OmegaConf.is_config(settings):
        return OmegaConf.to_container(settings, resolve=True)  # type: ignore[return-value]
    return dict(settings)


class LitClassifier(L.LightningModule):
    """Everything a run needs to rebuild the model is a plain hyperparameter (no pickled modules), so a
    checkpoint loads with ``torch.load(weights_only=True)`` and without the training config.

    A batch says what it holds: an ``(images, targets)`` tuple, or a mapping with ``entry`` (``pooled`` or
    ``prefixK``: cached outputs of the frozen backbone, see ``ImageClassifier.forward_entry``), ``inputs``,
    ``targets`` and, for test-time flip in eval mode, ``mirrored``. Nothing is guessed from a tensor's shape.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
        max_epochs: int | None = None,
        class_weights: str | Sequence[float] | None = None,
        class_counts: Sequence[int] | None = None,
        mixing: dict[str, Any] | None = None,
        image_size: int | None = None,
    ):
        """Built by train.py from conf/module/default.yaml (a partial: the data gives ``num_classes``,
        ``class_names`` and ``class_counts``). ``model``: a conf/model config (its ``_target_`` and
        ``class_weights`` are taken off; ``class_weights`` defaults to the model's), with ``image_size`` (the
        data's) added; ``optimizer``/``scheduler``: conf/optimizer, conf/scheduler configs, instantiated by
        :meth:`configure_optimizers`; ``mixing``: ``{mixup, cutmix, features}`` (alphas 0: off)."""
        super().__init__()
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        # The hyperparameters are saved as these locals are now: plain values only (weights_only=True loads),
        # the network's settings without Hydra's `_target_` (checkpoints rebuild it with build_classifier).
        model = plain_settings(model) or {}
        if class_weights is None:
            class_weights = model.get("class_weights")
        try:
            model = architecture(model)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if image_size is not None:
            model["image_size"] = image_size
        optimizer, scheduler = plain_settings(optimizer), plain_settings(scheduler)
        optimizer_settings(optimizer)  # a wrong name or _target_ fails now, not when fitting starts
        scheduler_settings(scheduler, max_epochs or 1)
        mixing = plain_settings(mixing)
        if mixing is not None:  # all alphas 0: no mixer, recorded as None
            mixing = mixing_settings({**mixing, "mix_features": mixing.get("features", False)})
        self.save_hyperparameters()
        self.net, preprocessing, self.weights_source = build_classifier(num_classes, **model)
        self.preprocessing: Preprocessing = preprocessing
        self.class_names = list(class_names)
        # class_weights (null, auto = inverse frequency of class_counts, or a list) weight the training loss
        # only, as Keras' class_weight does: val/test losses stay comparable with unweighted runs.
        weights = resolve_class_weights(class_weights, class_counts, num_classes)
        loss_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("loss_weights", loss_weights, persistent=False)
        # One confusion matrix per stage (foodvision.evaluation.metrics, eval.py's implementation), summed across
        # processes under DDP. Testing is eval.py's job: train.py evaluates the best checkpoint with it.
        self.metrics = {
            s: RunningMetrics(num_classes, track_loss=False, distributed=True) for s in ("train", "val")
        }
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.last_results: dict[str, dict[str, Any]] = {}
        # augment.mixup / cutmix: training batches mixed after transfer (foodvision.data.mixing)
        self.mixer = BatchMixer.from_settings(mixing, num_classes)
        self._batch_index = 0
        # Stop on a non-finite loss (TrainingDivergedError); the LR finder turns it off while it sweeps.
        self.stop_on_divergence = True
        self._val_nonfinite: torch.Tensor | None = None  # sum of this epoch's non-finite val losses (or 0)

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self, inputs: torch.Tensor, entry: str = IMAGES, mirrored: torch.Tensor | None = None
    ) -> torch.Tensor:
        if entry != IMAGES:  # cached backbone outputs
            return self.net.forward_entry(inputs, entry, mirrored)
        if self.hparams.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.net(inputs)

    def _step(self, batch: Any, stage: str) -> torch.Tensor | None:
        if batch is None:  # every sample of the batch was an unreadable file (data.skip_bad_images)
            return None
        if isinstance(batch, Mapping):
            targets = batch["targets"]
            logits = self(batch["inputs"], batch["entry"], batch.get("mirrored"))
        else:
            inputs, targets = batch
            logits = self(inputs)
        if stage == "train":  # label smoothing and class weights shape the training loss only
            loss = nn.functional.cross_entropy(
                logits, targets, weight=self.loss_weights, label_smoothing=self.hparams.label_smoothing
            )
        else:  # plain cross-entropy: val losses stay comparable across runs and with eval.py
            loss = nn.functional.cross_entropy(logits, targets)
        hard = hard_targets(targets)  # mixed (soft) targets: their dominant class
        self.metrics[stage].update(logits, hard)
        if stage == "train":  # one host sync per step; detect_anomaly would cost far more
            self._check_finite_loss(loss, f"at epoch {self.current_epoch} step {self._batch_index}", "loss")
        elif stage == "val":  # summed on the device, checked once at the epoch end (no sync per step)
            loss_value = loss.detach().float()
            bad = torch.where(torch.isfinite(loss_value), torch.zeros_like(loss_value), loss_value)
            self._val_nonfinite = bad if self._val_nonfinite is None else self._val_nonfinite + bad
        # No sync_dist: Lightning reduces such values lazily, when something reads them (rank 0's progress
        # bar in its epoch-end hook), and that collective would meet the metrics' all_reduce of the module's
        # epoch-end hook on the other ranks: a hang under DDP.
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets))
        return loss

    def _check_finite_loss(self, loss: torch.Tensor, where: str, name: str) -> None:
        """A :class:`TrainingDivergedError` when ``loss`` is not finite (on any rank: all of them stop)."""
        if not self.stop_on_divergence:
            return
        here = not bool(torch.isfinite(loss))
        diverged = here
        if self._trainer is not None and self.trainer.world_size > 1:
            diverged = self.trainer.strategy.reduce_boolean_decision(here, all=False)
        if not diverged:
            return
        value = float(loss.detach()) if here else "not finite on another rank"
        lr = (self.hparams.optimizer or {}).get("lr")
        lr_text = f" (now {lr:g})" if isinstance(lr, (int, float)) else ""
        raise TrainingDivergedError(
            f"training diverged {where}: {name} is {value}; lower optimizer.lr{lr_text}. "
            "Checkpoints of the epochs before are kept."
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """MixUp/CutMix of training batches (never of validation or test ones)."""
        if self.mixer is not None and self._trainer is not None and self.trainer.training:
            return self.mixer(batch)
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        self._batch_index = batch_idx
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What inference needs without the training config: classes, preprocessing, architecture."""
        info = ModelInfo(self.class_names, self.preprocessing, dict(self.hparams.model), self.weights_source)
        checkpoint[CHECKPOINT_KEY] = info.to_dict()

    # ---- epoch ends: summary scalars, per-class table and confusion matrix ---------------------
    def _epoch_end(self, stage: str) -> None:
        totals = self.metrics[stage]
        scores = totals.scores()  # summed across processes under DDP
        totals.reset()
        values = scores.named(stage, EPOCH_METRICS)
        self.log_dict(values, prog_bar=stage != "train")
        if self._wants_detail(stage):
            per_class = per_class_table(scores.confusion, self.class_names)
            log_confusion_to_loggers(self, stage, torch.from_numpy(scores.confusion), per_class)
        self.last_results[stage] = values

    def _wants_detail(self, stage: str) -> bool:
        """Whether this epoch's per-class table and confusion matrix are logged (validation, a TensorBoard
        logger, not the sanity check): otherwise the table is not computed and no figure drawn."""
        if stage != "val" or self._trainer is None or self.trainer.sanity_checking:
            return False
        return any(isinstance(logger, TensorBoardLogger) for logger in self.loggers)

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_start(self) -> None:
        self._val_nonfinite = None

    def on_validation_epoch_end(self) -> None:
        # Runs before the checkpoint callbacks save this epoch (on_validation_end, on_train_epoch_end).
        nonfinite, self._val_nonfinite = self._val_nonfinite, None
        if nonfinite is not None:
            sanity = self.trainer.sanity_checking
            where = "before training" if sanity else f"by the end of epoch {self.current_epoch}"
            self._check_finite_loss(nonfinite, where, "val/loss")
        self._epoch_end("val")

    # ---- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """Two parameter groups from the start: the head at ``optimizer.lr`` and the backbone at
        ``lr * optimizer.backbone_lr_factor`` (the one owner of that ratio). Frozen parameters have no
        gradient, so the optimizer skips them; unfreezing later therefore needs no new group and the
        scheduler sees every group throughout. The classes are the configs' ``_target_``
        (:mod:`foodvision.training.optimization`).
        """
        settings = optimizer_settings(self.hparams.optimizer)
        lr = float(settings.get("lr", 1e-3))
        backbone_lr_factor = float(settings.get("backbone_lr_factor", 1.0))
        groups = [
            {"params": list(self.net.head.parameters()), "lr": lr, "name": "head"},
            {
                "params": list(self.net.backbone.parameters()),
                "lr": lr * backbone_lr_factor,
                "name": "backbone",
            },
        ]
        optimizer = build_optimizer({**settings, "lr": lr}, [g for g in groups if g["params"]])
        epochs = max(1, int(self.hparams.max_epochs or self.trainer.max_epochs or 1))
        scheduler = build_scheduler(self.hparams.scheduler, optimizer, epochs)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}
