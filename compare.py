"""Compare training runs: `python compare.py runs=lightning_logs/runs` or `runs=[dir1,dir2]`."""

from foodvision.cli.compare import main

if __name__ == "__main__":
    main()
