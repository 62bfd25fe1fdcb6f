"""The LightningModule shared by scratch CNNs and timm backbones: loss, optimizer, metrics, logging."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from foodvision.data.balance import resolve_class_weights
from foodvision.data.mixing import BatchMixer, hard_targets
from foodvision.data.transforms import Preprocessing
from foodvision.errors import ToolError
from foodvision.inference.checkpoints import CHECKPOINT_KEY, ModelInfo
from foodvision.models.classifier import IMAGES, build_classifier
from foodvision.training.schedules import Stage2Schedule


class TrainingDivergedError(ToolError):
    """The loss became NaN or infinite: the weights have blown up and every later epoch would be wasted
    (and ``metrics.json`` would record NaN). Raised before that epoch's checkpoints are written."""


def summary_metrics(num_classes: int) -> torchmetrics.MetricCollection:
    metrics: dict[str, torchmetrics.Metric] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "precision_macro": MulticlassPrecision(num_classes, average="macro"),
        "recall_macro": MulticlassRecall(num_classes, average="macro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return torchmetrics.MetricCollection(metrics)


def per_class_from_confusion(
    confusion: torch.Tensor, class_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows: true classes), as
    torchmetrics' ``average=None`` metrics give them (0 where undefined): one matrix instead of four metrics."""
    confusion = confusion.double()
    true_positives = confusion.diagonal()
    support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)

    def ratio(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        return torch.where(bottom > 0, top / bottom.clamp(min=1), torch.zeros_like(top))

    precision, recall = ratio(true_positives, predicted), ratio(true_positives, support)
    f1 = ratio(2 * true_positives, support + predicted)
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }


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
    ):
        super().__init__()
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.save_hyperparameters()
        # ModuleDict keys get a suffix: "train" would clash with nn.Module.train.
        self.net, preprocessing, self.weights_source = build_classifier(num_classes, **model)
        self.preprocessing: Preprocessing = preprocessing
        self.class_names = list(class_names)
        # class_weights (null, auto = inverse frequency of class_counts, or a list) weight the training loss
        # only, as Keras' class_weight does: val/test losses stay comparable with unweighted runs.
        weights = resolve_class_weights(class_weights, class_counts, num_classes)
        loss_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("loss_weights", loss_weights, persistent=False)
        self.metrics = nn.ModuleDict({f"{s}_": summary_metrics(num_classes) for s in ("train", "val")})
        # Testing is eval.py's job (foodvision.evaluation.evaluate): train.py evaluates the best checkpoint with it.
        # The per-class table and confusion matrix are logged to TensorBoard only (train.py keeps scalars):
        # one confusion matrix, updated only when such a logger will receive it (see _wants_detail).
        self.detailed = nn.ModuleDict({"val_": MulticlassConfusionMatrix(num_classes)})
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
        self.metrics[f"{stage}_"].update(logits.detach().float(), hard)
        if self._wants_detail(stage):
            self.detailed[f"{stage}_"].update(logits.detach().float(), hard)
        if stage == "train":  # one host sync per step; detect_anomaly would cost far more
            self._check_finite_loss(loss, f"at epoch {self.current_epoch} step {self._batch_index}", "loss")
        elif stage == "val":  # summed on the device, checked once at the epoch end (no sync per step)
            loss_value = loss.detach().float()
            bad = torch.where(torch.isfinite(loss_value), torch.zeros_like(loss_value), loss_value)
            self._val_nonfinite = bad if self._val_nonfinite is None else self._val_nonfinite + bad
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
        values = {f"{stage}/{k}": v for k, v in self.metrics[f"{stage}_"].compute().items()}
        self.log_dict(values, prog_bar=stage != "train")
        self.metrics[f"{stage}_"].reset()
        result: dict[str, Any] = {k: float(v) for k, v in values.items()}
        if self._wants_detail(stage):
            confusion = self.detailed[f"{stage}_"].compute().cpu()
            self.detailed[f"{stage}_"].reset()
            from foodvision.evaluation.figures import log_confusion_to_loggers

            per_class = per_class_from_confusion(confusion, self.class_names)
            log_confusion_to_loggers(self, stage, confusion, per_class)
        self.last_results[stage] = result

    def _wants_detail(self, stage: str) -> bool:
        """Whether this epoch's per-class table and confusion matrix will be logged (a TensorBoard logger,
        not the sanity check): otherwise they are not computed at all."""
        if f"{stage}_" not in self.detailed or self._trainer is None or self.trainer.sanity_checking:
            return False
        from lightning.pytorch.loggers import TensorBoardLogger

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
        scheduler sees every group throughout.
        """
        cfg = dict(self.hparams.optimizer or {})
        name = cfg.pop("name", "adamw").lower()
        lr = float(cfg.pop("lr", 1e-3))
        weight_decay = float(cfg.pop("weight_decay", 0.0))
        backbone_lr_factor = float(cfg.pop("backbone_lr_factor", 1.0))
        groups = [
            {"params": list(self.net.head.parameters()), "lr": lr, "name": "head"},
            {
                "params": list(self.net.backbone.parameters()),
                "lr": lr * backbone_lr_factor,
                "name": "backbone",
            },
        ]
        groups = [g for g in groups if g["params"]]
        if name == "adam":
            optimizer = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, **cfg)
        elif name == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **cfg)
        elif name == "sgd":
            optimizer = torch.optim.SGD(
                groups, lr=lr, weight_decay=weight_decay, momentum=cfg.pop("momentum", 0.9), **cfg
            )
        else:
            raise ValueError(f"optimizer.name must be adam, adamw or sgd, got {name!r}")
        scheduler = self._scheduler(optimizer)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        cfg = dict(self.hparams.scheduler or {})
        name = cfg.get("name", "none")
        if name in (None, "none"):
            return None
        if name == "cosine":
            epochs = max(1, int(self.hparams.max_epochs or self.trainer.max_epochs or 1))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=epochs, eta_min=cfg.get("min_lr", 0.0)
            )
            return {"scheduler": sched, "interval": "epoch"}
        if name == "stage2":  # fine-tuning recipes: base rates in stage 1, warm-up + decay from stage 2
            sched = Stage2Schedule(optimizer, cfg.get("warmup_epochs", 0.0), cfg.get("decay", "cosine"))
            return {"scheduler": sched, "interval": "step"}
        if name == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.get("factor", 0.5), patience=cfg.get("patience", 2)
            )
            return {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"}
        raise ValueError(f"scheduler.name must be none, cosine, stage2 or plateau, got {name!r}")
