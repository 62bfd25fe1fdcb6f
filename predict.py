"""Classify photos: `python predict.py ckpt_path=<run>/checkpoints/last.ckpt inputs=[photo.jpg,folder/]`."""

from foodvision.cli.predict import main

if __name__ == "__main__":
    main()
