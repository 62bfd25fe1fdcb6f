"""Photos read in batches for a :class:`foodvision.inference.predictor.Predictor`: unreadable files are skipped and
reported, logits come batch by batch (:func:`stream_files`) or all at once (:func:`infer_files`).

Two ways to read them, with the same results (pixels equal to float rounding on a CPU, to JPEG decoder
rounding with nvJPEG) and the same reports: loader workers decode and transform each file with PIL
(:class:`ImageFiles`), or they only read its bytes (:class:`EncodedFiles`) and the batch is decoded and
transformed as tensors on the model's device (:func:`decode_eval_batch`: nvJPEG on CUDA), chosen by default
where the model runs on CUDA with PyTorch (:func:`batched_decode_default`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from foodvision.data.batched import BatchedTransform, decode_batch
from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.transforms import Preprocessing
from foodvision.inference.predictor import Predictor

log = logging.getLogger(__name__)

# Photos decoded at a time by decode_eval_batch: what bounds the memory of the full-size decoded photos
# (on CUDA a photo up to 8x the working size is decoded whole: 2048 x 2730 px, 17 MB) whatever the batch.
DECODE_CHUNK = 64


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
        except Exception as error:  # noqa: BLE001 - e.g. PIL's DecompressionBombError: report, keep going
            return index, None, failure_reason(error)


def failure_reason(error: Exception) -> str:
    """Why a file could not be read, as the reports (``failed``) say it."""
    if isinstance(error, BadImageError):
        return error.reason
    if isinstance(error, FileNotFoundError):
        return "file not found"
    return f"{type(error).__name__}: {error}"


def load_failure(path: str, draft: int | None) -> Exception | None:
    """What the PIL path raises reading ``path`` (``None``: it reads it). The batched path asks this of
    the few files it could not read or decode, so that their errors are the PIL path's, word for word."""
    try:
        load_rgb(path, draft_size=(draft, draft) if draft else None)
    except Exception as error:  # noqa: BLE001 - whatever the decoder raises makes the file bad
        return error
    return None


class EncodedFiles(Dataset):
    """Files -> ``(index, bytes as a 1-D uint8 tensor or None, error)``: all a loader worker does on the
    batched path (the decode and transform run batch-wise on the model's device)."""

    def __init__(self, files: Sequence[str | Path], draft: int | None = None):
        self.files = [str(f) for f in files]
        self.draft = draft

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.files[index]
        try:
            with open(path, "rb") as handle:
                data = bytearray(handle.read())
        except Exception as error:  # noqa: BLE001 - a file that cannot be read is reported, as on the PIL path
            return index, None, failure_reason(load_failure(path, self.draft) or error)
        payload = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return index, payload, ""


def collate_encoded(
    items: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], list[torch.Tensor], list]:
    good = [(i, p) for i, p, _ in items if p is not None]
    return [i for i, _ in good], [p for _, p in good], [(i, e) for i, p, e in items if p is None]


def decode_eval_batch(
    payloads: Sequence[torch.Tensor],
    names: Sequence[str],
    transform: BatchedTransform,
    device: torch.device | str,
    draft: int | None,
) -> tuple[torch.Tensor | None, list[int], list[tuple[int, Exception]]]:
    """Files' bytes -> ``(normalised eval images [K, 3, S, S] on device or None, positions kept,
    [(position, error)] of the others)``, :data:`DECODE_CHUNK` photos at a time
    (:func:`foodvision.data.batched.decode_batch`: one batched JPEG decode, nvJPEG on CUDA, a per-file CPU
    fallback for other formats). A file it cannot decode gets the PIL path's own error
    (:func:`load_failure`), so that reports and logs name and explain it as they do there."""
    outputs: list[torch.Tensor] = []
    kept: list[int] = []
    failed: list[tuple[int, Exception]] = []
    for start in range(0, len(payloads), DECODE_CHUNK):
        chunk = range(start, min(start + DECODE_CHUNK, len(payloads)))
        images, positions = decode_batch(
            [payloads[i] for i in chunk], [names[i] for i in chunk], device, draft, skip_bad=True
        )
        if images:
            outputs.append(transform(images))
        kept += [chunk[p] for p in positions]
        for position in sorted(set(range(len(chunk))) - set(positions)):
            name = names[chunk[position]]
            error = load_failure(name, draft) or BadImageError(name, "could not be decoded in its batch")
            failed.append((chunk[position], error))
        del images
    return (torch.cat(outputs) if outputs else None), kept, failed


def batched_decode_default(predictor: Predictor) -> bool:
    """Whether :func:`stream_files` decodes batch-wise on the model's device unless told: where the model
    runs on CUDA with PyTorch (nvJPEG; PIL in CPU workers starves the GPU). On a CPU the PIL path stays."""
    return predictor.engine == "torch" and predictor.device.type == "cuda"


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
    predictor: Predictor,
    files: Sequence[str | Path],
    batch_size: int | None,
    num_workers: int,
    batched_decode: bool | None = None,
) -> Iterator[tuple[list[int], torch.Tensor | None, list]]:
    """``(indices, logits or None, [(index, reason)])`` per batch of ``files``, in order. ``batch_size``: images
    read per batch (``None``: the predictor's :attr:`~Predictor.max_batch`). The forward pass runs in chunks of
    ``max_batch`` whatever is read, and the predictor is left as it was: only
    :meth:`Predictor.use_batch_size` (a tool's explicit ``batch_size``) changes what one forward pass takes.
    ``batched_decode``: workers read bytes and the batch is decoded on the model's device (``None``:
    :func:`batched_decode_default`)."""
    if batched_decode is None:
        batched_decode = batched_decode_default(predictor)
    pre = predictor.preprocessing
    loader = DataLoader(
        EncodedFiles(files, pre.resize_size) if batched_decode else ImageFiles(files, pre),
        batch_size=batch_size or predictor.max_batch,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_encoded if batched_decode else collate_files,
    )
    if not batched_decode:
        for indices, images, bad in loader:
            yield indices, (predictor.logits(images) if images is not None else None), bad
            del images  # before the loader builds the next batch
        return
    transform = BatchedTransform.from_config(pre, None, train=False)
    for indices, payloads, bad in loader:
        names = [str(files[i]) for i in indices]
        images, kept, failed = decode_eval_batch(
            payloads, names, transform, predictor.device, pre.resize_size
        )
        del payloads
        if failed:  # in index order, as the PIL path reports them
            bad = sorted(bad + [(indices[p], failure_reason(error)) for p, error in failed])
        yield [indices[p] for p in kept], (predictor.logits(images) if images is not None else None), bad
        del images


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
    batched_decode: bool | None = None,
) -> Iterator[Batch]:
    """Predict ``files`` batch by batch in their given order (so re-runs are identical), skipping unreadable
    ones: memory stays flat in the number of files. ``stream`` (when given) collects the totals.
    ``batched_decode``: loader workers only read the files and each batch is decoded and transformed on the
    model's device (``None``: on CUDA with PyTorch, :func:`batched_decode_default`); same results, same
    reports."""
    stream = stream if stream is not None else Stream()
    started = time.perf_counter()
    empty = torch.empty(0, predictor.info.num_classes)
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch_indices, logits, bad in iterate_batches(
            predictor, files, batch_size, num_workers, batched_decode
        ):
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
    batched_decode: bool | None = None,
) -> InferenceResult:
    """Predict ``files`` in their given order (so re-runs are identical), skipping unreadable ones; all the
    logits at once (:func:`stream_files` gives them batch by batch; ``batched_decode`` as there)."""
    files = [str(f) for f in files]
    stream = Stream()
    indices: list[int] = []
    chunks: list[torch.Tensor] = []
    for batch in stream_files(
        predictor, files, batch_size, num_workers, progress, desc, stream, batched_decode
    ):
        indices += batch.indices
        chunks.append(batch.logits)
    logits = torch.cat(chunks) if chunks else torch.empty(0, predictor.info.num_classes)
    return InferenceResult(files, indices, logits, stream.failed, stream.seconds)
