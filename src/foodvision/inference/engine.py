"""Where a frozen (inference-only) network runs: PyTorch eager or ONNX Runtime.

On a CPU, ONNX Runtime runs the same float32 network several times faster than PyTorch eager (it fuses
convolution, BatchNorm and activation and has better depthwise kernels): MobileNetV2 at 224 px, batch 64,
2 cores measured 240 images/s against 61 for eager channels_last and 35 for eager NCHW, with logits equal
within 1e-4. Nothing is lost by it: the module is exported from its current weights, in memory, each time
it is needed (a second or two), so there is no second copy of a model to keep in sync.

Memory: ONNX Runtime's CPU arena keeps the largest working set it ever needed, and its memory patterns
pre-plan a block per input shape: eval.py's batches of 256 photos at 256 px (test-time flip) reached 14 GB
peak RSS. Here every call runs in chunks of at most ``max_batch`` images, chosen from a memory budget
(``max_memory_mb``; default :data:`DEFAULT_MAX_MEMORY_MB`, or ``$FOODVISION_INFERENCE_MAX_MEMORY_MB``) and the
network's working memory per image, estimated from the exported graph (:func:`graph_bytes_per_image`).
With chunks of one size the arena stays at one chunk's working set (measured flat over a whole eval; with
the arena off, glibc's heap fragmented and RSS crept up by ~0.5 GB over 1,250 photos); memory patterns are
off. Results do not depend on the chunking: each image is computed on its own.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from foodvision.hardware import is_float32

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
# Working memory of one forward pass (activations, inputs and outputs of a chunk), in MB: what a laptop can
# spare beside the ~1.2 GB that importing torch, torchvision, timm and Lightning and the model take. Bounds
# the images per ONNX Runtime / PyTorch-on-CPU run and the batch size eval/predict pick by default.
# MobileNetV2 at 256 px with test-time flip: 7 images (eval.py: 1.44 GB peak RSS in all).
DEFAULT_MAX_MEMORY_MB = 256
MAX_MEMORY_ENV = "FOODVISION_INFERENCE_MAX_MEMORY_MB"
# Measured: ONNX Runtime's arena grows by ~31 MB per image of MobileNetV2 at 256 px with flip (chunks of 10:
# +315 MB; of 15: +460 MB), 2.3x the 13.4 MB liveness estimate of graph_bytes_per_image (layout reorders,
# the arena's power-of-two blocks); rounded up.
GRAPH_OVERHEAD = 2.5
LARGEST_AUTO_BATCH = 256


def default_max_memory_mb() -> float:
    """``$FOODVISION_INFERENCE_MAX_MEMORY_MB`` when set, else :data:`DEFAULT_MAX_MEMORY_MB`."""
    value = os.environ.get(MAX_MEMORY_ENV, "").strip()
    if not value:
        return float(DEFAULT_MAX_MEMORY_MB)
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"${MAX_MEMORY_ENV} must be a number of MB, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"${MAX_MEMORY_ENV} must be positive, got {value!r}")
    return number


def graph_bytes_per_image(model: bytes | object) -> int | None:
    """Peak working memory of one image through an ONNX graph (bytes): tensors are live from the node that
    makes them to their last consumer, in the graph's order; weights are not counted. ``None`` where the
    shapes cannot be inferred (then callers fall back to a fixed batch)."""
    try:
        import onnx
        from onnx import shape_inference

        proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
        graph = shape_inference.infer_shapes(proto).graph
    except Exception as error:  # noqa: BLE001 - a missing onnx package or an unusual graph: no estimate
        log.debug("no memory estimate of the ONNX graph: %s", error)
        return None
    itemsize = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}
    sizes: dict[str, int] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        count = 1
        for dim in list(tensor.shape.dim)[1:]:  # the first axis is the batch
            count *= dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1
        sizes[info.name] = count * itemsize.get(tensor.elem_type, 4)
    weights = {init.name for init in graph.initializer}
    last_use = {name: i for i, node in enumerate(graph.node) for name in node.input}
    live = {info.name: sizes.get(info.name, 0) for info in graph.input if info.name not in weights}
    peak = sum(live.values())
    for i, node in enumerate(graph.node):
        for name in node.output:
            live[name] = sizes.get(name, 0)
        peak = max(peak, sum(live.values()))
        for name in node.input:
            if last_use.get(name) == i:
                live.pop(name, None)
    return peak or None


def module_bytes_per_image(module: nn.Module, example: torch.Tensor) -> int | None:
    """Working memory of one image through ``module`` run by PyTorch (bytes): the largest input + output of
    any leaf module in a forward pass of ``example`` (one image), a lower bound much like the graph
    estimate; ``None`` when that forward fails."""
    peak = 0
    modes = {m: m.training for m in module.modules()}  # eval for the probe (no BatchNorm update), restored

    def hook(_: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal peak
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        peak = max(peak, sum(t.numel() * t.element_size() for t in tensors) // max(1, len(example)))

    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    module.eval()
    try:
        with torch.inference_mode():
            module(example)
    except Exception as error:  # noqa: BLE001 - no estimate; callers use a fixed batch
        log.debug("no memory estimate of the module: %s", error)
        return None
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return peak or None


def batch_for_memory(
    bytes_per_image: float | None, max_memory_mb: float | None = None, fallback: int = 32
) -> int:
    """Images per forward pass that fit ``max_memory_mb`` (default: :func:`default_max_memory_mb`) at
    ``bytes_per_image`` working memory each (times :data:`GRAPH_OVERHEAD`); 1 to 256."""
    if not bytes_per_image:
        return fallback
    budget = (max_memory_mb or default_max_memory_mb()) * 2**20
    return int(max(1, min(LARGEST_AUTO_BATCH, budget // (bytes_per_image * GRAPH_OVERHEAD))))


def session_options(threads: int | None = None) -> object:
    """ONNX Runtime CPU session options of every session foodvision opens: the memory arena on (callers run
    chunks of one size, so it stays at one chunk's working set; see the module docstring), no memory
    patterns, no busy-waiting between runs (the data loader's workers need those cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def release_free_memory() -> None:
    """Hand memory that is free but still held by the C allocator back to the system (glibc ``malloc_trim``):
    the exporter leaves a few hundred MB of it behind. A no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_in_chunks(session: object, images: np.ndarray, max_batch: int) -> list[np.ndarray]:
    """``session.run`` on at most ``max_batch`` images at a time; the outputs concatenated."""
    name = session.get_inputs()[0].name  # type: ignore[attr-defined]
    if len(images) <= max_batch:
        return list(session.run(None, {name: images}))  # type: ignore[attr-defined]
    parts = [session.run(None, {name: images[i : i + max_batch]}) for i in range(0, len(images), max_batch)]  # type: ignore[attr-defined]
    return [np.concatenate([part[k] for part in parts]) for k in range(len(parts[0]))]


class ChunkedForward:
    """``forward`` (images -> a tensor or a tuple of tensors) on at most ``max_batch`` images at a time, the
    outputs concatenated: PyTorch's working memory bounded as ONNX Runtime's is."""

    def __init__(self, forward: Callable[[torch.Tensor], Any], max_batch: int):
        self.forward, self.max_batch = forward, int(max_batch)

    def __call__(self, images: torch.Tensor) -> Any:
        if len(images) <= self.max_batch:
            return self.forward(images)
        parts = [self.forward(chunk) for chunk in images.split(self.max_batch)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat([part[k] for part in parts]) for k in range(len(parts[0])))
        return torch.cat(parts)


def torch_max_batch(
    module: nn.Module, image_size: int, max_memory_mb: float | None = None, precision: str = "32"
) -> int:
    """Images per PyTorch forward pass of ``module`` that fit ``max_memory_mb`` (see :func:`batch_for_memory`);
    under bf16 autocast activations take half the bytes. (Measured on a CPU with AMX: bf16 chunks of 8 ran
    at 40 % of the speed of chunks of 32, the weights being cast on every call; float32 and ONNX Runtime lose
    nothing at 8.)"""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    per_image = module_bytes_per_image(module, example)
    if per_image and "bf16" in str(precision).lower():
        per_image //= 2
    return batch_for_memory(per_image, max_memory_mb)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(engine: str | None, device: torch.device | str, precision: str = "32") -> str:
    """``auto``: ONNX Runtime for float32 work on a CPU when it is installed, PyTorch otherwise (GPUs,
    bf16 on CPUs that run it natively)."""
    engine = str(engine or "auto").lower()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "onnxruntime" and not onnxruntime_available():
        raise ValueError("engine=onnxruntime needs onnxruntime: pip install onnxruntime")
    if engine != "auto":
        return engine
    on_cpu = torch.device(device).type == "cpu"
    float32 = is_float32(precision)
    return "onnxruntime" if on_cpu and float32 and onnxruntime_available() else "torch"


class OnnxRuntimeModule:
    """A float32 snapshot of ``module`` run by ONNX Runtime; called with a torch batch (any size), returns
    torch tensors (a tuple when the module returns several).

    A batch runs in chunks of at most ``max_batch`` images: given, or chosen so that one chunk's working
    memory fits ``max_memory_mb`` (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        example: torch.Tensor,
        output_names: Sequence[str] = ("output",),
        threads: int | None = None,
        max_batch: int | None = None,
        max_memory_mb: float | None = None,
    ):
        import onnxruntime as ort

        self.output_names = list(output_names)
        buffer = io.BytesIO()
        modes = {m: m.training for m in module.modules()}  # restored one by one: frozen BN stays in eval
        module.eval()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TorchScript-based exporter deprecation notes
                torch.onnx.export(
                    module,
                    (example.float().contiguous(),),
                    buffer,
                    dynamo=False,
                    input_names=["images"],
                    output_names=self.output_names,
                    dynamic_axes={name: {0: "batch"} for name in ["images", *self.output_names]},
                    opset_version=17,
                )
        finally:
            for m, training in modes.items():
                m.training = training
        graph = buffer.getvalue()
        del buffer
        self.session = ort.InferenceSession(
            graph, session_options(threads), providers=["CPUExecutionProvider"]
        )
        release_free_memory()
        self.input_name = self.session.get_inputs()[0].name
        self.bytes_per_image = graph_bytes_per_image(graph)
        self.max_memory_mb = max_memory_mb or default_max_memory_mb()
        self.max_batch = (
            int(max_batch) if max_batch else batch_for_memory(self.bytes_per_image, self.max_memory_mb)
        )
        log.debug(
            "ONNX Runtime: %s per image, up to %d images per run",
            f"{self.bytes_per_image / 2**20:.1f} MB" if self.bytes_per_image else "unknown",
            self.max_batch,
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        array = images.detach().float().cpu().contiguous().numpy()
        outputs = [
            torch.from_numpy(np.asarray(o)) for o in run_in_chunks(self.session, array, self.max_batch)
        ]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def onnxruntime_or_none(
    module: nn.Module,
    example: torch.Tensor,
    output_names: Sequence[str],
    requested: str,
    max_memory_mb: float | None = None,
) -> OnnxRuntimeModule | None:
    """``OnnxRuntimeModule`` of ``module``; where export or loading fails, ``None`` (run it with PyTorch)
    when ONNX Runtime was only chosen by ``auto``, else the error."""
    try:
        return OnnxRuntimeModule(module, example, output_names, max_memory_mb=max_memory_mb)
    except Exception as error:  # noqa: BLE001 - the exporter and ORT raise many types
        if str(requested).lower() == "onnxruntime":
            raise
        log.warning("ONNX Runtime cannot run this model (%s: %s); using PyTorch", type(error).__name__, error)
        return None
