"""The CUDA benchmark of the tensor data path (issue #22), in one run sized for 10 minutes of one H200.

It records, in ``<out>/results.json`` and ``<out>/results.md`` (default ``bench/cuda/``):

1. the model-only bound: EfficientNet-B0 (timm ``efficientnet_b0``, random init, 101 classes), 224 px, bf16
   autocast, channels_last, batch 256, synthetic batches already on the GPU: training steps (forward,
   backward, AdamW) and inference (``inference_mode``), images/s;
2. stage-2 training throughput of ``experiment=food101_effnet`` (single GPU: ``trainer=gpu``) on a
   generated 512 px JPEG tree (class folders; smooth random photos, quality 90), ``train.py`` itself timed
   by bench/scale_timer.py: ``data.pipeline=tensor`` with 14 and with 2 loader workers, ``decoded`` with
   14 (the decoded-photo cache) and today's ``pil`` with 14 for reference; first stage-2 epoch and the
   steady one after it, each as a fraction of the training bound (targets: >= 80 % with 14 workers,
   >= 50 % with 2; the first stage-2 epoch within 10 % of a steady one);
3. extraction throughput: the stage-1 feature extraction of the first of those runs (train and val
   photos over the time from setup to the first epoch), as a fraction of the inference bound (target
   >= 50 %);
4. the default recipe (``python train.py``: mobilenetv2_ft, random init offline) on 1,800 training photos
   of the tree, whole ``train.py`` wall time (target < 20 s).

Weights are random (``model.pretrained=false``): speed does not depend on them, accuracy is not measured.
Runs that would not fit the time budget (``--budget-s``) are skipped and listed. ``--tiny --device cpu``
runs every step at toy sizes on a CPU (the smoke test, tests/test_tensor_path.py).

    python bench/cuda_bench.py                      # on the GPU machine (bench/cuda_bench.sh sets it up)
    python bench/cuda_bench.py --tiny --device cpu --out /tmp/cuda-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "batch": 256,
        "image_size": 224,
        "warmup_steps": 5,
        "train_steps": 30,
        "infer_steps": 50,
        "classes": 10,
        "train_per_class": 1000,  # official train list; 10 % of it is carved into val
        "test_per_class": 10,
        "photo_px": 512,
        "recipe_photos": 1800,
        "stage2_epochs": 2,
        "runs": [("tensor", 14), ("tensor", 2), ("decoded", 14), ("pil", 14)],
        "train_args": [],
    },
    "tiny": {
        "batch": 4,
        "image_size": 32,
        "warmup_steps": 1,
        "train_steps": 2,
        "infer_steps": 2,
        "classes": 3,
        "train_per_class": 10,
        "test_per_class": 2,
        "photo_px": 64,
        "recipe_photos": 9,
        "stage2_epochs": 1,
        "runs": [("tensor", 1), ("decoded", 0)],
        "train_args": [
            "data.image_size=32",
            "data.batch_size=4",
            "data.eval_batch_size=8",
            "trainer.precision=32-true",
        ],
    },
}
QUIET = [
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]
TARGETS = {"stage2_14": 0.8, "stage2_2": 0.5, "extraction": 0.5, "recipe_seconds": 20.0, "first_epoch": 0.10}


def say(message: str) -> None:
    print(f"[cuda_bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1. the model-only bound ---------------------------------------------------------------------------
def model_bound(device: torch.device, sizes: dict[str, Any]) -> dict[str, Any]:
    """Images/s of EfficientNet-B0 training steps and inference on batches already on ``device``."""
    import timm

    batch, size = sizes["batch"], sizes["image_size"]
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=101)
    model = model.to(device).to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 101, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bf16 = device.type == "cuda"  # on a CPU (the smoke test) float32

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(function: Any, steps: int) -> float:
        for _ in range(sizes["warmup_steps"]):
            function()
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            function()
        sync(device)
        return steps * batch / (time.perf_counter() - started)

    model.train()
    train = timed(step, sizes["train_steps"])
    model.eval()

    def infer() -> None:
        with torch.inference_mode(), autocast():
            model(images)

    inference = timed(infer, sizes["infer_steps"])
    return {
        "model": "efficientnet_b0",
        "batch": batch,
        "image_size": size,
        "dtype": "bf16" if bf16 else "fp32",
        "train_images_per_s": train,
        "inference_images_per_s": inference,
    }


# ---- the photo tree --------------------------------------------------------------------------------------
def _photo(job: tuple[str, int, int, int]) -> int:
    """One smooth random photo (low-frequency colour field + fine noise: JPEG sizes like real photos)."""
    path, seed, px, label = job
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    coarse[..., label % 3] = np.clip(coarse[..., label % 3].astype(int) + 60, 0, 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((px * 4 // 3, px), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, field.shape, dtype=np.int16)
    Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
    return 1


def make_tree(root: Path, sizes: dict[str, Any], workers: int) -> dict[str, int]:
    """A Food-101 layout (``images/<class>/<n>.jpg``, ``meta/{classes,train,test}.txt``; val is carved
    from train, 10 %) of ``photo_px`` x 4/3 JPEGs, so that ``data.max_per_class`` caps it."""
    classes = [f"class_{label:02d}" for label in range(sizes["classes"])]
    lists: dict[str, list[str]] = {"train": [], "test": []}
    jobs = []
    for label, name in enumerate(classes):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for i in range(sizes["train_per_class"] + sizes["test_per_class"]):
            lists["train" if i < sizes["train_per_class"] else "test"].append(f"{name}/{i:05d}")
            jobs.append(
                (str(root / "images" / name / f"{i:05d}.jpg"), 1000 * label + i, sizes["photo_px"], label)
            )
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    for split, lines in lists.items():
        (root / "meta" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    with ProcessPoolExecutor(max(1, workers)) as pool:
        done = sum(pool.map(_photo, jobs, chunksize=64))
    train = len(lists["train"])
    return {
        "photos": done,
        "train": train - train // 10,
        "validation": train // 10,
        "test": len(lists["test"]),
    }


# ---- 2-4. train.py runs ------------------------------------------------------------------------------------
def train_run(
    name: str, overrides: list[str], scratch: Path, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """``train.py`` with the epoch timer; its epochs (seconds, photos), extraction and wall seconds."""
    out = scratch / name
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        "test=false",
        f"paths.log_dir={out / 'logs'}",
        "+callbacks.scale_timer._target_=scale_timer.EpochTimes",
        f"+callbacks.scale_timer.out={out / 'times.json'}",
        *QUIET,
    ]
    say(f"{name}: train.py {' '.join(overrides)}")
    started = time.perf_counter()
    with open(out / "train.out", "w") as sink:
        done = subprocess.run(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout
        )
    wall = time.perf_counter() - started
    text = (out / "train.out").read_text()
    if done.returncode != 0:
        raise RuntimeError(f"{name}: train.py exited with {done.returncode}:\n{text[-3000:]}")
    times = json.loads((out / "times.json").read_text())
    epochs = []
    for key in sorted(times["epochs"], key=int):
        epoch = times["epochs"][key]
        if "train_end" in epoch:
            seconds = epoch["train_end"] - epoch["start"]
            photos = int(epoch.get("samples") or 0)
            epochs.append(
                {"epoch": int(key), "seconds": seconds, "photos": photos, "images_per_s": photos / seconds}
            )
    first_start = times["epochs"]["0"]["start"] if "0" in times["epochs"] else times["fit_end"]
    return {
        "name": name,
        "overrides": overrides,
        "wall_seconds": wall,
        "fit_seconds": times["fit_end"] - times["setup"],
        "before_first_epoch_seconds": first_start - times["setup"],
        "epochs": epochs,
        "decoded_cache_built": "decoded-photo cache: decoded" in text,
    }


def stage2_overrides(
    tree: Path, pipeline: str, workers: int, sizes: dict[str, Any], device: str
) -> list[str]:
    return [
        "experiment=food101_effnet",
        f"trainer={'gpu' if device == 'cuda' else 'cpu'}",
        f"data.root={tree}",
        "model.pretrained=false",
        "callbacks.finetune.stage1_epochs=1",
        f"trainer.max_epochs={1 + sizes['stage2_epochs']}",
        f"data.num_workers={workers}",
        f"data.pipeline={pipeline}",
        *sizes["train_args"],
    ]


def stage2_summary(run: dict[str, Any], bound: float) -> dict[str, Any]:
    stage2 = [e for e in run["epochs"] if e["epoch"] >= 1]
    first = stage2[0]
    steady = stage2[1:] or stage2
    rate = statistics.median(e["images_per_s"] for e in steady)
    return {
        "first_stage2_images_per_s": first["images_per_s"],
        "steady_images_per_s": rate,
        "fraction_of_bound": rate / bound,
        "first_epoch_slower_by": first["seconds"] / statistics.median(e["seconds"] for e in steady) - 1,
    }


def markdown(document: dict[str, Any]) -> str:
    bound = document.get("bound") or {}
    lines = [
        "# foodvision CUDA benchmark (issue #22)",
        "",
        f"{document['started']}, {document['seconds']:.0f} s. Machine: {document['machine']}.",
        "",
        "| what | measured | fraction of its bound | target |",
        "|---|---|---|---|",
    ]
    if bound:
        lines.append(
            f"| model-only bound, EfficientNet-B0 {bound['image_size']} px, {bound['dtype']}, channels_last, batch "
            f"{bound['batch']}: train / inference | {bound['train_images_per_s']:,.0f} / "
            f"{bound['inference_images_per_s']:,.0f} img/s | 100 % | - |"
        )
    for run in document.get("stage2", []):
        s = run["summary"]
        target = {14: TARGETS["stage2_14"], 2: TARGETS["stage2_2"]}.get(run["workers"])
        lines.append(
            f"| stage 2 (food101_effnet), data.pipeline={run['pipeline']}, {run['workers']} workers: steady / first "
            f"epoch | {s['steady_images_per_s']:,.0f} / {s['first_stage2_images_per_s']:,.0f} img/s (first "
            f"{s['first_epoch_slower_by']:+.0%}) | {s['fraction_of_bound']:.0%} of train | "
            f"{f'>= {target:.0%}' if target else '-'}; first epoch within {TARGETS['first_epoch']:.0%} |"
        )
    extraction = document.get("extraction")
    if extraction:
        lines.append(
            f"| feature extraction ({extraction['photos']:,} photos, {extraction['run']}; setup to epoch 1) | "
            f"{extraction['images_per_s']:,.0f} img/s ({extraction['seconds']:.1f} s) | "
            f"{extraction['fraction_of_bound']:.0%} of inference | >= {TARGETS['extraction']:.0%} |"
        )
    recipe = document.get("recipe")
    if recipe:
        lines.append(
            f"| default recipe, {recipe['photos']:,} training photos, whole train.py | {recipe['wall_seconds']:.1f} s "
            f"(fit {recipe['fit_seconds']:.1f} s) | - | < {TARGETS['recipe_seconds']:.0f} s |"
        )
    if document.get("skipped"):
        lines += ["", "Skipped (time budget): " + ", ".join(document["skipped"])]
    if document.get("errors"):
        lines += ["", "Errors:"] + [f"- {e}" for e in document["errors"]]
    lines += [
        "",
        f"Photos: a generated Food-101 layout of {document['tree']['photos']:,} JPEGs, {document['sizes']['photo_px']} "
        "px shorter side (x 4/3), quality 90 (val carved from train); random-init weights. Stage 2: one stage-1 epoch on "
        "cached features, then stage-2 epochs on images (augment=seed, the recipe's batch); the first of "
        "them includes worker start-up. Raw numbers: results.json.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU smoke test)")
    parser.add_argument("--out", default=str(BENCH_DIR / "cuda"))
    parser.add_argument(
        "--scratch", default=None, help="where the photo tree and runs go (default: a temp dir)"
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip runs that would end after this")
    args = parser.parse_args(argv)
    sizes = SIZES["tiny" if args.tiny else "full"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny for the smoke test)")
    started, clock = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="cuda-bench-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    document: dict[str, Any] = {
        "started": started,
        "machine": f"{name}, {os.cpu_count()} cores, torch {torch.__version__}",
        "sizes": {k: v for k, v in sizes.items() if k != "runs"},
        "stage2": [],
        "skipped": [],
        "errors": [],
    }
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env.update(
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(
            p for p in [str(ROOT / "src"), str(BENCH_DIR), env.get("PYTHONPATH", "")] if p
        ),
        FOODVISION_CACHE=str(scratch / "cache"),
        TQDM_MININTERVAL="30",
    )

    def write() -> None:
        document["seconds"] = time.perf_counter() - clock
        (out / "results.json").write_text(json.dumps(document, indent=1))
        (out / "results.md").write_text(markdown(document))

    try:
        say("model-only bound")
        document["bound"] = model_bound(device, sizes)
        say(f"  {document['bound']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tree = scratch / "tree"
        say("photo tree")
        document["tree"] = make_tree(tree, sizes, os.cpu_count() or 1)
        train_bound = document["bound"]["train_images_per_s"]
        last_run = 0.0
        for pipeline, workers in sizes["runs"]:
            run_name = f"stage2-{pipeline}-{workers}w"
            elapsed = time.perf_counter() - clock
            if elapsed + 1.2 * last_run > args.budget_s:
                document["skipped"].append(run_name)
                continue
            begun = time.perf_counter()
            try:
                run = train_run(
                    run_name,
                    stage2_overrides(tree, pipeline, workers, sizes, device.type),
                    scratch,
                    env,
                    args.budget_s,
                )
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                document["errors"].append(f"{run_name}: {str(error)[-1500:]}")
                write()
                continue
            last_run = time.perf_counter() - begun
            run.update(pipeline=pipeline, workers=workers, summary=stage2_summary(run, train_bound))
            document["stage2"].append(run)
            if "extraction" not in document:  # the first run extracted (later ones find the feature cache)
                photos = document["tree"]["train"] + document["tree"]["validation"]
                seconds = run["before_first_epoch_seconds"]
                document["extraction"] = {
                    "run": run_name,
                    "photos": photos,
                    "seconds": seconds,
                    "images_per_s": photos / seconds,
                    "fraction_of_bound": photos / seconds / document["bound"]["inference_images_per_s"],
                }
            say(f"  {run['summary']}")
            write()
        if time.perf_counter() - clock + 1.2 * last_run > args.budget_s:
            document["skipped"].append("recipe")
        else:
            per_class = max(1, sizes["recipe_photos"] // sizes["classes"])
            overrides = [
                f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}",
                f"data.root={tree}",
                "model.pretrained=false",
                f"++data.max_per_class.train={per_class}",
                *sizes["train_args"],
            ]
            recipe = train_run("recipe", overrides, scratch, env, args.budget_s)
            document["recipe"] = {**recipe, "photos": per_class * sizes["classes"]}
    finally:
        write()
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    say(f"results: {out / 'results.md'}")
    print((out / "results.md").read_text())
    return 1 if document["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
