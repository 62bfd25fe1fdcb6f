"""``python -m foodvision.cli.sweep`` / ``foodvision-sweep MULTIRUN_DIR...``: (re)write and print the summary
table of sweep dirs (:func:`foodvision.runs.sweep.write_sweep_summary`), e.g. after a sweep was killed."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from foodvision.runs.sweep import write_sweep_summary


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code: 0 done, 2 no argument or one that is not a directory."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m foodvision.cli.sweep MULTIRUN_DIR [MULTIRUN_DIR ...]")
        return 0 if args else 2
    for arg in args:
        if not Path(arg).is_dir():
            print(f"error: {arg} is not a directory", file=sys.stderr)
            return 2
        csv_path, md_path, table = write_sweep_summary(arg)
        print(f"{csv_path}\n{md_path}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
