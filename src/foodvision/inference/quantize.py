"""``python export.py ckpt_path=... format=onnx quantize=int8``: an INT8 ONNX model for CPU inference.

ONNX Runtime's static quantization (``onnxruntime.quantization.quantize_static``) of the float32 export:
weights per output channel (int8, symmetric) and activations per tensor (uint8), in QDQ form, which ONNX
Runtime fuses into integer convolutions (VNNI ``vpdpbusd`` on CPUs that have it: AVX512-VNNI, AVX-VNNI,
AMX). Activation ranges come from a few hundred training photos (``calibration_images``, a seeded sample
of the run's train split) run through the model's own preprocessing (:class:`PhotoCalibration`); the graph
is first pre-processed (``quant_pre_process``: shape inference, BatchNorm folded into convolutions).

The result is checked against the float32 model it was made from: top-1 agreement (and the accuracy of
both) on the run's val split, printed, returned and saved in the file's ``foodvision.json`` metadata
(``quantization``). The file takes and gives float32 tensors like any foodvision ONNX export, so eval.py,
predict.py, serve.py and an exported app's ``app.py`` run it unchanged.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from foodvision.atomic import write_with
from foodvision.cli import required
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.roots import resolve_eval_data
from foodvision.errors import ToolError
from foodvision.inference.checkpoints import META_KEY, ModelInfo, load_onnx_file, run_dir_of
from foodvision.inference.engine import session_options
from foodvision.inference.export import default_output

log = logging.getLogger(__name__)

MODES = ("int8",)


def _quantization_api() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError as error:
        raise ToolError("quantize=int8 needs onnxruntime: pip install 'foodvision[onnx]'") from error
    return quantization


def output_paths(cfg: DictConfig, ckpt_path: Path) -> tuple[Path, Path]:
    """(INT8 file, float32 file it is made from): ``output`` (default ``<run>/export/<ckpt>-int8.onnx``) and
    the float32 export beside it (``<ckpt>.onnx``, or ``<output stem>-float32.onnx`` for a given output)."""
    if cfg.get("output"):
        int8 = Path(cfg.output).expanduser()
        return int8, int8.with_name(f"{int8.stem}-float32.onnx")
    plain = default_output(ckpt_path, "onnx")
    return plain.with_name(f"{plain.stem}-int8.onnx"), plain


def photo_datasets(cfg: DictConfig, ckpt_path: Path, info: ModelInfo) -> Any:
    """The run's data (its ``config.yaml``, or ``data.*`` overrides, as eval.py finds it) with the model's
    preprocessing."""
    data_args, _ = resolve_eval_data(cfg, run_dir_of(ckpt_path))
    data_args = {k: v for k, v in data_args.items() if k != "_target_"}
    data_args.update(num_workers=0, augment=None)
    datamodule = FoodDataModule(**data_args)
    datamodule.discover()
    datamodule.preprocessing = info.preprocessing
    return datamodule


def _batches(dataset: Any, indices: list[int], batch_size: int) -> Any:
    """Float32 NCHW numpy batches (and labels) of ``dataset[indices]``; unreadable photos are skipped."""
    images, labels = [], []
    for index in indices:
        item = dataset[index]
        if item is None:
            continue
        image, label = item
        images.append(image.float().numpy())
        labels.append(int(label))
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(labels)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels)


def calibration_reader(dataset: Any, indices: list[int], input_name: str, batch_size: int = 16) -> Any:
    """A ``CalibrationDataReader`` over ``dataset[indices]`` (preprocessed photos), ``batch_size`` at a time."""
    quantization = _quantization_api()

    class PhotoCalibration(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = _batches(dataset, indices, batch_size)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch[0]}

    return PhotoCalibration()


def sample_indices(count: int, wanted: int | None, seed: int) -> list[int]:
    """``wanted`` indices of ``range(count)`` (all with ``None``), a seeded sample in a seeded order."""
    indices = list(range(count))
    random.Random(seed).shuffle(indices)
    return sorted(indices if wanted is None else indices[: int(wanted)])


def quantize_onnx(float_path: Path, output: Path, reader: Any, per_channel: bool = True) -> None:
    """Pre-process and statically quantize ``float_path`` into ``output`` (QDQ, int8 weights per channel,
    uint8 activations, MinMax ranges from ``reader``)."""
    quantization = _quantization_api()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per copied bias at INFO
    try:
        _quantize(quantization, float_path, output, reader, per_channel)
    finally:
        root.setLevel(level)


def _quantize(quantization: Any, float_path: Path, output: Path, reader: Any, per_channel: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="foodvision-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        quantization.quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_static(
            str(prepared),
            str(output),
            reader,
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def compare_top1(float_path: Path, int8_path: Path, dataset: Any, indices: list[int]) -> dict[str, Any]:
    """Top-1 agreement of the two models on ``dataset[indices]``, the accuracy of each, and their speed."""
    sessions = {"float32": _session(float_path), "int8": _session(int8_path)}
    name = sessions["float32"].get_inputs()[0].name
    predictions: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    seconds = dict.fromkeys(sessions, 0.0)
    truth = []
    for images, labels in _batches(dataset, indices, 32):
        if not truth:  # warm-up: the first run of a session plans its kernels
            for session in sessions.values():
                session.run(None, {name: images})
        truth.append(labels)
        for key, session in sessions.items():
            started = time.perf_counter()
            logits = session.run(None, {name: images})[0]
            seconds[key] += time.perf_counter() - started
            predictions[key].append(logits.argmax(axis=1))
    if not truth:
        raise ToolError("no readable photo to compare the INT8 model with the float32 one")
    labels = np.concatenate(truth)
    top1 = {k: np.concatenate(v) for k, v in predictions.items()}
    count = len(labels)
    return {
        "images": count,
        "top1_agreement": float((top1["float32"] == top1["int8"]).mean()),
        "acc_float32": float((top1["float32"] == labels).mean()),
        "acc_int8": float((top1["int8"] == labels).mean()),
        "images_per_second_float32": count / max(seconds["float32"], 1e-9),
        "images_per_second_int8": count / max(seconds["int8"], 1e-9),
    }


def write_metadata(source: Path, output: Path, extra: dict[str, Any]) -> None:
    """``source`` (the quantized graph) written to ``output`` with foodvision metadata: the float32 file's
    ``foodvision.json`` plus ``extra``."""
    import json

    import onnx

    proto = onnx.load(str(source))
    float_meta = extra.pop("_float_meta")
    meta = {**json.loads(float_meta), **extra}
    kept = [p for p in proto.metadata_props if p.key != META_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, indent=1)
    write_with(output, lambda temporary: onnx.save(proto, str(temporary)))


def export_int8(cfg: DictConfig, export_float: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
    """The float32 ONNX export (``export_float``, i.e. :func:`foodvision.inference.export.export_model`), then its INT8 model,
    calibrated and checked as the module docstring says."""
    mode = str(cfg.quantize).lower()
    if mode not in MODES:
        raise ToolError(f"quantize must be {' or '.join(MODES)} (or null), got {cfg.quantize!r}")
    if str(cfg.get("format", "torchscript")).lower() != "onnx":
        raise ToolError(
            f"quantize=int8 writes an ONNX model: add format=onnx (got format={cfg.get('format')})"
        )
    ckpt_path = Path(required(cfg, "ckpt_path", "ckpt_path=<run>/checkpoints/last.ckpt")).expanduser()
    int8_path, float_path = output_paths(cfg, ckpt_path)
    float_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(float_cfg):
        float_cfg.quantize = None
        float_cfg.output = str(float_path)
    float_result = export_float(float_cfg)

    session, info = load_onnx_file(float_path)
    input_name = session.get_inputs()[0].name
    float_meta = session.get_modelmeta().custom_metadata_map[META_KEY]
    del session
    datamodule = photo_datasets(cfg, ckpt_path, info)
    splits = datamodule.discover().splits
    seed = int(cfg.get("seed", 42))
    if not splits.get("train"):
        raise ToolError(f"{ckpt_path}: the run's train split has no photos to calibrate the INT8 model with")
    calibration = sample_indices(len(splits["train"]), int(cfg.calibration_images), seed)
    check_split = str(cfg.get("check_split", "val"))
    if not splits.get(check_split):
        raise ToolError(
            f"the run's {check_split} split (check_split) has no photos to check the INT8 model on"
        )
    check = sample_indices(len(splits[check_split]), cfg.get("check_images"), seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="foodvision-int8-") as folder:
        quantized = Path(folder) / "int8.onnx"
        reader = calibration_reader(datamodule.image_dataset("train"), calibration, input_name)
        quantize_onnx(float_path, quantized, reader, per_channel=bool(cfg.get("per_channel", True)))
        compared = compare_top1(float_path, quantized, datamodule.image_dataset(check_split), check)
        summary = {
            "mode": "int8 (ONNX Runtime static, QDQ, per-channel int8 weights, uint8 activations, MinMax)",
            "calibration_images": len(calibration),
            "calibration_split": "train",
            "check_split": check_split,
            **compared,
        }
        write_metadata(
            quantized,
            int8_path,
            {
                "_float_meta": float_meta,
                "format": "onnx",
                "quantization": summary,
                "float32_model": float_path.name,
            },
        )
    seconds = time.perf_counter() - started
    size = int8_path.stat().st_size / 1e6
    print(
        f"quantized to INT8: {int8_path} ({size:.1f} MB, float32 {float_result['size_mb']:.1f} MB; "
        f"{len(calibration)} calibration photos, {seconds:.0f} s)\n"
        f"  {check_split} split, {compared['images']} photos: top-1 agreement with float32 "
        f"{compared['top1_agreement']:.2%}; accuracy {compared['acc_int8']:.4f} (float32 {compared['acc_float32']:.4f}); "
        f"{compared['images_per_second_int8']:.0f} vs {compared['images_per_second_float32']:.0f} images/s "
        f"({torch.get_num_threads()} threads)\n"
        f"use it with: python predict.py ckpt_path={int8_path} inputs=[photo.jpg]",
        flush=True,
    )
    return {
        **float_result,
        "output": str(int8_path),
        "float32_output": str(float_path),
        "size_mb": size,
        "float32_size_mb": float_result["size_mb"],
        "quantization": summary,
    }
