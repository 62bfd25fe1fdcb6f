"""Export a trained model: `python export.py ckpt_path=<run>/checkpoints/last.ckpt format=onnx`."""

from foodvision.cli.export import main

if __name__ == "__main__":
    main()
