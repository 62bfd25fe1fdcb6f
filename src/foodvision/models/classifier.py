"""One classifier shape for every model: a backbone that pools an image to a vector, and a head."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from foodvision.data.transforms import Preprocessing
from foodvision.models.scratch import ScratchCNN
from foodvision.models.weights import load_pretrained_weights

log = logging.getLogger(__name__)


def build_head(
    num_features: int, num_classes: int, hidden: int | Sequence[int] | None, dropout: float
) -> nn.Sequential:
    """[Linear(hidden)+ReLU]* -> Dropout -> Linear(num_classes); the reference used hidden 128, dropout 0.3."""
    sizes = [] if hidden in (None, 0) else ([hidden] if isinstance(hidden, int) else list(hidden))
    layers: list[nn.Module] = []
    width = num_features
    for size in sizes:
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    layers += [nn.Dropout(dropout), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class BlockGroup:
    """A whole block of the backbone (timm ``group_matcher``): the unit of freezing and unfreezing."""

    name: str
    parameter_names: tuple[str, ...]


IMAGES = "images"  # entry points of ImageClassifier.forward_entry
POOLED = "pooled"


def prefix_entry(depth: int) -> str:
    """The entry name of the feature maps after the stem and the first ``depth`` blocks."""
    return f"prefix{depth}"


def prefix_entry_depth(entry: str) -> int | None:
    """``pooled`` -> None, ``prefixK`` -> K; anything else is an error naming the known entries."""
    if entry == POOLED:
        return None
    match = re.fullmatch(r"prefix(\d+)", entry)
    if match is None:
        raise ValueError(f"unknown model entry point {entry!r}: expected images, pooled or prefixK")
    return int(match.group(1))


class ImageClassifier(nn.Module):
    """``head(backbone(images))``. The backbone's pooled output is what the feature cache stores.

    With ``test_time_flip`` the model in eval mode averages the logits of each image and its mirror
    image: part of the model, so testing, eval, predict and exported files all do it (measured on
    food101-mini: +0.9 points test accuracy for twice the inference work).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, num_features: int, test_time_flip: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features
        self.test_time_flip = test_time_flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images))
        if self.test_time_flip and not self.training:
            logits = (logits + self.head(self.backbone(images.flip(-1)))) / 2
        return logits

    def forward_entry(
        self, inputs: torch.Tensor, entry: str = IMAGES, mirrored: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits from an explicit entry point: ``images``, ``pooled`` features, or ``prefixK`` feature maps
        (the output of the stem and ``blocks.0 .. blocks.K-1``, see :meth:`forward_prefix`).

        Test-time flip applies to every entry in eval mode: for cached entries, ``mirrored`` is the same
        entry computed from the mirrored photos, so validation on cached features measures the function
        that testing on images measures.
        """
        if entry == IMAGES:
            return self(inputs)
        depth = prefix_entry_depth(entry)

        def logits(x: torch.Tensor) -> torch.Tensor:
            return self.head(x if depth is None else self.forward_suffix(x, depth))

        result = logits(inputs)
        if self.test_time_flip and not self.training:
            if mirrored is None:
                raise ValueError(
                    f"test_time_flip is on but the {entry!r} batch has no mirrored view: evaluating without it "
                    "would measure another function than testing on images"
                )
            result = (result + logits(mirrored)) / 2
        return result

    def prefix_depth(self, first_trainable_group: str) -> int | None:
        """How many of ``backbone.blocks`` come before ``first_trainable_group`` (``blocks.K`` -> K), when the
        backbone can be cut there (timm EfficientNet/MobileNet families); None otherwise."""
        backbone = self.backbone
        cuttable = all(
            hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")
        )
        match = re.fullmatch(r"blocks\.(\d+)", first_trainable_group)
        return int(match.group(1)) if cuttable and match and int(match.group(1)) > 0 else None

    def forward_prefix(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        """Stem and the first ``depth`` blocks: the part a stage-2 run keeps frozen."""
        backbone = self.backbone
        x = backbone.bn1(backbone.conv_stem(images))
        for block in backbone.blocks[:depth]:
            x = block(x)
        return x

    def forward_suffix(self, maps: torch.Tensor, depth: int) -> torch.Tensor:
        """The rest of the backbone (pooled output) from the ``forward_prefix`` feature maps."""
        backbone = self.backbone
        for block in backbone.blocks[depth:]:
            maps = block(maps)
        return backbone.global_pool(backbone.bn2(backbone.conv_head(maps)))

    def block_groups(self) -> list[BlockGroup]:
        """The backbone's blocks, bottom (stem) to top, as timm's coarse ``group_matcher`` cuts them.

        Each group is named after its first parameter (``stem``, ``blocks.0`` ... ``blocks.6``);
        models without a matcher form a single group ``backbone``.
        """
        matcher = getattr(self.backbone, "group_matcher", None)
        names = [n for n, _ in self.backbone.named_parameters()]
        if matcher is None:
            return [BlockGroup("backbone", tuple(names))]
        grouped = timm.models.group_parameters(self.backbone, matcher(coarse=True))
        groups = []
        for parameter_names in grouped.values():
            first = parameter_names[0]
            block = re.match(r"^(blocks|stages|layers)\.\d+", first)
            label = block.group(0) if block else ("stem" if not groups else first.split(".")[0])
            groups.append(BlockGroup(label, tuple(parameter_names)))
        return groups


# The `_target_` of every conf/model/*.yaml: `hydra.utils.instantiate(cfg.model, num_classes=..., image_size=...)`
# builds the network. Checkpoints describe their network with the same keys (less `_target_`); rebuilding one
# never imports or calls a function its file names (:func:`architecture`).
MODEL_FACTORY = "foodvision.models.classifier.build_classifier"
# model.* keys that configure training, not the network (the loss's class weights)
TRAINING_KEYS = ("class_weights",)


def architecture(config: Mapping[str, Any], where: str = "model") -> dict[str, Any]:
    """The :func:`build_classifier` keyword arguments of a model config or of a checkpoint's metadata: without
    Hydra's ``_target_`` and without the training-only keys. A ``_target_`` naming anything but
    :data:`MODEL_FACTORY` is refused (a ValueError naming ``where``): checkpoint metadata is data, and a file
    naming ``os.system`` must never get it called."""
    options = dict(config)
    target = options.pop("_target_", MODEL_FACTORY)
    if target != MODEL_FACTORY:
        raise ValueError(
            f"{where}._target_ is {target!r}: foodvision builds networks only with {MODEL_FACTORY} "
            "(checkpoints rebuild the network from these settings, never from a function they name)"
        )
    for key in TRAINING_KEYS:
        options.pop(key, None)
    return options


def build_classifier(
    num_classes: int,
    kind: str = "timm",
    name: str = "mobilenetv2_100",
    pretrained: bool = True,
    weights_file: str | None = None,
    head: dict[str, Any] | None = None,
    scratch: dict[str, Any] | None = None,
    image_size: int | None = None,
    drop_path_rate: float = 0.0,
    test_time_flip: bool = False,
    class_weights: Any = None,
) -> tuple[ImageClassifier, Preprocessing, str]:
    """Build a model from config (conf/model/*.yaml names this function as its ``_target_``); returns it with
    its preprocessing and where its weights came from. ``class_weights`` (``model.class_weights``) weights the
    training loss and does not shape the network: accepted so that a model config instantiates as written."""
    head = dict(head or {})
    hidden, dropout = head.get("hidden"), float(head.get("dropout", 0.0))
    if kind == "scratch":
        size = int(image_size or 224)
        backbone = ScratchCNN(image_size=size, **dict(scratch or {}))
        model = ImageClassifier(
            backbone,
            build_head(backbone.num_features, num_classes, hidden, dropout),
            backbone.num_features,
            test_time_flip,
        )
        return model, Preprocessing(image_size=size), "random init (scratch CNN)"
    if kind != "timm":
        raise ValueError(f"model.kind must be 'timm' or 'scratch', got {kind!r}")
    kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    try:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as error:
        raise ValueError(f"timm has no model {name!r} ({error}); see timm.list_models()") from error
    source = "random init (model.pretrained=false)"
    if pretrained:
        source = load_pretrained_weights(backbone, name, weights_file)
    preprocessing = Preprocessing.from_timm(timm.data.resolve_model_data_config(backbone), image_size)
    model = ImageClassifier(
        backbone,
        build_head(backbone.num_features, num_classes, hidden, dropout),
        backbone.num_features,
        test_time_flip,
    )
    log.info("model %s: weights from %s", name, source)
    return model, preprocessing, source
