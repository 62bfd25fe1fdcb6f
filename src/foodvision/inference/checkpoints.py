"""Trained models on disk: Lightning checkpoints and exported TorchScript/ONNX files, and the metadata they all
carry (:class:`ModelInfo`: class names, preprocessing, architecture), so inference never needs the training
config or data. Checkpoints are read with ``weights_only=True``: nothing in them is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foodvision.atomic import save_torch
from foodvision.data.transforms import Preprocessing
from foodvision.errors import ModelLoadError
from foodvision.inference.calibration import Calibration
from foodvision.inference.engine import (
    session_options,
)
from foodvision.models.classifier import architecture, build_classifier

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "foodvision"  # the entry of a Lightning checkpoint holding ModelInfo.to_dict()
META_KEY = "foodvision.json"  # TorchScript extra file and ONNX metadata_props key holding ModelInfo as JSON
METADATA_VERSION = 1
CHECKPOINT_SUFFIXES = (".ckpt",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript", ".ts")
ONNX_SUFFIXES = (".onnx",)


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs besides the weights; saved in checkpoints (``checkpoint['foodvision']``)
    and in exported files."""

    class_names: list[str]
    preprocessing: Preprocessing
    model: dict[str, Any] = field(default_factory=dict)
    weights_source: str = ""
    # Temperature and "unknown" threshold fitted on validation (foodvision.inference.calibration); metadata written
    # before calibration existed reads as temperature 1, no threshold.
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def architecture(self) -> str:
        name = self.model.get("name", "?")
        if self.model.get("kind") == "scratch":
            widths = (self.model.get("scratch") or {}).get("widths")
            return f"{name}{list(widths)}" if widths else str(name)
        return str(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "model": dict(self.model),
            "weights_source": self.weights_source,
            "calibration": self.calibration.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str | Path) -> ModelInfo:
        try:
            names = [str(n) for n in values["class_names"]]
            preprocessing = Preprocessing.from_dict(values["preprocessing"])
        except (KeyError, TypeError, ValueError) as error:
            raise ModelLoadError(
                f"{where}: the foodvision metadata is incomplete or damaged ({error!r})"
            ) from error
        if not names:
            raise ModelLoadError(f"{where}: the foodvision metadata lists no classes")
        try:
            calibration = Calibration.from_dict(values.get("calibration"))
        except (TypeError, ValueError) as error:
            raise ModelLoadError(
                f"{where}: the calibration in the foodvision metadata is damaged ({error})"
            ) from error
        return cls(
            names,
            preprocessing,
            dict(values.get("model") or {}),
            str(values.get("weights_source", "")),
            calibration,
        )


# ---- checkpoints ---------------------------------------------------------------------------------------
def require_file(path: str | Path | None, what: str = "checkpoint") -> Path:
    if path is None or str(path) in ("", "???"):
        raise ModelLoadError(
            f"no {what} given: pass ckpt_path=/path/to/model.ckpt (or an exported .pt/.onnx file)"
        )
    resolved = Path(str(path)).expanduser()
    if resolved.is_dir():
        found = sorted(resolved.glob("checkpoints/*.ckpt")) or sorted(resolved.glob("*.ckpt"))
        hint = f"; it holds {', '.join(p.name for p in found[:4])}" if found else ""
        raise ModelLoadError(f"{what} {resolved} is a folder, not a file{hint}")
    if not resolved.is_file():
        raise ModelLoadError(f"{what} {resolved} does not exist")
    return resolved


def run_dir_of(model_path: str | Path) -> Path:
    """``<run>/checkpoints/x.ckpt``, ``<run>/export/x.pt`` -> ``<run>``; elsewhere: the file's folder."""
    path = Path(model_path).resolve()
    return path.parent.parent if path.parent.name in ("checkpoints", "export") else path.parent


def _load_failure_reason(path: Path, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``: empty, truncated, foreign pickle, or not a
    checkpoint at all. Never suggests ``weights_only=False``: foodvision does not unpickle files."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes): a save was interrupted or the copy failed"
    with path.open("rb") as handle:
        head = handle.read(4)
    text = str(error)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return (
            f"the file is truncated or damaged ({size} bytes, its zip directory is missing): a save was "
            "interrupted or the copy is incomplete. Use another checkpoint of the run (last.ckpt, best-*.ckpt)"
        )
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):  # neither torch.save's zip nor legacy pickle
        return f"it is not a PyTorch checkpoint (those are zip archives written by torch.save; it starts with {head!r})"
    match = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
    if match or "weights only load failed" in text.lower():
        found = f" (e.g. {match.group(1)})" if match else ""
        return (
            f"it contains pickled Python objects{found}; foodvision loads only tensors and plain values and "
            "never unpickles code, so this file was not written by foodvision's training and will not be "
            "loaded"
        )
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"it is not a readable PyTorch checkpoint ({type(error).__name__}{': ' + first if first else ''})"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that say why a file is not a usable checkpoint."""
    path = require_file(path)
    if is_torchscript(path):  # never handed to torch.load, which dispatches such archives to torch.jit.load
        raise ModelLoadError(
            f"cannot load {path}: it is a TorchScript program, not a checkpoint, and foodvision does not run "
            f"it as one ({TORCHSCRIPT_IS_CODE}); use the run's .ckpt or an ONNX export"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for foreign files
        raise ModelLoadError(f"cannot load {path}: {_load_failure_reason(path, error)}") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        keys = (
            ", ".join(sorted(map(str, checkpoint))[:8])
            if isinstance(checkpoint, dict)
            else type(checkpoint).__name__
        )
        raise ModelLoadError(
            f"{path} is not a foodvision checkpoint: it has no 'foodvision' metadata (class names, "
            f"preprocessing, architecture); top-level content: {keys}. Use a checkpoint written by "
            "`python train.py` "
            "(lightning_logs/runs/<run>/checkpoints/*.ckpt)."
        )
    if "state_dict" not in checkpoint:
        raise ModelLoadError(f"{path} has foodvision metadata but no state_dict (weights)")
    return checkpoint


def build_model(info: ModelInfo, where: str | Path) -> nn.Module:
    """The architecture recorded in ``info``, randomly initialised (never downloads weights). Built by
    :func:`build_classifier` alone: a ``_target_`` in the metadata naming another function is refused before
    anything is imported or called (the file is data, not code)."""
    if not info.model:
        raise ModelLoadError(f"{where}: the foodvision metadata does not describe the architecture")
    try:
        kwargs = {**architecture(info.model, where="its model"), "pretrained": False}
    except ValueError as error:
        raise ModelLoadError(f"{where}: refused: {error}") from None
    quiet = logging.getLogger("foodvision.models.classifier")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # not "weights from random init": the checkpoint's weights follow
    try:
        model, _, _ = build_classifier(info.num_classes, **kwargs)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ModelLoadError(
            f"{where}: cannot rebuild the recorded architecture {info.architecture}: {error}"
        ) from error
    finally:
        quiet.setLevel(level)
    return model


NETWORK_PREFIX = "net."  # LitClassifier keeps the network as ``self.net``: its weights' keys start so


def network_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's weights of a training checkpoint's ``state_dict`` (the LightningModule's other state,
    e.g. metrics, left out), keyed as the bare network names them."""
    return {k[len(NETWORK_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(NETWORK_PREFIX)}


def network_parameter_count(checkpoint: dict[str, Any]) -> int:
    """Parameters of the network stored in a training checkpoint."""
    return sum(v.numel() for v in network_weights(checkpoint["state_dict"]).values())


def load_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], info: ModelInfo, where: str | Path
) -> None:
    """Strict loading with a readable account of what does not fit."""
    weights = network_weights(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(weights) & set(expected))
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if not weights:
            parts.append("it has no 'net.*' weights at all")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape (e.g. {'; '.join(mismatched[:3])})")
        raise ModelLoadError(
            f"the weights in {where} do not fit the architecture its metadata names "
            f"({info.architecture}, {info.num_classes} classes): {'; '.join(parts)}. "
            "Was the checkpoint written by another version of the model or edited?"
        )
    model.load_state_dict(weights, strict=True)


def checkpoint_info(checkpoint: dict[str, Any], path: str | Path) -> ModelInfo:
    """The :class:`ModelInfo` a training checkpoint (read by :func:`read_checkpoint`) carries."""
    return ModelInfo.from_dict(checkpoint[CHECKPOINT_KEY], path)


def load_checkpoint_model(path: str | Path) -> tuple[nn.Module, ModelInfo, dict[str, Any]]:
    """Rebuild the classifier of a training checkpoint: ``(model in eval mode, info, checkpoint)``."""
    checkpoint = read_checkpoint(path)
    info = checkpoint_info(checkpoint, path)
    model = build_model(info, path)
    load_weights(model, checkpoint["state_dict"], info, path)
    return model.eval(), info, checkpoint


def save_calibration(path: str | Path, calibration: Calibration) -> ModelInfo:
    """Rewrite the training checkpoint ``path`` with ``calibration`` in its metadata (weights, optimizer
    state and everything else unchanged), atomically: a failed write leaves the previous file. Returns
    the metadata now saved."""

    checkpoint = read_checkpoint(path)
    info = dataclasses.replace(checkpoint_info(checkpoint, path), calibration=calibration)
    checkpoint[CHECKPOINT_KEY] = info.to_dict()
    save_torch(path, checkpoint)
    return info


# ---- exported files ----------------------------------------------------------------------------------
def export_metadata(info: ModelInfo, **extra: Any) -> str:
    return json.dumps({"metadata_version": METADATA_VERSION, **info.to_dict(), **extra}, indent=1)


def is_torchscript(path: Path) -> bool:
    """A zip archive holding TorchScript code (``<archive>/code/``), seen from its file list alone."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def model_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    if is_torchscript(path):
        return "torchscript"
    return "checkpoint"


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """TorchScript is deprecated in recent PyTorch (a FutureWarning on every call) but still what
    ``format=torchscript`` asks for; keep the console readable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated.*", category=FutureWarning)
        yield


TORCHSCRIPT_IS_CODE = (
    "TorchScript is a program, not weights: loading it runs the code it holds (its __setstate__ runs on "
    "load, with your permissions)"
)
MAX_METADATA_BYTES = 1 << 20  # foodvision.json is a few KB; never inflate more than this from a foreign zip


def read_torchscript_metadata(path: Path) -> str:
    """The ``foodvision.json`` extra file of a TorchScript archive, read with :mod:`zipfile` (nothing loaded
    or run); ``""`` when there is none."""
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                parts = entry.filename.split("/")
                if len(parts) == 3 and parts[1:] == ["extra", META_KEY]:
                    if entry.file_size > MAX_METADATA_BYTES:
                        raise ModelLoadError(
                            f"{path}: its {META_KEY} is {entry.file_size} bytes, not foodvision metadata"
                        )
                    return archive.read(entry).decode("utf-8")
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise ModelLoadError(f"cannot read TorchScript model {path}: {error}") from None
    return ""


def load_torchscript_file(path: Path, device: torch.device, trust: bool = False) -> tuple[Any, ModelInfo]:
    """An exported TorchScript model and its metadata. TorchScript is code, so it is loaded only with
    ``trust=True`` (``trust_torchscript=true``): a digest or signature inside the file would prove nothing,
    since whoever wrote the program can write a matching one too. The metadata is read first, as data."""
    meta = read_torchscript_metadata(path)
    if not meta:
        raise ModelLoadError(
            f"{path} is a TorchScript model without foodvision metadata ({META_KEY}); export it with "
            "`python export.py ckpt_path=... format=onnx` (or format=torchscript)"
        )
    if not trust:
        raise ModelLoadError(
            f"{path} is a TorchScript file, not loaded: {TORCHSCRIPT_IS_CODE}. Load it only if you trust "
            "where it came from, with trust_torchscript=true; otherwise use the run's .ckpt or an ONNX export "
            "(`python export.py ckpt_path=<run>/checkpoints/last.ckpt format=onnx`), which load as data"
        )
    try:
        info = ModelInfo.from_dict(json.loads(meta), path)
    except ValueError as error:  # not JSON
        raise ModelLoadError(f"{path}: the foodvision metadata is not JSON ({error})") from None
    try:
        with quiet_jit():
            module = torch.jit.load(str(path), map_location=device)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"cannot load TorchScript model {path}: {error}") from error
    return module.eval(), info


def load_onnx_file(path: Path) -> tuple[Any, ModelInfo]:
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ModelLoadError(
            f"{path} is an ONNX model, and running it needs onnxruntime: pip install 'foodvision[onnx]'"
        ) from error
    try:
        session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"cannot load ONNX model {path}: {error}") from error
    meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if not meta:
        raise ModelLoadError(
            f"{path} is an ONNX model without foodvision metadata ({META_KEY} in metadata_props); export it "
            "with `python export.py ckpt_path=... format=onnx`"
        )
    return session, ModelInfo.from_dict(json.loads(meta), path)
