"""``python -m foodvision.data catalogue``: one CSV row per file of a dataset tree, and a summary.

Every file is really decoded (``load``), so corrupt and truncated files show up as
``readable=false`` with the decoder's error, before they break a training run.
"""

from __future__ import annotations

import csv
import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

from PIL import Image
from tqdm import tqdm

from foodvision.atomic import atomic_open, ensure_dir
from foodvision.data.images import is_image_file
from foodvision.data.sources import DataLayoutError, class_folder_files, find_split_folder, read_food101_lists
from foodvision.data.splits import SPLITS

T = TypeVar("T")
R = TypeVar("R")

FLAT, SPLIT_TREE, FOOD101 = "flat class-per-folder tree", "train/validation/test tree", "Food-101 archive"
NOT_AN_IMAGE = "not an image file extension (training ignores it)"


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def parallel_map(
    function: Callable[[T], R], items: Sequence[T], workers: int, desc: str, unit: str = "file"
) -> list[R]:
    """``[function(item) for item in items]`` on a thread pool (PIL decodes without the GIL), in order,
    with a progress bar when stderr is a terminal."""
    bar = dict(total=len(items), desc=desc, unit=unit, disable=None, leave=False, mininterval=0.5)
    if workers <= 1 or len(items) < 2:
        return [function(item) for item in tqdm(items, **bar)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(function, items), **bar))


@dataclass
class ImageInfo:
    format: str = ""
    width: int | None = None
    height: int | None = None
    mode: str = ""
    channels: int | None = None
    bytes: int | None = None
    readable: bool = False
    error: str = ""


def inspect_image(path: str | Path) -> ImageInfo:
    """Format, stored size, mode and channels of ``path``, after decoding it completely.

    JPEGs are decoded in draft mode (DCT scaling): every block of the file is still read and decoded, so
    truncation and corrupt headers are caught, at a fraction of the cost. Sizes are the stored ones
    (before any EXIF rotation).
    """
    info = ImageInfo(format=Path(path).suffix.lower().lstrip("."))
    try:
        info.bytes = os.path.getsize(path)
        with Image.open(path) as image:
            info.format = image.format or info.format
            info.width, info.height = image.size
            info.mode = image.mode
            info.channels = len(image.getbands())
            if image.format == "JPEG":
                image.draft(None, (1, 1))
            image.load()
        info.readable = True
    except Exception as error:  # any decoder failure means the file is unusable
        info.error = f"{type(error).__name__}: {error}"
    return info


def detect_layout(root: Path) -> str:
    if (root / "meta" / "classes.txt").is_file() and (root / "images").is_dir():
        return FOOD101
    if any(find_split_folder(root, split) for split in SPLITS):
        return SPLIT_TREE
    return FLAT


@dataclass
class FileEntry:
    path: str
    class_name: str
    split: str


def list_tree(root: Path) -> tuple[str, list[FileEntry]]:
    """The layout of ``root`` and every file of its class folders, with its class and split."""
    entries: list[FileEntry] = []
    layout = detect_layout(root)
    if layout == FOOD101:
        _, lists = read_food101_lists(root)
        split_of = {
            path: split for split, by_class in lists.items() for fs in by_class.values() for path in fs
        }
        for class_name, files in class_folder_files(root / "images").items():
            entries += [FileEntry(f, class_name, split_of.get(f, "")) for f in files]
    elif layout == SPLIT_TREE:
        for split in SPLITS:
            folder = find_split_folder(root, split)
            if folder is not None:
                for class_name, files in class_folder_files(folder).items():
                    entries += [FileEntry(f, class_name, split) for f in files]
    else:
        for class_name, files in class_folder_files(root).items():
            entries += [FileEntry(f, class_name, "") for f in files]
    return layout, entries


@dataclass
class CatalogueRow:
    path: str
    class_name: str
    split: str
    info: ImageInfo

    def csv_row(self) -> list[object]:
        values = asdict(self.info)
        values["readable"] = "true" if self.info.readable else "false"
        return [self.path, self.class_name, self.split, *("" if v is None else v for v in values.values())]


CSV_HEADER = ["path", "class", "split", *(f.name for f in fields(ImageInfo))]


def inspect_entry(entry: FileEntry) -> ImageInfo:
    if is_image_file(entry.path):
        return inspect_image(entry.path)
    info = ImageInfo(format=Path(entry.path).suffix.lower().lstrip("."), error=NOT_AN_IMAGE)
    info.bytes = os.path.getsize(entry.path)
    return info


def build_catalogue(root: str | Path, workers: int = 1) -> tuple[str, list[CatalogueRow]]:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataLayoutError(f"{root} does not exist")
    if not root.is_dir():
        raise DataLayoutError(f"{root} is not a folder")
    layout, entries = list_tree(root)
    if not entries:
        raise DataLayoutError(f"{root} has no class folders with files (layout: {layout})")
    infos = parallel_map(inspect_entry, entries, workers, "reading images")
    rows = [
        CatalogueRow(Path(e.path).relative_to(root).as_posix(), e.class_name, e.split, info)
        for e, info in zip(entries, infos, strict=True)
    ]
    return layout, rows


def write_catalogue(path: str | Path, rows: Iterable[CatalogueRow]) -> Path:
    path = Path(path)
    ensure_dir(path.parent)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        writer.writerows(row.csv_row() for row in rows)
    return path


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key}={count}" for key, count in counter.most_common())


def summarise(root: str | Path, layout: str, rows: Sequence[CatalogueRow], max_listed: int = 50) -> str:
    """Images per class and split, formats, modes and channels, sizes, and the unreadable files."""
    good = [r for r in rows if r.info.readable]
    bad = [r for r in rows if not r.info.readable and r.info.error != NOT_AN_IMAGE]
    skipped = [r for r in rows if r.info.error == NOT_AN_IMAGE]
    lines = [f"{root}: {layout}, {len(rows)} file(s), {len(good)} readable image(s)", ""]

    splits = [s for s in (*SPLITS, "") if any(r.split == s for r in rows)]
    names = {"": "unlisted" if layout == FOOD101 else "images"}
    classes = sorted({r.class_name for r in rows})
    per = Counter((r.class_name, r.split) for r in good)
    table = [[c, *(per[c, s] for s in splits), sum(per[c, s] for s in splits)] for c in classes]
    table.append(["total", *(sum(per[c, s] for c in classes) for s in splits), len(good)])
    lines += ["Readable images per class and split:"]
    lines += [format_table(["class", *(names.get(s, s) for s in splits), "total"], table)]
    totals = [row[-1] for row in table[:-1]]
    if len(classes) > 1 and min(totals) > 0:
        lines.append(f"class balance: largest/smallest = {max(totals) / min(totals):.1f}")
    elif len(classes) > 1:
        lines.append(
            "classes with no readable image: "
            + ", ".join(c for c, t in zip(classes, totals, strict=True) if not t)
        )

    lines += ["", f"formats: {_counts(Counter(r.info.format for r in good))}"]
    modes = Counter(r.info.mode for r in good)
    not_rgb = (
        " (loading converts every mode to RGB; 'prepare --rgb' does it once)" if set(modes) - {"RGB"} else ""
    )
    lines.append(f"modes: {_counts(modes)}{not_rgb}")
    lines.append(f"channels: {_counts(Counter(r.info.channels for r in good))}")
    if good:
        widths = [r.info.width for r in good]
        heights = [r.info.height for r in good]
        shorter = [min(r.info.width, r.info.height) for r in good]
        lines.append("sizes (min / median / max):")
        for name, values in (("width", widths), ("height", heights), ("shorter side", shorter)):
            lines.append(f"  {name}: {min(values)} / {statistics.median(values):g} / {max(values)}")
        lines.append(f"  distinct widths: {len(set(widths))}, distinct heights: {len(set(heights))}")

    if skipped:
        lines += [
            "",
            f"{len(skipped)} non-image file(s) in class folders (training ignores them), "
            f"e.g. {skipped[0].path}",
        ]
    lines += ["", f"unreadable files: {len(bad)}"]
    for row in bad[:max_listed]:
        lines.append(f"  {row.path}: {row.info.error}")
    if len(bad) > max_listed:
        lines.append(f"  ... and {len(bad) - max_listed} more (readable=false in the CSV)")
    return "\n".join(lines)


def run_catalogue(root: str | Path, out: str | Path = "catalogue.csv", workers: int | None = None) -> Path:
    if Path(out).is_dir():
        raise DataLayoutError(
            f"--out {out} is a folder; give the CSV file to write, e.g. {Path(out) / 'catalogue.csv'}"
        )
    layout, rows = build_catalogue(root, workers or default_workers())
    path = write_catalogue(out, rows)
    print(summarise(root, layout, rows))
    print(f"\ncatalogue written to {path.resolve()} (paths relative to {Path(root).expanduser().resolve()})")
    return path
