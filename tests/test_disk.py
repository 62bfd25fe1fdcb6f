"""Disk trouble loses nothing and ends in one line (issue #19, items 3, 5, 12, 13).

Every file foodvision writes goes to a per-process temporary name beside it and is renamed when complete,
so a full disk, a kill or a second process writing the same file leaves the previous file or nothing,
never half a file. A full disk, a read-only or a deleted run dir ends a command with one ``error:`` line
naming the file, exit 1 (predict: 2), no traceback. An unwritable cache folder is not fatal.

The full-disk and read-only cases run the real commands on a small tmpfs in a private mount namespace
(``unshare -m``, as root); where that is not possible they are skipped, and the monkeypatched tests
below cover the same code paths.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from foodvision.atomic import DiskWriteError, temporary_name, writable_cache_dir, write_text, write_with
from foodvision.data.verify import find_bad_images
from foodvision.inference.checkpoints import read_checkpoint
from tests.conftest import ROOT, TINY_RUN_SETTINGS, TinyRun, compose_tool, make_class_tree

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}
ENV.pop("HYDRA_FULL_ERROR", None)
TRAIN = list(TINY_RUN_SETTINGS)  # tiny_run's settings: its checkpoint size predicts this run's


def _can_mount_tmpfs() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as where:
        probe = f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(where)}"
        return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -m` and tmpfs mounts (root)")


def on_small_disk(mount: Path, size: int, script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a ``size``-byte tmpfs mounted at ``mount``, in a private mount namespace:
    the mount is gone when it ends, so the script copies out what the test looks at. ``$PY`` is this
    Python, ``$ROOT`` the repository."""
    mount.mkdir(parents=True, exist_ok=True)
    body = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount))} && cd {shlex.quote(str(ROOT))} && {script}"
    env = {**ENV, "PY": sys.executable, "ROOT": str(ROOT)}
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", body], env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_error_line(result: subprocess.CompletedProcess, pattern: str, code: int = 1) -> None:
    import re

    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.stderr[-4000:]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]


# ---- atomic writes --------------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_text(target, "old")

    def half_then_full(temporary: Path) -> None:
        temporary.write_text("half of the new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskWriteError, match=r"cannot write .*metrics\.json: the disk is full"):
        write_with(target, half_then_full)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_temporary_names_differ_between_processes_and_calls(tmp_path: Path) -> None:
    target = tmp_path / "verdicts.json"
    code = f"from foodvision.atomic import temporary_name; print(temporary_name({str(target)!r}))"
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names = {temporary_name(target), temporary_name(target), Path(theirs.stdout.strip())}
    assert len(names) == 3
    assert all(n.parent == tmp_path and n.name.startswith(".verdicts.json.") for n in names)


def test_two_evaluations_into_one_dir_both_finish(tiny_run: TinyRun, tmp_path: Path, monkeypatch) -> None:
    """A second eval into the same dir while the first streams its predictions (two `eval.py` in one
    second): both used to write `predictions.csv.partial`, and the first died renaming it."""
    import foodvision.evaluation.evaluate as evaluate_module

    out = tmp_path / "eval"
    real_stream = evaluate_module.stream_files
    started, nested = [], []

    def stream_and_start_another(*args, **kwargs):
        for number, batch in enumerate(real_stream(*args, **kwargs)):
            if number == 0 and not started:
                started.append(True)
                nested.append(evaluate_module.evaluate(cfg))  # the other eval runs to its end meanwhile
            yield batch

    monkeypatch.setattr(evaluate_module, "stream_files", stream_and_start_another)
    cfg = compose_tool(
        "eval",
        f"ckpt_path={tiny_run.checkpoint}",
        f"output_dir={out}",
        "report=false",
        "batch_size=4",
        "num_workers=0",
    )
    first = evaluate_module.evaluate(cfg)
    assert nested and first["num_images"] == nested[0]["num_images"] == 6 * 4
    with (out / "predictions.csv").open() as handle:
        assert len(list(csv.reader(handle))) == 1 + 6 * 4
    assert leftovers(out) == []


def test_onnx_export_on_a_full_disk_leaves_no_file_without_metadata(
    tiny_run: TinyRun, tmp_path: Path, monkeypatch
) -> None:
    import onnx

    from foodvision.cli.export import export

    output = tmp_path / "export" / "last.onnx"

    def full_disk(proto, path, *args, **kwargs) -> None:  # noqa: ANN001
        Path(path).write_bytes(proto.SerializeToString()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save", full_disk)
    monkeypatch.setattr(onnx, "save_model", full_disk)
    with pytest.raises(DiskWriteError, match=r"cannot write .*last\.onnx: the disk is full"):
        export(compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=onnx", f"output={output}"))
    assert list(output.parent.iterdir()) == []


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(
    compose_train, image_folder, monkeypatch
) -> None:
    """The disk fills up at epoch 1's save: last.ckpt stays epoch 0's, whole; the error names the file."""
    from foodvision.training.fit import train

    real_save = torch.save
    saves = []

    def fills_up_at_the_third_file(value, target, *args, **kwargs):  # noqa: ANN001
        if hasattr(target, "write") and not hasattr(target, "getvalue"):  # a file, not an in-memory buffer
            saves.append(target)
            if len(saves) >= 3:  # epoch 0: best and last; epoch 1: the disk is full
                target.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(value, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up_at_the_third_file)
    cfg = compose_train(
        "experiment=scratch_baseline",
        "model.scratch.widths=[8,16]",
        "trainer.max_epochs=2",
        "test=false",
        root=image_folder,
    )
    with pytest.raises(DiskWriteError, match=r"cannot write .*checkpoints/\S+\.ckpt: the disk is full"):
        train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert read_checkpoint(checkpoints / "last.ckpt")["epoch"] == 0
    assert leftovers(checkpoints) == []


# ---- unwritable caches (item 12) ------------------------------------------------------------------------
def test_an_unwritable_verdict_cache_falls_back_to_a_temporary_one(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """A cache folder that cannot be created or written (read-only, or a file in its way) costs one
    warning; the verdicts go to a private temporary cache that the next run reads."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-tmp"))
    (tmp_path / "system-tmp").mkdir()
    files = [str(p) for ps in make_class_tree(tmp_path / "photos", ["a", "b"], 3).values() for p in ps]
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    cache = blocked / "verified"
    with caplog.at_level(logging.INFO, logger="foodvision"):
        assert find_bad_images(files, cache_dir=cache, progress=False) == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(cache) in warnings[0], warnings
    fallback = writable_cache_dir(cache)
    assert fallback.is_dir() and fallback.is_relative_to(tmp_path / "system-tmp")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="foodvision"):
        assert find_bad_images(files, cache_dir=cache, progress=False) == {}
    assert not any("checked" in r.getMessage() for r in caplog.records)  # every verdict came from the cache


def test_writable_cache_dir_keeps_a_writable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "features"
    assert writable_cache_dir(folder) == folder and folder.is_dir() and list(folder.iterdir()) == []


# ---- the commands on a full, read-only or vanishing disk (item 5, item 13) ------------------------------
@needs_tmpfs
def test_a_full_disk_while_training_keeps_whole_checkpoints_and_ends_in_one_line(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    """Room for one checkpoint: best-epoch000.ckpt is written whole, last.ckpt is not written at all (it
    used to be a truncated copy from the system temporary folder), and the run ends in one line."""
    disk = tmp_path / "disk"
    size = tiny_run.checkpoint.stat().st_size * 3 // 2 + 256 * 1024
    args = [
        f"paths.root_dir={disk}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"data.root={tiny_run.data_root}",
        *TRAIN,
        "trainer.max_epochs=1",
    ]
    script = (
        f'"$PY" train.py {shlex.join(args)}; code=$?; cp -a {disk}/lightning_logs {tmp_path}/copy; exit $code'
    )
    result = on_small_disk(disk, size, script)
    assert_one_error_line(result, r"cannot write .*/checkpoints/last\.ckpt: the disk is full")
    (checkpoints,) = (tmp_path / "copy").glob("runs/*/checkpoints")
    assert {p.name for p in checkpoints.iterdir()} == {"best-epoch000.ckpt"}
    assert read_checkpoint(checkpoints / "best-epoch000.ckpt")["epoch"] == 0


@needs_tmpfs
def test_tools_on_a_full_disk_end_in_one_line_and_leave_no_half_file(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    """export (ONNX, TorchScript), eval and predict writing to a full disk; the image check's verdict
    cache on a full disk is not fatal."""
    disk = tmp_path / "disk"
    ckpt = tiny_run.checkpoint
    photos = tiny_run.data_root / "test"
    verdicts = (
        "from foodvision.data.verify import find_bad_images; import glob; "
        f"print(find_bad_images(glob.glob('{photos}/*/*'), cache_dir='{disk}/cache', progress=False))"
    )
    commands = {
        "onnx": f'"$PY" export.py ckpt_path={ckpt} format=onnx output={disk}/export/last.onnx',
        "torchscript": f'"$PY" export.py ckpt_path={ckpt} format=torchscript output={disk}/export/last.pt',
        "eval": f'"$PY" eval.py ckpt_path={ckpt} output_dir={disk}/eval progress=false',
        "predict": f'"$PY" predict.py ckpt_path={ckpt} inputs=[{photos}] output={disk}/out/predictions.csv',
        "verdicts": f'"$PY" -c "{verdicts}"',
    }
    script = (
        f"fallocate -l 1m {disk}/filler 2>/dev/null || dd if=/dev/zero of={disk}/filler bs=4k 2>/dev/null; "
    )
    for name, command in commands.items():
        script += f"{command} >{tmp_path}/{name}.out 2>{tmp_path}/{name}.err; echo $? >{tmp_path}/{name}.rc; "
    script += f"cp -a {disk} {tmp_path}/copy"
    on_small_disk(disk, 1024 * 1024, script)

    def result(name: str) -> subprocess.CompletedProcess:
        read = (tmp_path / f"{name}.{{}}").as_posix().format
        rc = int(Path(read("rc")).read_text())
        return subprocess.CompletedProcess(
            [], rc, Path(read("out")).read_text(), Path(read("err")).read_text()
        )

    assert_one_error_line(result("onnx"), r"cannot write .*/export/last\.onnx: the disk is full")
    assert_one_error_line(result("torchscript"), r"cannot write .*/export/last\.pt: the disk is full")
    assert_one_error_line(result("eval"), r"cannot write .*/eval/\S+: the disk is full")
    assert_one_error_line(result("predict"), r"cannot write .*/out/predictions\.csv: the disk is full", 2)
    verdicts_run = result("verdicts")
    assert verdicts_run.returncode == 0 and verdicts_run.stdout.strip() == "{}", verdicts_run.stderr
    copy = tmp_path / "copy"
    assert not (copy / "export").exists() or list((copy / "export").iterdir()) == []
    assert not (copy / "out" / "predictions.csv").exists()
    assert leftovers(copy) == []


@needs_tmpfs
def test_a_read_only_disk_is_one_line_and_a_read_only_cache_is_not_fatal(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    train_args = [f"paths.root_dir={disk}", f"data.root={tiny_run.data_root}", *TRAIN, "trainer.max_epochs=1"]
    photos = tiny_run.data_root / "test"
    verdicts = (
        "import logging, glob; logging.basicConfig(level=logging.WARNING); "
        "from foodvision.data.verify import find_bad_images; "
        f"print(find_bad_images(glob.glob('{photos}/*/*'), cache_dir='{disk}/data/cache/verified', progress=False))"
    )
    script = (
        f"mkdir -p {disk}/data/cache && mount -o remount,ro {disk} && "
        f'"$PY" train.py {shlex.join(train_args)} >{tmp_path}/train.out 2>{tmp_path}/train.err; '
        f"echo $? >{tmp_path}/train.rc; "
        f'"$PY" eval.py ckpt_path={tiny_run.checkpoint} output_dir={disk}/eval progress=false '
        f">{tmp_path}/eval.out 2>{tmp_path}/eval.err; echo $? >{tmp_path}/eval.rc; "
        f'TMPDIR={tmp_path} "$PY" -c "{verdicts}" >{tmp_path}/verdicts.out 2>{tmp_path}/verdicts.err; '
        f"echo $? >{tmp_path}/verdicts.rc"
    )
    on_small_disk(disk, 1024 * 1024, script)

    def result(name: str) -> subprocess.CompletedProcess:
        rc = int((tmp_path / f"{name}.rc").read_text())
        out, err = (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()
        return subprocess.CompletedProcess([], rc, out, err)

    assert_one_error_line(
        result("train"), r"cannot write into .*lightning_logs.*: the filesystem is read-only"
    )
    assert_one_error_line(result("eval"), r"cannot write .*/eval: the filesystem is read-only")
    verdicts_run = result("verdicts")
    assert verdicts_run.returncode == 0 and verdicts_run.stdout.strip() == "{}", verdicts_run.stderr
    warnings = [line for line in verdicts_run.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "read-only" in warnings[0] and str(tmp_path) in warnings[0], warnings


def test_a_run_dir_deleted_while_training_is_one_error_line(tiny_run: TinyRun, tmp_path: Path) -> None:
    args = [
        f"paths.root_dir={tmp_path}",
        f"data.root={tiny_run.data_root}",
        *TRAIN,
        "trainer.max_epochs=1",
        "+callbacks.breaker._target_=tests.disk_faults.DeleteRunDir",
    ]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_one_error_line(result, r"cannot write .*: its folder does not exist \(deleted while running\?\)")
    assert list((tmp_path / "lightning_logs" / "runs").iterdir()) == []  # deleted, and not recreated
