"""Audit a data set: `python audit.py data=imagefolder data.root=<photos>` (duplicates, label issues, stats)."""

from foodvision.cli.audit import main

if __name__ == "__main__":
    main()
