"""Train a food classifier: `python train.py model=mobilenetv2_ft` (see conf/ and README.md)."""

from foodvision.cli.train import main

if __name__ == "__main__":
    main()
