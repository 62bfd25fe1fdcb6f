"""The plain-PyTorch side of `make bench`'s memory section: what a plain script does, run in a process of its
own so that its peak RSS can be compared with train.py / eval.py / predict.py.

    python bench/plain_memory.py eval CKPT FILE_LIST        # DataLoader batch 64, fp32 no_grad, accuracy
    python bench/plain_memory.py predict CKPT FILE_LIST     # one photo at a time, top-3 written to a list
    python bench/plain_memory.py train CKPT FILE_LIST STEPS # blocks.5+ and head trainable, batch 64, on images

FILE_LIST: one ``path<TAB>label`` per line. Prints one JSON line: images, seconds.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T


class Files(Dataset):
    def __init__(self, samples: list[tuple[str, int]], transform: T.Compose):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(Image.open(path).convert("RGB")), label


def load(ckpt: str) -> tuple[nn.Module, T.Compose]:
    from foodvision.data.transforms import Preprocessing
    from foodvision.models.classifier import build_classifier

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = checkpoint["foodvision"]
    model, _, _ = build_classifier(len(meta["class_names"]), **{**meta["model"], "pretrained": False})
    model.load_state_dict({k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    pre = Preprocessing.from_dict(meta["preprocessing"])
    transform = T.Compose(
        [
            T.Resize(pre.resize_size),
            T.CenterCrop(pre.image_size),
            T.ToTensor(),
            T.Normalize(list(pre.mean), list(pre.std)),
        ]
    )
    return model, transform


def main(argv: list[str]) -> None:
    mode, ckpt, listing = argv[:3]
    samples = [
        (line.split("\t")[0], int(line.split("\t")[1])) for line in open(listing).read().splitlines() if line
    ]
    model, transform = load(ckpt)
    started = time.perf_counter()
    count = 0
    if mode == "eval":
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in DataLoader(Files(samples, transform), batch_size=64, num_workers=1):
                correct += int((model(images).argmax(1) == labels).sum())
                count += len(labels)
    elif mode == "predict":
        model.eval()
        rows = []
        with torch.no_grad():
            for path, _ in samples:
                image = transform(Image.open(path).convert("RGB")).unsqueeze(0)
                values, classes = model(image).softmax(1).topk(3)
                rows.append((path, classes.tolist(), values.tolist()))
                count += 1
    elif mode == "train":
        steps = int(argv[3])
        model.train()
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(
                ("backbone.blocks.5", "backbone.blocks.6", "backbone.conv_head", "head")
            )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loader = DataLoader(Files(samples, transform), batch_size=64, shuffle=True, num_workers=1)
        for step, (images, labels) in enumerate(loader):
            if step >= steps:
                break
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            count += len(labels)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({"images": count, "seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
