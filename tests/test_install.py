"""A wheel of the checkout, installed non-editable, works from another directory: it ships ``conf/`` as
``foodvision/conf`` (setup.py), and its ``foodvision-train`` prints its help and trains a fast dev run."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT, TINY_RUN_SETTINGS, make_class_tree

# What a wheel is built from (README.md: the long description); src/ and conf/ are copied beside them.
PACKAGING_FILES = ("pyproject.toml", "setup.py", "README.md")
TOOLS = ("train", "eval", "predict", "export", "serve", "compare", "audit")
# Building a wheel and a run from it take about a minute: `make test-all` (CI) runs them.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's wheel, built from a copy of it, so the build leaves nothing in the repository."""
    source = tmp_path_factory.mktemp("source")
    for name in PACKAGING_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for folder in ("src", "conf"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    result = subprocess.run(
        [*build, "-w", str(out), str(source)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = out.glob("foodvision-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into its own folder: a pure-Python wheel's install is its files unpacked (no pip,
    which could touch the editable install of this environment)."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def console_script(site: Path, name: str) -> str:
    """``module:function`` of a console script the installed wheel declares."""
    (entry_points,) = site.glob("foodvision-*.dist-info/entry_points.txt")
    parser = configparser.ConfigParser()
    parser.read(entry_points)
    return parser["console_scripts"][name]


def run_installed(site: Path, script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """What the installed console script ``script`` runs, with only the wheel's foodvision importable: the
    wheel's folder comes first on the path, and the run says where foodvision and its config came from."""
    module, function = console_script(site, script).split(":")
    code = (
        "import sys, importlib, foodvision, foodvision.config as c\n"
        "print('foodvision from', foodvision.__file__, 'config', c.CONFIG_DIR, file=sys.stderr)\n"
        f"sys.argv[0] = {script!r}\n"
        f"sys.exit(getattr(importlib.import_module({module!r}), {function!r})())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    for name in ("FOODVISION_ROOT", "FOODVISION_CACHE", "HYDRA_FULL_ERROR"):
        env.pop(name, None)  # paths.root_dir is the working directory
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert f"foodvision from {site / 'foodvision' / '__init__.py'} config {site / 'foodvision' / 'conf'}" in (
        result.stderr
    ), result.stderr[-3000:]  # the wheel's copy, not the checkout's
    return result


def test_wheel_ships_every_config_file_and_a_console_script_per_tool(wheel: Path, site: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("foodvision/conf/")}
    expected = {
        f"foodvision/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert (
        "foodvision/conf/train.yaml" in expected and "foodvision/conf/hydra/launcher/slurm.yaml" in expected
    )
    assert shipped == expected
    for tool in TOOLS:
        assert console_script(site, f"foodvision-{tool}") == f"foodvision.cli.{tool}:main"


def test_installed_wheel_trains_from_another_directory(site: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    helped = run_installed(site, "foodvision-train", "--help", cwd=elsewhere)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "== Configuration groups ==" in helped.stdout and "experiment:" in helped.stdout

    data = tmp_path / "food3"
    for split, count, seed in (("train", 4, 0), ("validation", 2, 100), ("test", 2, 200)):
        make_class_tree(data / split, ["apple_pie", "baklava", "bibimbap"], count, start_seed=seed)
    result = run_installed(
        site, "foodvision-train", "debug=fdr", *TINY_RUN_SETTINGS, f"data.root={data}", cwd=elsewhere
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (elsewhere / "lightning_logs" / "runs").iterdir()  # under the working directory
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "metrics.json").is_file()
    assert (run_dir / "train.log").is_file()
