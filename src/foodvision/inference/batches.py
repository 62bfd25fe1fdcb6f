"""Photos read in batches for a :class:`foodvision.inference.predictor.Predictor`: unreadable files are skipped and
reported, logits come batch by batch (:func:`stream_files`) or all at once (:func:`infer_files`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.transforms import Preprocessing
from foodvision.inference.predictor import Predictor

log = logging.getLogger(__name__)


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
    """``(indices, logits or None, [(index, reason)])`` per batch of ``files``, in order. ``batch_size``: images
    read per batch (``None``: the predictor's :attr:`~Predictor.max_batch`). The forward pass runs in chunks of
    ``max_batch`` whatever is read, and the predictor is left as it was: only
    :meth:`Predictor.use_batch_size` (a tool's explicit ``batch_size``) changes what one forward pass takes."""
    loader = DataLoader(
        ImageFiles(files, predictor.preprocessing),
        batch_size=batch_size or predictor.max_batch,
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
