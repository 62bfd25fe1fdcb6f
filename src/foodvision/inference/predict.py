"""`python predict.py ckpt_path=... inputs=[photo.jpg,folder/,'glob/*.png']`: top-k classes of each photo.

Needs only the model file (a training checkpoint or an exported .pt/.onnx), no training data. Folders are
searched recursively for image files; files that cannot be read are reported and skipped. Exit code 0 when
every input was predicted, 1 when some failed, 2 when nothing could be predicted.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from foodvision.atomic import DiskWriteError, atomic_open, describe_os_error, disk_error
from foodvision.cli import EXPECTED_ERRORS, required
from foodvision.config.check import ConfigError
from foodvision.data.images import IMAGE_EXTENSIONS, is_image_file
from foodvision.errors import ToolError
from foodvision.inference.batches import Stream, stream_files
from foodvision.inference.calibration import Calibration, is_unknown
from foodvision.inference.predictor import predictor_from_config

log = logging.getLogger(__name__)

EXIT_OK, EXIT_SOME_FAILED, EXIT_NOTHING_PREDICTED = 0, 1, 2


@dataclass
class Inputs:
    """The files to predict, in order, and the inputs that gave none (missing path, empty folder, ...)."""

    files: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-image files found while searching folders


def _folder_images(folder: Path) -> tuple[list[str], list[str]]:
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            (images if is_image_file(name) else others).append(os.path.join(dirpath, name))
    return images, others


def collect_inputs(inputs: Sequence[str] | str) -> Inputs:
    """Expand files, folders (recursively: image files only) and glob patterns, keeping their order.

    A file named explicitly is always tried, whatever its extension; inside folders and glob matches only
    files with an image extension are taken.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    found = Inputs()
    seen: set[str] = set()

    def add(path: str) -> None:
        if path not in seen:
            seen.add(path)
            found.files.append(path)

    for item in map(str, inputs):
        path = Path(item).expanduser()
        if glob.has_magic(item) and not path.exists():
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                found.problems.append((item, "no files match this pattern"))
                continue
            images = []
            for match in matches:
                if os.path.isdir(match):
                    more, others = _folder_images(Path(match))
                    images += more
                    found.ignored += others
                elif is_image_file(match):
                    images.append(match)
                else:
                    found.ignored.append(match)
            if not images:
                found.problems.append((item, f"the {len(matches)} match(es) include no image files"))
            for image in images:
                add(image)
        elif path.is_dir():
            images, others = _folder_images(path)
            found.ignored += others
            if not images:
                what = (
                    f"only {len(others)} non-image file(s), e.g. {Path(others[0]).name}"
                    if others
                    else "no files"
                )
                found.problems.append(
                    (item, f"folder has no image files ({what}; looked for {', '.join(IMAGE_EXTENSIONS)})")
                )
            for image in images:
                add(image)
        elif path.is_file():
            add(str(path))
        else:
            found.problems.append((item, "no such file or folder"))
    return found


def top_k_rows(
    files: Sequence[str], indices: Sequence[int], probabilities: Any, class_names: Sequence[str], k: int
) -> list[dict[str, Any]]:
    k = max(1, min(int(k), len(class_names)))
    values, classes = probabilities.topk(k, dim=1)
    return [
        {
            "file": files[index],
            "predictions": [
                {"class": class_names[c], "probability": float(p)}
                for c, p in zip(row_classes, row_values, strict=True)
            ],
        }
        for index, row_classes, row_values in zip(indices, classes.tolist(), values.tolist(), strict=True)
    ]


UNKNOWN_ANSWER = "not sure"  # predict's answer to a photo below the model's unknown threshold


def mark_unknown(rows: Sequence[dict[str, Any]], logits: Any, calibration: Calibration) -> None:
    """``row["unknown"]`` for each row (of these calibrated logits) when the model has an unknown threshold
    (foodvision.inference.calibration); rows of a model without one get no such key."""
    if calibration.unknown_threshold is None:
        return
    for row, unknown in zip(rows, is_unknown(logits, calibration), strict=True):
        row["unknown"] = bool(unknown)


def format_table(rows: Sequence[dict[str, Any]], failed: Sequence[tuple[str, str]]) -> str:
    if not rows:
        table = ""
    else:
        k = len(rows[0]["predictions"])
        answers = "unknown" in rows[0]  # the model has an unknown threshold: an answer column first
        header = ["file"] + (["answer"] if answers else []) + [f"top-{i + 1}" for i in range(k)]
        name_width = max(len(p["class"]) for r in rows for p in r["predictions"])
        cells = [
            [r["file"]]
            + ([UNKNOWN_ANSWER if r["unknown"] else r["predictions"][0]["class"]] if answers else [])
            + [f"{p['class']:<{name_width}} {p['probability']:6.1%}" for p in r["predictions"]]
            for r in rows
        ]
        widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in [header, *cells]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        table = "\n".join(lines)
        unsure = sum(1 for r in rows if r.get("unknown"))
        if unsure:
            table += (
                f"\n\n{UNKNOWN_ANSWER} ({unsure} of {len(rows)}): below the model's unknown threshold (chosen on "
                "its validation photos), so probably none of its classes; the top guesses are shown anyway"
            )
    if failed:
        table += f"\n\nnot predicted ({len(failed)}):\n" + "\n".join(
            f"  {name}: {reason}" for name, reason in failed
        )
    return table.strip("\n")


class _Discarded(Exception):
    """Ends a :class:`PredictionWriter`'s temporary file without renaming it."""


class PredictionWriter:
    """Writes ``output=`` (.csv or .json) while predicting: rows as they come (:meth:`add`), the failed inputs
    at the end (:meth:`close`), so memory does not grow with the number of photos. The file is the same,
    byte for byte, as one written at once (``json.dumps(document, indent=2)``; CSV: a header with the top-k
    columns of the first row, one line per photo, then one per failure); it is written under a temporary
    name of this process (:func:`foodvision.atomic.atomic_open`) and renamed when complete."""

    def __init__(self, path: Path, model: str):
        self.path = Path(path)
        self.json = self.path.suffix.lower() == ".json"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DiskWriteError(describe_os_error(error, self.path)) from error
        self._file = contextlib.ExitStack()
        self.handle = self._file.enter_context(atomic_open(self.path, "w", newline=""))
        self.csv = csv.writer(self.handle)
        self.k: int | None = None  # top-k columns of the CSV, from the first row (1 when there is none)
        self.unknown = False  # an "unknown" column, from the first row
        self.rows = 0
        if self.json:
            with self._writing():
                self.handle.write('{\n  "model": ' + json.dumps(model) + ',\n  "predictions": [')

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write that fails (full disk) discards the file and names it (not the temporary name)."""
        try:
            yield
        except OSError as error:
            self.discard()
            raise DiskWriteError(describe_os_error(error, self.path)) from error

    def _header(self, k: int, unknown: bool = False) -> None:
        self.k = k
        self.unknown = unknown  # an "unknown" column (true/false) when the model has an unknown threshold
        if not self.json:
            columns = [f"{what}_{i + 1}" for i in range(k) for what in ("class", "probability")]
            self.csv.writerow(["file", *columns, *(["unknown"] if unknown else []), "error"])

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        with self._writing():
            self._add(rows)

    def _add(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            if self.k is None:
                self._header(len(row["predictions"]), "unknown" in row)
            if self.json:
                self.handle.write(
                    ("\n" if not self.rows else ",\n") + textwrap.indent(json.dumps(row, indent=2), "    ")
                )
            else:
                cells = [v for p in row["predictions"] for v in (p["class"], f"{p['probability']:.6f}")]
                flag = ["true" if row.get("unknown") else "false"] if self.unknown else []
                self.csv.writerow([row["file"], *cells, *flag, ""])
            self.rows += 1

    def close(self, failed: Sequence[tuple[str, str]]) -> None:
        with self._writing():
            self._tail(failed)
        self._file.close()  # renamed over the final name

    def _tail(self, failed: Sequence[tuple[str, str]]) -> None:
        if self.k is None:
            self._header(1)
        if self.json:
            self.handle.write("\n  ]" if self.rows else "]")
            listed = [{"file": name, "error": reason} for name, reason in failed]
            self.handle.write("," + json.dumps({"failed": listed}, indent=2)[1:-1] + "}\n")
        else:
            for name, reason in failed:
                self.csv.writerow([name, *([""] * (2 * (self.k or 1) + self.unknown)), reason])

    def discard(self) -> None:
        """After an error: no half-written file is left behind (an earlier output file stays)."""
        self._file.__exit__(_Discarded, _Discarded(), None)


def write_output(
    path: Path, rows: Sequence[dict[str, Any]], failed: Sequence[tuple[str, str]], model: str
) -> None:
    """All at once (the same file as :class:`PredictionWriter` writes as it goes)."""
    writer = PredictionWriter(path, model)
    writer.add(rows)
    writer.close(failed)


def predict(cfg: DictConfig) -> tuple[int, list[dict[str, Any]], list[tuple[str, str]]]:
    """Predict ``cfg.inputs``; returns ``(exit code, rows, failed)`` and prints the table."""
    ckpt_path = required(cfg, "ckpt_path", "ckpt_path=<run>/checkpoints/last.ckpt (or model.pt / model.onnx)")
    raw = cfg.get("inputs")
    raw = OmegaConf.to_container(raw) if isinstance(raw, ListConfig) else raw
    if raw in (None, "", []):
        raise ToolError("inputs is required, e.g. inputs=[photo.jpg,folder/,'photos/*.png']")
    top_k = cfg.get("top_k", 3)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} (must be an integer >= 1: how many classes to list per photo)")
    output = Path(cfg.output) if cfg.get("output") else None
    if output is not None and output.suffix.lower() not in (".csv", ".json"):
        raise ToolError(f"output must end in .csv or .json, got {output}")
    predictor, batch_size = predictor_from_config(cfg, ckpt_path)
    found = collect_inputs(raw)
    if found.ignored:
        log.info("ignored %d non-image file(s) in folders, e.g. %s", len(found.ignored), found.ignored[0])
    failed = list(found.problems)
    rows: list[dict[str, Any]] = []
    # Batch by batch: the output file is written as the predictions come (no logits are kept).
    writer = PredictionWriter(output, str(predictor.path)) if output is not None else None
    try:
        if found.files:
            stream = Stream()
            for batch in stream_files(
                predictor,
                found.files,
                batch_size=batch_size,
                num_workers=int(cfg.get("num_workers") or 0),
                progress=bool(cfg.get("progress", True)) and len(found.files) > 1,
                stream=stream,
            ):
                if batch.indices:
                    probabilities = batch.logits.float().softmax(dim=1)
                    new = top_k_rows(
                        found.files, batch.indices, probabilities, predictor.class_names, cfg.get("top_k", 3)
                    )
                    mark_unknown(new, batch.logits, predictor.calibration)
                    rows += new
                    if writer is not None:
                        writer.add(new)
            failed += stream.failed
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    print(format_table(rows, failed), flush=True)
    if writer is not None:
        writer.close(failed)
        print(f"\nwrote {output}", flush=True)
    if not rows:
        print(
            "error: nothing could be predicted" + (": no inputs found" if not found.files else ""),
            file=sys.stderr,
        )
        return EXIT_NOTHING_PREDICTED, rows, failed
    return (EXIT_SOME_FAILED if failed else EXIT_OK), rows, failed


def run(cfg: DictConfig) -> int:
    """Exit code of a predict run; known errors (bad model file, ...) print one line and give 2."""
    try:
        return predict(cfg)[0]
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_NOTHING_PREDICTED
    except Exception as error:  # a full disk or read-only folder met by a writer that is not ours
        disk = disk_error(error)
        if disk is None:
            raise
        print(f"error: {disk}", file=sys.stderr, flush=True)
        return EXIT_NOTHING_PREDICTED
