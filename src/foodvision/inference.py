"""Load a trained model (Lightning checkpoint, exported TorchScript or ONNX file); predict batches of photos.

Checkpoints run with PyTorch or, for float32 work on a CPU (``engine=auto``), with ONNX Runtime from an
in-memory export of their weights: same logits, several times faster there (see :mod:`foodvision.engine`).
Every format carries the same metadata (:class:`ModelInfo`: class names, preprocessing, architecture), so
inference never needs the training config or data. Checkpoints are read with ``weights_only=True``: nothing
in them is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.transforms import Preprocessing
from foodvision.engine import (
    ENGINES,
    OnnxRuntimeModule,
    batch_for_memory,
    default_max_memory_mb,
    graph_bytes_per_image,
    module_bytes_per_image,
    onnxruntime_available,
    resolve_engine,
    run_in_chunks,
    session_options,
)
from foodvision.hardware import auto_precision

log = logging.getLogger(__name__)

META_KEY = "foodvision.json"  # TorchScript extra file and ONNX metadata_props key holding ModelInfo as JSON
METADATA_VERSION = 1
CHECKPOINT_SUFFIXES = (".ckpt",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript", ".ts")
ONNX_SUFFIXES = (".onnx",)


class ToolError(Exception):
    """A problem the command-line tools report as one clear message (no traceback)."""


class ModelLoadError(ToolError):
    """The file is missing, is not a foodvision model, or its weights do not fit its recorded architecture."""


class ClassMismatchError(ToolError):
    """A model's classes do not fit the classes of the data it is asked to evaluate."""


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs besides the weights; saved in checkpoints (``checkpoint['foodvision']``)
    and in exported files."""

    class_names: list[str]
    preprocessing: Preprocessing
    model: dict[str, Any] = field(default_factory=dict)
    weights_source: str = ""

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
        return cls(
            names, preprocessing, dict(values.get("model") or {}), str(values.get("weights_source", ""))
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
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for foreign files
        raise ModelLoadError(f"cannot load {path}: {_load_failure_reason(path, error)}") from None
    if not isinstance(checkpoint, dict) or "foodvision" not in checkpoint:
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
    """The architecture recorded in ``info``, randomly initialised (never downloads weights)."""
    from foodvision.models.classifier import build_classifier

    if not info.model:
        raise ModelLoadError(f"{where}: the foodvision metadata does not describe the architecture")
    kwargs = {**info.model, "pretrained": False}
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


def load_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], info: ModelInfo, where: str | Path
) -> None:
    """Strict loading with a readable account of what does not fit."""
    weights = {k[len("net.") :]: v for k, v in state_dict.items() if k.startswith("net.")}
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


def load_checkpoint_model(path: str | Path) -> tuple[nn.Module, ModelInfo, dict[str, Any]]:
    """Rebuild the classifier of a training checkpoint: ``(model in eval mode, info, checkpoint)``."""
    checkpoint = read_checkpoint(path)
    info = ModelInfo.from_dict(checkpoint["foodvision"], path)
    model = build_model(info, path)
    load_weights(model, checkpoint["state_dict"], info, path)
    return model.eval(), info, checkpoint


# ---- exported files ----------------------------------------------------------------------------------
def export_metadata(info: ModelInfo, **extra: Any) -> str:
    return json.dumps({"metadata_version": METADATA_VERSION, **info.to_dict(), **extra}, indent=1)


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


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


def _load_torchscript(path: Path, device: torch.device) -> tuple[Any, ModelInfo]:
    extra = {META_KEY: ""}
    try:
        with quiet_jit():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"cannot load TorchScript model {path}: {error}") from error
    if not extra[META_KEY]:
        raise ModelLoadError(
            f"{path} is a TorchScript model without foodvision metadata ({META_KEY}); export it with "
            "`python export.py ckpt_path=... format=torchscript`"
        )
    return module.eval(), ModelInfo.from_dict(json.loads(extra[META_KEY]), path)


def _load_onnx(path: Path) -> tuple[Any, ModelInfo]:
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


# ---- precision and device ------------------------------------------------------------------------------
def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(device))


def resolve_precision(precision: Any, device: torch.device) -> str:
    """``auto``: bf16 autocast where the hardware runs it natively, else float32; gives ``bf16`` or ``32``."""
    value = str(precision).lower()
    if value in ("32", "32-true", "fp32", "float32"):
        return "32"
    if value in ("bf16", "bf16-mixed", "bfloat16"):
        return "bf16"
    if value != "auto":
        raise ToolError(f"precision must be auto, 32 or bf16, got {precision!r}")
    return "bf16" if auto_precision(device.type) == "bf16-mixed" else "32"  # float16 autocast: not here


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_engine(engine: Any) -> str:
    """``auto``, ``torch`` or ``onnxruntime`` (``None``: auto), else a ToolError saying what is accepted."""
    value = "auto" if engine is None else str(engine).lower()
    if value not in ENGINES:
        raise ToolError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if value == "onnxruntime" and not onnxruntime_available():
        raise ToolError("engine=onnxruntime needs onnxruntime: pip install onnxruntime")
    return value


def check_max_memory_mb(value: Any) -> float | None:
    """``None`` (the default budget) or a positive number of MB, else a ToolError."""
    if value in (None, "", "auto"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number > 0:
        raise ToolError(
            f"max_memory_mb must be a positive number of MB (or null for the default), got {value!r}"
        )
    return number


def check_batch_size(value: Any) -> int | None:
    """``None`` (chosen from the memory budget) or a positive integer, else a ToolError."""
    if value in (None, "", "auto"):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ToolError(
            f"batch_size must be a positive integer (or null: chosen from max_memory_mb), got {value!r}"
        )
    return number


class Predictor:
    """Normalised NCHW float images -> float32 logits, for any model format.

    Checkpoints run with ``engine`` (:func:`foodvision.engine.resolve_engine`; ``auto``: ONNX Runtime for
    float32 on a CPU, else PyTorch in ``torch.inference_mode`` with channels_last inputs and bf16 autocast
    where supported). Exported ``.onnx`` files always run with ONNX Runtime, TorchScript files with PyTorch.

    ``max_batch``: images per forward pass, chosen so that its working memory fits ``max_memory_mb``
    (default :func:`foodvision.engine.default_max_memory_mb`); :meth:`use_batch_size` sets it explicitly.
    Larger batches are run in chunks of ``max_batch``, so memory stays bounded whatever a caller passes.
    """

    def __init__(
        self,
        path: str | Path,
        device: str | None = "auto",
        precision: Any = "auto",
        engine: str | None = "auto",
        max_memory_mb: float | None = None,
    ):
        requested = check_engine(engine)
        self.max_memory_mb = check_max_memory_mb(max_memory_mb) or default_max_memory_mb()
        self.path = require_file(path, "model file")
        self.format = model_format(self.path)
        self.checkpoint: dict[str, Any] | None = None
        self.runner: OnnxRuntimeModule | None = None
        if self.format == "checkpoint":
            if requested == "onnxruntime":  # device/precision auto: the CPU float32 it runs
                device = "cpu" if device in (None, "auto") else device
                precision = "32" if str(precision).lower() == "auto" else precision
            self.device = resolve_device(device)
            self.precision = resolve_precision(precision, self.device)
            self.engine = resolve_engine(requested, self.device, self.precision)
            if self.engine == "onnxruntime" and (self.device.type != "cpu" or self.precision != "32"):
                raise ToolError(
                    f"engine=onnxruntime runs float32 on the CPU, not {self.device.type} "
                    f"{'bf16' if self.precision == 'bf16' else 'float32'}: use device=cpu precision=32, "
                    "or engine=torch"
                )
            model, self.info, self.checkpoint = load_checkpoint_model(self.path)
            if self.engine == "onnxruntime":
                self.model: Any = model.float()
                self.runner = self._onnxruntime(model, explicit=requested == "onnxruntime")
            if self.runner is None:
                self.engine = "torch"
                self.model = model.to(self.device, memory_format=torch.channels_last)
        else:
            self.device = torch.device("cpu") if self.format == "onnx" else resolve_device(device)
            self.engine = "onnxruntime" if self.format == "onnx" else "torch"
            if self.format == "onnx":
                self.model, self.info = _load_onnx(self.path)
            else:
                self.model, self.info = _load_torchscript(self.path, self.device)
            if requested not in ("auto", self.engine):
                log.warning("%s files run with %s; engine=%s ignored", self.format, self.engine, requested)
            requested_precision = resolve_precision(precision, self.device)
            if requested_precision != "32" and str(precision).lower() != "auto":
                log.warning("exported models run in float32; precision=%s ignored", precision)
            self.precision = "32"
        self.max_batch = self._batch_for_memory()

    def _batch_for_memory(self) -> int:
        """Images per forward pass that fit ``max_memory_mb``, from the network's working memory per image."""
        if self.runner is not None:
            return self.runner.max_batch
        size = self.preprocessing.image_size
        if self.format == "onnx":
            per_image = graph_bytes_per_image(self.path.read_bytes())
        elif self.format == "checkpoint":
            per_image = module_bytes_per_image(self.model, torch.zeros(1, 3, size, size, device=self.device))
            if per_image and self.precision == "bf16":
                per_image //= 2  # activations in bf16 under autocast
        else:
            per_image = None  # TorchScript: no estimate, the fixed fallback
        return batch_for_memory(per_image, self.max_memory_mb)

    def use_batch_size(self, batch_size: int | None) -> int:
        """The batch size to read images in: ``batch_size`` when given (then also the forward pass's, even
        beyond the memory budget: what the user asked for), else :attr:`max_batch`."""
        if batch_size:
            self.max_batch = int(batch_size)
            if self.runner is not None:
                self.runner.max_batch = self.max_batch
        return self.max_batch

    def _onnxruntime(self, model: nn.Module, explicit: bool) -> OnnxRuntimeModule | None:
        """``model`` exported (in memory) and loaded by ONNX Runtime; ``None`` (run it with PyTorch) where
        that fails and ONNX Runtime was only chosen by ``engine=auto``."""
        size = self.info.preprocessing.image_size
        try:
            return OnnxRuntimeModule(
                model,
                torch.zeros(1, 3, size, size),
                output_names=("logits",),
                max_memory_mb=self.max_memory_mb,
            )
        except Exception as error:  # noqa: BLE001 - the exporter and ORT raise many types
            if explicit:
                raise ToolError(
                    f"engine=onnxruntime cannot run {self.info.architecture} from {self.path}: "
                    f"{type(error).__name__}: {error}; use engine=torch"
                ) from error
            log.warning(
                "ONNX Runtime cannot run %s (%s: %s); running it with PyTorch",
                self.info.architecture,
                type(error).__name__,
                error,
            )
            return None

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing

    def describe(self) -> str:
        precision = "bf16 autocast" if self.precision == "bf16" else "float32"
        return (
            f"{self.path} ({self.format}): {self.info.architecture}, {self.info.num_classes} classes, "
            f"{self.preprocessing.image_size} px, {self.device.type} {precision} on {self.engine}"
        )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.format == "onnx":
            output = run_in_chunks(self.model, images.float().contiguous().numpy(), self.max_batch)[0]
            return torch.from_numpy(np.asarray(output, dtype=np.float32))
        size = self.preprocessing.image_size
        if self.runner is not None and tuple(images.shape[-2:]) == (size, size):
            return self.runner(images).float()  # exported at this size; other sizes run with PyTorch below
        if len(images) > self.max_batch:
            return torch.cat([self.logits(chunk) for chunk in images.split(self.max_batch)])
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model(images).float().cpu()


def predictor_from_config(cfg: Any, ckpt_path: str | Path) -> tuple[Predictor, int]:
    """A tool's model (``device``, ``precision``, ``engine``, ``max_memory_mb`` of its config) and the batch
    size it reads images in (``batch_size``, else what the memory budget allows); logs what it runs."""
    predictor = Predictor(
        ckpt_path,
        cfg.get("device", "auto"),
        cfg.get("precision", "auto"),
        cfg.get("engine", "auto"),
        max_memory_mb=cfg.get("max_memory_mb"),
    )
    batch_size = predictor.use_batch_size(check_batch_size(cfg.get("batch_size")))
    log.info("model: %s; batches of %d images", predictor.describe(), batch_size)
    return predictor, batch_size


# ---- batches of files ------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """Files -> ``(index, tensor or None, error)`` with the model's eval transform; a file that cannot be
    read yields its error instead of stopping the run."""

    def __init__(self, files: Sequence[str | Path], preprocessing: Preprocessing):
        self.files = [str(f) for f in files]
        self.transform = preprocessing.eval_transform()
        self.draft = (preprocessing.resize_size, preprocessing.resize_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.files[index]
        try:
            image = load_rgb(path, draft_size=self.draft)
            return index, self.transform(image), ""
        except BadImageError as error:
            return index, None, error.reason
        except FileNotFoundError:
            return index, None, "file not found"
        except Exception as error:  # noqa: BLE001 - e.g. PIL's DecompressionBombError: report, keep going
            return index, None, f"{type(error).__name__}: {error}"


def collate_files(
    items: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list]:
    good = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, e) for i, t, e in items if t is None]
    tensor = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], tensor, bad


@dataclass
class InferenceResult:
    """Logits of the files that could be read (rows in the order of ``indices``) and why others could not."""

    files: list[str]
    indices: list[int]
    logits: torch.Tensor
    failed: list[tuple[str, str]]
    seconds: float

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.float().softmax(dim=1)

    @property
    def images_per_second(self) -> float:
        return len(self.indices) / self.seconds if self.seconds > 0 else float("nan")


def iterate_batches(
    predictor: Predictor, files: Sequence[str | Path], batch_size: int | None, num_workers: int
) -> Iterator[tuple[list[int], torch.Tensor | None, list]]:
    """``(indices, logits or None, [(index, reason)])`` per batch of ``files``, in order. ``batch_size``
    ``None``: the predictor's memory-bounded batch (:meth:`Predictor.use_batch_size`)."""
    loader = DataLoader(
        ImageFiles(files, predictor.preprocessing),
        batch_size=predictor.use_batch_size(batch_size),
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_files,
    )
    for indices, images, bad in loader:
        yield indices, (predictor.logits(images) if images is not None else None), bad
        del images  # before the loader builds the next batch


@dataclass
class Batch:
    """One batch of :func:`stream_files`: logits of the files that could be read and why others could not."""

    indices: list[int]
    logits: torch.Tensor
    failed: list[tuple[str, str]]


@dataclass
class Stream:
    """Running totals of :func:`stream_files`, complete once the iteration has ended."""

    predicted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else float("nan")


def stream_files(
    predictor: Predictor,
    files: Sequence[str],
    batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "predict",
    stream: Stream | None = None,
) -> Iterator[Batch]:
    """Predict ``files`` batch by batch in their given order (so re-runs are identical), skipping unreadable
    ones: memory stays flat in the number of files. ``stream`` (when given) collects the totals."""
    stream = stream if stream is not None else Stream()
    started = time.perf_counter()
    empty = torch.empty(0, predictor.info.num_classes)
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch_indices, logits, bad in iterate_batches(predictor, files, batch_size, num_workers):
            failed = [(files[index], reason) for index, reason in bad]
            for name, reason in failed:
                log.warning("skipping %s: %s", name, reason)
            stream.failed += failed
            stream.predicted += len(batch_indices) if logits is not None else 0
            yield Batch(
                batch_indices if logits is not None else [], logits if logits is not None else empty, failed
            )
            bar.update(len(batch_indices) + len(bad))
    stream.seconds = time.perf_counter() - started


def infer_files(
    predictor: Predictor,
    files: Sequence[str | Path],
    batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "predict",
) -> InferenceResult:
    """Predict ``files`` in their given order (so re-runs are identical), skipping unreadable ones; all the
    logits at once (:func:`stream_files` gives them batch by batch)."""
    files = [str(f) for f in files]
    stream = Stream()
    indices: list[int] = []
    chunks: list[torch.Tensor] = []
    for batch in stream_files(predictor, files, batch_size, num_workers, progress, desc, stream):
        indices += batch.indices
        chunks.append(batch.logits)
    logits = torch.cat(chunks) if chunks else torch.empty(0, predictor.info.num_classes)
    return InferenceResult(files, indices, logits, stream.failed, stream.seconds)


def measure_throughput(
    model: nn.Module, image_size: int, precision: str = "32", batch_size: int = 32, iterations: int = 3
) -> float:
    """Images per second of a forward pass on a fixed random batch (CPU, channels_last, after one warm-up)."""
    device = torch.device("cpu")
    model = model.eval().to(device, memory_format=torch.channels_last)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, precision):
        model(images)
        started = time.perf_counter()
        for _ in range(iterations):
            model(images)
        seconds = time.perf_counter() - started
    return batch_size * iterations / seconds
