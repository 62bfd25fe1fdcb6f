"""`make bench` (`python bench/run.py [options]`): foodvision's fast paths against a plain PyTorch baseline.

Same data, same model (MobileNetV2, 224 px), same run. Every section runs its baseline and its foodvision
side in two processes of their own (``multiprocessing`` spawn), so peak RSS is per side; the parent sends
them the repeats in alternating order (A B, B A, ...) and keeps every raw number. Reported: medians of the
repeats, and ratios as the median of the per-repeat paired ratios (speed-up of foodvision, > 1 is faster).

Sections: matmul_peak, data_loading, inference, frozen_epoch, stage2_epoch, predict, memory, scale, recipe, int8 (see
``bench/sections.py`` for what each one measures). Writes ``<out>/results.json`` (all raw numbers, machine
info) and ``<out>/results.md`` (one table); ``--merge`` keeps the other sections of an earlier run there.

    python bench/run.py                          # everything but running the recipe (minutes, 2 cores)
    python bench/run.py --quick --out /tmp/b     # tiny sizes, one repeat: a smoke test, not a benchmark
    python bench/run.py --sections inference,predict --ckpt lightning_logs/runs/x/checkpoints/best.ckpt
    python bench/run.py --sections recipe --run-recipe --recipe-args "trainer.max_epochs=8"
    python bench/run.py --sections memory --merge  # peak RSS of train.py, eval.py, predict.py (make bench-memory)
    python bench/run.py --sections scale --merge   # train.py's memory and s/photo at 3k, 20k, 100k photos

The parent process never imports torch (its peak RSS would be inherited by the children it spawns).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SECTION_ORDER = (
    "matmul_peak",
    "data_loading",
    "inference",
    "frozen_epoch",
    "stage2_epoch",
    "predict",
    "memory",
    "scale",
    "recipe",
    "int8",
)
TWO_SIDED = ("data_loading", "inference", "frozen_epoch", "stage2_epoch", "predict", "int8")
CUDA_SECTIONS = ("matmul_peak", "inference", "stage2_epoch")  # also run on the GPU when there is one
EPOCHS_WITH_CACHE = 10

# Sizes: full benchmark and --quick (smoke test: a few batches, one repeat; numbers mean little).
FULL = {
    "repeats": 3,
    "matmul_size": 2048,
    "matmul_seconds": 1.0,  # each repeat runs enough torch.mm calls to last about this long
    "load_images": 512,
    "load_batch": 64,
    "infer_images": 256,
    "baseline_batch": 64,
    "ours_batch": 128,
    "acc_images": 0,  # 0: the whole test split
    "int8_calibration": 300,  # int8: train photos the INT8 model is calibrated on
    "train_images": 256,  # K: images the image-based training epochs are measured on (then extrapolated)
    "train_batch": 64,
    "extract_batch": 128,
    "frozen_rows": 0,  # cached-feature rows of ours' head epoch; 0: the train split size
    "stage2_images": 128,  # K of the baseline stage-2 epoch
    "prefix_images": 256,  # images ours extracts prefix maps from (tiled to stage2_ours_images rows)
    "stage2_ours_images": 1024,  # rows of ours' stage-2 epoch (then extrapolated); 0: the train split size
    "latency_photos": 10,
    "folder_photos": 128,
    "predict_batch": 0,  # predict.py's defaults (0: the batch chosen from the memory budget)
    "predict_workers": 0,
    "memory_big_photos": 5000,  # memory: eval.py and predict.py also on this many photos (0: skip)
    "memory_train_steps": 20,  # memory: the plain training script's steps (batch 64, on images)
    "memory_skip_train": 0,  # memory: 1 = do not run train.py (needs --ckpt)
    # scale: training photos of each train.py run (comma-separated; 18,180: food101-64px as it is)
    "scale_sizes": "3000,18180,100000",
    "scale_image_size": 64,  # scale: data.image_size of those runs (the photos' own size)
}
QUICK = {
    **FULL,
    "repeats": 1,
    "matmul_size": 512,
    "matmul_seconds": 0.05,
    "load_images": 16,
    "load_batch": 8,
    "infer_images": 16,
    "baseline_batch": 8,
    "ours_batch": 16,
    "acc_images": 16,
    "int8_calibration": 16,
    "train_images": 16,
    "train_batch": 8,
    "extract_batch": 16,
    "frozen_rows": 64,
    "stage2_images": 8,
    "prefix_images": 8,
    "stage2_ours_images": 16,
    "latency_photos": 2,
    "folder_photos": 8,
    "predict_batch": 8,
    "memory_big_photos": 24,
    "memory_train_steps": 1,
    "scale_sizes": "202,404",
    "scale_image_size": 32,
}


class SectionError(RuntimeError):
    pass


# ---- arguments and configuration -----------------------------------------------------------------------
def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_data_root() -> Path:
    return Path(
        os.environ.get("FOOD101_ROOT") or ROOT / ".." / "shared" / "data" / "food101-mini" / "food-101"
    )


def newest_checkpoint(log_dir: Path) -> Path | None:
    found = sorted(log_dir.glob("runs/*/checkpoints/best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (tests; not a benchmark)")
    parser.add_argument(
        "--sections", default="all", help=f"comma-separated, or all: {','.join(SECTION_ORDER)} (default all)"
    )
    parser.add_argument("--out", default=str(BENCH_DIR), help="folder for results.json/results.md (bench/)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers, both sides (default 1)")
    parser.add_argument(
        "--threads", type=int, default=cores(), help="torch.set_num_threads (default all cores)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per side (default 3, quick 1)"
    )
    parser.add_argument(
        "--data-root", default=str(default_data_root()), help="Food-101 layout or class folders"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--precision",
        choices=("auto", "32"),
        default="auto",
        help="foodvision's precision in the sections: auto (bf16 where the hardware has it) or 32 (float32:\n"
        "the ONNX Runtime path of CPUs without bf16); memory: also the tools' and train.py's precision",
    )
    parser.add_argument(
        "--ckpt",
        default="auto",
        help="checkpoint for accuracy and predict; auto: newest lightning_logs/runs/*/checkpoints/best-*.ckpt; none",
    )
    parser.add_argument(
        "--log-dir", default=str(ROOT / "lightning_logs"), help="where runs are (recipe, --ckpt auto)"
    )
    parser.add_argument(
        "--run-recipe", action="store_true", help="recipe: run train.py (default: read the newest run)"
    )
    parser.add_argument(
        "--recipe-args", default="", help='extra train.py overrides for --run-recipe, e.g. "seed=1"'
    )
    parser.add_argument(
        "--memory-train-args",
        default="trainer.max_epochs=10",
        help='memory: train.py overrides (default "trainer.max_epochs=10": 8 cached head epochs + 2 stage-2 '
        'epochs, cold cache, test included; "" runs the whole default recipe)',
    )
    parser.add_argument(
        "--memory-tool-args",
        default="",
        help='memory: extra eval.py/predict.py overrides, e.g. "precision=32" (ONNX Runtime on CPUs with bf16)',
    )
    parser.add_argument(
        "--scale-root",
        default=str(ROOT / ".." / "shared" / "data" / "food101-64px" / "food-101"),
        help="scale: the Food-101 layout its trees are made from (default ../shared/data/food101-64px)",
    )
    parser.add_argument(
        "--scale-dir",
        default=str(Path(tempfile.gettempdir()) / "foodvision-scale"),
        help="scale: where the tree of photo variants is made and kept between runs",
    )
    parser.add_argument(
        "--scale-train-args",
        default="callbacks.finetune.stage1_epochs=1 trainer.max_epochs=2 +trainer.limit_train_batches=50 test=false",
        help="scale: train.py overrides (default: the default recipe shortened to 1 head + 1 stage-2 epoch of\n"
        "50 batches; the caches still cover every photo)",
    )
    parser.add_argument(
        "--scale-code",
        default="",
        help="scale: a foodvision checkout whose train.py and src/ are measured (default this one; to "
        "measure the code of before a change: git worktree add /tmp/old HEAD)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of <out>/results.json that this run does not measure (results.md lists all)",
    )
    parser.add_argument(
        "--no-cuda", action="store_true", help="skip the GPU variants even when CUDA is available"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds one step of a section may take"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=N",
        help="override a size, e.g. --set train_images=512 (keys: " + ", ".join(sorted(FULL)) + ")",
    )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in FULL:
            raise SystemExit(f"--set: unknown key {key!r}; keys: {', '.join(sorted(FULL))}")
        cfg[key] = type(FULL[key])(value)
    if args.repeats is not None:
        cfg["repeats"] = max(1, args.repeats)
    log_dir = Path(args.log_dir).resolve()
    ckpt_note = ""
    if args.ckpt == "auto":
        found = newest_checkpoint(log_dir)
        ckpt = str(found) if found else None
        ckpt_note = (
            f"newest best-*.ckpt under {log_dir}/runs"
            if found
            else f"no --ckpt given and no {log_dir}/runs/*/checkpoints/best-*.ckpt"
        )
    elif args.ckpt.lower() in ("none", ""):
        ckpt, ckpt_note = None, "--ckpt none"
    else:
        ckpt = str(Path(args.ckpt).resolve())
        if not Path(ckpt).is_file():
            raise SystemExit(f"--ckpt {ckpt} does not exist")
    cfg.update(
        ckpt_source=ckpt,
        quick=bool(args.quick),
        workers=max(0, args.workers),
        threads=max(1, args.threads),
        data_root=str(Path(args.data_root).resolve()),
        image_size=args.image_size,
        ckpt=ckpt,
        ckpt_note=ckpt_note,
        log_dir=str(log_dir),
        run_recipe=bool(args.run_recipe),
        recipe_args=shlex.split(args.recipe_args),
        precision=args.precision,
        memory_train_args=shlex.split(args.memory_train_args)
        + (["trainer.precision=32-true"] if args.precision == "32" else []),
        memory_tool_args=shlex.split(args.memory_tool_args)
        + (["precision=32"] if args.precision == "32" else []),
        scale_root=str(Path(args.scale_root).resolve()),
        scale_dir=str(Path(args.scale_dir).resolve()),
        scale_train_args=shlex.split(args.scale_train_args)
        + (["trainer.precision=32-true"] if args.precision == "32" else []),
        scale_code=str(Path(args.scale_code).resolve()) if args.scale_code else "",
        timeout=args.timeout,
        device="cpu",
    )
    return cfg


def selected_sections(text: str) -> list[str]:
    if text.strip() in ("", "all"):
        return list(SECTION_ORDER)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTION_ORDER]
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTION_ORDER)}")
    return [s for s in SECTION_ORDER if s in chosen]


# ---- child processes -----------------------------------------------------------------------------------
def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _import_sections() -> Any:
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # also seen by spawned DataLoader workers
    import sections

    return sections


def _side_main(conn: Any, section: str, side: str, cfg: dict[str, Any]) -> None:
    """One side of one section: set up, then answer ``run`` (one timed repeat) and ``finish``."""
    rss_at_start = _maxrss_mb()
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads TQDM_* at import
    runner = None
    try:
        impl = _import_sections()
        impl.setup_process(cfg)
        runner = impl.SECTIONS[section](side, cfg)
        conn.send(
            (
                "ok",
                {
                    "rss_at_start_mb": rss_at_start,
                    "setup_peak_rss_mb": impl.maxrss_mb(),
                    **impl.side_info(cfg),
                },
            )
        )
        while True:
            try:
                command = conn.recv()
            except (EOFError, OSError):  # the parent gave up on this section (the other side failed)
                return
            if command == "run":
                conn.send(("ok", runner.run()))
            else:
                conn.send(("ok", {**runner.finish(), "peak_rss_mb": impl.maxrss_mb()}))
                return
    except BaseException:  # noqa: BLE001 - reported to the parent, which records it and goes on
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if runner is not None and hasattr(runner, "close"):
            runner.close()  # temporary files, also after an error (atexit does not run in these children)


def _info_main(conn: Any) -> None:
    try:
        conn.send(("ok", _import_sections().environment()))
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))


def _receive(conn: Any, process: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not conn.poll(1.0):
        if not process.is_alive():
            raise SectionError(f"{what}: the process died (exit code {process.exitcode}; out of memory?)")
        if time.monotonic() > deadline:
            raise SectionError(f"{what}: no answer after {timeout:.0f} s")
    status, payload = conn.recv()
    if status != "ok":
        raise SectionError(f"{what} failed:\n{payload}")
    return payload


def _start(ctx: Any, target: Any, args: tuple) -> tuple[Any, Any]:
    parent_end, child_end = ctx.Pipe()
    process = ctx.Process(target=target, args=(child_end, *args))
    process.start()
    child_end.close()
    return process, parent_end


def _stop(process: Any) -> None:
    process.join(timeout=30)
    if process.is_alive():  # only our own child, by its object
        process.terminate()
        process.join(timeout=10)


def machine_environment(ctx: Any) -> dict[str, Any]:
    process, conn = _start(ctx, _info_main, ())
    try:
        return _receive(conn, process, "environment", 300)
    finally:
        _stop(process)


def run_section(ctx: Any, key: str, section: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Both sides (or the one ``main`` side) of a section: setup in turn, repeats interleaved, finish."""
    sides = ["baseline", "ours"] if section in TWO_SIDED else ["main"]
    raw: dict[str, Any] = {side: {"runs": []} for side in sides}
    processes: dict[str, tuple[Any, Any]] = {}
    timeout = float(cfg["timeout"])
    try:
        for side in sides:  # one after the other: setups never overlap a measurement
            print(f"  {key}/{side}: setting up", flush=True)
            processes[side] = _start(ctx, _side_main, (section, side, {**cfg, "label": f"{key}/{side}"}))
            raw[side]["setup"] = _receive(
                processes[side][1], processes[side][0], f"{key}/{side} setup", timeout
            )
        repeats = 1 if section in ("recipe", "memory", "scale") else int(cfg["repeats"])
        for repeat in range(repeats):
            for side in sides if repeat % 2 == 0 else sides[::-1]:
                process, conn = processes[side]
                conn.send("run")
                result = _receive(conn, process, f"{key}/{side} repeat {repeat + 1}", timeout)
                raw[side]["runs"].append(result)
                print(f"  {key}/{side} repeat {repeat + 1}/{repeats}: {brief(result)}", flush=True)
        for side in sides:
            process, conn = processes[side]
            conn.send("finish")
            raw[side]["finish"] = _receive(conn, process, f"{key}/{side} finish", timeout)
        raw["status"] = "ok"
    except (SectionError, OSError, EOFError) as error:
        raw["status"] = "error"
        raw["error"] = str(error)
        print(f"  {key}: ERROR {error_line(error)}", flush=True)
        print(str(error), file=sys.stderr, flush=True)
    finally:
        for process, conn in processes.values():
            conn.close()
            _stop(process)
    return raw


def brief(result: dict[str, Any]) -> str:
    keys = ("images_per_s", "seconds", "fp32_gflops", "bf16_gflops", "extract_images_per_s", "load_seconds")
    parts = [f"{k}={result[k]:.3g}" for k in keys if isinstance(result.get(k), (int, float))]
    if "run" in result:
        run = result.get("run") or {}
        parts.append(
            f"run={run.get('run_dir')} wall={run.get('wall_seconds')} test/acc={run.get('test_acc')}"
        )
    return ", ".join(parts) or "done"


# ---- summaries -----------------------------------------------------------------------------------------
def med(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def per_run(raw: dict[str, Any], side: str, key: str) -> list[float]:
    return [float(r[key]) for r in raw[side]["runs"] if r.get(key) is not None]


def paired(top: Sequence[float], bottom: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(top, bottom, strict=False) if b]


def rss(raw: dict[str, Any], side: str) -> float | None:
    return (raw.get(side, {}).get("finish") or {}).get("peak_rss_mb")


def fmt_rate(value: float, unit: str = "img/s") -> str:
    return f"{value:,.1f} {unit}" if value == value else "n/a"


def fmt_s(value: float) -> str:
    if value != value:
        return "n/a"
    return f"{value:,.2f} s" if value < 100 else f"{value:,.0f} s"


def fmt_ratio(value: float) -> str:
    return f"**{value:.2f}x**" if value == value else "n/a"


def with_rss(text: str, mb: float | None) -> str:
    return f"{text}; {mb:,.0f} MB RSS" if mb else text


def peak_of(results: dict[str, Any], device_suffix: str) -> dict[str, float]:
    summary = (results.get("matmul_peak" + device_suffix) or {}).get("summary") or {}
    return {k: summary[k] for k in ("fp32_gflops", "bf16_gflops") if k in summary}


def error_line(error: Any) -> str:
    """The first line of an error and, for a traceback, the exception it ended with."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return "error"
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def summarise(
    key: str, section: str, raw: dict[str, Any], results: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, Any]:
    label = key if cfg.get("device", "cpu") == "cpu" else f"{section} [{cfg.get('device_name', 'cuda')}]"
    if raw.get("status") != "ok":
        return {"rows": [row(label, "-", "-", "-", "error: " + error_line(raw.get("error", "")))]}
    return SUMMARISERS[section](label, raw, results, cfg, "_cuda" if key.endswith("_cuda") else "")


def row(section: str, baseline: str, ours: str, ratio: str, notes: str) -> dict[str, str]:
    return {"section": section, "baseline": baseline, "foodvision": ours, "ratio": ratio, "notes": notes}


def sum_matmul(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    fp32, bf16 = per_run(raw, "main", "fp32_gflops"), per_run(raw, "main", "bf16_gflops")
    info = raw["main"]["finish"]
    summary = {
        "fp32_gflops": med(fp32),
        "bf16_gflops": med(bf16),
        "bf16_over_fp32": med(paired(bf16, fp32)),
        "size": info["size"],
        "peak_rss_mb": rss(raw, "main"),
    }
    notes = (
        f"torch.mm {info['size']}x{info['size']}, {cfg['threads']} thread(s), median of {len(fp32)}; "
        "the physical limit the model sections are compared to (baseline: fp32, foodvision: bf16)"
    )
    cells = (
        f"fp32 {fmt_rate(summary['fp32_gflops'], 'GFLOP/s')}",
        f"bf16 {fmt_rate(summary['bf16_gflops'], 'GFLOP/s')}",
    )
    return {"summary": summary, "rows": [row(label, *cells, fmt_ratio(summary["bf16_over_fp32"]), notes)]}


def sum_rates(raw: dict[str, Any]) -> dict[str, Any]:
    base, ours = per_run(raw, "baseline", "images_per_s"), per_run(raw, "ours", "images_per_s")
    return {
        "baseline_images_per_s": med(base),
        "ours_images_per_s": med(ours),
        "ratio": med(paired(ours, base)),
        "ratio_of_medians": med(ours) / med(base) if base and ours else float("nan"),
        "paired_ratios": paired(ours, base),
        "baseline_peak_rss_mb": rss(raw, "baseline"),
        "ours_peak_rss_mb": rss(raw, "ours"),
    }


def sum_loading(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    summary = sum_rates(raw)
    base, ours = raw["baseline"]["finish"], raw["ours"]["finish"]
    images = raw["baseline"]["runs"][0]["images"]
    notes = (
        f"{images} train JPEGs -> normalised {cfg['image_size']} px batches of {base['batch']}, "
        f"{base['workers']} worker(s) each, worker start-up included; baseline: {base['pipeline']}; "
        f"foodvision: {ours['pipeline']}"
    )
    cells = (
        with_rss(fmt_rate(summary["baseline_images_per_s"]), summary["baseline_peak_rss_mb"]),
        with_rss(fmt_rate(summary["ours_images_per_s"]), summary["ours_peak_rss_mb"]),
    )
    return {"summary": summary, "rows": [row(label, *cells, fmt_ratio(summary["ratio"]), notes)]}


def sum_inference(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    summary = sum_rates(raw)
    base, ours = raw["baseline"]["finish"], raw["ours"]["finish"]
    flops = base.get("flops_per_image")
    peaks = peak_of(results, suffix)
    summary["flops_per_image"] = flops
    ours_path = f"{ours.get('engine', 'torch')} {'bf16 autocast' if ours['precision'] == 'bf16' else 'fp32'}"
    notes = [
        f"{raw['baseline']['runs'][0]['images']} preloaded test images (loading excluded); baseline fp32 NCHW "
        f"no_grad batch {base['batch']}; foodvision {ours_path} (channels_last, inference_mode) batch {ours['batch']}"
    ]
    alternative = per_run(raw, "ours", "alt_images_per_s")
    if alternative:
        summary["ours_eager_images_per_s"] = med(alternative)
        summary["ours_eager_ratio"] = med(paired(alternative, per_run(raw, "baseline", "images_per_s")))
        summary["engine_over_eager"] = med(paired(per_run(raw, "ours", "images_per_s"), alternative))
        notes.append(
            f"{ours.get('alternative')} (same process, interleaved): {summary['ours_eager_images_per_s']:.1f} img/s "
            f"= {summary['ours_eager_ratio']:.2f}x the baseline; {ours_path} over it: "
            f"{summary['engine_over_eager']:.2f}x"
        )
    if flops:
        notes.append(f"{flops / 1e9:.3f} GFLOP/image (FlopCounterMode)")
        base_peak = peaks.get("fp32_gflops")
        ours_peak = peaks.get("bf16_gflops" if ours["precision"] == "bf16" else "fp32_gflops")
        if base_peak and ours_peak:
            summary["baseline_fraction_of_peak"] = (
                summary["baseline_images_per_s"] * flops / (base_peak * 1e9)
            )
            summary["ours_fraction_of_peak"] = summary["ours_images_per_s"] * flops / (ours_peak * 1e9)
            notes.append(
                f"fraction of matmul peak: baseline {summary['baseline_fraction_of_peak']:.1%} of fp32, "
                f"foodvision {summary['ours_fraction_of_peak']:.1%} of "
                f"{'bf16' if ours['precision'] == 'bf16' else 'fp32'}"
            )
            if max(summary["baseline_fraction_of_peak"], summary["ours_fraction_of_peak"]) > 1:
                notes.append(
                    "a fraction over 100% means torch.mm is not this machine's limit in that precision"
                )
        else:
            notes.append("fraction of peak: run matmul_peak in the same run")
    cells = (
        with_rss(fmt_rate(summary["baseline_images_per_s"]), summary["baseline_peak_rss_mb"]),
        with_rss(fmt_rate(summary["ours_images_per_s"]), summary["ours_peak_rss_mb"]),
    )
    rows = [row(label, *cells, fmt_ratio(summary["ratio"]), "; ".join(notes))]
    acc_base, acc_ours = base.get("accuracy"), ours.get("accuracy")
    if acc_base is not None or acc_ours is not None:
        acc_base, acc_ours = acc_base or {}, acc_ours or {}
        skipped = acc_base.get("skipped") or acc_ours.get("skipped")
        if skipped:
            summary["accuracy"] = {"skipped": skipped}
            rows.append(row(f"{label}: test accuracy", "-", "-", "-", f"skipped: {skipped}"))
        else:
            delta = 100 * (acc_ours["acc"] - acc_base["acc"])
            precision_delta = 100 * (acc_ours["acc"] - acc_ours["acc_fp32"])  # vs eager torch fp32
            ok = delta >= -0.5
            summary["accuracy"] = {
                "checkpoint": cfg.get("ckpt_source"),
                "images": acc_base["images"],
                "baseline_acc": acc_base["acc"],
                "ours_acc": acc_ours["acc"],
                "ours_fp32_acc": acc_ours["acc_fp32"],
                "difference_points": delta,
                "vs_eager_fp32_points": precision_delta,
                "within_0.5_points": ok,
            }
            notes = (
                f"{acc_base['images']} fixed test images, checkpoint {cfg.get('ckpt_source')}; foodvision eager fp32 on "
                f"the same inputs: {acc_ours['acc']:.2%} vs {acc_ours['acc_fp32']:.2%} ({precision_delta:+.2f} pt from "
                f"{acc_ours.get('precision')}); limit -0.5 pt: {'OK' if ok else 'EXCEEDED'}"
            )
            cells = (f"{acc_base['acc']:.2%} (fp32)", f"{acc_ours['acc']:.2%} ({acc_ours.get('precision')})")
            rows.append(row(f"{label}: test accuracy", *cells, f"{delta:+.2f} pt", notes))
    return {"summary": summary, "rows": rows}


def sum_frozen(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    base_info, ours_info = raw["baseline"]["finish"], raw["ours"]["finish"]
    split = base_info["split_size"]
    base_ips = per_run(raw, "baseline", "images_per_s")
    ours_ips = per_run(raw, "ours", "images_per_s")
    extract_ips = per_run(raw, "ours", "extract_images_per_s")
    base_epoch = [split / r for r in base_ips]
    ours_epoch = [split / r for r in ours_ips]
    extract = [split / r for r in extract_ips]
    base_10 = [EPOCHS_WITH_CACHE * s for s in base_epoch]
    ours_10 = [x + EPOCHS_WITH_CACHE * s for x, s in zip(extract, ours_epoch, strict=False)]
    summary = {
        "split_size": split,
        "baseline_subset_images": base_info["subset"],
        "baseline_images_per_s": med(base_ips),
        "baseline_epoch_seconds": med(base_epoch),
        "ours_epoch_seconds": med(ours_epoch),
        "ours_rows": raw["ours"]["runs"][0]["images"],
        "ours_extract_images_per_s": med(extract_ips),
        "ours_extract_seconds": med(extract),
        "ratio_1_epoch": med(paired(base_epoch, ours_epoch)),
        f"baseline_{EPOCHS_WITH_CACHE}_epochs_seconds": med(base_10),
        f"ours_{EPOCHS_WITH_CACHE}_epochs_seconds": med(ours_10),
        f"ratio_{EPOCHS_WITH_CACHE}_epochs": med(paired(base_10, ours_10)),
        "baseline_peak_rss_mb": rss(raw, "baseline"),
        "ours_peak_rss_mb": rss(raw, "ours"),
        "trainer_precision": ours_info.get("trainer_precision"),
    }
    rows_note = (
        "" if summary["ours_rows"] == split else f" (measured on {summary['ours_rows']} rows, extrapolated)"
    )
    common = (
        f"train split {split} images; baseline: fp32 NCHW, whole model on images every epoch, head trains, measured on "
        f"{base_info['subset']} images at {summary['baseline_images_per_s']:.1f} img/s incl. loading "
        f"({base_info['workers']} worker(s)), EXTRAPOLATED to the split"
    )
    one = (
        f"{common}; foodvision: LitClassifier head epoch on cached pooled features (in-memory), Lightning "
        f"{summary['trainer_precision']}{rows_note}"
    )
    ten = (
        f"{EPOCHS_WITH_CACHE} epochs; foodvision adds the one-time extraction: extract_features at "
        f"{summary['ours_extract_images_per_s']:.1f} img/s incl. loading, measured on {base_info['subset']} images, "
        f"extrapolated to the split ({summary['ours_extract_seconds']:.1f} s); train split only, no validation"
    )
    rows = [
        row(
            f"{label} (1 epoch)",
            with_rss(
                fmt_s(summary["baseline_epoch_seconds"]) + " (extrapolated)", summary["baseline_peak_rss_mb"]
            ),
            with_rss(fmt_s(summary["ours_epoch_seconds"]), summary["ours_peak_rss_mb"]),
            fmt_ratio(summary["ratio_1_epoch"]),
            one,
        ),
        row(
            f"{label} ({EPOCHS_WITH_CACHE} epochs incl. extraction)",
            fmt_s(summary[f"baseline_{EPOCHS_WITH_CACHE}_epochs_seconds"]) + " (extrapolated)",
            fmt_s(summary[f"ours_{EPOCHS_WITH_CACHE}_epochs_seconds"]),
            fmt_ratio(summary[f"ratio_{EPOCHS_WITH_CACHE}_epochs"]),
            ten,
        ),
    ]
    return {"summary": summary, "rows": rows}


def sum_stage2(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    base_info, ours_info = raw["baseline"]["finish"], raw["ours"]["finish"]
    split = base_info["split_size"]
    base_ips, ours_ips = per_run(raw, "baseline", "images_per_s"), per_run(raw, "ours", "images_per_s")
    base_epoch, ours_epoch = [split / r for r in base_ips], [split / r for r in ours_ips]
    extraction = ours_info["extraction"]
    summary = {
        "split_size": split,
        "baseline_subset_images": base_info["subset"],
        "baseline_images_per_s": med(base_ips),
        "ours_images_per_s": med(ours_ips),
        "baseline_epoch_seconds": med(base_epoch),
        "ours_epoch_seconds": med(ours_epoch),
        "ratio": med(paired(base_epoch, ours_epoch)),
        "ours_rows": ours_info["rows"],
        "ours_prefix_extraction": extraction,
        "trainable_backbone_params": {
            "baseline": base_info["trainable_backbone_params"],
            "ours": ours_info["trainable_backbone_params"],
        },
        "baseline_peak_rss_mb": rss(raw, "baseline"),
        "ours_peak_rss_mb": rss(raw, "ours"),
    }
    same = base_info["trainable_backbone_params"] == ours_info["trainable_backbone_params"]
    rows_note = (
        "" if ours_info["rows"] == split else f", measured on {ours_info['rows']} rows and extrapolated"
    )
    notes = (
        f"blocks.5, blocks.6, conv_head train ({ours_info['trainable_backbone_params']:,} backbone params"
        f"{'' if same else ' vs baseline ' + format(base_info['trainable_backbone_params'], ',')}; BatchNorm frozen); "
        f"train split {split}; baseline: fp32 NCHW forward+backward of the whole model on images, "
        f"{summary['baseline_images_per_s']:.1f} img/s on {base_info['subset']} images incl. loading, EXTRAPOLATED; "
        f"foodvision: LitClassifier forward_suffix on cached prefix maps (depth {ours_info['depth']}, "
        f"{'x'.join(map(str, extraction['map_shape']))} {extraction['map_dtype']}), Lightning "
        f"{ours_info['trainer_precision']}, channels_last{rows_note}; the maps come from the stage-1 extraction pass "
        f"({extraction['images_per_s']:.1f} img/s measured on {extraction['images']} images)"
    )
    cells = (
        with_rss(
            fmt_s(summary["baseline_epoch_seconds"]) + " (extrapolated)", summary["baseline_peak_rss_mb"]
        ),
        with_rss(fmt_s(summary["ours_epoch_seconds"]), summary["ours_peak_rss_mb"]),
    )
    return {
        "summary": summary,
        "rows": [row(f"{label} (1 epoch)", *cells, fmt_ratio(summary["ratio"]), notes)],
    }


def sum_predict(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    base_info, ours_info = raw["baseline"]["finish"], raw["ours"]["finish"]
    load_b, load_o = per_run(raw, "baseline", "load_seconds"), per_run(raw, "ours", "load_seconds")
    lat_b, lat_o = per_run(raw, "baseline", "latency_seconds"), per_run(raw, "ours", "latency_seconds")
    summary = {
        **sum_rates(raw),
        "checkpoint": cfg.get("ckpt_source"),
        "baseline_load_seconds": med(load_b),
        "ours_load_seconds": med(load_o),
        "load_ratio": med(paired(load_b, load_o)),
        "baseline_latency_seconds": med(lat_b),
        "ours_latency_seconds": med(lat_o),
        "latency_ratio": med(paired(lat_b, lat_o)),
    }
    photos = len(raw["baseline"]["runs"][0]["latencies"])
    folder = raw["baseline"]["runs"][0]["images"]
    rows = [
        row(
            f"{label}: model load",
            fmt_s(summary["baseline_load_seconds"]),
            fmt_s(summary["ours_load_seconds"]),
            fmt_ratio(summary["load_ratio"]),
            f"checkpoint {cfg.get('ckpt_source')}; baseline: {base_info['path'].split(';')[0]}; foodvision: Predictor "
            "(metadata checks, channels_last); excluded from the rows below",
        ),
        row(
            f"{label}: one photo",
            f"{1000 * summary['baseline_latency_seconds']:.1f} ms",
            f"{1000 * summary['ours_latency_seconds']:.1f} ms",
            fmt_ratio(summary["latency_ratio"]),
            f"median over {photos} test photos: decode, preprocess, forward, probabilities",
        ),
        row(
            f"{label}: folder",
            with_rss(fmt_rate(summary["baseline_images_per_s"]), summary["baseline_peak_rss_mb"]),
            with_rss(fmt_rate(summary["ours_images_per_s"]), summary["ours_peak_rss_mb"]),
            fmt_ratio(summary["ratio"]),
            f"{folder} photos; baseline: {base_info['path']}; foodvision: {ours_info['path']}, batch "
            f"{ours_info['batch']}, {ours_info['workers']} workers (predict.py defaults)",
        ),
    ]
    return {"summary": summary, "rows": rows}


def sum_recipe(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    result = raw["main"]["runs"][0]
    run = result.get("run")
    summary: dict[str, Any] = {
        "source": result["source"],
        "run": run,
        "note": result.get("note"),
        "train_py_peak_rss_mb": raw["main"]["finish"].get("train_py_peak_rss_mb"),
    }
    if result["source"] == "ran train.py":
        summary.update(returncode=result["returncode"], seconds=result["seconds"])
    if not run:
        return {"summary": summary, "rows": [row(label, "-", "-", "-", result.get("note") or "no run")]}
    baseline_cell, ratio_cell, estimate_note = (
        "-",
        "-",
        "no plain-PyTorch estimate (run frozen_epoch and stage2_epoch too)",
    )
    frozen = (results.get("frozen_epoch") or {}).get("summary")
    stage2 = (results.get("stage2_epoch") or {}).get("summary")
    if frozen and stage2 and run.get("stage1_epochs") is not None and run.get("max_epochs"):
        stage1, total = int(run["stage1_epochs"]), int(run["max_epochs"])
        estimate = (
            stage1 * frozen["baseline_epoch_seconds"] + (total - stage1) * stage2["baseline_epoch_seconds"]
        )
        run_px, bench_px = run.get("image_size"), cfg["image_size"]
        scale = (int(run_px) / int(bench_px)) ** 2 if run_px else 1.0  # convolution work ~ pixels
        estimate *= scale
        summary["baseline_estimate_seconds"] = estimate
        if run.get("train_seconds"):
            baseline_cell = f"~{fmt_s(estimate)} (estimate)"
            ratio_cell = f"~{estimate / run['train_seconds']:.2f}x"
            scaled = (
                ""
                if scale == 1.0
                else f", scaled x{scale:.2f} from the sections' {bench_px} px to the run's {run_px} px (pixel count)"
            )
            estimate_note = (
                f"baseline estimate = {stage1} frozen + {total - stage1} stage-2 baseline epochs from this run's "
                f"sections{scaled} (training only: no validation, no test), vs foodvision's whole fit "
                "(train_seconds, validation and feature extraction included)"
            )
    test_acc = run.get("test_acc")
    notes = (
        f"{result['source']}: {run['run_dir']} ({result.get('note') or 'default recipe'}); "
        f"{run.get('stage1_epochs')} + {int(run.get('max_epochs') or 0) - int(run.get('stage1_epochs') or 0)} epochs, "
        f"{run.get('image_size')} px, {run.get('precision')}; wall {run.get('wall_seconds')} s incl. test; "
        f"test/acc {test_acc if test_acc is None else format(test_acc, '.2%')}; {estimate_note}"
    )
    ours_cell = (
        f"{fmt_s(float(run['train_seconds']))} fit"
        if run.get("train_seconds")
        else f"{run.get('wall_seconds')} s"
    )
    return {"summary": summary, "rows": [row(label, baseline_cell, ours_cell, ratio_cell, notes)]}


def sum_memory(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    measured = raw["main"]["runs"][0]["measurements"]
    plain = {m["command"]: m for m in measured if m["side"] == "plain"}
    ours = [m for m in measured if m["side"] == "foodvision"]
    summary = {"measurements": measured, "checkpoint": raw["main"]["runs"][0].get("checkpoint")}
    rows = []
    for item in ours:
        base = (
            plain.get(item["command"])
            if item["photos"] == (plain.get(item["command"]) or {}).get("photos")
            else None
        )
        if item["command"] == "train.py":
            base = plain.get("train.py")
        what = {
            "train.py": f"train.py {' '.join(cfg.get('memory_train_args') or []) or '(default recipe)'}",
            "eval.py": " ".join(["eval.py", *(cfg.get("memory_tool_args") or [])]),
            "predict.py": " ".join(["predict.py", *(cfg.get("memory_tool_args") or [])]) + ", a folder",
        }[item["command"]]
        notes = f"{item['photos']:,} photos; whole process, {item['seconds']:.0f} s"
        if base:
            notes += f"; plain PyTorch: {base['photos']:,} photos, {base['seconds']:.0f} s"
        if item["command"] == "train.py" and base:
            notes += " (training steps on images, batch 64, blocks.5+ trainable)"
        rows.append(
            row(
                f"{label}: {what} ({item['photos']:,} photos)",
                f"{base['peak_rss_mb']:,.0f} MB" if base else "-",
                f"{item['peak_rss_mb']:,.0f} MB",
                f"{item['peak_rss_mb'] / base['peak_rss_mb']:.2f}x RSS" if base else "-",
                notes,
            )
        )
    return {"summary": summary, "rows": rows}


def sum_scale(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    """One row per size: peak anonymous memory (the target: <= 1.5 GiB) and the seconds per photo beside
    those of the smallest size (the target: within 15 %)."""
    measured = raw["main"]["runs"][0]["measurements"]
    base = measured[0] if measured else None
    rows = []
    for item in measured:
        extraction, stage2 = item["extraction_s_per_photo"], item["stage2_s_per_photo"]
        ratios = (
            f"{extraction / base['extraction_s_per_photo']:.2f}x / {stage2 / base['stage2_s_per_photo']:.2f}x"
            if base and item is not base
            else "-"
        )
        notes = (
            f"train.py {' '.join(cfg.get('scale_train_args') or [])}, data.image_size={cfg.get('scale_image_size')}"
            f", {item['train_photos']:,} training photos; peak RSS {item['peak_rss_mb']:,.0f} MB, PSS "
            f"{item['peak_pss_mb']:,.0f} MB; extraction {item['extraction_seconds']:.0f} s "
            f"({1e3 * extraction:.2f} ms/photo), stage-2 epoch {item['stage2_epoch_seconds']:.0f} s for "
            f"{item.get('stage2_photos', item['train_photos']):,} photos "
            f"({1e3 * stage2:.2f} ms/photo); {item['seconds']:.0f} s in all"
            + (f"; code {item['code']}" if cfg.get("scale_code") else "")
        )
        rows.append(
            row(
                f"{label}: train.py ({item['train_photos']:,} photos)",
                "-",
                f"{item['peak_anon_mb']:,.0f} MB anon",
                ratios + " s/photo" if ratios != "-" else "-",
                notes,
            )
        )
    return {"summary": {"measurements": measured}, "rows": rows}


def sum_int8(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    summary = sum_rates(raw)
    base, ours = raw["baseline"]["finish"], raw["ours"]["finish"]
    agree = [a == b for a, b in zip(base.pop("predictions"), ours.pop("predictions"), strict=True)]
    summary.update(
        float32_test_acc=base["test_acc"],
        int8_test_acc=ours["test_acc"],
        accuracy_change_points=100 * (ours["test_acc"] - base["test_acc"]),
        top1_agreement=sum(agree) / max(1, len(agree)),
        float32_size_mb=base["size_mb"],
        int8_size_mb=ours["size_mb"],
        calibration_seconds=ours["calibration_seconds"],
        checkpoint=cfg.get("ckpt_source"),
    )
    notes = (
        f"ONNX Runtime, {cfg['threads']} thread(s), batch {base['batch']}, {base['image_size']} px, "
        f"{raw['baseline']['runs'][0]['images']} preloaded test images; test top-1 on {base['test_images']} "
        f"photos: float32 {base['test_acc']:.4f}, INT8 {ours['test_acc']:.4f} "
        f"({summary['accuracy_change_points']:+.2f} points, {summary['top1_agreement']:.1%} agreement); "
        f"{base['size_mb']:.1f} -> {ours['size_mb']:.1f} MB; static quantization (export.py quantize=int8) "
        f"calibrated on {cfg['int8_calibration']} train photos; checkpoint {cfg.get('ckpt_source')}"
    )
    cells = (
        with_rss(f"float32 {fmt_rate(summary['baseline_images_per_s'])}", summary["baseline_peak_rss_mb"]),
        with_rss(f"INT8 {fmt_rate(summary['ours_images_per_s'])}", summary["ours_peak_rss_mb"]),
    )
    return {"summary": summary, "rows": [row(label, *cells, fmt_ratio(summary["ratio"]), notes)]}


SUMMARISERS = {
    "matmul_peak": sum_matmul,
    "data_loading": sum_loading,
    "inference": sum_inference,
    "frozen_epoch": sum_frozen,
    "stage2_epoch": sum_stage2,
    "predict": sum_predict,
    "memory": sum_memory,
    "scale": sum_scale,
    "recipe": sum_recipe,
    "int8": sum_int8,
}


# ---- machine info and outputs --------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    return []


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def measured_at(document: dict[str, Any], key: str) -> str | None:
    """When section ``key`` of a results document was measured: the document's own run, or, for a section
    it kept with ``--merge``, the run that measured it (followed through earlier merges)."""
    merged = document.get("merged_from") or {}
    if key in (merged.get("measured") or {}):
        return merged["measured"][key]
    if key in merged.get("sections", []):  # documents written before ``measured`` was recorded
        return measured_at(
            {"started": merged.get("started"), "merged_from": merged.get("earlier_merges")}, key
        )
    return document.get("started")


def merge_earlier(document: dict[str, Any], path: Path) -> None:
    """``--merge``: the sections of an earlier results.json that this run does not measure, kept in its order
    (listed in ``merged_from``, each with the run that measured it)."""
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    new = set(document["plan"])
    kept = [key for key in earlier.get("plan", []) if key not in new and key in earlier.get("sections", {})]
    order = {key: i for i, key in enumerate(SECTION_ORDER)}
    document["plan"] = sorted(kept + document["plan"], key=lambda k: order.get(k.removesuffix("_cuda"), 99))
    for key in kept:
        document["sections"][key] = earlier["sections"][key]
    document["merged_from"] = {
        "started": earlier.get("started"),
        "command": earlier.get("command"),
        "sections": kept,
        "measured": {key: measured_at(earlier, key) for key in kept},
        "earlier_merges": earlier.get("merged_from"),
    }


def merge_note(merged: dict[str, Any]) -> str:
    """Which kept sections were measured when (one clause per run)."""
    measured = merged.get("measured") or {key: merged.get("started") for key in merged["sections"]}
    runs: dict[str, list[str]] = {}
    for key in merged["sections"]:
        runs.setdefault(str(measured.get(key)), []).append(key)
    clauses = [f"{', '.join(keys)} from the run of {started}" for started, keys in runs.items()]
    return f"Kept from earlier runs (--merge): {'; '.join(clauses)}."


def write_outputs(out: Path, document: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(document))


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(document: dict[str, Any]) -> str:
    machine, cfg = document["machine"], document["config"]
    env = machine.get("torch_environment") or {}
    lines = [
        "# foodvision benchmark"
        + (" (--quick: tiny sizes, 1 repeat, not a benchmark)" if cfg.get("quick") else ""),
        "",
        f"{document['started']}, {document.get('seconds', 0):.0f} s. Machine: {machine['cpu_model']}, "
        f"{machine['cores']} cores, {machine.get('memory_gb')} GB, torch {env.get('torch')} ({cfg['threads']} threads), "
        f"oneDNN bf16 {'yes' if env.get('mkldnn_bf16_supported') else 'no'}"
        + (f", GPU {env.get('cuda_device')}" if env.get("cuda_available") else "")
        + f"; load average {machine.get('load_average_start')} at start, {machine.get('load_average_end')} at end.",
        "",
        f"Data {cfg['data_root']}; MobileNetV2 (timm mobilenetv2_100, head 128/0.3), {cfg['image_size']} px; "
        f"{cfg['workers']} DataLoader worker(s) per side; {cfg['repeats']} repeat(s), sides interleaved.",
        "",
        *([f"**Warning:** {machine['busy_warning']}.", ""] if machine.get("busy_warning") else []),
        *([merge_note(document["merged_from"]), ""] if document.get("merged_from") else []),
        "| section | baseline | foodvision | ratio | notes |",
        "|---|---|---|---|---|",
    ]
    for key in document["plan"]:
        for item in (document["sections"].get(key) or {}).get("rows", []):
            lines.append(
                "| "
                + " | ".join(cell(item[k]) for k in ("section", "baseline", "foodvision", "ratio", "notes"))
                + " |"
            )
    lines += [
        "",
        "Ratio: foodvision's speed-up over the baseline (> 1: foodvision faster), the median of the per-repeat ratios "
        "of this run; for accuracy the difference in points. RSS: peak resident memory (ru_maxrss) of each side's "
        "own process, Python + torch included (importing torch and torchvision alone: "
        f"{env.get('import_peak_rss_mb', '?')} MB). Baseline: PIL `Image.open().convert('RGB')` + torchvision "
        "Resize/CenterCrop/ToTensor/Normalize, float32, NCHW, `torch.no_grad`, DataLoader. foodvision: its own "
        "classes and functions, channels_last, precision=auto (bf16 only on GPUs and CPUs with bf16 instructions) or float32 (`--precision 32`; each "
        "row's notes name its precision and engine), `torch.inference_mode`, "
        "cached features / prefix maps. Raw numbers: results.json.",
        "",
    ]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    chosen = selected_sections(args.sections)
    out = Path(args.out).resolve()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="foodvision-bench-") as scratch:
        if cfg["ckpt"]:
            # A training in progress replaces its best-*.ckpt: every section reads one unchanging copy.
            cfg["ckpt"] = shutil.copy2(cfg["ckpt"], Path(scratch) / Path(cfg["ckpt"]).name)
        command = [sys.executable, *sys.argv] if argv is None else ["bench/run.py", *argv]
        return run_all(args, cfg, chosen, out, ctx, command)


def run_all(
    args: argparse.Namespace, cfg: dict[str, Any], chosen: list[str], out: Path, ctx: Any, command: list[str]
) -> int:
    started = time.perf_counter()
    print(
        f"foodvision bench: sections {', '.join(chosen)}{' (quick)' if cfg['quick'] else ''} -> {out}",
        flush=True,
    )
    machine: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gb": memory_gb(),
        "platform": platform.platform(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    if machine["load_average_start"][0] > 0.5 * machine["cores"]:
        machine["busy_warning"] = (
            f"the machine was busy when the benchmark started (load average {machine['load_average_start'][0]} on "
            f"{machine['cores']} cores): timings are noisy, and with more torch threads than idle cores small "
            "operations can be many times slower (thread oversubscription)"
        )
        print(f"  WARNING: {machine['busy_warning']}", flush=True)
    machine["torch_environment"] = env = machine_environment(ctx)
    print(
        f"  {machine['cpu_model']}, {machine['cores']} cores, torch {env['torch']}, "
        f"bf16 {env['mkldnn_bf16_supported']}, cuda {env['cuda_available']}",
        flush=True,
    )
    plan: list[tuple[str, str, dict[str, Any]]] = []
    for section in chosen:
        plan.append((section, section, cfg))
        if env.get("cuda_available") and not args.no_cuda and section in CUDA_SECTIONS:
            plan.append(
                (f"{section}_cuda", section, {**cfg, "device": "cuda", "device_name": env.get("cuda_device")})
            )
    document: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "config": {k: v for k, v in cfg.items() if k != "device"},
        "plan": [key for key, _, _ in plan],
        "sections": {},
    }
    if args.merge:
        merge_earlier(document, out / "results.json")
    failed = []
    for index, (key, section, section_cfg) in enumerate(plan, 1):
        print(f"[{index}/{len(plan)}] {key}", flush=True)
        section_started = time.perf_counter()
        if section == "predict" and not section_cfg.get("ckpt"):
            note = f"skipped: needs a checkpoint ({section_cfg.get('ckpt_note')})"
            document["sections"][key] = {
                "status": "skipped",
                "note": note,
                "rows": [row(key, "-", "-", "-", note)],
            }
            print(f"  {note}", flush=True)
            continue
        if section == "inference":
            section_cfg = {**section_cfg, "accuracy": section_cfg.get("device", "cpu") == "cpu"}
        raw = run_section(ctx, key, section, section_cfg)
        try:
            summary = summarise(key, section, raw, document["sections"], section_cfg)
        except Exception:  # noqa: BLE001 - keep the raw numbers; say what went wrong
            raw["status"], raw["error"] = "error", "summary failed:\n" + traceback.format_exc()
            summary = {"rows": [row(key, "-", "-", "-", "error while summarising (see results.json)")]}
            print(raw["error"], file=sys.stderr, flush=True)
        if raw.get("status") != "ok":
            failed.append(key)
        document["sections"][key] = {
            "status": raw.get("status"),
            "seconds": round(time.perf_counter() - section_started, 1),
            **summary,
            "raw": raw,
        }
        for item in summary["rows"]:
            print(
                f"  => {item['section']}: {item['baseline']} | {item['foodvision']} | {item['ratio']}",
                flush=True,
            )
        document["seconds"] = time.perf_counter() - started
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        write_outputs(out, document)
    document["seconds"] = time.perf_counter() - started
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    # The children's RSS includes the peak of the process that spawned them: this one must stay small.
    machine["parent_peak_rss_mb"] = round(_maxrss_mb(), 1)
    machine["parent_imported_torch"] = "torch" in sys.modules
    write_outputs(out, document)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} ({document['seconds']:.0f} s)", flush=True)
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
