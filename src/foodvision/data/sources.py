"""Finding the photos of each split and class: class-per-folder trees and the Food-101 archive."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from foodvision.data.images import is_image_file
from foodvision.data.splits import SPLITS, Sample, cap_per_class, stratified_split

log = logging.getLogger(__name__)

SPLIT_FOLDER_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}
# iPhone photos (HEIF/HEIC) are not read by Pillow itself: named in errors with how to convert them.
HEIF_EXTENSIONS = (".heic", ".heif", ".hif")
HEIF_HINT = (
    "foodvision does not read HEIC/HEIF (iPhone) photos: convert them to JPEG, e.g. "
    "`heif-convert photo.heic photo.jpg` (libheif-examples), `magick mogrify -format jpg *.heic` "
    "(ImageMagick), `sips -s format jpeg photo.heic --out photo.jpg` (macOS), or set the iPhone's "
    "Settings > Camera > Formats to Most Compatible"
)


class DataLayoutError(ValueError):
    """The data root does not have the layout foodvision expects; the message says what to change."""


@dataclass
class DatasetSplits:
    """Classes and the (path, label) samples of each split, plus where the split came from."""

    classes: list[str]
    splits: dict[str, list[Sample]]
    origin: str
    generated_splits: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(samples) for name, samples in self.splits.items()}


def class_folder_files(root: str | Path) -> dict[str, list[str]]:
    """All (non-hidden) files of each class sub-folder of ``root``, recursively, in sorted order.

    Non-image files are included; callers filter them with :func:`is_image_file` (and report them).
    """
    files: dict[str, list[str]] = {}
    hidden = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and entry.name.startswith("."):
            hidden.append(entry.name)
        elif entry.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(entry.path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
            files[entry.name] = found
    if hidden:  # .git, .cache, ... are no classes; a class named so would vanish without a word
        log.info(
            "ignored hidden folder(s) in %s: %s (a name starting with '.' is not a class; rename it to "
            "train on it)",
            root,
            ", ".join(f"{name}/" for name in hidden),
        )
    return files


_class_folders = class_folder_files


def _split_images(
    files_by_class: dict[str, list[str]], where: Path
) -> tuple[dict[str, list[str]], list[str]]:
    images = {c: [f for f in fs if is_image_file(f)] for c, fs in files_by_class.items()}
    ignored = [f for fs in files_by_class.values() for f in fs if not is_image_file(f)]
    empty = [c for c, fs in images.items() if not fs]
    if empty:
        heif = [c for c in empty if any(is_heif_file(f) for f in files_by_class[c])]
        detail = f" ({', '.join(heif)}: HEIC/HEIF photos only; {HEIF_HINT})" if heif else ""
        raise DataLayoutError(
            f"class folder(s) with no images in {where}: {', '.join(empty)}{detail}. "
            "Add images to them or remove the folders."
        )
    heif_files = [f for f in ignored if is_heif_file(f)]
    if heif_files:
        log.warning("left out %d HEIC/HEIF photo(s), e.g. %s: %s", len(heif_files), heif_files[0], HEIF_HINT)
    return images, ignored


def is_heif_file(path: str | Path) -> bool:
    return str(path).lower().endswith(HEIF_EXTENSIONS)


def check_same_classes(per_split: dict[str, Sequence[str]]) -> list[str]:
    """The common sorted class list; an error naming the classes each split lacks otherwise."""
    every = sorted(set().union(*per_split.values()))
    missing = {s: sorted(set(every) - set(c)) for s, c in per_split.items() if set(c) != set(every)}
    if missing:
        detail = "; ".join(f"{split} lacks {', '.join(names)}" for split, names in missing.items())
        raise DataLayoutError(
            f"the splits do not have the same classes: {detail}. Every split needs a folder for every class."
        )
    return every


def find_split_folder(root: str | Path, split: str) -> Path | None:
    """The folder of ``split`` ('train', 'val' or 'test') under ``root``, whichever accepted name it has."""
    root = Path(root)
    for name in SPLIT_FOLDER_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


_find_split_folder = find_split_folder


def carve_fractions(
    names: Sequence[str], fractions: Sequence[float], val_fraction: float | None = None
) -> list[float]:
    """The shares of the splits ``names`` carved from one pool of photos: ``fractions`` (train, val, test)
    renormalised to those splits; with ``val_fraction``, val takes that share of the pool and the others
    divide the rest in their ``fractions`` proportions."""
    wanted = [float(fractions[SPLITS.index(n)]) for n in names]
    if val_fraction is None or "val" not in names:
        return [w / sum(wanted) for w in wanted]
    others = sum(w for n, w in zip(names, wanted, strict=True) if n != "val")
    return [
        float(val_fraction) if n == "val" else (1 - float(val_fraction)) * w / others
        for n, w in zip(names, wanted, strict=True)
    ]


# Files -> their group keys (content digests: foodvision.data.fingerprints.content_digests): the splits
# foodvision carves keep each group of identical files in one split.
GroupKeys = Callable[[list[str]], Mapping[str, str]]


def _groups(
    group_of: GroupKeys | None, files_by_class: Mapping[str, Sequence[str]]
) -> Mapping[str, str] | None:
    return None if group_of is None else group_of([f for files in files_by_class.values() for f in files])


def discover_image_folder(
    root: str | Path,
    fractions: Sequence[float],
    seed: int,
    val_fraction: float | None = None,
    group_of: GroupKeys | None = None,
) -> DatasetSplits:
    """A ``train/ validation/ test/`` class-per-folder tree, or a train-only or flat tree to split.

    Splits that are missing are carved out of ``train`` (or the flat root) by a stratified,
    seeded split with ``fractions`` (train, val, test). ``val_fraction`` (``data.val_fraction``), when set,
    is the share of that pool that goes to a carved val split; a tree with its own val folder keeps it
    (and a warning says ``val_fraction`` is ignored).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(
            f"data root {root} does not exist (set data.root=... to a class-per-folder tree)"
        )
    folders = {s: _find_split_folder(root, s) for s in SPLITS}
    ignored: list[str] = []
    if folders["train"] is None:
        if any(folders.values()):
            raise DataLayoutError(
                f"{root} has {[str(p.name) for p in folders.values() if p]} but no train/ folder"
            )
        images, ignored = _split_images(_class_folders(root), root)
        if not images:
            raise DataLayoutError(f"{root} has no class sub-folders with images")
        shares = list(fractions) if val_fraction is None else carve_fractions(SPLITS, fractions, val_fraction)
        by_split = stratified_split(images, shares, seed, groups=_groups(group_of, images))
        classes = sorted(images)
        generated = list(SPLITS)
        origin = f"flat class-per-folder tree {root}, split {[round(f, 4) for f in shares]} (seed {seed})"
    else:
        per_split: dict[str, dict[str, list[str]]] = {}
        for split, folder in folders.items():
            if folder is not None:
                per_split[split], skipped = _split_images(_class_folders(folder), folder)
                ignored += skipped
        classes = check_same_classes({s: list(v) for s, v in per_split.items()})
        generated = [s for s in SPLITS if s not in per_split]
        by_split = dict(per_split)
        if val_fraction is not None and folders["val"] is not None:
            log.warning(
                "data.val_fraction=%s is ignored: %s has its own validation split (%s/)",
                val_fraction,
                root,
                folders["val"].name,
            )
        if generated:
            # Carve the missing splits out of train with the same proportions the defaults give them.
            names = ["train", *generated]
            shares = carve_fractions(names, fractions, val_fraction)
            carved = stratified_split(
                per_split["train"], shares, seed, names, groups=_groups(group_of, per_split["train"])
            )
            by_split.update(carved)
        origin = f"split folders under {root}" + (
            f"; {generated} carved from train (seed {seed})" if generated else ""
        )
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: [(f, index[c]) for c in classes for f in by_split[s].get(c, [])] for s in SPLITS}
    if ignored:
        log.warning("ignored %d non-image file(s), e.g. %s", len(ignored), ignored[0])
    return DatasetSplits(classes, splits, origin, generated, ignored)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_food101_lists(
    root: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """The sorted chosen classes (all by default) and the files of the official ``train`` and ``test``
    lists of a Food-101 archive, per class: ``{"train": {class: [path, ...]}, "test": {...}}``."""
    root = Path(root).expanduser()
    meta = root / "meta"
    if not (meta / "classes.txt").is_file() or not (root / "images").is_dir():
        raise DataLayoutError(
            f"{root} is not a Food-101 archive (expected images/ and meta/classes.txt). "
            "Point data.root at the extracted 'food-101' folder, or set data.download=true on a machine "
            "that is online."
        )
    all_classes = _read_lines(meta / "classes.txt")
    chosen = list(classes) if classes else all_classes
    unknown = sorted(set(chosen) - set(all_classes))
    if unknown:
        raise DataLayoutError(f"data.classes names classes that {root} does not have: {', '.join(unknown)}")
    chosen = sorted(chosen)
    lists: dict[str, dict[str, list[str]]] = {}
    for official in ("train", "test"):
        by_class: dict[str, list[str]] = {c: [] for c in chosen}
        for line in _read_lines(meta / f"{official}.txt"):
            class_name = line.split("/", 1)[0]
            if class_name in by_class:
                by_class[class_name].append(str(root / "images" / f"{line}.jpg"))
        lists[official] = by_class
    return chosen, lists


def discover_food101(
    root: str | Path,
    val_fraction: float,
    seed: int,
    classes: Sequence[str] | None = None,
    caps: dict[str, int | None] | None = None,
    group_of: GroupKeys | None = None,
) -> DatasetSplits:
    """The official Food-101 layout (``images/``, ``meta/``): official train/test lists, with a
    stratified, seeded validation split carved out of the official train list."""
    root = Path(root).expanduser()
    chosen, lists = read_food101_lists(root, classes)
    caps = caps or {}
    carved = stratified_split(
        lists["train"],
        [1 - val_fraction, val_fraction],
        seed,
        ("train", "val"),
        groups=_groups(group_of, lists["train"]),
    )
    by_split = {"train": carved["train"], "val": carved["val"], "test": lists["test"]}
    index = {c: i for i, c in enumerate(chosen)}
    splits = {
        s: [(f, index[c]) for c in chosen for f in cap_per_class(by_split[s][c], caps.get(s), seed, c)]
        for s in SPLITS
    }
    empty = [f"{s}/{c}" for s in SPLITS for c in chosen if not by_split[s][c]]
    if empty:
        raise DataLayoutError(f"no images listed for {', '.join(empty[:10])} in {root / 'meta'}")
    origin = f"Food-101 archive {root}: official train/test, val carved from train ({val_fraction:.0%}, seed {seed})"
    return DatasetSplits(chosen, splits, origin, ["val"])


def default_food101_root(candidates: Sequence[str | Path]) -> Path:
    """The first candidate that holds a Food-101 archive, or an error that says how to get one."""
    tried = []
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        tried.append(str(path))
        if (path / "meta" / "classes.txt").is_file():
            return path
    raise DataLayoutError(
        "no Food-101 data found; looked in: " + ", ".join(tried) + ". Download Food-101 "
        "(https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/food-101.tar.gz) and extract it to data/, "
        "or set FOOD101_ROOT=/path/to/food-101, or run with data.download=true when online, "
        "or use data=imagefolder data.root=/path/to/class/folders."
    )
