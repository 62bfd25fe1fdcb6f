"""Cached backbone features for the frozen stage: the backbone runs once per split, not once per epoch.

While the backbone is frozen and the training images are not augmented, every epoch would compute
the same pooled features again. This callback computes them once (progress bar), stores them on disk
under a key that covers everything they depend on, and hands them to the datamodule, so stage 1
trains the head on in-memory tensors. When stage 2 begins it drops them and the loaders go back to
images. A second run, and every trial of a sweep, finds the features on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from foodvision.callbacks.finetune import TwoStageFinetuning

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_list_digest(paths: list[str]) -> str:
    """sha256 of the files' paths, sizes and modification times (a changed photo rebuilds the cache)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def feature_cache_key(
    model_name: str, weights_digest: str, preprocessing: dict[str, Any], paths: list[str], precision: str
) -> str:
    """Everything the cached features depend on; nothing else (batch size, lr, epochs...) is in it."""
    payload = {
        "format": CACHE_FORMAT,
        "model": model_name,
        "weights": weights_digest,
        "preprocessing": preprocessing,
        "precision": precision,
        "images": image_list_digest(paths),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def extract_features(
    pl_module: L.LightningModule, loader: torch.utils.data.DataLoader, forward_context: Any, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features and labels for every readable image of ``loader``, in order."""
    backbone = pl_module.net.backbone
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
            if batch is None:
                continue
            images, targets = batch
            images = images.to(pl_module.device)
            if pl_module.hparams.get("channels_last", False):
                images = images.contiguous(memory_format=torch.channels_last)
            with forward_context():
                pooled = backbone(images)
            features.append(pooled.float().cpu())
            labels.append(targets.cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


class FeatureCache(Callback):
    """Stage 1 on cached pooled features; see the module docstring.

    ``enabled``: ``auto`` caches when the datamodule does no augmentation; ``true`` caches even then
    (stage 1 trains on un-augmented features and augmentation applies from stage 2 on); ``false``
    never caches.
    """

    def __init__(self, enabled: str | bool = "auto", cache_dir: str = "data/cache/features"):
        super().__init__()
        self.enabled = enabled
        self.cache_dir = Path(cache_dir)
        self.active = False
        self.hits: list[str] = []
        self.builds: list[str] = []

    def _finetune(self, trainer: L.Trainer) -> TwoStageFinetuning | None:
        return next((c for c in trainer.callbacks if isinstance(c, TwoStageFinetuning)), None)

    def _applies(self, trainer: L.Trainer) -> bool:
        finetune = self._finetune(trainer)
        datamodule = trainer.datamodule
        if self.enabled in (False, "false") or finetune is None or datamodule is None:
            return False
        if finetune.stage_at(trainer.current_epoch) != 1:
            return False
        if self.enabled == "auto" and datamodule.augmented:
            log.info("feature cache off: training images are augmented (feature_cache.enabled=true forces it)")
            return False
        return True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._applies(trainer):
            return
        datamodule = trainer.datamodule
        for split in ("train", "val"):
            datamodule.cached_features[split] = self.load_or_build(trainer, pl_module, split)
        self.active = True

    def load_or_build(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> TensorDataset:
        datamodule = trainer.datamodule
        paths = [path for path, _ in datamodule.discover().splits[split]]
        key = feature_cache_key(
            pl_module.hparams.model.get("name", "scratch"),
            state_digest(pl_module.net.backbone),
            pl_module.preprocessing.to_dict(),
            paths,
            str(trainer.precision),
        )
        path = self.cache_dir / f"{split}-{key}.pt"
        if trainer.is_global_zero and not path.is_file():
            loader = datamodule.loader(datamodule.image_dataset(split), shuffle=False, batch_size=datamodule.eval_batch_size)
            features, labels = extract_features(
                pl_module, loader, trainer.precision_plugin.forward_context, f"caching {split} features"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            torch.save({"features": features, "labels": labels}, temporary)
            temporary.replace(path)  # atomic: an interrupted build never leaves a half-written cache
            self.builds.append(str(path))
            log.info("cached %d %s features in %s", len(labels), split, path)
        else:
            self.hits.append(str(path))
            log.info("feature cache hit: %s", path)
        trainer.strategy.barrier("feature-cache")
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return TensorDataset(stored["features"], stored["labels"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Back to images when the next epoch is stage 2 (decided by the finetune callback at validation end)."""
        finetune = self._finetune(trainer)
        if not self.active or finetune is None or finetune.stage_at(trainer.current_epoch + 1) == 1:
            return
        trainer.datamodule.cached_features.clear()
        self.active = False
        request_dataloader_reload(trainer)
        log.info("stage 2 next: training continues on images")


def request_dataloader_reload(trainer: L.Trainer) -> None:
    """Make the fit loop rebuild its train and val loaders before the next epoch.

    Lightning only offers a fixed period (``reload_dataloaders_every_n_epochs``); the stage switch
    happens once, at an epoch known only at run time, so the loops' cached loaders are dropped.
    """
    trainer.fit_loop._combined_loader = None
    trainer.fit_loop.epoch_loop.val_loop._combined_loader = None
