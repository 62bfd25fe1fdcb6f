"""The numbers of each section (medians, paired ratios, extrapolations) and ``results.md``: torch-free, run in
the parent process (which must stay small: its children inherit its peak RSS).

A section's summariser turns its raw measurements into ``summary`` (data, kept in results.json) and table
rows ``{section, baseline, foodvision, ratio, notes}``; each row's notes are one of the short templates in
:data:`NOTES`, filled from the summary.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EPOCHS_WITH_CACHE = 10
COLUMNS = ("section", "baseline", "foodvision", "ratio", "notes")
NOTES = {
    "matmul_peak": "torch.mm {size}x{size}, {threads} thread(s), median of {repeats}; the limit the model "
    "sections are compared to (baseline: fp32, foodvision: bf16)",
    "data_loading": "{images} train JPEGs -> {image_size} px batches of {batch}, {workers} worker(s) each, "
    "worker start-up included; baseline: {baseline_pipeline}; foodvision: {ours_pipeline}",
    "inference": "{images} preloaded test images (loading excluded); baseline fp32 NCHW no_grad batch "
    "{baseline_batch}; foodvision {ours_path} (channels_last, inference_mode) batch {ours_batch}",
    "inference_eager": "{alternative} (same process, interleaved): {ours_eager_images_per_s:.1f} img/s = "
    "{ours_eager_ratio:.2f}x the baseline; {ours_path} over it: {engine_over_eager:.2f}x",
    "inference_peak": "{gflops:.3f} GFLOP/image (FlopCounterMode); fraction of matmul peak: baseline "
    "{baseline_fraction_of_peak:.1%} of fp32, foodvision {ours_fraction_of_peak:.1%} of {ours_dtype}",
    "accuracy": "{images} fixed test images, checkpoint {checkpoint}; foodvision eager fp32 on the same inputs: "
    "{ours_fp32_acc:.2%} ({vs_eager_fp32_points:+.2f} pt from {precision}); limit -0.5 pt: {verdict}",
    "frozen_1": "train split {split_size} images; baseline: fp32 NCHW whole model on images, head trains, "
    "{baseline_images_per_s:.1f} img/s incl. loading on {baseline_subset_images} images, EXTRAPOLATED; "
    "foodvision: head epoch on cached pooled features (in-memory), Lightning {trainer_precision}{rows_note}",
    "frozen_n": "{epochs} epochs; foodvision adds the one-time extraction: {ours_extract_images_per_s:.1f} img/s "
    "incl. loading on {baseline_subset_images} images, extrapolated ({ours_extract_seconds:.1f} s); no validation",
    "stage2_epoch": "blocks.5, blocks.6, conv_head train ({params:,} backbone params; BatchNorm frozen); train "
    "split {split_size}; baseline: fp32 NCHW forward+backward on images, {baseline_images_per_s:.1f} img/s on "
    "{baseline_subset_images} images incl. loading, EXTRAPOLATED; foodvision: forward_suffix on cached prefix "
    "maps (depth {depth}, {map_shape} {map_dtype}), Lightning {trainer_precision}, channels_last, {ours_rows} "
    "rows extrapolated; maps from the stage-1 extraction ({extraction_rate:.1f} img/s on {extraction_images})",
    "predict_load": "checkpoint {checkpoint}; baseline: torch.load + build + load_state_dict; foodvision: "
    "Predictor (metadata checks, channels_last); excluded from the rows below",
    "predict_photo": "median over {photos} test photos: decode, preprocess, forward, probabilities",
    "predict_folder": "{folder} photos; baseline: {baseline_path}; foodvision: {ours_path}, batch {batch}, "
    "{workers} workers (predict.py defaults)",
    "memory": "{photos:,} photos; whole process, {seconds:.0f} s{plain}",
    "scale": "train.py {train_args}, data.image_size={image_size}, {train_photos:,} training photos; peak RSS "
    "{peak_rss_mb:,.0f} MB, PSS {peak_pss_mb:,.0f} MB; extraction {extraction_seconds:.0f} s ({extraction_ms:.2f} "
    "ms/photo), stage-2 epoch {stage2_epoch_seconds:.0f} s for {stage2_photos:,} photos ({stage2_ms:.2f} "
    "ms/photo); {seconds:.0f} s in all{code}",
    "recipe": "{source}: {run_dir} ({note}); {stage1} + {stage2} epochs, {image_size} px, {precision}; wall "
    "{wall_seconds} s incl. test; test/acc {test_acc}; {estimate}",
    "recipe_estimate": "baseline estimate = {stage1} frozen + {stage2} stage-2 baseline epochs of this run's "
    "sections{scaled} (training only), vs foodvision's whole fit (train_seconds: validation, extraction included)",
    "int8": "ONNX Runtime, {threads} thread(s), batch {batch}, {image_size} px, {images} preloaded test images; "
    "top-1 on {test_images} photos: float32 {float32_test_acc:.4f}, INT8 {int8_test_acc:.4f} "
    "({accuracy_change_points:+.2f} pt, {top1_agreement:.1%} agreement); {float32_size_mb:.1f} -> "
    "{int8_size_mb:.1f} MB; static quantization calibrated on {calibration} train photos; checkpoint {checkpoint}",
}
FOOTER = (
    "Ratio: foodvision's speed-up over the baseline (> 1: foodvision faster), the median of the per-repeat "
    "ratios of this run; for accuracy the difference in points. RSS: peak resident memory (ru_maxrss) of each "
    "side's own process, Python + torch included (importing torch and torchvision alone: {import_rss} MB). "
    "Baseline: PIL `Image.open().convert('RGB')` + torchvision Resize/CenterCrop/ToTensor/Normalize, float32, "
    "NCHW, `torch.no_grad`, DataLoader. foodvision: its own classes and functions, channels_last, precision=auto "
    "(bf16 only where the hardware has it) or float32 (`--precision 32`), `torch.inference_mode`, cached "
    "features / prefix maps. Raw numbers: results.json."
)


# ---- numbers -------------------------------------------------------------------------------------------
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
    return "n/a" if value != value else (f"{value:,.2f} s" if value < 100 else f"{value:,.0f} s")


def fmt_ratio(value: float) -> str:
    return f"**{value:.2f}x**" if value == value else "n/a"


def with_rss(text: str, mb: float | None) -> str:
    return f"{text}; {mb:,.0f} MB RSS" if mb else text


def row(section: str, baseline: str, ours: str, ratio: str, notes: str) -> dict[str, str]:
    return dict(zip(COLUMNS, (section, baseline, ours, ratio, notes), strict=True))


def error_line(error: Any) -> str:
    """The first line of an error and, for a traceback, the exception it ended with."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "error" if not lines else (lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}")


def rates(raw: dict[str, Any]) -> dict[str, Any]:
    """Images/s of both sides and foodvision's speed-up: what every two-sided section reports."""
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


def rate_cells(summary: dict[str, Any]) -> tuple[str, str, str]:
    return (
        with_rss(fmt_rate(summary["baseline_images_per_s"]), summary["baseline_peak_rss_mb"]),
        with_rss(fmt_rate(summary["ours_images_per_s"]), summary["ours_peak_rss_mb"]),
        fmt_ratio(summary["ratio"]),
    )


def rate_row(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    """The generic summariser of a two-sided section whose repeats return ``images_per_s``: one row."""
    summary = rates(raw)
    return {"summary": summary, "rows": [row(label, *rate_cells(summary), cfg.get("note", ""))]}


# ---- one summariser per section -------------------------------------------------------------------------
def sum_matmul(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    fp32, bf16 = per_run(raw, "main", "fp32_gflops"), per_run(raw, "main", "bf16_gflops")
    size = raw["main"]["finish"]["size"]
    summary = {
        "fp32_gflops": med(fp32),
        "bf16_gflops": med(bf16),
        "bf16_over_fp32": med(paired(bf16, fp32)),
        "size": size,
        "peak_rss_mb": rss(raw, "main"),
    }
    cells = (f"fp32 {fmt_rate(med(fp32), 'GFLOP/s')}", f"bf16 {fmt_rate(med(bf16), 'GFLOP/s')}")
    notes = NOTES["matmul_peak"].format(size=size, threads=cfg["threads"], repeats=len(fp32))
    return {"summary": summary, "rows": [row(label, *cells, fmt_ratio(summary["bf16_over_fp32"]), notes)]}


def sum_loading(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    base, ours = raw["baseline"]["finish"], raw["ours"]["finish"]
    notes = NOTES["data_loading"].format(
        images=raw["baseline"]["runs"][0]["images"], image_size=cfg["image_size"], batch=base["batch"],
        workers=base["workers"], baseline_pipeline=base["pipeline"], ours_pipeline=ours["pipeline"],
    )  # fmt: skip
    return rate_row(label, raw, results, {**cfg, "note": notes}, suffix)


def sum_inference(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    summary = rates(raw)
    base, ours = raw["baseline"]["finish"], raw["ours"]["finish"]
    flops = summary["flops_per_image"] = base.get("flops_per_image")
    ours_dtype = "bf16" if ours["precision"] == "bf16" else "fp32"
    ours_path = f"{ours.get('engine', 'torch')} {'bf16 autocast' if ours_dtype == 'bf16' else 'fp32'}"
    values = {"images": raw["baseline"]["runs"][0]["images"], "baseline_batch": base["batch"]}
    values.update(ours_path=ours_path, ours_batch=ours["batch"], alternative=ours.get("alternative"))
    notes = [NOTES["inference"].format(**values)]
    alternative = per_run(raw, "ours", "alt_images_per_s")
    if alternative:
        summary["ours_eager_images_per_s"] = med(alternative)
        summary["ours_eager_ratio"] = med(paired(alternative, per_run(raw, "baseline", "images_per_s")))
        summary["engine_over_eager"] = med(paired(per_run(raw, "ours", "images_per_s"), alternative))
        notes.append(NOTES["inference_eager"].format(**values, **summary))
    peak = (results.get("matmul_peak" + suffix) or {}).get("summary") or {}
    base_peak, ours_peak = peak.get("fp32_gflops"), peak.get(f"{ours_dtype}_gflops")
    if flops and base_peak and ours_peak:
        summary["baseline_fraction_of_peak"] = summary["baseline_images_per_s"] * flops / (base_peak * 1e9)
        summary["ours_fraction_of_peak"] = summary["ours_images_per_s"] * flops / (ours_peak * 1e9)
        notes.append(NOTES["inference_peak"].format(gflops=flops / 1e9, ours_dtype=ours_dtype, **summary))
    elif flops:
        notes.append(f"{flops / 1e9:.3f} GFLOP/image; fraction of peak: run matmul_peak in the same run")
    rows = [row(label, *rate_cells(summary), "; ".join(notes))]
    acc_base, acc_ours = base.get("accuracy"), ours.get("accuracy")
    if acc_base is None and acc_ours is None:
        return {"summary": summary, "rows": rows}
    acc_base, acc_ours = acc_base or {}, acc_ours or {}
    skipped = acc_base.get("skipped") or acc_ours.get("skipped")
    if skipped:
        summary["accuracy"] = {"skipped": skipped}
        rows.append(row(f"{label}: test accuracy", "-", "-", "-", f"skipped: {skipped}"))
        return {"summary": summary, "rows": rows}
    delta = 100 * (acc_ours["acc"] - acc_base["acc"])
    summary["accuracy"] = accuracy = {
        "checkpoint": cfg.get("ckpt_source"),
        "images": acc_base["images"],
        "baseline_acc": acc_base["acc"],
        "ours_acc": acc_ours["acc"],
        "ours_fp32_acc": acc_ours["acc_fp32"],
        "difference_points": delta,
        "vs_eager_fp32_points": 100 * (acc_ours["acc"] - acc_ours["acc_fp32"]),
        "within_0.5_points": delta >= -0.5,
    }
    verdict = "OK" if delta >= -0.5 else "EXCEEDED"
    notes_acc = NOTES["accuracy"].format(**accuracy, precision=acc_ours.get("precision"), verdict=verdict)
    cells = (f"{acc_base['acc']:.2%} (fp32)", f"{acc_ours['acc']:.2%} ({acc_ours.get('precision')})")
    rows.append(row(f"{label}: test accuracy", *cells, f"{delta:+.2f} pt", notes_acc))
    return {"summary": summary, "rows": rows}


def sum_frozen(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    base_info, ours_info = raw["baseline"]["finish"], raw["ours"]["finish"]
    split, n = base_info["split_size"], EPOCHS_WITH_CACHE
    base_ips, extract_ips = (
        per_run(raw, "baseline", "images_per_s"),
        per_run(raw, "ours", "extract_images_per_s"),
    )
    base_epoch = [split / r for r in base_ips]
    ours_epoch = [split / r for r in per_run(raw, "ours", "images_per_s")]
    extract = [split / r for r in extract_ips]
    base_n = [n * s for s in base_epoch]
    ours_n = [x + n * s for x, s in zip(extract, ours_epoch, strict=False)]
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
        f"baseline_{n}_epochs_seconds": med(base_n),
        f"ours_{n}_epochs_seconds": med(ours_n),
        f"ratio_{n}_epochs": med(paired(base_n, ours_n)),
        "baseline_peak_rss_mb": rss(raw, "baseline"),
        "ours_peak_rss_mb": rss(raw, "ours"),
        "trainer_precision": ours_info.get("trainer_precision"),
    }
    rows_note = "" if summary["ours_rows"] == split else f" ({summary['ours_rows']} rows, extrapolated)"
    extrapolated = fmt_s(summary["baseline_epoch_seconds"]) + " (extrapolated)"
    rows = [
        row(
            f"{label} (1 epoch)",
            with_rss(extrapolated, summary["baseline_peak_rss_mb"]),
            with_rss(fmt_s(summary["ours_epoch_seconds"]), summary["ours_peak_rss_mb"]),
            fmt_ratio(summary["ratio_1_epoch"]),
            NOTES["frozen_1"].format(**summary, rows_note=rows_note),
        ),
        row(
            f"{label} ({n} epochs incl. extraction)",
            fmt_s(summary[f"baseline_{n}_epochs_seconds"]) + " (extrapolated)",
            fmt_s(summary[f"ours_{n}_epochs_seconds"]),
            fmt_ratio(summary[f"ratio_{n}_epochs"]),
            NOTES["frozen_n"].format(**summary, epochs=n),
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
    notes = NOTES["stage2_epoch"].format(
        **summary, params=ours_info["trainable_backbone_params"], depth=ours_info["depth"],
        map_shape="x".join(map(str, extraction["map_shape"])), map_dtype=extraction["map_dtype"],
        trainer_precision=ours_info["trainer_precision"], extraction_rate=extraction["images_per_s"],
        extraction_images=extraction["images"],
    )  # fmt: skip
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
    summary: dict[str, Any] = {**rates(raw), "checkpoint": cfg.get("ckpt_source")}
    for key, name in (("load_seconds", "load"), ("latency_seconds", "latency")):
        base, ours = per_run(raw, "baseline", key), per_run(raw, "ours", key)
        summary.update(
            {f"baseline_{key}": med(base), f"ours_{key}": med(ours), f"{name}_ratio": med(paired(base, ours))}
        )
    first = raw["baseline"]["runs"][0]
    ms = lambda seconds: f"{1000 * seconds:.1f} ms"  # noqa: E731
    rows = [
        row(f"{label}: model load", fmt_s(summary["baseline_load_seconds"]), fmt_s(summary["ours_load_seconds"]),
            fmt_ratio(summary["load_ratio"]), NOTES["predict_load"].format(**summary)),
        row(f"{label}: one photo", ms(summary["baseline_latency_seconds"]), ms(summary["ours_latency_seconds"]),
            fmt_ratio(summary["latency_ratio"]), NOTES["predict_photo"].format(photos=len(first["latencies"]))),
        row(f"{label}: folder", *rate_cells(summary), NOTES["predict_folder"].format(
            folder=first["images"], baseline_path=base_info["path"], ours_path=ours_info["path"],
            batch=ours_info["batch"], workers=ours_info["workers"])),
    ]  # fmt: skip
    return {"summary": summary, "rows": rows}


def sum_memory(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    """One row per foodvision command, beside the plain script of the same command (on as many photos; for
    train.py any: its steps are a sample)."""
    measured = raw["main"]["runs"][0]["measurements"]
    plain = {m["command"]: m for m in measured if m["side"] == "plain"}
    tool_args = cfg.get("memory_tool_args") or []
    what = {
        "train.py": f"train.py {' '.join(cfg.get('memory_train_args') or []) or '(default recipe)'}",
        "eval.py": " ".join(["eval.py", *tool_args]),
        "predict.py": " ".join(["predict.py", *tool_args]) + ", a folder",
    }
    rows = []
    for item in (m for m in measured if m["side"] == "foodvision"):
        base = plain.get(item["command"])
        if base and item["command"] != "train.py" and base["photos"] != item["photos"]:
            base = None
        extra = f"; plain PyTorch: {base['photos']:,} photos, {base['seconds']:.0f} s" if base else ""
        notes = NOTES["memory"].format(**item, plain=extra)
        rows.append(
            row(
                f"{label}: {what[item['command']]} ({item['photos']:,} photos)",
                f"{base['peak_rss_mb']:,.0f} MB" if base else "-",
                f"{item['peak_rss_mb']:,.0f} MB",
                f"{item['peak_rss_mb'] / base['peak_rss_mb']:.2f}x RSS" if base else "-",
                notes,
            )
        )
    summary = {"measurements": measured, "checkpoint": raw["main"]["runs"][0].get("checkpoint")}
    return {"summary": summary, "rows": rows}


def sum_scale(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    """One row per size: peak anonymous memory (target <= 1.5 GiB), and the seconds per photo of extraction
    and of a stage-2 epoch beside those of the smallest size (target: within 15 %)."""
    measured = raw["main"]["runs"][0]["measurements"]
    rows = []
    for item in measured:
        base = measured[0]
        ratios = "-"
        if item is not base:
            ratios = (
                f"{item['extraction_s_per_photo'] / base['extraction_s_per_photo']:.2f}x / "
                f"{item['stage2_s_per_photo'] / base['stage2_s_per_photo']:.2f}x s/photo"
            )
        notes = NOTES["scale"].format_map({
            "stage2_photos": item["train_photos"], **item, "image_size": cfg.get("scale_image_size"),
            "train_args": " ".join(cfg.get("scale_train_args") or []), "extraction_ms": 1e3 * item["extraction_s_per_photo"],
            "stage2_ms": 1e3 * item["stage2_s_per_photo"], "code": f"; code {item['code']}" if cfg.get("scale_code") else "",
        })  # fmt: skip
        name = f"{label}: train.py ({item['train_photos']:,} photos)"
        rows.append(row(name, "-", f"{item['peak_anon_mb']:,.0f} MB anon", ratios, notes))
    return {"summary": {"measurements": measured}, "rows": rows}


def sum_recipe(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    """The default recipe's whole fit, beside the plain-PyTorch estimate from this run's epoch sections."""
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
    stage1 = int(run.get("stage1_epochs") or 0)
    stage2 = int(run.get("max_epochs") or 0) - stage1
    baseline_cell = ratio_cell = "-"
    estimate_note = "no plain-PyTorch estimate (run frozen_epoch and stage2_epoch too)"
    frozen = (results.get("frozen_epoch") or {}).get("summary")
    second = (results.get("stage2_epoch") or {}).get("summary")
    if frozen and second and run.get("stage1_epochs") is not None and run.get("max_epochs"):
        run_px, bench_px = run.get("image_size"), cfg["image_size"]
        scale = (int(run_px) / int(bench_px)) ** 2 if run_px else 1.0  # convolution work ~ pixels
        estimate = scale * (
            stage1 * frozen["baseline_epoch_seconds"] + stage2 * second["baseline_epoch_seconds"]
        )
        summary["baseline_estimate_seconds"] = estimate
        if run.get("train_seconds"):
            baseline_cell = f"~{fmt_s(estimate)} (estimate)"
            ratio_cell = f"~{estimate / run['train_seconds']:.2f}x"
            scaled = (
                "" if scale == 1.0 else f", scaled x{scale:.2f} from {bench_px} px to the run's {run_px} px"
            )
            estimate_note = NOTES["recipe_estimate"].format(stage1=stage1, stage2=stage2, scaled=scaled)
    test_acc = run.get("test_acc")
    notes = NOTES["recipe"].format_map({
        **run, "source": result["source"], "note": result.get("note") or "default recipe", "stage1": stage1,
        "stage2": stage2, "test_acc": test_acc if test_acc is None else format(test_acc, ".2%"), "estimate": estimate_note,
    })  # fmt: skip
    train = run.get("train_seconds")
    ours_cell = f"{fmt_s(float(train))} fit" if train else f"{run.get('wall_seconds')} s"
    return {"summary": summary, "rows": [row(label, baseline_cell, ours_cell, ratio_cell, notes)]}


def sum_int8(label: str, raw: dict[str, Any], results: dict, cfg: dict, suffix: str) -> dict[str, Any]:
    summary = rates(raw)
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
    notes = NOTES["int8"].format(
        **summary, threads=cfg["threads"], batch=base["batch"], image_size=base["image_size"],
        images=raw["baseline"]["runs"][0]["images"], test_images=base["test_images"],
        calibration=cfg["int8_calibration"],
    )  # fmt: skip
    cells = (
        with_rss(f"float32 {fmt_rate(summary['baseline_images_per_s'])}", summary["baseline_peak_rss_mb"]),
        with_rss(f"INT8 {fmt_rate(summary['ours_images_per_s'])}", summary["ours_peak_rss_mb"]),
    )
    return {"summary": summary, "rows": [row(label, *cells, fmt_ratio(summary["ratio"]), notes)]}


Summariser = Callable[[str, dict[str, Any], dict[str, Any], dict[str, Any], str], dict[str, Any]]


def summarise(
    summariser: Summariser, key: str, section: str, raw: dict[str, Any], results: dict[str, Any], cfg: dict
) -> dict[str, Any]:
    """``summariser``'s summary and rows of one section (``key``: ``<section>`` or ``<section>_cuda``)."""
    label = key if cfg.get("device", "cpu") == "cpu" else f"{section} [{cfg.get('device_name', 'cuda')}]"
    if raw.get("status") != "ok":
        return {"rows": [row(label, "-", "-", "-", "error: " + error_line(raw.get("error", "")))]}
    return summariser(label, raw, results, cfg, "_cuda" if key.endswith("_cuda") else "")


# ---- results.md ----------------------------------------------------------------------------------------
def merge_note(merged: dict[str, Any]) -> str:
    """Which kept sections were measured when (one clause per run)."""
    measured = merged.get("measured") or {key: merged.get("started") for key in merged["sections"]}
    runs: dict[str, list[str]] = {}
    for key in merged["sections"]:
        runs.setdefault(str(measured.get(key)), []).append(key)
    clauses = [f"{', '.join(keys)} from the run of {started}" for started, keys in runs.items()]
    return f"Kept from earlier runs (--merge): {'; '.join(clauses)}."


def markdown(document: dict[str, Any]) -> str:
    """results.md: the machine, the settings, one table of every section's rows, what the columns mean."""
    machine, cfg = document["machine"], document["config"]
    env = machine.get("torch_environment") or {}
    gpu = f", GPU {env.get('cuda_device')}" if env.get("cuda_available") else ""
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        "# foodvision benchmark"
        + (" (--quick: tiny sizes, 1 repeat, not a benchmark)" if cfg.get("quick") else ""),
        "",
        f"{document['started']}, {document.get('seconds', 0):.0f} s. Machine: {machine['cpu_model']}, "
        f"{machine['cores']} cores, {machine.get('memory_gb')} GB, torch {env.get('torch')} ({cfg['threads']} "
        f"threads), oneDNN bf16 {'yes' if env.get('mkldnn_bf16_supported') else 'no'}{gpu}; load average "
        f"{machine.get('load_average_start')} at start, {machine.get('load_average_end')} at end.",
        "",
        f"Data {cfg['data_root']}; MobileNetV2 (timm mobilenetv2_100, head 128/0.3), {cfg['image_size']} px; "
        f"{cfg['workers']} DataLoader worker(s) per side; {cfg['repeats']} repeat(s), sides interleaved.",
        "",
        *([f"**Warning:** {machine['busy_warning']}.", ""] if machine.get("busy_warning") else []),
        *([merge_note(document["merged_from"]), ""] if document.get("merged_from") else []),
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|---|---|---|",
    ]
    for key in document["plan"]:
        for item in (document["sections"].get(key) or {}).get("rows", []):
            lines.append("| " + " | ".join(cell(item[k]) for k in COLUMNS) + " |")
    lines += ["", FOOTER.format(import_rss=env.get("import_peak_rss_mb", "?")), ""]
    return "\n".join(lines)


def write_outputs(out: Path, document: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(document))
