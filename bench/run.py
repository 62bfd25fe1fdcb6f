"""`make bench` (`python bench/run.py [options]`): foodvision's fast paths against a plain PyTorch baseline.

Same data, same model (MobileNetV2, 224 px), same run. Each side of a section (baseline, foodvision) runs in a
process of its own (``multiprocessing`` spawn), so peak RSS is per side; the parent sends them the repeats in
alternating order (A B, B A, ...) and keeps every raw number. Reported: medians of the repeats, and ratios as
the median of the per-repeat paired ratios (foodvision's speed-up, > 1 is faster). Writes
``<out>/results.json`` (raw numbers, machine) and ``<out>/results.md`` (one table); ``--merge`` keeps the
other sections of an earlier run there. Sections: :data:`SECTIONS` (what each measures: ``bench/sections.py``).

    python bench/run.py                          # everything but running the recipe (minutes, 2 cores)
    python bench/run.py --quick --out /tmp/b     # tiny sizes, one repeat: a smoke test, not a benchmark
    python bench/run.py --sections inference,predict --ckpt lightning_logs/runs/x/checkpoints/best.ckpt
    python bench/run.py --sections recipe --run-recipe --recipe-args "trainer.max_epochs=8"
    python bench/run.py --sections memory --merge  # peak RSS of train.py, eval.py, predict.py
    python bench/run.py --sections scale --merge   # train.py's memory and s/photo at 3k, 20k, 100k photos

The parent process never imports torch (its peak RSS would be inherited by the children it spawns).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # sections and results; also seen by spawned children

import results  # noqa: E402 - torch-free: summaries and results.md
import tensor_path  # noqa: E402 - torch-free at the top: its summariser

TWO, ONE = ("baseline", "ours"), ("main",)


class Section(NamedTuple):
    """How a section runs: ``measure`` is ``module:Class`` in bench/ (built in each side's process),
    ``summarise`` a torch-free function of the raw numbers (default: baseline vs foodvision images/s)."""

    measure: str
    sides: tuple[str, ...] = TWO
    summarise: results.Summariser = results.rate_row
    repeats: bool = True  # False: one run (whole commands)
    cuda: bool = False  # also run on the GPU when there is one
    needs_ckpt: bool = False  # skipped without a checkpoint


# The sections, in the order they run and are listed (a new one: its class in a bench/ module, one line here).
SECTIONS: dict[str, Section] = {
    "matmul_peak": Section("sections:MatmulPeak", ONE, results.sum_matmul, cuda=True),
    "data_loading": Section("sections:DataLoading", TWO, results.sum_loading),
    "inference": Section("sections:Inference", TWO, results.sum_inference, cuda=True),
    "frozen_epoch": Section("sections:FrozenEpoch", TWO, results.sum_frozen),
    "stage2_epoch": Section("sections:Stage2Epoch", TWO, results.sum_stage2, cuda=True),
    "predict": Section("sections:Predict", TWO, results.sum_predict, needs_ckpt=True),
    "memory": Section("sections:Memory", ONE, results.sum_memory, repeats=False),
    "scale": Section("sections:Scale", ONE, results.sum_scale, repeats=False),
    "recipe": Section("sections:Recipe", ONE, results.sum_recipe, repeats=False),
    "int8": Section("sections:Int8", TWO, results.sum_int8),
    "tensor_path": Section("tensor_path:TensorPath", ONE, tensor_path.summarise, repeats=False),
}

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
    "scale_sizes": "3000,18180,100000",  # scale: training photos of each train.py run (18,180: food101-64px)
    "scale_image_size": 64,  # scale: data.image_size of those runs (the photos' own size)
}
QUICK = {
    **FULL,
    **dict(repeats=1, matmul_size=512, matmul_seconds=0.05, load_images=16, load_batch=8, infer_images=16),
    **dict(
        baseline_batch=8, ours_batch=16, acc_images=16, int8_calibration=16, train_images=16, train_batch=8
    ),
    **dict(extract_batch=16, frozen_rows=64, stage2_images=8, prefix_images=8, stage2_ours_images=16),
    **dict(latency_photos=2, folder_photos=8, predict_batch=8, memory_big_photos=24, memory_train_steps=1),
    **dict(scale_sizes="202,404", scale_image_size=32),
}


class SectionError(RuntimeError):
    pass


# ---- arguments and configuration -----------------------------------------------------------------------
def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    shared = ROOT / ".." / "shared" / "data"
    data_root = os.environ.get("FOOD101_ROOT") or shared / "food101-mini" / "food-101"
    scale_args = (
        "callbacks.finetune.stage1_epochs=1 trainer.max_epochs=2 +trainer.limit_train_batches=50 test=false"
    )
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny sizes, 1 repeat (tests; not a benchmark)")
    add("--sections", default="all", help=f"comma-separated, or all: {','.join(SECTIONS)} (default all)")
    add("--out", default=str(BENCH_DIR), help="folder for results.json/results.md (bench/)")
    add("--workers", type=int, default=1, help="DataLoader workers, both sides (default 1)")
    add("--threads", type=int, default=cores(), help="torch.set_num_threads (default all cores)")
    add("--repeats", type=int, default=None, help="timed repeats per side (default 3, quick 1)")
    add("--data-root", default=str(data_root), help="Food-101 layout or class folders")
    add("--image-size", type=int, default=224)
    add("--precision", choices=("auto", "32"), default="auto",
        help="foodvision's precision: auto (bf16 where the hardware has it) or 32 (float32: the ONNX Runtime\n"
        "path of CPUs without bf16); memory: also the tools' and train.py's precision")  # fmt: skip
    add("--ckpt", default="auto",
        help="checkpoint for accuracy and predict; auto: newest lightning_logs/runs/*/checkpoints/best-*.ckpt; none")  # fmt: skip
    add("--log-dir", default=str(ROOT / "lightning_logs"), help="where runs are (recipe, --ckpt auto)")
    add("--run-recipe", action="store_true", help="recipe: run train.py (default: read the newest run)")
    add("--recipe-args", default="", help='extra train.py overrides for --run-recipe, e.g. "seed=1"')
    add("--memory-train-args", default="trainer.max_epochs=10",
        help='memory: train.py overrides ("" runs the whole default recipe)')  # fmt: skip
    add(
        "--memory-tool-args",
        default="",
        help='memory: extra eval.py/predict.py overrides, e.g. "precision=32"',
    )
    add("--scale-root", default=str(shared / "food101-64px" / "food-101"),
        help="scale: the Food-101 layout its trees are made from")  # fmt: skip
    add("--scale-dir", default=str(Path(tempfile.gettempdir()) / "foodvision-scale"),
        help="scale: where the tree of photo variants is made and kept between runs")  # fmt: skip
    add("--scale-train-args", default=scale_args,
        help="scale: train.py overrides (default: 1 head + 1 stage-2 epoch of 50 batches; caches cover every photo)")  # fmt: skip
    add("--scale-code", default="",
        help="scale: a foodvision checkout whose train.py and src/ are measured (default this one)")  # fmt: skip
    add(
        "--merge",
        action="store_true",
        help="keep the sections of <out>/results.json this run does not measure",
    )
    add("--no-cuda", action="store_true", help="skip the GPU variants even when CUDA is available")
    add("--timeout", type=float, default=3600.0, help="seconds one step of a section may take")
    add("--set", action="append", default=[], metavar="KEY=N",
        help="override a size, e.g. --set train_images=512 (keys: " + ", ".join(sorted(FULL)) + ")")  # fmt: skip
    return parser.parse_args(argv)


def find_checkpoint(args: argparse.Namespace, log_dir: Path) -> tuple[str | None, str]:
    """``--ckpt``: a path, ``none``, or ``auto`` (the newest best-*.ckpt of the runs under ``--log-dir``)."""
    if args.ckpt.lower() in ("none", ""):
        return None, "--ckpt none"
    if args.ckpt != "auto":
        if not Path(args.ckpt).is_file():
            raise SystemExit(f"--ckpt {args.ckpt} does not exist")
        return str(Path(args.ckpt).resolve()), ""
    found = sorted(log_dir.glob("runs/*/checkpoints/best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if found:
        return str(found[-1]), f"newest best-*.ckpt under {log_dir}/runs"
    return None, f"no --ckpt given and no {log_dir}/runs/*/checkpoints/best-*.ckpt"


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
    ckpt, ckpt_note = find_checkpoint(args, log_dir)
    float32 = args.precision == "32"
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
        + (["trainer.precision=32-true"] if float32 else []),
        memory_tool_args=shlex.split(args.memory_tool_args) + (["precision=32"] if float32 else []),
        scale_root=str(Path(args.scale_root).resolve()),
        scale_dir=str(Path(args.scale_dir).resolve()),
        scale_train_args=shlex.split(args.scale_train_args)
        + (["trainer.precision=32-true"] if float32 else []),
        scale_code=str(Path(args.scale_code).resolve()) if args.scale_code else "",
        timeout=args.timeout,
        device="cpu",
    )
    return cfg


def selected_sections(text: str) -> list[str]:
    if text.strip() in ("", "all"):
        return list(SECTIONS)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen]


# ---- child processes -----------------------------------------------------------------------------------
def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _side_main(conn: Any, measure: str, side: str, cfg: dict[str, Any]) -> None:
    """One side of one section: set up, then answer ``run`` (one timed repeat) and ``finish``."""
    rss_at_start = maxrss_mb()
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads TQDM_* at import
    runner = None
    try:
        common = importlib.import_module("sections")
        common.setup_process(cfg)
        module, _, name = measure.partition(":")
        runner = getattr(importlib.import_module(module), name)(side, cfg)
        conn.send(
            (
                "ok",
                {"rss_at_start_mb": rss_at_start, "setup_peak_rss_mb": maxrss_mb(), **common.side_info(cfg)},
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
                conn.send(("ok", {**runner.finish(), "peak_rss_mb": maxrss_mb()}))
                return
    except BaseException:  # noqa: BLE001 - reported to the parent, which records it and goes on
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if runner is not None and hasattr(runner, "close"):
            runner.close()  # temporary files, also after an error (atexit does not run in these children)


def _info_main(conn: Any) -> None:
    try:
        conn.send(("ok", importlib.import_module("sections").environment()))
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


def run_section(ctx: Any, key: str, spec: Section, cfg: dict[str, Any]) -> dict[str, Any]:
    """Every side of a section: setups in turn (never overlapping a measurement), repeats interleaved, finish."""
    raw: dict[str, Any] = {side: {"runs": []} for side in spec.sides}
    processes: dict[str, tuple[Any, Any]] = {}
    timeout = float(cfg["timeout"])
    try:
        for side in spec.sides:
            print(f"  {key}/{side}: setting up", flush=True)
            processes[side] = _start(ctx, _side_main, (spec.measure, side, {**cfg, "label": f"{key}/{side}"}))
            raw[side]["setup"] = _receive(
                processes[side][1], processes[side][0], f"{key}/{side} setup", timeout
            )
        repeats = int(cfg["repeats"]) if spec.repeats else 1
        for repeat in range(repeats):
            for side in spec.sides if repeat % 2 == 0 else spec.sides[::-1]:
                process, conn = processes[side]
                conn.send("run")
                result = _receive(conn, process, f"{key}/{side} repeat {repeat + 1}", timeout)
                raw[side]["runs"].append(result)
                print(f"  {key}/{side} repeat {repeat + 1}/{repeats}: {brief(result)}", flush=True)
        for side in spec.sides:
            process, conn = processes[side]
            conn.send("finish")
            raw[side]["finish"] = _receive(conn, process, f"{key}/{side} finish", timeout)
        raw["status"] = "ok"
    except (SectionError, OSError, EOFError) as error:
        raw.update(status="error", error=str(error))
        print(f"  {key}: ERROR {results.error_line(error)}", flush=True)
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


# ---- machine and merging -------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU model, cores, vector flags, memory, platform, load: what the numbers depend on."""
    info: dict[str, Any] = {"cpu_model": platform.processor() or platform.machine(), "cores": cores()}
    info.update(cpu_count=os.cpu_count(), cpu_flags=[], memory_gb=None, platform=platform.platform())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                info["cpu_model"] = value.strip()
            elif name.strip() == "flags" and not info["cpu_flags"]:
                wanted = ("avx512", "amx", "avx2", "fma")
                info["cpu_flags"] = sorted({f for f in value.split() if f.startswith(wanted)})
    with contextlib.suppress(OSError, IndexError, ValueError):
        total = next(
            line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
        )
        info["memory_gb"] = round(int(total.split()[1]) / 1024**2, 1)
    info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    if info["load_average_start"][0] > 0.5 * info["cores"]:
        info["busy_warning"] = (
            f"the machine was busy when the benchmark started (load average {info['load_average_start'][0]} on "
            f"{info['cores']} cores): timings are noisy, and with more torch threads than idle cores small "
            "operations can be many times slower (thread oversubscription)"
        )
    return info


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
    """``--merge``: the sections of an earlier results.json that this run does not measure, kept in the
    sections' order (listed in ``merged_from``, each with the run that measured it)."""
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    new = set(document["plan"])
    kept = [key for key in earlier.get("plan", []) if key not in new and key in earlier.get("sections", {})]
    order = {key: i for i, key in enumerate(SECTIONS)}
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


merge_note = results.merge_note


# ---- main ----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    chosen = selected_sections(args.sections)
    with tempfile.TemporaryDirectory(prefix="foodvision-bench-") as scratch:
        if cfg["ckpt"]:
            # A training in progress replaces its best-*.ckpt: every section reads one unchanging copy.
            cfg["ckpt"] = shutil.copy2(cfg["ckpt"], Path(scratch) / Path(cfg["ckpt"]).name)
        command = [sys.executable, *sys.argv] if argv is None else ["bench/run.py", *argv]
        return run_all(args, cfg, chosen, Path(args.out).resolve(), mp.get_context("spawn"), command)


def run_all(
    args: argparse.Namespace, cfg: dict[str, Any], chosen: list[str], out: Path, ctx: Any, command: list[str]
) -> int:
    started = time.perf_counter()
    print(
        f"foodvision bench: sections {', '.join(chosen)}{' (quick)' if cfg['quick'] else ''} -> {out}",
        flush=True,
    )
    machine = machine_info()
    if machine.get("busy_warning"):
        print(f"  WARNING: {machine['busy_warning']}", flush=True)
    machine["torch_environment"] = env = machine_environment(ctx)
    print(f"  {machine['cpu_model']}, {machine['cores']} cores, torch {env['torch']}, bf16 "
          f"{env['mkldnn_bf16_supported']}, cuda {env['cuda_available']}", flush=True)  # fmt: skip
    plan: list[tuple[str, str, dict[str, Any]]] = []
    for section in chosen:
        plan.append((section, section, cfg))
        if env.get("cuda_available") and not args.no_cuda and SECTIONS[section].cuda:
            gpu = {**cfg, "device": "cuda", "device_name": env.get("cuda_device")}
            plan.append((f"{section}_cuda", section, gpu))
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
        spec, section_started = SECTIONS[section], time.perf_counter()
        if spec.needs_ckpt and not section_cfg.get("ckpt"):
            note = f"skipped: needs a checkpoint ({section_cfg.get('ckpt_note')})"
            document["sections"][key] = {
                "status": "skipped",
                "note": note,
                "rows": [results.row(key, "-", "-", "-", note)],
            }
            print(f"  {note}", flush=True)
            continue
        if section == "inference":  # test accuracy on the CPU only
            section_cfg = {**section_cfg, "accuracy": section_cfg.get("device", "cpu") == "cpu"}
        raw = run_section(ctx, key, spec, section_cfg)
        try:
            summary = results.summarise(spec.summarise, key, section, raw, document["sections"], section_cfg)
        except Exception:  # noqa: BLE001 - keep the raw numbers; say what went wrong
            raw["status"], raw["error"] = "error", "summary failed:\n" + traceback.format_exc()
            summary = {
                "rows": [results.row(key, "-", "-", "-", "error while summarising (see results.json)")]
            }
            print(raw["error"], file=sys.stderr, flush=True)
        if raw.get("status") != "ok":
            failed.append(key)
        seconds = round(time.perf_counter() - section_started, 1)
        document["sections"][key] = {"status": raw.get("status"), "seconds": seconds, **summary, "raw": raw}
        for item in summary["rows"]:
            print(
                f"  => {item['section']}: {item['baseline']} | {item['foodvision']} | {item['ratio']}",
                flush=True,
            )
        document["seconds"] = time.perf_counter() - started
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        results.write_outputs(out, document)
    document["seconds"] = time.perf_counter() - started
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    # The children's RSS includes the peak of the process that spawned them: this one must stay small.
    machine["parent_peak_rss_mb"] = round(maxrss_mb(), 1)
    machine["parent_imported_torch"] = "torch" in sys.modules
    results.write_outputs(out, document)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} ({document['seconds']:.0f} s)", flush=True)
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
