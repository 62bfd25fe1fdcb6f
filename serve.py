"""Web demo of a trained model: `python serve.py ckpt_path=<run>/checkpoints/last.ckpt` (http://127.0.0.1:7860)."""

from foodvision.cli.serve import main

if __name__ == "__main__":
    main()
