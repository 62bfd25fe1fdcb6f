"""``python -m foodvision.data prepare``: write a ``train/ validation/ test/`` class-per-folder tree.

The source (a flat class-per-folder tree, a split tree, or the Food-101 archive) is only read. Every
selected image is decoded first; unreadable files are listed and left out *before* splitting, so the
requested counts are met with good files. Splits are stratified per class and seeded.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from foodvision.atomic import atomic_open, atomic_path, ensure_dir, write_text
from foodvision.data.catalogue import (
    FOOD101,
    SPLIT_TREE,
    ImageInfo,
    default_workers,
    detect_layout,
    format_table,
    inspect_image,
    parallel_map,
)
from foodvision.data.images import is_image_file, load_rgb
from foodvision.data.sources import (
    DataLayoutError,
    check_same_classes,
    class_folder_files,
    find_split_folder,
    read_food101_lists,
)
from foodvision.data.splits import SPLITS, cap_per_class, stratified_split

DEST_FOLDERS = {"train": "train", "val": "validation", "test": "test"}
OUTPUTS = (*DEST_FOLDERS.values(), "splits.csv", "bad_files.txt")
HEADER_WORDS = {"old", "source", "src", "from", "original", "folder", "name", "class", "old_name"}
# Formats a resized image is saved in when it is not converted to RGB JPEG (others become PNG).
KEPT_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class Pool:
    """Files of one source group, per class, and the splits they are divided into."""

    name: str
    targets: tuple[str, ...]
    files: dict[str, list[str]]


@dataclass
class PrepareOptions:
    fractions: Sequence[float] | None = (0.7, 0.15, 0.15)
    counts: Sequence[int] | None = None
    seed: int = 42
    classes: Sequence[str] | None = None
    class_map: Mapping[str, str] | str | Path | None = None  # a mapping, or a CSV / JSON file
    rgb: bool = False
    resize_shorter: int | None = None
    jpeg_quality: int = 90
    overwrite: bool = False
    workers: int = field(default_factory=default_workers)


@dataclass
class Assignment:
    split: str
    class_name: str
    source: str
    info: ImageInfo
    dest: Path | None = None


def read_class_map(path: str | Path) -> dict[str, str]:
    """``old -> new`` class names from a JSON object or a two-column CSV (an optional header row)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataLayoutError(f"class map {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataLayoutError(f"class map {path} is not valid JSON: {error}") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise DataLayoutError(f"class map {path} must be a JSON object of old name -> new name")
        return {str(k): v.strip() for k, v in mapping.items()}
    rows = [[c.strip() for c in row] for row in csv.reader(text.splitlines()) if any(c.strip() for c in row)]
    if rows and rows[0][0].lower() in HEADER_WORDS:
        rows = rows[1:]
    bad = [row for row in rows if len(row) != 2 or not all(row)]
    if bad:
        raise DataLayoutError(f"class map {path}: every row must be 'old,new', got {bad[0]}")
    return {old: new for old, new in rows}


def find_pools(src: Path) -> tuple[str, list[Pool], list[str]]:
    """The layout of ``src``, its pools of image files per (source) class, and its non-image files."""
    layout = detect_layout(src)
    ignored: list[str] = []

    def images(files_by_class: dict[str, list[str]]) -> dict[str, list[str]]:
        ignored.extend(f for fs in files_by_class.values() for f in fs if not is_image_file(f))
        return {c: [f for f in fs if is_image_file(f)] for c, fs in files_by_class.items()}

    if layout == FOOD101:
        _, lists = read_food101_lists(src)
        pools = [
            Pool("the official train list", ("train", "val"), lists["train"]),
            Pool("the official test list", ("test",), lists["test"]),
        ]
    elif layout == SPLIT_TREE:
        folders = {s: find_split_folder(src, s) for s in SPLITS}
        if folders["train"] is None:
            found = ", ".join(p.name for p in folders.values() if p)
            raise DataLayoutError(f"{src} has {found}/ but no train/ folder")
        present = [s for s in SPLITS if folders[s] is not None]
        missing = tuple(s for s in SPLITS if folders[s] is None)
        per_split = {s: images(class_folder_files(folders[s])) for s in present}
        check_same_classes({s: list(v) for s, v in per_split.items()})
        pools = [
            Pool(f"{folders[s].name}/", ("train", *missing) if s == "train" else (s,), per_split[s])
            for s in present
        ]
    else:
        pools = [Pool("", SPLITS, images(class_folder_files(src)))]
    if not any(fs for pool in pools for fs in pool.files.values()):
        raise DataLayoutError(f"{src} has no class folders with images ({layout})")
    return layout, pools, ignored


def choose_classes(
    source_classes: Sequence[str], classes: Sequence[str] | None, class_map: Mapping[str, str] | None
) -> dict[str, str]:
    """Selected source class -> destination class name. ``classes`` may use old or new names."""
    class_map = dict(class_map or {})
    unknown = sorted(set(class_map) - set(source_classes))
    if unknown:
        raise DataLayoutError(
            f"the class map names classes that the source does not have: {', '.join(unknown)} "
            f"(source classes: {', '.join(source_classes)})"
        )
    invalid = sorted(n for n in class_map.values() if not n or n in (".", "..") or "/" in n or "\\" in n)
    if invalid:
        raise DataLayoutError(f"the class map gives invalid folder names: {', '.join(map(repr, invalid))}")
    renamed = {c: class_map.get(c, c) for c in source_classes}
    if not classes:
        return renamed
    wanted = set(classes)
    unknown = sorted(wanted - set(renamed) - set(renamed.values()))
    if unknown:
        raise DataLayoutError(
            f"--classes names classes that the source does not have: {', '.join(unknown)} "
            f"(source classes: {', '.join(source_classes)})"
        )
    return {old: new for old, new in renamed.items() if old in wanted or new in wanted}


def split_pool(
    files_by_class: Mapping[str, Sequence[str]],
    targets: Sequence[str],
    options: PrepareOptions,
    where: str = "",
) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """Divide one pool per class among ``targets`` by fractions, or by counts (a seeded subset first)."""
    warnings: list[str] = []
    result: dict[str, dict[str, list[str]]] = {t: {} for t in targets}
    for class_name, files in sorted(files_by_class.items()):
        if options.counts is not None:
            wanted = [options.counts[SPLITS.index(t)] for t in targets]
            if len(files) < sum(wanted):
                warnings.append(
                    f"{class_name}: {len(files)} image(s){where} for {'+'.join(targets)}, fewer than the "
                    f"{sum(wanted)} requested; "
                    + ("all taken" if len(targets) == 1 else "divided in proportion to the counts")
                )
            files = cap_per_class(files, sum(wanted), options.seed, class_name)
        else:
            wanted = [options.fractions[SPLITS.index(t)] for t in targets]
        if sum(wanted) == 0:
            for t in targets:
                result[t][class_name] = []
            continue
        divided = stratified_split(
            {class_name: files}, [w / sum(wanted) for w in wanted], options.seed, targets
        )
        for t in targets:
            result[t][class_name] = divided[t][class_name]
    return result, warnings


def _dest_name(assignment: Assignment, options: PrepareOptions) -> str:
    source = Path(assignment.source)
    if options.rgb:
        return source.stem + ".jpg"
    if options.resize_shorter and not _keep_bytes(assignment.info, options):
        return source.stem + KEPT_FORMATS.get(assignment.info.format, ".png")
    return source.name


def _keep_bytes(info: ImageInfo, options: PrepareOptions) -> bool:
    """Whether the file can be copied as it is: no normalisation asked for, or none needed."""
    small = not options.resize_shorter or min(info.width, info.height) <= options.resize_shorter
    if options.rgb:
        return small and info.format == "JPEG" and info.mode == "RGB"
    return small


def _resized(image: Image.Image, shorter: int | None) -> Image.Image:
    if not shorter or min(image.size) <= shorter:
        return image
    width, height = image.size
    scale = shorter / min(width, height)
    size = (
        (shorter, max(1, round(height * scale)))
        if width <= height
        else (max(1, round(width * scale)), shorter)
    )
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def write_image(assignment: Assignment, options: PrepareOptions) -> str | None:
    """Copy or re-encode one file to ``assignment.dest``; the error message when that fails."""
    try:
        with atomic_path(assignment.dest) as dest:  # a killed or failed write never leaves half a photo
            _write_image(assignment, options, dest)
    except Exception as error:  # reported per file, the run goes on
        assignment.dest.unlink(missing_ok=True)
        return f"{type(error).__name__}: {error}"
    return None


def _write_image(assignment: Assignment, options: PrepareOptions, dest: Path) -> None:
    if _keep_bytes(assignment.info, options):
        shutil.copy2(assignment.source, dest)
    elif options.rgb:
        draft = (options.resize_shorter,) * 2 if options.resize_shorter else None
        image = _resized(load_rgb(assignment.source, draft_size=draft), options.resize_shorter)
        image.save(dest, "JPEG", quality=options.jpeg_quality)
    else:
        with Image.open(assignment.source) as opened:
            fmt = opened.format
            image = ImageOps.exif_transpose(opened)
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            image = _resized(image, options.resize_shorter)
        save_format = "JPEG" if fmt in ("JPEG", "MPO") else (fmt if fmt in KEPT_FORMATS else "PNG")
        extra = {"quality": options.jpeg_quality} if save_format == "JPEG" else {}
        image.save(dest, save_format, **extra)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.exists():
        raise DataLayoutError(f"source {src} does not exist")
    if not src.is_dir():
        raise DataLayoutError(f"source {src} is not a folder")
    if _overlaps(src.resolve(), dst.resolve()):
        raise DataLayoutError(
            f"destination {dst} and source {src} overlap; choose a destination outside the source"
        )
    if dst.exists() and not dst.is_dir():
        raise DataLayoutError(f"destination {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DataLayoutError(f"destination {dst} is not empty; pass --overwrite to replace its contents")


def prepare(src: str | Path, dst: str | Path, options: PrepareOptions) -> dict[str, Counter]:
    """Write the split tree; returns the number of images written per split and class."""
    src, dst = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
    _check_paths(src, dst, options.overwrite)
    layout, pools, ignored = find_pools(src)
    source_classes = sorted({c for pool in pools for c in pool.files})
    class_map = (
        read_class_map(options.class_map) if isinstance(options.class_map, str | Path) else options.class_map
    )
    renamed = choose_classes(source_classes, options.classes, class_map)

    # Decode every candidate first, so bad files are left out before the split.
    candidates = sorted({f for pool in pools for c, fs in pool.files.items() if c in renamed for f in fs})
    infos = dict(
        zip(
            candidates,
            parallel_map(inspect_image, candidates, options.workers, "checking images"),
            strict=True,
        )
    )
    bad = {f: info.error for f, info in infos.items() if not info.readable}

    assignments: list[Assignment] = []
    warnings: list[str] = []
    for pool in pools:
        merged: dict[str, list[str]] = {}
        for old, files in pool.files.items():
            if old in renamed:
                merged.setdefault(renamed[old], []).extend(f for f in files if f not in bad)
        divided, pool_warnings = split_pool(
            merged, pool.targets, options, f" in {pool.name}" if pool.name else ""
        )
        warnings += pool_warnings
        for split, by_class in divided.items():
            assignments += [Assignment(split, c, f, infos[f]) for c, fs in by_class.items() for f in fs]
    if not assignments:
        raise DataLayoutError(f"no readable images selected from {src}")
    new_classes = sorted(set(renamed.values()))
    taken = Counter((a.split, a.class_name) for a in assignments)
    for split in SPLITS:
        if any(taken[split, c] for c in new_classes):
            empty = [c for c in new_classes if not taken[split, c]]
            if empty:
                warnings.append(f"{split} has no images of: {', '.join(empty)}")

    if options.overwrite:
        for name in OUTPUTS:
            target = dst / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    used: set[Path] = set()
    order = {s: i for i, s in enumerate(SPLITS)}
    assignments.sort(key=lambda a: (order[a.split], a.class_name, a.source))
    for assignment in assignments:
        folder = dst / DEST_FOLDERS[assignment.split] / assignment.class_name
        name = Path(_dest_name(assignment, options))
        dest, n = folder / name, 0
        while dest in used:  # same file name from two source folders (merged classes, nested folders)
            n += 1
            dest = folder / f"{name.stem}_{n}{name.suffix}"
        used.add(dest)
        assignment.dest = dest
    for folder in sorted({a.dest.parent for a in assignments}):
        folder.mkdir(parents=True, exist_ok=True)
    errors = parallel_map(lambda a: write_image(a, options), assignments, options.workers, "writing images")
    for assignment, error in zip(assignments, errors, strict=True):
        if error:
            bad[assignment.source] = f"cannot write {assignment.dest}: {error}"
    written = [a for a, error in zip(assignments, errors, strict=True) if not error]

    ensure_dir(dst)
    with atomic_open(dst / "splits.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "class", "source", "dest"])
        for a in written:
            writer.writerow([a.split, a.class_name, a.source, a.dest.relative_to(dst).as_posix()])
    write_text(dst / "bad_files.txt", "".join(f"{path}\t{error}\n" for path, error in sorted(bad.items())))

    counts = {s: Counter(a.class_name for a in written if a.split == s) for s in SPLITS}
    _report(src, dst, layout, options, new_classes, counts, bad, ignored, warnings)
    return counts


def _report(src, dst, layout, options, classes, counts, bad, ignored, warnings, max_listed=50) -> None:
    how = (
        f"counts {list(options.counts)}"
        if options.counts is not None
        else f"fractions {list(options.fractions)}"
    )
    print(f"{src}: {layout}; split by {how}, seed {options.seed}")
    if layout == FOOD101:
        print("official test list kept as test; validation carved out of the official train list")
    elif layout == SPLIT_TREE:
        print("existing split folders kept; missing splits carved out of train")
    for warning in warnings:
        print(f"warning: {warning}")
    splits = [s for s in SPLITS if counts[s]]
    table = [[c, *(counts[s][c] for s in splits), sum(counts[s][c] for s in splits)] for c in classes]
    table.append(
        ["total", *(sum(counts[s].values()) for s in splits), sum(sum(counts[s].values()) for s in splits)]
    )
    print(format_table(["class", *(DEST_FOLDERS[s] for s in splits), "total"], table))
    if ignored:
        print(f"{len(ignored)} non-image file(s) ignored, e.g. {ignored[0]}")
    print(f"unreadable files left out: {len(bad)}")
    for path, error in sorted(bad.items())[:max_listed]:
        print(f"  {path}: {error}")
    if len(bad) > max_listed:
        print(f"  ... and {len(bad) - max_listed} more (see bad_files.txt)")
    print(f"written to {dst} (splits.csv, bad_files.txt)")
