"""Pooled features of the frozen, pretrained backbone for every photo: what near-duplicate search (cosine
similarity) and the label-issue head (k-fold) work on.

The backbone is built from the model config as training builds it (:func:`foodvision.models.classifier.
build_classifier`, offline weights first) and run in eval mode, by ONNX Runtime on a CPU (``engine=auto``:
several times faster than eager PyTorch) or PyTorch. The features are cached on disk under a key of
everything they depend on (architecture, weights, preprocessing, engine and every file's path, size and
modification time), so a second audit of the same data is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from foodvision.atomic import write_with
from foodvision.data.images import load_rgb
from foodvision.data.transforms import Preprocessing
from foodvision.data.verify import image_list_digest
from foodvision.inference.engine import ChunkedForward, onnxruntime_or_none, resolve_engine, torch_max_batch
from foodvision.models.classifier import architecture, build_classifier
from foodvision.training.callbacks.feature_cache import state_digest

log = logging.getLogger(__name__)

FEATURES_FORMAT = 1


class _Photos(Dataset):
    """index -> (eval-transformed photo, index, readable); an unreadable photo gives zeros and False."""

    def __init__(self, paths: Sequence[str], preprocessing: Preprocessing):
        self.paths = list(paths)
        self.size = preprocessing.image_size
        self.draft = (preprocessing.resize_size, preprocessing.resize_size)
        self.transform = preprocessing.eval_transform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        try:
            return self.transform(load_rgb(self.paths[index], draft_size=self.draft)), index, True
        except Exception:  # noqa: BLE001 - a bad file has no features; the fingerprints name its error
            return torch.zeros(3, self.size, self.size), index, False


def build_backbone(
    model: Mapping[str, Any], image_size: int | None
) -> tuple[torch.nn.Module, Preprocessing, str]:
    """The model config's backbone (pretrained weights as training loads them), its preprocessing and where
    its weights came from."""

    options = {k: v for k, v in architecture(model).items() if k != "test_time_flip"}
    options["image_size"] = image_size
    net, preprocessing, source = build_classifier(num_classes=2, **options)
    return net.backbone.eval(), preprocessing, source


def features_key(
    name: str, backbone: torch.nn.Module, preprocessing: Preprocessing, paths: Sequence[str], engine: str
) -> str:

    payload = {
        "format": FEATURES_FORMAT,
        "model": name,
        "weights": state_digest(backbone),
        "preprocessing": preprocessing.to_dict(),
        "engine": engine,
        "images": image_list_digest(paths),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def pooled_features(
    paths: Sequence[str],
    model: Mapping[str, Any],
    image_size: int | None = None,
    engine: str = "auto",
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features [N, D] float32, readable [N] bool, facts)`` for ``paths`` in order; ``facts`` says which
    model, weights, input size and engine made them and whether they came from the cache."""
    chosen = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    backbone, preprocessing, source = build_backbone(model, image_size)
    used = resolve_engine(engine, chosen, "32")
    name = str(model.get("name", model.get("kind", "model")))
    facts = {"model": name, "weights": source, "image_size": preprocessing.image_size, "engine": used}
    cache_file = None
    if cache_dir is not None:
        cache_file = (
            Path(cache_dir) / f"features-{features_key(name, backbone, preprocessing, paths, used)}.pt"
        )
        if cache_file.is_file():
            try:
                stored = torch.load(cache_file, map_location="cpu", weights_only=True)
                log.info("audit features from the cache: %s", cache_file)
                return stored["features"].numpy(), stored["readable"].numpy(), {**facts, "cached": True}
            except Exception as error:  # noqa: BLE001 - a damaged cache file is rebuilt
                log.warning("rebuilding the damaged feature cache %s (%s)", cache_file, error)
    example = torch.zeros(1, 3, preprocessing.image_size, preprocessing.image_size)
    runner = None
    if used == "onnxruntime":
        runner = onnxruntime_or_none(backbone, example, ["pooled"], engine)
    if runner is None:
        backbone = backbone.to(chosen)
        if chosen.type == "cpu":
            runner = ChunkedForward(backbone, torch_max_batch(backbone, preprocessing.image_size))
        else:
            runner = backbone
        facts["engine"] = "torch"
    loader = DataLoader(
        _Photos(paths, preprocessing), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    features: torch.Tensor | None = None
    readable = torch.zeros(len(paths), dtype=torch.bool)
    for images, indices, ok in tqdm(
        loader, desc="audit features", unit="batch", disable=not progress, leave=False
    ):
        out = runner(images.to(chosen) if facts["engine"] == "torch" else images)
        out = out.float().cpu()
        if features is None:
            features = torch.zeros(len(paths), out.shape[1], dtype=torch.float32)
        features[indices] = out
        readable[indices] = ok
    assert features is not None
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_with(cache_file, lambda p: torch.save({"features": features, "readable": readable}, p))
    return features.numpy(), readable.numpy(), {**facts, "cached": False}
