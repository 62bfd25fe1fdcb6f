"""Evaluate a trained model: `python eval.py ckpt_path=<run>/checkpoints/last.ckpt [data.split=test]`."""

from foodvision.evaluation.evaluate import main

if __name__ == "__main__":
    main()
