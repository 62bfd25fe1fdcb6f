"""``python -m foodvision.data catalogue|prepare`` on tiny generated trees."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SRC_DIR = Path(__file__).resolve().parents[1] / "src"
try:
    import foodvision  # noqa: F401
except ImportError:  # not installed: run from the checkout
    sys.path.insert(0, str(SRC_DIR))

from foodvision.data.__main__ import main  # noqa: E402

RNG = np.random.default_rng(0)
BAD = {"corrupt.jpg", "truncated.jpg"}


def noise(width: int, height: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def jpeg_bytes(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(width, height)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_flat_tree(root: Path) -> Path:
    """apple: 8 mixed files + 2 bad ones; banana: 6 of odd modes; cherry: 3 (imbalanced)."""
    apple, banana, cherry = (root / c for c in ("apple", "banana", "cherry"))
    for folder in (apple, banana, cherry):
        folder.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(noise(48, 32)).save(apple / f"a{i}.jpg")
    Image.fromarray(noise(32, 32, 1), "L").save(apple / "gray.jpg")
    Image.fromarray(noise(32, 40, 4), "RGBA").save(apple / "alpha.png")
    Image.fromarray(noise(16, 24)).save(apple / "small.png")  # shorter side 16: never upscaled
    (apple / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    data = jpeg_bytes()
    (apple / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (apple / "notes.txt").write_text("not an image")
    for i in range(3):
        Image.fromarray(noise(40, 32)).save(banana / f"b{i}.png")
    Image.new("CMYK", (32, 36), (10, 20, 30, 40)).save(banana / "cmyk.jpg")
    Image.fromarray((RNG.integers(0, 65535, (32, 32))).astype(np.uint16)).save(banana / "deep.png")
    Image.fromarray(noise(32, 32, 1), "L").save(banana / "gray.png")
    for i in range(3):
        Image.fromarray(noise(32, 48)).save(cherry / f"c{i}.jpg")
    return root


def make_food101(root: Path) -> Path:
    classes = ["pizza", "sushi"]
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    lists = {"train": [], "test": []}
    for c in classes:
        (root / "images" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(noise(40, 32)).save(root / "images" / c / f"{i}.jpg")
            lists["train" if i < 7 else "test"].append(f"{c}/{i}")
    (root / "images" / "sushi" / "9.jpg").write_bytes(b"garbage")
    for name, lines in lists.items():
        (root / "meta" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    return make_flat_tree(tmp_path_factory.mktemp("flat") / "src")


@pytest.fixture(scope="module")
def food101(tmp_path_factory) -> Path:
    return make_food101(tmp_path_factory.mktemp("food") / "food-101")


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def split_sets(dst: Path) -> dict[str, set[tuple[str, str]]]:
    """(class, source file name) per split, from DST/splits.csv."""
    result: dict[str, set[tuple[str, str]]] = {}
    for row in read_csv(dst / "splits.csv"):
        result.setdefault(row["split"], set()).add((row["class"], Path(row["source"]).name))
    return result


def prepare(src: Path, dst: Path, *args: str) -> int:
    return main(["prepare", str(src), str(dst), "--workers", "2", *args])


# --- catalogue -------------------------------------------------------------------------------------------


def test_catalogue_rows_and_summary(flat, tmp_path, capsys):
    out = tmp_path / "cat.csv"
    assert main(["catalogue", str(flat), "--out", str(out)]) == 0
    rows = {row["path"]: row for row in read_csv(out)}
    assert list(read_csv(out)[0]) == (
        "path class split format width height mode channels bytes readable error".split()
    )
    assert len(rows) == 20  # every file, the text file included
    assert rows["apple/a0.jpg"] | {"bytes": ""} == dict(
        path="apple/a0.jpg", split="", format="JPEG", width="48", height="32", mode="RGB", channels="3",
        bytes="", readable="true", error="", **{"class": "apple"},
    )  # fmt: skip
    assert int(rows["apple/a0.jpg"]["bytes"]) == (flat / "apple" / "a0.jpg").stat().st_size
    expected = {
        "apple/gray.jpg": ("L", "1"),
        "apple/alpha.png": ("RGBA", "4"),
        "banana/cmyk.jpg": ("CMYK", "4"),
        "banana/deep.png": ("I;16", "1"),
    }
    for path, (mode, channels) in expected.items():
        assert (rows[path]["mode"], rows[path]["channels"], rows[path]["readable"]) == (
            mode,
            channels,
            "true",
        )
    for name in BAD:
        assert rows[f"apple/{name}"]["readable"] == "false"
        assert rows[f"apple/{name}"]["error"]
    assert "truncated" in rows["apple/truncated.jpg"]["error"]
    assert rows["apple/notes.txt"]["readable"] == "false"

    printed = capsys.readouterr().out
    assert "flat class-per-folder tree" in printed
    table = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.split()}
    assert table["apple"] == ["8", "8"] and table["banana"] == ["6", "6"] and table["cherry"] == ["3", "3"]
    assert "formats: JPEG=10, PNG=7" in printed
    assert "channels: 3=12, 1=3, 4=2" in printed and "CMYK=1" in printed and "I;16=1" in printed
    assert "width: 16 / 32 / 48" in printed
    assert "unreadable files: 2" in printed
    assert "apple/corrupt.jpg" in printed and "apple/truncated.jpg" in printed
    assert str(out.resolve()) in printed


def test_catalogue_split_tree_and_default_out(flat, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "split"
    assert prepare(flat, dst) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["catalogue", str(dst)]) == 0
    rows = read_csv(tmp_path / "catalogue.csv")
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    assert all(row["path"].split("/")[0] in {"train", "validation", "test"} for row in rows)
    assert "train/validation/test tree" in capsys.readouterr().out


def test_catalogue_food101_uses_meta_lists(food101, tmp_path, capsys):
    out = tmp_path / "food.csv"
    assert main(["catalogue", str(food101), "--out", str(out)]) == 0
    rows = {row["path"]: row for row in read_csv(out)}
    assert len(rows) == 20
    assert rows["images/pizza/0.jpg"]["split"] == "train" and rows["images/pizza/8.jpg"]["split"] == "test"
    assert rows["images/sushi/9.jpg"]["readable"] == "false"
    assert "Food-101 archive" in capsys.readouterr().out


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["catalogue", str(tmp_path / "missing")]) == 2
    assert main(["catalogue", str(tmp_path)]) == 2  # empty tree
    assert main(["prepare", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(tmp_path), str(tmp_path / "out"), "--fractions", "0.5", "0.5", "0.5"])
    assert exit_info.value.code == 2


# --- prepare ---------------------------------------------------------------------------------------------


def test_prepare_fractions_stratified_and_seeded(flat, tmp_path, capsys):
    before = tree_hash(flat)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert prepare(flat, a) == 0
    printed = capsys.readouterr().out
    assert prepare(flat, b) == 0
    assert prepare(flat, c, "--seed", "7") == 0
    assert tree_hash(flat) == before  # SRC untouched

    sets = split_sets(a)
    assert set(sets) == {"train", "val", "test"}
    for split in sets.values():
        assert {cls for cls, _ in split} == {"apple", "banana", "cherry"}
    everything = [item for split in sets.values() for item in split]
    assert len(everything) == len(set(everything)) == 8 + 6 + 3  # no file in two splits, bad ones left out
    assert sum(1 for cls, _ in everything if cls == "apple") == 8
    assert sets == split_sets(b)
    assert sets != split_sets(c)

    for row in read_csv(a / "splits.csv"):
        dest = a / row["dest"]
        assert dest.parts[-3] == {"train": "train", "val": "validation", "test": "test"}[row["split"]]
        assert dest.read_bytes() == Path(row["source"]).read_bytes()  # byte-for-byte copy
    for name in (*BAD, "notes.txt"):
        assert not list(a.rglob(name))
    bad_lines = (a / "bad_files.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in bad_lines) == sorted(BAD)
    assert "unreadable files left out: 2" in printed and "corrupt.jpg" in printed
    assert "validation" in printed and "total" in printed


def test_prepare_counts_subset_and_refuses_non_empty(flat, tmp_path, capsys):
    dst = tmp_path / "out"
    assert prepare(flat, dst, "--counts", "2", "1", "1", "--classes", "apple", "banana") == 0
    rows = read_csv(dst / "splits.csv")
    counts = {(r["split"], r["class"]) for r in rows}
    assert len(rows) == 8 and len(counts) == 6
    assert sorted(p.name for p in (dst / "train").iterdir()) == ["apple", "banana"]
    for cls in ("apple", "banana"):
        assert [r["split"] for r in rows if r["class"] == cls].count("train") == 2
    capsys.readouterr()

    assert prepare(flat, dst) == 2
    assert "not empty" in capsys.readouterr().err
    assert prepare(flat, dst, "--overwrite") == 0
    assert len(read_csv(dst / "splits.csv")) == 17
    assert len([p for p in (dst / "train").rglob("*") if p.is_file()]) == len(split_sets(dst)["train"])

    assert prepare(flat, tmp_path / "x", "--classes", "durian") == 2
    assert prepare(flat, flat / "inside") == 2  # DST inside SRC
    assert not (flat / "inside").exists()


def test_prepare_counts_fewer_than_requested_is_proportional(flat, tmp_path, capsys):
    dst = tmp_path / "out"
    assert prepare(flat, dst, "--counts", "4", "2", "2", "--classes", "cherry") == 0
    assert {s: len(v) for s, v in split_sets(dst).items()} == {"train": 1, "val": 1, "test": 1}
    assert "fewer than the 8 requested" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_prepare_class_map(flat, tmp_path, kind):
    mapping = {"apple": "mela", "banana": "fruit", "cherry": "fruit"}
    path = tmp_path / f"map.{kind}"
    if kind == "json":
        path.write_text(json.dumps(mapping))
    else:
        path.write_text("old,new\n" + "".join(f"{k},{v}\n" for k, v in mapping.items()))
    dst = tmp_path / "out"
    assert prepare(flat, dst, "--class-map", str(path)) == 0
    assert sorted(p.name for p in (dst / "train").iterdir()) == ["fruit", "mela"]
    assert sum(1 for r in read_csv(dst / "splits.csv") if r["class"] == "fruit") == 9

    bad_map = tmp_path / "bad.json"
    bad_map.write_text(json.dumps({"cane": "dog"}))
    assert prepare(flat, tmp_path / "other", "--class-map", str(bad_map)) == 2


def test_prepare_rgb_resize(flat, tmp_path):
    dst = tmp_path / "out"
    assert prepare(flat, dst, "--rgb", "--resize-shorter", "20", "--jpeg-quality", "80") == 0
    files = [p for p in dst.rglob("*") if p.is_file() and p.name not in {"splits.csv", "bad_files.txt"}]
    assert len(files) == 17
    for path in files:
        with Image.open(path) as image:
            assert (image.format, image.mode, path.suffix) == ("JPEG", "RGB", ".jpg")
            assert min(image.size) == (16 if path.stem == "small" else 20)
    assert len({p.stem for p in files if p.parent.name == "apple"}) == 8


def test_prepare_resize_keeps_format_without_rgb(flat, tmp_path):
    dst = tmp_path / "out"
    assert prepare(flat, dst, "--resize-shorter", "20", "--classes", "banana") == 0
    modes = {}
    for path in (p for p in dst.rglob("*") if p.parent.name == "banana"):
        with Image.open(path) as image:
            modes[path.name] = (image.format, image.mode, min(image.size))
    assert modes["cmyk.jpg"] == ("JPEG", "CMYK", 20)
    assert modes["deep.png"] == ("PNG", "I;16", 20)


def test_prepare_split_tree_keeps_existing_splits(flat, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert prepare(flat, first, "--classes", "apple", "banana") == 0
    os.rename(first / "validation", first / "val")
    assert prepare(first, second, "--seed", "99") == 0
    names = {s: {name for _, name in v} for s, v in split_sets(first).items()}
    assert {s: {name for _, name in v} for s, v in split_sets(second).items()} == names


def test_prepare_food101(food101, tmp_path, capsys):
    dst = tmp_path / "out"
    assert prepare(food101, dst) == 0
    sets = split_sets(dst)
    official_test = {(c, f"{i}.jpg") for c in ("pizza", "sushi") for i in (7, 8, 9)} - {("sushi", "9.jpg")}
    assert sets["test"] == official_test  # the whole official test list, the bad file left out
    assert {s: len(v) for s, v in sets.items()} == {"train": 12, "val": 2, "test": 5}
    assert all(int(name.split(".")[0]) < 7 for s in ("train", "val") for _, name in sets[s])
    assert "sushi/9.jpg" in (dst / "bad_files.txt").read_text()
    assert "official test list kept" in capsys.readouterr().out

    assert prepare(food101, tmp_path / "b", "--counts", "4", "2", "5") == 0
    sets = split_sets(tmp_path / "b")
    assert sets["test"] == official_test  # fewer than 5 per class: all of them
    assert {s: len(v) for s, v in sets.items()} == {"train": 8, "val": 4, "test": 5}
    assert all(int(name.split(".")[0]) < 7 for s in ("train", "val") for _, name in sets[s])


def test_module_help_subprocess():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "foodvision.data", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0
    assert "catalogue" in result.stdout and "prepare" in result.stdout
