"""Lose nothing: last.ckpt per epoch and exact resume after SIGKILL, every bad photo found before training,
clear errors for bad config values and damaged or foreign checkpoints, sweep exit codes."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from foodvision.checkpoints import read_checkpoint
from foodvision.config_check import ConfigError
from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.verify import BadImagesError, find_bad_images
from foodvision.errors import ModelLoadError
from foodvision.train import train

from .conftest import ROOT, make_class_tree

QUIET = [
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]
SMALL = [
    "experiment=scratch_baseline",
    "model.scratch.widths=[8,16]",
    "data=imagefolder",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.precision=32-true",
    "optimizer.lr=3e-3",
    "scheduler=none",
]


def make_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (PIL refuses it as a decompression bomb)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[16:29])  # width, height, depth, colour type, ... after the 'IHDR' tag
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def make_truncated_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def plant_bad_files(root: Path) -> list[Path]:
    """A bomb and a truncated JPEG in each split of an image-folder tree."""
    planted = []
    for split in ("train", "validation", "test"):
        planted.append(make_bomb(root / split / "baklava" / f"bomb_{split}.png"))
        planted.append(make_truncated_jpeg(root / split / "apple_pie" / f"cut_{split}.jpg"))
    return planted


def run_cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- bad photos ---------------------------------------------------------------------------------------
def test_bomb_is_a_bad_file_naming_the_path(tmp_path: Path) -> None:
    bomb = make_bomb(tmp_path / "bomb.png")
    with pytest.raises(BadImageError, match="bomb.png.*too large"):
        load_rgb(bomb)


def test_every_bad_file_of_every_split_is_reported_before_training(
    compose_train, image_folder, tmp_path
) -> None:
    planted = plant_bad_files(image_folder)
    cfg = compose_train(*SMALL[:2], root=image_folder)
    with pytest.raises(BadImagesError) as caught:
        train(cfg)
    message = str(caught.value)
    assert message.startswith("6 image(s)")
    for path in planted:
        assert str(path) in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
    listed = (tmp_path / "run" / "bad_images.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(map(str, planted))


def test_skip_bad_images_trains_and_lists_each_file_once(compose_train, image_folder, tmp_path) -> None:
    planted = plant_bad_files(image_folder)
    cfg = compose_train(*SMALL[:2], "data.skip_bad_images=true", "trainer.max_epochs=2", root=image_folder)
    _, metrics = train(cfg)
    assert metrics["skipped_bad_images"] == 6 and sorted(metrics["bad_images"]) == sorted(map(str, planted))
    assert metrics["test/acc"] >= 0.0  # the test split ran without its two bad files
    lines = (tmp_path / "run" / "bad_images.tsv").read_text().splitlines()
    assert len(lines) == 6 and len({line.split("\t")[0] for line in lines}) == 6


def test_verdicts_are_cached_and_a_changed_file_is_checked_again(tmp_path: Path, monkeypatch) -> None:
    files = make_class_tree(tmp_path / "tree", ["a", "b"], 5)
    paths = [str(p) for fs in files.values() for p in fs]
    cache = tmp_path / "cache"
    assert find_bad_images(paths, cache_dir=cache, progress=False) == {}
    decoded: list[str] = []
    import foodvision.data.verify as verify

    monkeypatch.setattr(verify, "load_rgb", lambda path, draft_size=None: decoded.append(path))
    assert find_bad_images(paths, cache_dir=cache, progress=False) == {}
    assert decoded == []  # every verdict came from the cache
    monkeypatch.undo()
    make_truncated_jpeg(Path(paths[3]))
    bad = find_bad_images(paths, cache_dir=cache, progress=False)
    assert list(bad) == [paths[3]]


# ---- config values ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("data.image_size=-5", "data.image_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.max_per_class.train=0", "data.max_per_class.train"),
        ("optimizer.lr=0", "optimizer.lr"),
    ],
)
def test_bad_config_values_are_refused_naming_the_key(compose_train, image_folder, override, key) -> None:
    cfg = compose_train(*SMALL[:2], override, root=image_folder)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(cfg)


def test_stage1_at_or_beyond_max_epochs_is_refused(compose_train, image_folder) -> None:
    cfg = compose_train(
        "model=mobilenetv2_ft", "model.pretrained=false", "trainer.max_epochs=8", root=image_folder
    )
    with pytest.raises(ConfigError, match=r"finetune\.stage1_epochs=8 >= trainer\.max_epochs=8"):
        train(cfg)


def test_cli_user_error_is_one_message_without_traceback(image_folder: Path, tmp_path: Path) -> None:
    result = run_cli(
        "train.py", *SMALL, f"data.root={image_folder}", f"paths.root_dir={tmp_path}", "data.batch_size=0", *QUIET,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: invalid config: data.batch_size=0 (must be an integer >= 1)" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_top_k_zero_is_refused(tiny_run, tmp_path: Path) -> None:
    photo = next((tiny_run.data_root / "test").glob("*/*.jpg"))
    result = run_cli(
        "predict.py", f"ckpt_path={tiny_run.checkpoint}", f"inputs=[{photo}]", "top_k=0", cwd=tmp_path
    )
    assert result.returncode == 2 and "top_k" in result.stderr and "Traceback" not in result.stderr


# ---- checkpoints --------------------------------------------------------------------------------------
class _Payload:
    """Pickles to a call that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def damaged_checkpoints(good: Path, where: Path) -> dict[str, Path]:
    where.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    files = {
        "empty": where / "empty.ckpt",
        "truncated": where / "truncated.ckpt",
        "text": where / "notes.ckpt",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"].write_text("not a checkpoint\n")
    files["malicious"] = where / "malicious.ckpt"
    torch.save({"state_dict": {}, "foodvision": _Payload(where / "PWNED")}, files["malicious"])
    return files


def test_damaged_and_foreign_checkpoints_are_told_apart(tiny_run, tmp_path: Path) -> None:
    files = damaged_checkpoints(tiny_run.checkpoint, tmp_path)
    expected = {
        "empty": "empty \\(0 bytes\\)",
        "truncated": "truncated or damaged",
        "text": "not a PyTorch checkpoint",
        "malicious": "pickled Python objects",
    }
    for name, pattern in expected.items():
        with pytest.raises(ModelLoadError, match=pattern) as caught:
            read_checkpoint(files[name])
        assert "weights_only=False" not in str(caught.value)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["truncated", "malicious"])
def test_tools_report_bad_checkpoints_with_their_exit_codes(tiny_run, tmp_path: Path, name: str) -> None:
    ckpt = damaged_checkpoints(tiny_run.checkpoint, tmp_path / "ckpts")[name]
    photo = next((tiny_run.data_root / "test").glob("*/*.jpg"))
    predict = run_cli("predict.py", f"ckpt_path={ckpt}", f"inputs=[{photo}]", cwd=tmp_path)
    assert predict.returncode == 2 and f"cannot load {ckpt}" in predict.stderr
    resume = run_cli(
        "train.py", *SMALL, f"data.root={tiny_run.data_root}", f"paths.root_dir={tmp_path}", f"ckpt_path={ckpt}", *QUIET,
        cwd=tmp_path,
    )  # fmt: skip
    assert resume.returncode == 1 and f"cannot load {ckpt}" in resume.stderr
    for result in (predict, resume):
        assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr
    assert not (tmp_path / "ckpts" / "PWNED").exists()


# ---- sweeps -------------------------------------------------------------------------------------------
def test_multirun_where_every_trial_fails_exits_non_zero(image_folder: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py", "-m", *SMALL, f"data.root={image_folder}", f"paths.root_dir={tmp_path}",
        "data.batch_size=0,-1", f"hydra.sweep.dir={sweep}", *QUIET, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "all 2 trials of the sweep failed" in result.stderr
    assert (sweep / "0" / "failed.json").is_file() and (sweep / "summary.md").is_file()


# ---- SIGKILL and resume -------------------------------------------------------------------------------
def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_sigkill_resume_repeats_no_epoch_and_ends_with_the_uninterrupted_weights(
    image_folder: Path, tmp_path: Path
) -> None:
    """Killed in the middle of epoch 4 (after three finished epochs that did not improve val accuracy),
    resumed with ckpt_path=last in the same run dir: epochs and steps continue from the kill point and the
    final weights are the uninterrupted run's, bit for bit."""
    common = [*SMALL, f"data.root={image_folder}", "trainer.max_epochs=6", "test=false", *QUIET]
    straight = run_cli("train.py", *common, f"paths.root_dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    root = tmp_path / "killed"
    kill = ["+callbacks.killer._target_=tests.killer.KillAt", "+callbacks.killer.epoch=4"]
    killed = run_cli("train.py", *common, f"paths.root_dir={root}", *kill, cwd=ROOT)
    assert killed.returncode == -9
    (run_dir,) = (root / "lightning_logs" / "runs").iterdir()
    at_kill = _last(run_dir)
    assert at_kill["epoch"] == 3  # last.ckpt is the last finished epoch ...
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    best_epoch = torch.load(best, map_location="cpu", weights_only=True)["epoch"]
    assert best_epoch < 3  # ... not the best one (val accuracy stopped improving before epoch 3)
    config_before = (run_dir / "config.yaml").read_text()

    resumed = run_cli("train.py", *common, f"paths.root_dir={root}", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in (root / "lightning_logs" / "runs").iterdir()] == [run_dir.name]  # no stray dir
    assert (run_dir / "config.yaml").read_text() == config_before
    log = (run_dir / "train.log").read_text()
    assert "resuming from" in log and log.index("resuming from") > 0  # appended to the original log
    final = _last(run_dir)
    (straight_dir,) = (tmp_path / "straight" / "lightning_logs" / "runs").iterdir()
    reference = _last(straight_dir)
    assert final["epoch"] == reference["epoch"] == 5
    assert final["global_step"] == reference["global_step"]  # epoch 4 was trained once, not twice
    steps_per_epoch = reference["global_step"] // 6
    assert at_kill["global_step"] == 4 * steps_per_epoch
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
