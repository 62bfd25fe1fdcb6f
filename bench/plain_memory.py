"""The plain-PyTorch side of `make bench`'s memory section: what a plain script does, run in a process of its
own so that its peak RSS can be compared with train.py / eval.py / predict.py.

    python bench/plain_memory.py eval CKPT FILE_LIST        # DataLoader batch 64, fp32 no_grad, accuracy
    python bench/plain_memory.py predict CKPT FILE_LIST     # one photo at a time, top-3 kept
    python bench/plain_memory.py train CKPT FILE_LIST STEPS # blocks.5+ and head trainable, batch 64, on images

FILE_LIST: one ``path<TAB>label`` per line. Prints one JSON line: images, seconds. The model load and the
dataset are bench/sections.py's plain ones (torch.load + build + load_state_dict, PIL + torchvision).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from PIL import Image
from sections import PlainImages, load_plain, plain_train_steps
from torch.utils.data import DataLoader


def main(argv: list[str]) -> None:
    mode, ckpt, listing = argv[:3]
    lines = [line.split("\t") for line in open(listing).read().splitlines() if line]
    samples = [(path, int(label)) for path, label in lines]
    model, transform = load_plain(ckpt)
    started, count = time.perf_counter(), 0
    if mode == "eval":
        with torch.no_grad():
            for images, labels in DataLoader(PlainImages(samples, transform), batch_size=64, num_workers=1):
                int((model(images).argmax(1) == labels).sum())
                count += len(labels)
    elif mode == "predict":
        rows = []
        with torch.no_grad():
            for path, _ in samples:
                values, classes = (
                    model(transform(Image.open(path).convert("RGB")).unsqueeze(0)).softmax(1).topk(3)
                )
                rows.append((path, classes.tolist(), values.tolist()))
                count += 1
    elif mode == "train":
        model.train()
        trainable = ("backbone.blocks.5", "backbone.blocks.6", "backbone.conv_head", "head")
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(trainable)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loader = DataLoader(PlainImages(samples, transform), batch_size=64, shuffle=True, num_workers=1)
        count = plain_train_steps(model, optimizer, loader, torch.device("cpu"), int(argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({"images": count, "seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
