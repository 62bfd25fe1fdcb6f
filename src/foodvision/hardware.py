"""What the machine can do fast: decides ``precision=auto`` for training and inference alike."""

from __future__ import annotations

import os
from pathlib import Path

import torch


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
