"""Lose nothing: last.ckpt per epoch and exact resume after SIGKILL, every bad photo found before training,
clear errors for bad config values and damaged or foreign checkpoints, sweep exit codes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from foodvision.config.check import ConfigError
from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.verify import BadImagesError, find_bad_images
from foodvision.errors import ModelLoadError
from foodvision.inference.checkpoints import read_checkpoint
from foodvision.training.fit import train

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
    assert len(list((run_dir / ".hydra").glob("resume-*/overrides.yaml"))) == 1  # the resume's own record


def _kill_then_resume(common: list[str], root: Path, kills: list[int]) -> tuple[Path, list[dict], str]:
    """Run ``common`` under ``root``, SIGKILLed in epoch ``kills[0]`` (so last.ckpt holds the epoch before),
    resumed with ckpt_path=last and killed again in each further epoch of ``kills``, then resumed to the
    end: (run dir, last.ckpt at each kill, what the resumed runs logged)."""
    at_kills = []
    run_dir = None
    log_before = ""
    for number, epoch in enumerate(kills):
        kill = ["+callbacks.killer._target_=tests.killer.KillAt", f"+callbacks.killer.epoch={epoch}"]
        resume = ["ckpt_path=last"] if number else []
        killed = run_cli("train.py", *common, f"paths.root_dir={root}", *kill, *resume, cwd=ROOT)
        assert killed.returncode == -9, killed.stderr[-2000:]
        (run_dir,) = (root / "lightning_logs" / "runs").iterdir()
        at_kills.append(_last(run_dir))
        log_before = log_before or (run_dir / "train.log").read_text()
    assert run_dir is not None
    resumed = run_cli("train.py", *common, f"paths.root_dir={root}", "ckpt_path=last", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return run_dir, at_kills, (run_dir / "train.log").read_text()[len(log_before) :]


CACHED_RECIPE = [
    "data=imagefolder",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.precision=32-true",
    "test=false",
    *QUIET,
]
TWO_STAGE = ["model=mobilenetv2_ft", "callbacks.finetune.stage1_epochs=2", "trainer.max_epochs=4"]


@pytest.fixture(scope="module")
def cached_recipe_runs(tmp_path_factory: pytest.TempPathFactory):
    """A small tree (3 classes: 12/4/4 photos) and each recipe's uninterrupted run, trained once per module."""
    base = tmp_path_factory.mktemp("cached_recipes")
    data = base / "food3"
    for split, count, seed in (("train", 12, 0), ("validation", 4, 100), ("test", 4, 200)):
        make_class_tree(data / split, ["apple_pie", "baklava", "bibimbap"], count, start_seed=seed)
    references: dict[str, dict] = {}

    def reference(name: str, recipe: list[str]) -> dict:
        if name not in references:
            root = base / f"straight-{name}"
            common = [*CACHED_RECIPE, f"data.root={data}", *recipe]
            straight = run_cli("train.py", *common, f"paths.root_dir={root}", cwd=base)
            assert straight.returncode == 0, straight.stderr[-2000:]
            (run_dir,) = (root / "lightning_logs" / "runs").iterdir()
            references[name] = _last(run_dir)
        return references[name]

    return data, reference


@pytest.mark.parametrize(
    ("name", "recipe", "kills"),
    [
        pytest.param(
            "features", ["experiment=mobilenetv2_features", "trainer.max_epochs=3"], [1], id="features"
        ),
        pytest.param(
            "two_stage", TWO_STAGE, [1, 2, 3], id="two-stage-stage1-switch-stage2", marks=pytest.mark.slow
        ),  # three kills and resumes: ~75 s; make test-all (CI) runs it
    ],
)
def test_sigkill_resume_of_the_cached_feature_recipes_is_bit_exact(
    cached_recipe_runs, tmp_path: Path, name: str, recipe: list[str], kills: list[int]
) -> None:
    """The cached-feature recipes SIGKILLed and resumed from last.ckpt, on the cache the killed run built:
    the head on cached pooled features (killed in epoch 1); two stages, stage 2 on cached feature maps,
    killed in stage 1 (epoch 1), right after the last stage-1 epoch (epoch 2: resumed at the switch) and in
    stage 2 (epoch 3), resumed each time. They end with the uninterrupted run's weights, bit for bit (the
    first epoch after a resume had drawn other dropout masks: its data iterator moved torch's global RNG)."""
    data, reference = cached_recipe_runs
    expected = reference(name, recipe)
    run_dir, at_kills, resumed_log = _kill_then_resume(
        [*CACHED_RECIPE, f"data.root={data}", *recipe], tmp_path / "killed", kills
    )
    assert [at_kill["epoch"] for at_kill in at_kills] == [epoch - 1 for epoch in kills]
    assert "feature cache hit" in resumed_log  # the resumed runs trained on cached features, as the original
    final = _last(run_dir)
    assert final["epoch"] == expected["epoch"] and final["global_step"] == expected["global_step"]
    differing = [k for k, v in expected["state_dict"].items() if not torch.equal(final["state_dict"][k], v)]
    assert differing == []


def _snapshot(folder: Path, leave_out: str | None = None) -> dict[str, bytes]:
    """Every file under ``folder`` (dot folders included) by relative path, but names that start with
    ``leave_out``."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not (leave_out and p.name.startswith(leave_out))
    }


def test_last_never_resumes_a_finished_run_nor_writes_into_it(image_folder: Path, tmp_path: Path) -> None:
    """#19: a finished run on one data root, then ckpt_path=last on a copy of that root whose own run died
    before its first last.ckpt: refused, naming the finished run, which stays byte for byte as it was
    (metrics.json, splits.csv, train.log, .hydra/); no stray run dir is left."""
    common = [*SMALL, "trainer.max_epochs=1", "test=false", *QUIET, f"paths.root_dir={tmp_path}"]
    base = run_cli("train.py", *common, f"data.root={image_folder}", cwd=tmp_path)
    assert base.returncode == 0, base.stderr[-2000:]
    runs = tmp_path / "lightning_logs" / "runs"
    (finished,) = runs.iterdir()
    before = _snapshot(finished)
    copy = tmp_path / "k1"
    shutil.copytree(image_folder, copy)
    resumed = run_cli("train.py", *common, f"data.root={copy}", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 1
    assert "no interrupted run of this config" in resumed.stderr
    assert f"{finished} (finished (metrics.json))" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert _snapshot(finished) == before
    assert list(runs.iterdir()) == [finished]


def test_last_picks_the_newest_interrupted_run_of_the_same_config(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    """Three runs with a last.ckpt: an interrupted one of this config (the oldest), an interrupted one on
    another data root and a finished one of this config (the newest). ckpt_path=last with another lr is
    refused naming all three and why; with this config it resumes the first and leaves the others alone."""
    other_root = tmp_path / "other"
    shutil.copytree(image_folder, other_root)
    runs = tmp_path / "lightning_logs" / "runs"
    common = ("experiment=scratch_baseline", "model.scratch.widths=[8]", "test=false")
    for name, root, interrupted in (("ours", image_folder, True), ("other", other_root, True), ("done", image_folder, False)):  # fmt: skip
        train(compose_train(*common, f"paths.output_dir={runs / name}", root=root))
        if interrupted:  # killed after its last.ckpt, before it finished (metrics.json)
            (runs / name / "metrics.json").unlink()
    # TensorBoard event files left out: a finished in-process run's writer flushes whenever it is collected
    others = {name: _snapshot(runs / name, "events.out.tfevents") for name in ("other", "done")}

    with pytest.raises(ConfigError, match="no interrupted run of this config") as refused:
        train(compose_train(*common, "optimizer.lr=1e-4", "ckpt_path=last", root=image_folder))
    message = str(refused.value)
    assert f"{runs / 'done'} (finished (metrics.json))" in message
    assert f"{runs / 'other'} (another config: data.root: '{other_root}'" in message
    assert f"{runs / 'ours'} (another config: optimizer.lr:" in message

    _, metrics = train(compose_train(*common, "trainer.max_epochs=2", "ckpt_path=last", root=image_folder))
    assert metrics["run_dir"] == str(runs / "ours")
    assert _last(runs / "ours")["epoch"] == 1
    for name, files in others.items():
        now = _snapshot(runs / name, "events.out.tfevents")
        assert sorted(now) == sorted(files), name
        assert [path for path in files if now[path] != files[path]] == [], name


def test_a_refused_resume_leaves_the_run_and_its_splits_as_they_were(tmp_path: Path) -> None:
    """#19: a two-stage run on a flat tree (foodvision writes its splits.csv) SIGKILLed after its first
    epoch; a class folder is added and the run resumed by path: refused (other classes), and nothing in the
    run changed: splits.csv, train.log and .hydra/ byte for byte, no new file."""
    flat = tmp_path / "flat"
    make_class_tree(flat, ["apple_pie", "baklava", "bibimbap"], 12)
    common = [
        "data=imagefolder", f"data.root={flat}", "data.image_size=64", "data.batch_size=8", "data.num_workers=0",
        "model=mobilenetv2_ft", "callbacks.finetune.stage1_epochs=1", "trainer.max_epochs=2", "test=false",
        f"paths.root_dir={tmp_path}", *QUIET,
    ]  # fmt: skip
    kill = ["+callbacks.killer._target_=tests.killer.KillAt", "+callbacks.killer.epoch=1"]
    assert run_cli("train.py", *common, *kill, cwd=ROOT).returncode == -9
    (run_dir,) = (tmp_path / "lightning_logs" / "runs").iterdir()
    before = _snapshot(run_dir)
    assert "splits.csv" in before
    make_class_tree(flat, ["churros"], 12, start_seed=500)
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = run_cli("train.py", *common, f"ckpt_path={last}", cwd=tmp_path)
    assert resumed.returncode == 1 and "classes differ" in resumed.stderr, resumed.stderr[-2000:]
    assert _snapshot(run_dir) == before
    assert [p.name for p in (tmp_path / "lightning_logs" / "runs").iterdir()] == [run_dir.name]


def test_runs_started_in_the_same_second_get_their_own_dirs(image_folder: Path, tmp_path: Path) -> None:
    """#19: two train.py runs whose run-dir names collide (same time and network: the name is given here,
    as if both started in the same second) run at once; each gets its own dir and its own record
    (config.yaml, hparams.yaml, metrics.json), the second one's name a suffix of the first's."""
    same = "hydra.run.dir='${fv_run_dir:${ckpt_path},${paths.log_dir},${paths.log_dir}/runs/same-second}'"
    common = [*SMALL, f"data.root={image_folder}", "trainer.max_epochs=1", "test=false", *QUIET, same]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    lrs = ("0.01", "1e-05")
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "train.py"),
                *common,
                f"paths.root_dir={tmp_path}",
                f"optimizer.lr={lr}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for lr in lrs
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-2000:]
    runs = tmp_path / "lightning_logs" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["same-second", "same-second-2"]
    seen = set()
    for run_dir in runs.iterdir():
        config = OmegaConf.load(run_dir / "config.yaml")
        hparams = OmegaConf.load(run_dir / "hparams.yaml")
        assert float(hparams.lr) == float(config.optimizer.lr)
        assert json.loads((run_dir / "metrics.json").read_text())["run_dir"] == str(run_dir)
        seen.add(float(config.optimizer.lr))
    assert seen == {float(lr) for lr in lrs}


def test_unique_run_dir_is_an_exclusive_create_per_process(tmp_path: Path) -> None:
    """Two processes asking for the same run-dir name get two dirs; one process asking twice (Hydra
    resolves hydra.run.dir more than once) gets the same one."""
    base = str(tmp_path / "runs" / "2026-01-01_00-00-00_mobilenetv2")
    code = f"from foodvision.training.resume import unique_run_dir as u; print(u({base!r}), u({base!r}) == u({base!r}))"
    answers = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() for _ in range(2)]  # fmt: skip
    assert [a[0] for a in answers] == [base, f"{base}-2"] and all(a[1] == "True" for a in answers)
    assert all(Path(a[0]).is_dir() for a in answers)
