"""Bench section ``tensor_path``: the epoch time of the augmented recipes on the PIL data path against the
tensor data path (``data.pipeline``), measured in one run by ``train.py`` itself.

Recipes: ``experiment=mnv2_2b_augment`` (frozen MobileNetV2 at 224 px, augment=seed, batch 20: the backbone
runs on augmented images every epoch) and ``experiment=scratch_baseline augment=seed`` (the 4-block scratch
CNN at 128 px, batch 32). Each runs with ``data.pipeline=pil`` (today's path: loader workers decode and
augment with PIL), ``tensor`` (workers read bytes; decode and augmentation batched on the training device)
and ``decoded`` (workers read rows of the decoded-photo cache, decoded once; a cold cache, so its one-off
decode is in the run and reported), in that order per recipe, on a capped food101-mini
(``data.max_per_class``) for a few epochs. Epoch time: the training part of each epoch (start to
validation), median over the epochs after the first (the first also pays worker start-up); accuracy: the
last epoch's val/acc (a few epochs on a few hundred photos: noisy). Every setting but ``data.pipeline`` is
the recipe's own (workers, precision, batch size).

Run alone:  python bench/tensor_path.py [--quick] [--data-root ...]  (prints the rows, writes JSON with --out)
In the suite: python bench/run.py --sections tensor_path --merge
This module is torch-free at the top: bench/run.py's parent process imports it for :func:`summarise`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import results  # noqa: E402 - torch-free: the table's row format

RECIPES = {
    "mnv2_2b_augment": ["experiment=mnv2_2b_augment"],
    "scratch_baseline augment=seed": ["experiment=scratch_baseline", "augment=seed"],
}
PIPELINES = ("pil", "tensor", "decoded")
# Sizes: photos per class (food101-mini: 10 classes) and epochs; --quick: a smoke test, numbers mean little.
FULL = {"train_per_class": 60, "val_per_class": 10, "epochs": 3, "image_size": None}
QUICK = {"train_per_class": 4, "val_per_class": 2, "epochs": 1, "image_size": 32}
TARGET = 1.3  # the issue's: at least 1.3x faster on a CPU


def _say(cfg: dict[str, Any], message: str) -> None:
    print(f"    [{cfg.get('label', 'tensor_path')}] {message}", flush=True)


def _epoch_seconds(times: dict[str, Any]) -> tuple[float, float, int]:
    """(median training seconds of the epochs after the first (the first where there is one only), the
    first epoch's, photos per epoch) from scale_timer.EpochTimes' record."""
    epochs = times["epochs"]
    spans = [
        (int(k), e["train_end"] - e["start"], int(e.get("samples") or 0))
        for k, e in epochs.items()
        if "train_end" in e
    ]
    spans.sort()
    steady = [seconds for epoch, seconds, _ in spans if epoch > 0] or [spans[0][1]]
    return statistics.median(steady), spans[0][1], max(samples for _, _, samples in spans)


class TensorPath:
    """One run: every recipe on every pipeline, ``train.py`` in a subprocess each (bench/run.py's ``main``
    side)."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg = cfg
        self.sizes = dict(QUICK if cfg.get("quick") else FULL)
        self.root = Path(
            cfg.get("data_root") or ROOT.parent / "shared" / "data" / "food101-mini" / "food-101"
        )
        if not self.root.is_dir():
            raise RuntimeError(f"--data-root {self.root}: not found")
        self.scratch = Path(tempfile.mkdtemp(prefix="bench-tensor-path-"))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def command(self, recipe: str, pipeline: str, out: Path) -> list[str]:
        sizes = self.sizes
        overrides = [
            *RECIPES[recipe],
            f"data.root={self.root}",
            f"data.pipeline={pipeline}",
            f"++data.max_per_class.train={sizes['train_per_class']}",
            f"++data.max_per_class.val={sizes['val_per_class']}",
            f"trainer.max_epochs={sizes['epochs']}",
            "test=false",
            f"paths.log_dir={out / 'logs'}",
            "+callbacks.scale_timer._target_=scale_timer.EpochTimes",
            f"+callbacks.scale_timer.out={out / 'times.json'}",
            "~callbacks.progress_bar",
            "+trainer.enable_progress_bar=false",
            "+trainer.enable_model_summary=false",
        ]
        if sizes.get("image_size"):
            overrides.append(f"data.image_size={sizes['image_size']}")
        return [sys.executable, str(ROOT / "train.py"), *overrides, *self.cfg.get("tensor_path_args", [])]

    def measure(self, recipe: str, pipeline: str) -> dict[str, Any]:
        out = self.scratch / f"{recipe.split()[0]}-{pipeline}"
        out.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        src = str(ROOT / "src")
        env.update(
            HF_HUB_OFFLINE="1",
            PYTHONPATH=os.pathsep.join([src, str(BENCH_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            FOODVISION_CACHE=str(self.scratch / "cache"),  # cold for each recipe's first decoded run
        )
        command = self.command(recipe, pipeline, out)
        started = time.perf_counter()
        with open(out / "train.out", "w") as sink:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            tail = (out / "train.out").read_text()[-3000:]
            raise RuntimeError(
                f"train.py ({recipe}, data.pipeline={pipeline}) exited with {done.returncode}:\n{tail}"
            )
        times = json.loads((out / "times.json").read_text())
        steady, first, photos = _epoch_seconds(times)
        (metrics_file,) = (out / "logs").rglob("metrics.json")
        metrics = json.loads(metrics_file.read_text())
        text = (out / "train.out").read_text()
        epoch0 = times["epochs"].get("0", {}).get("start", times["setup"])
        return {
            "recipe": recipe,
            "pipeline": pipeline,
            "epoch_seconds": steady,
            "first_epoch_seconds": first,
            "photos": photos,
            "images_per_s": photos / steady if steady else None,
            "before_first_epoch_seconds": epoch0
            - times["setup"],  # loaders, sanity check, decoded-cache build
            "fit_seconds": times["fit_end"] - times["setup"],
            "wall_seconds": wall,
            "val_acc": metrics.get("val/acc"),
            "resolved": next(
                (
                    line.split(": ", 1)[-1]
                    for line in text.splitlines()
                    if f"data.pipeline={pipeline}:" in line
                ),
                None,
            ),
            "decoded_once": "decoded-photo cache: decoded" in text,
        }

    def run(self) -> dict[str, Any]:
        measured = []
        for recipe in RECIPES:
            for pipeline in PIPELINES:
                _say(self.cfg, f"{recipe}, data.pipeline={pipeline}")
                item = self.measure(recipe, pipeline)
                _say(
                    self.cfg,
                    f"  epoch {item['epoch_seconds']:.2f} s ({item['images_per_s']:.1f} img/s), first "
                    f"{item['first_epoch_seconds']:.2f} s, before it {item['before_first_epoch_seconds']:.1f} s, "
                    f"val/acc {item['val_acc']:.3f}",
                )
                measured.append(item)
        return {"measurements": measured}

    def finish(self) -> dict[str, Any]:
        return {**self.sizes, "root": str(self.root), "threads": self.cfg.get("threads")}


def summarise(label: str, raw: dict[str, Any], results_: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    """One row per recipe: the PIL path's epoch time against the faster new path's."""
    measured = raw["main"]["runs"][0]["measurements"]
    sizes = raw["main"].get("finish", {})
    rows, summary = [], {}
    for recipe in dict.fromkeys(item["recipe"] for item in measured):
        by = {item["pipeline"]: item for item in measured if item["recipe"] == recipe}
        old = by["pil"]
        new = min((by[p] for p in ("tensor", "decoded") if p in by), key=lambda item: item["epoch_seconds"])
        ratio = old["epoch_seconds"] / new["epoch_seconds"]
        summary[recipe] = {"pil": old, "new": new["pipeline"], "ratio": ratio, "all": by}
        others = "; ".join(
            f"{p}: {by[p]['epoch_seconds']:.2f} s, val/acc {by[p]['val_acc']:.3f}, "
            f"{by[p]['before_first_epoch_seconds']:.1f} s before epoch 1"
            for p in PIPELINES
            if p in by
        )
        notes = (
            f"train.py {recipe}, {old['photos']} training photos ({sizes.get('train_per_class')}/class), "
            f"{sizes.get('epochs')} epochs; training part of an epoch, median after the first; {others} "
            f"(decoded: a cold cache, its one-off decode before epoch 1); target >= {TARGET}x"
        )
        rows.append(
            results.row(
                f"{label}: {recipe}",
                f"pil {old['epoch_seconds']:.2f} s (val/acc {old['val_acc']:.3f})",
                f"{new['pipeline']} {new['epoch_seconds']:.2f} s (val/acc {new['val_acc']:.3f})",
                f"**{ratio:.2f}x**",
                notes,
            )
        )
    return {"summary": summary, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", default=str(ROOT.parent / "shared" / "data" / "food101-mini" / "food-101")
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: a few photos, one epoch")
    parser.add_argument("--out", default=None, help="write the raw numbers and rows here (JSON)")
    parser.add_argument(
        "train_args", nargs="*", help="more train.py overrides (e.g. trainer.precision=32-true)"
    )
    args = parser.parse_args(argv)
    cfg = {"data_root": args.data_root, "quick": args.quick, "tensor_path_args": args.train_args}
    section = TensorPath("main", cfg)
    try:
        raw = {"status": "ok", "main": {"runs": [section.run()], "finish": section.finish()}}
    finally:
        section.close()
    table = summarise("tensor_path", raw, {}, cfg, "")
    for item in table["rows"]:
        print(" | ".join(item[column] for column in results.COLUMNS))
    if args.out:
        Path(args.out).write_text(json.dumps({"raw": raw, **table}, indent=1))


if __name__ == "__main__":
    main()
