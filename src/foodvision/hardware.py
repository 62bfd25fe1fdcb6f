"""What the machine can do fast: the one place that decides ``precision=auto`` and translates precisions
between Lightning's vocabulary (training: ``bf16-mixed``, ``32-true``) and the inference tools' (``bf16``, ``32``)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from foodvision.errors import ToolError

FLOAT32_NAMES = ("32", "32-true", "fp32", "float32")
BF16_NAMES = ("bf16", "bf16-mixed", "bfloat16")


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512_BF16 or AMX).

    Elsewhere oneDNN emulates bf16: measured here on an AVX-512 Xeon without them, bf16 matrix products ran
    at 62 GFLOP/s against 318 in float32 (``make bench``), although ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` says True.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(device_type: str) -> str:
    """What ``precision=auto`` means on this hardware, in Lightning's words; the one place that decides it
    (training and the inference tools only translate it to their own vocabulary).

    bf16-mixed on GPUs with bf16 and on CPUs with bf16 instructions; 16-mixed on older GPUs; else 32-true.
    """
    if device_type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask: what a container or `taskset` allows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def trainer_precision(precision: Any, accelerator: str) -> Any:
    """``trainer.precision``: ``auto`` becomes :func:`auto_precision` for the device the trainer will use."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return auto_precision("cuda" if on_gpu else "cpu")


def inference_precision(precision: Any, device: torch.device) -> str:
    """An inference tool's ``precision`` as ``bf16`` or ``32``: ``auto`` is bf16 autocast where the hardware
    runs it natively (float16 autocast is not offered); a ToolError for anything else."""
    value = str(precision).lower()
    if value in FLOAT32_NAMES:
        return "32"
    if value in BF16_NAMES:
        return "bf16"
    if value != "auto":
        raise ToolError(f"precision must be auto, 32 or bf16, got {precision!r}")
    return "bf16" if auto_precision(device.type) == "bf16-mixed" else "32"


def inference_precision_of_trainer(trainer_precision: Any) -> str:
    """The trainer's resolved precision for evaluating what it trained: bf16 stays bf16, anything else
    (32-true, 16-mixed) is evaluated in float32."""
    return "bf16" if str(trainer_precision).startswith("bf16") else "32"


def is_float32(precision: Any) -> bool:
    return str(precision).lower() in FLOAT32_NAMES


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
