"""Evaluate a trained model: `python eval.py ckpt_path=<run>/checkpoints/last.ckpt [data.split=test]`."""

from foodvision.cli.eval import main

if __name__ == "__main__":
    main()
