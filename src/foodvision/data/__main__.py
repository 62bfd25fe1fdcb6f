"""Dataset tooling: ``python -m foodvision.data {catalogue,prepare} --help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from foodvision.data.catalogue import default_workers, run_catalogue
from foodvision.data.prepare import PrepareOptions, prepare
from foodvision.data.sources import DataLayoutError

LAYOUTS = (
    "ROOT may be a flat class-per-folder tree (ROOT/<class>/*.jpg), a split tree "
    "(ROOT/{train,validation|val|valid,test}/<class>/*.jpg) "
    "or the Food-101 archive (ROOT/images/, ROOT/meta/)."
)
EXAMPLES = """examples:
  python -m foodvision.data catalogue data/food-101 --out food101.csv
  python -m foodvision.data prepare data/raw-img data/animals --class-map animals10.json --counts 750 200 50
  python -m foodvision.data prepare data/photos data/split --fractions 0.8 0.1 0.1 --rgb --resize-shorter 256
"""


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not between 1 and 100")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m foodvision.data",
        description="Inspect an image dataset and prepare train/validation/test folders from it.",
        epilog=EXAMPLES + "\nRun 'python -m foodvision.data COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cat = commands.add_parser(
        "catalogue",
        help="decode every file and write a CSV (path, class, split, format, size, mode, readable, ...)",
        description="Decode every file under ROOT, write one CSV row per file and print a summary: "
        "images per class and split, formats and channels, sizes, unreadable files. " + LAYOUTS,
    )
    cat.add_argument("root", metavar="ROOT", help="dataset folder")
    cat.add_argument("--out", default="catalogue.csv", help="CSV to write (default: ./catalogue.csv)")
    cat.add_argument(
        "--workers", type=_positive, default=default_workers(), help="decoding threads (default: %(default)s)"
    )

    prep = commands.add_parser(
        "prepare",
        help="write a DST/{train,validation,test}/<class>/ tree with a stratified, seeded split",
        description="Write DST/{train,validation,test}/<class>/ from SRC, split per class (stratified) "
        "with a seed, plus DST/splits.csv and DST/bad_files.txt. Every image is decoded first; unreadable "
        "ones are listed and not copied. SRC is never modified. "
        + LAYOUTS.replace("ROOT", "SRC")
        + " Existing split folders (and the official Food-101 test list) are kept as the same split; "
        "missing splits (validation for Food-101) are carved out of train.",
    )
    prep.set_defaults(subparser=prep)
    prep.add_argument("src", metavar="SRC", help="source dataset folder (only read)")
    prep.add_argument("dst", metavar="DST", help="destination folder (must be empty unless --overwrite)")
    how = prep.add_mutually_exclusive_group()
    how.add_argument(
        "--fractions",
        nargs=3,
        type=_fraction,
        metavar=("TRAIN", "VAL", "TEST"),
        default=[0.7, 0.15, 0.15],
        help="fractions of each class's images per split, summing to 1 (default: 0.7 0.15 0.15)",
    )
    how.add_argument(
        "--counts",
        nargs=3,
        type=_non_negative,
        metavar=("TRAIN", "VAL", "TEST"),
        help="images per class and split, e.g. 750 200 50 (a class with fewer is divided in proportion)",
    )
    prep.add_argument("--seed", type=int, default=42, help="seed of the split (default: 42)")
    prep.add_argument(
        "--classes", nargs="+", metavar="CLASS", help="only these classes (source or mapped names)"
    )
    prep.add_argument(
        "--class-map",
        metavar="FILE",
        help="rename classes: a JSON object {old: new} or a CSV of old,new rows (unmapped classes keep their "
        "name; several old names may map to one new name)",
    )
    prep.add_argument("--rgb", action="store_true", help="convert every image to an RGB JPEG (.jpg)")
    prep.add_argument(
        "--resize-shorter",
        type=_positive,
        metavar="N",
        help="resize so the shorter side is N pixels (never upscales); keeps the format unless --rgb",
    )
    prep.add_argument(
        "--jpeg-quality",
        type=_quality,
        default=90,
        metavar="Q",
        help="JPEG quality when re-encoding (default: 90)",
    )
    prep.add_argument(
        "--overwrite", action="store_true", help="replace the train/validation/test folders in DST"
    )
    prep.add_argument(
        "--workers", type=_positive, default=default_workers(), help="threads (default: %(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "catalogue":
            run_catalogue(args.root, args.out, args.workers)
        else:
            if args.counts is None and abs(sum(args.fractions) - 1) > 1e-6:
                args.subparser.error(f"--fractions must sum to 1, got {' + '.join(map(str, args.fractions))}")
            options = PrepareOptions(
                fractions=None if args.counts else args.fractions,
                counts=args.counts,
                seed=args.seed,
                classes=args.classes,
                class_map=args.class_map,
                rgb=args.rgb,
                resize_shorter=args.resize_shorter,
                jpeg_quality=args.jpeg_quality,
                overwrite=args.overwrite,
                workers=args.workers,
            )
            prepare(args.src, args.dst, options)
    except (DataLayoutError, OSError) as error:  # missing paths, permissions, a full disk: no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
